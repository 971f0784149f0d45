"""Benchmark: the whole ``dissect()`` call against a NetDissect-Lite-like reference that pays the same
costs, on a machine that is busy with something else too.

Data: a synthetic Broden-format set at broden1_224 geometry (224-pixel images, 112 x 112 label
maps), ResNet18 with random weights recorded on it (``layer1`` 64 x 56 x 56 and ``layer4`` 512 x 7 x 7,
float16), NetDissect-Lite's five categories (object, part, scene, texture, color).

- reference (per image, as NetDissect-Lite's ``tally_job``): thresholds by ``numpy.quantile`` over
  all the stored activations of a unit; then per image the label PNGs decoded from disk, and per
  unit whose map exceeds its threshold: PIL bilinear upsampling of the map (float mode), ``argwhere``
  of the mask and ``bincount`` of the labels under it on every plane, and the category hits;
- neurosem: ``dissect()`` in a fresh process (thresholds, tallies, dissect.h5, CSV, JSON, HTML and
  the summary figure; the compiled kernels load inside the call), first with an empty label cache
  (the PNGs decoded once, by worker processes), then with the cache, then with ``--no-report``;
  and the ``neurosem dissect`` command as a user runs it (process start-up included).

During every measurement ``--busy`` other processes keep CPU cores busy (default 1). The ratios are
printed against the targets (whole call >= 10x, thresholds + tally >= 20x); the IoU of both is
compared (they differ only where PIL's float32 upsampling and the exact float64 one fall on
different sides of a threshold). Then the peak memory of ``dissect()`` at two dataset sizes: it
must not grow with the number of images. On a GPU the same call runs with ``--device cuda`` too.

Usage: python benchmarks/dissect.py [--images 800] [--busy 1] [--keep DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CATEGORIES = ["object", "part", "scene", "texture", "color"]
LAYERS = ["layer1", "layer4"]


def _spin(stop: "mp.synchronize.Event") -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF


class Busy:
    """``n`` CPU-bound processes running while the block runs."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> "Busy":
        self.stop = mp.Event()
        self.procs = [mp.Process(target=_spin, args=(self.stop,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.procs:
            p.join()


def lite_like(store_path: Path, root: Path, layers: list[str], categories: list[str], q: float = 0.005,
              batch: int = 64) -> dict:
    """The reference: numpy quantiles, then per image PNG labels, PIL upsampling and bincounts."""
    from PIL import Image

    from neurosem.data.broden import BrodenDataset
    from neurosem.store import ActivationStore

    t0 = time.perf_counter()
    ds = BrodenDataset(root, categories=categories, with_labels=True)
    st = ActivationStore.open(store_path)
    n = st.n_done
    thr = {}
    for name in layers:
        _, c, h, w = st.shape(name)
        vals = np.empty((c, n * h * w), dtype=np.float32)
        for s in range(0, n, batch):
            a = st.read(name, s, min(n, s + batch))
            vals[:, s * h * w:(s + a.shape[0]) * h * w] = a.transpose(1, 0, 2, 3).reshape(c, -1)
        thr[name] = np.quantile(vals, 1 - q, axis=1)
        del vals
    t1 = time.perf_counter()
    nl, k = ds.n_labels, len(ds.categories)
    prim = ds.primary_category
    labelcat = np.zeros((nl, k), dtype=np.int64)
    ok = prim >= 0
    labelcat[np.flatnonzero(ok), prim[ok]] = 1
    sh, sw = ds.seg_size
    gt = np.zeros(nl, dtype=np.int64)
    both = {name: np.zeros((st.shape(name)[1], nl), dtype=np.int64) for name in layers}
    act = {name: np.zeros((st.shape(name)[1], k), dtype=np.int64) for name in layers}
    t_labels = 0.0
    for s in range(0, n, batch):
        e = min(n, s + batch)
        acts = {name: st.read(name, s, e) for name in layers}
        for i in range(s, e):
            ta = time.perf_counter()
            pixels = ds.load_seg(i)
            scalars = [int(x) for x in ds.load_image_labels(i) if x]
            t_labels += time.perf_counter() - ta
            for sc in scalars:
                gt[sc] += sh * sw
            counts = np.bincount(pixels.ravel(), minlength=nl)
            counts[0] = 0
            gt += counts
            for name in layers:
                a, t = acts[name][i - s], thr[name]
                for u in range(a.shape[0]):
                    fmap = a[u]
                    if not fmap.max() > t[u]:
                        continue
                    up = np.asarray(Image.fromarray(fmap.astype(np.float32), mode="F").resize((sw, sh), Image.BILINEAR))
                    idx = np.argwhere(up > t[u])
                    bt = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(), minlength=nl)
                    bt[0] = 0
                    cat = bt @ labelcat
                    both[name][u] += bt
                    for sc in scalars:
                        cat = cat + labelcat[sc]
                        both[name][u, sc] += len(idx)
                    act[name][u] += len(idx) * (cat > 0)
    t2 = time.perf_counter()
    st.close()
    cols = np.flatnonzero(gt > 0)
    cols = cols[cols > 0]
    iou = {name: both[name][:, cols] / (act[name][:, prim[cols]] + gt[cols] - both[name][:, cols] + 1e-10)
           for name in layers}
    return {"thresholds_s": t1 - t0, "tally_s": t2 - t1 - t_labels, "labels_s": t_labels, "total_s": t2 - t0,
            "labels": cols, "iou": iou}


def _child(run: str, broden: str, device: str, report: bool, threads: int | None = None) -> None:
    """In a fresh process: one dissect() call; prints JSON (wall time, stages, peak RSS)."""
    from neurosem.dissect import dissect

    def hwm_mb() -> float:
        # VmHWM: this process's peak (ru_maxrss would carry the parent's peak over the exec)
        with open("/proc/self/status") as fh:
            return next(int(x.split()[1]) for x in fh if x.startswith("VmHWM")) / 1024

    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    before = rss_mb()
    t0 = time.perf_counter()
    dis = dissect(run=run, broden=broden, categories=CATEGORIES, device=device, progress=False, report=report,
                  threads=threads)
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "stages": dis.timings, "rss_before_mb": before,
           "rss_peak_mb": hwm_mb(),
           "torch_imported": "torch" in sys.modules}
    print("RESULT " + json.dumps(out))


def run_child(run: Path, broden: Path, device: str = "auto", report: bool = True, fresh: bool = True,
              env: dict | None = None, threads: int = 0) -> dict:
    if fresh and (run / "dissect.h5").exists():
        (run / "dissect.h5").unlink()
    proc = subprocess.run([sys.executable, __file__, "--child", str(run), str(broden), device,
                           "report" if report else "no-report", str(threads)], capture_output=True, text=True,
                          env={**os.environ, "NEUROSEM_NO_PROGRESS": "1", **(env or {})})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"dissect child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def copy_prefix(src: Path, dst: Path, n: int) -> None:
    """A run whose store holds the first ``n`` images of ``src``'s."""
    from neurosem.store import ActivationStore

    dst.mkdir(parents=True, exist_ok=True)
    with ActivationStore.open(src / "activations.h5") as a:
        shapes = {name: a.shape(name)[1:] for name in a.layers}
        prov = dict(a.provenance, n_images=n)
        out = ActivationStore.create(dst / "activations.h5", shapes, n, provenance=prov)
        try:
            for s, batch in a.iter_batches(a.layers, 64, stop=n):
                out.append(batch, a.image_ids[s:s + next(iter(batch.values())).shape[0]])
            out.mark_complete()
        finally:
            out.close()
    shutil.copy(src / "run.json", dst / "run.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--busy", type=int, default=1, help="CPU-bound processes running meanwhile (default 1)")
    ap.add_argument("--quick", action="store_true", help="200 images (a smoke run)")
    ap.add_argument("--keep", default=None, help="keep the data in this directory (and reuse it)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.child[2], args.child[3] == "report", int(args.child[4]) or None)
        return
    n = 200 if args.quick else args.images
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="neurosem-bench-dissect-"))
    work.mkdir(parents=True, exist_ok=True)
    broden, run = work / "broden", work / "run"
    cache = work / "cache"
    os.environ["NEUROSEM_CACHE_DIR"] = str(cache)
    try:
        from neurosem.data.synthetic import write_synthetic_broden

        if not (broden / "index.csv").exists():
            write_synthetic_broden(broden, n_images=n, image_size=224, seg_size=112, seed=0)
        if not (run / "activations.h5").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "neurosem", "record", "resnet18", "--weights", "none",
                            "--data", str(broden), "--layers", ",".join(LAYERS), "--run", str(run), "-q"],
                           check=True, env={**os.environ, "NEUROSEM_NO_PROGRESS": "1"}, capture_output=True)
            print(f"recorded ResNet18 (random weights) {','.join(LAYERS)} on {n} images in "
                  f"{time.perf_counter() - t0:.0f} s")
        print(f"{n} images 224x224, labels 112x112, categories {','.join(CATEGORIES)}; "
              f"{os.cpu_count()} CPU cores, {args.busy} busy process(es) running during every measurement")
        with Busy(args.busy):
            ref = lite_like(run / "activations.h5", broden, LAYERS, CATEGORIES)
            warm0 = run_child(run, broden)               # neurosem right after the reference
            shutil.rmtree(cache, ignore_errors=True)
            cold = run_child(run, broden)                # builds the label cache and the thumbnails
            warm = run_child(run, broden)
            bare = run_child(run, broden, report=False)
            by_threads = {t: run_child(run, broden, report=False, threads=t) for t in (1, os.cpu_count() or 1)}
            t0 = time.perf_counter()
            (run / "dissect.h5").unlink()
            subprocess.run([sys.executable, "-m", "neurosem", "dissect", "--broden", str(broden), "--run", str(run),
                            "--categories", ",".join(CATEGORIES), "-q"], check=True, capture_output=True,
                           env={**os.environ, "NEUROSEM_NO_PROGRESS": "1"})
            cli = time.perf_counter() - t0
            ref2 = lite_like(run / "activations.h5", broden, LAYERS, CATEGORIES)    # the load may drift:
        first = ref["total_s"]
        for key in ("thresholds_s", "tally_s", "labels_s", "total_s"):             # the mean of two runs
            ref[key] = (ref[key] + ref2[key]) / 2
        print(f"reference runs (first and last): {first:.2f} s and {ref2['total_s']:.2f} s; neurosem warm "
              f"runs: {warm0['wall_s']:.2f} s and {warm['wall_s']:.2f} s (the faster is reported)")
        if warm0["wall_s"] < warm["wall_s"]:
            warm = warm0
        from neurosem.dissect import load_dissection

        dis = load_dissection(run)
        diffs, equal = [], 0
        for name in LAYERS:
            assert dis.label_numbers.tolist() == ref["labels"].tolist(), "label columns differ"
            d = np.abs(dis.iou(name).astype(np.float64) - ref["iou"][name])
            diffs.append(float(d.max()))
            equal += int((dis.best(name)[0] == ref["iou"][name].argmax(1)).sum())
        units = sum(dis.n_units(name) for name in LAYERS)
        cache_mb = sum(p.stat().st_size for p in (cache / "labels").rglob("*") if p.is_file()) / 2 ** 20
        ref_tt = ref["thresholds_s"] + ref["tally_s"]

        def row(name: str, sec: float, ref_s: float, target: float | None = None) -> None:
            ratio = ref_s / sec
            goal = "" if target is None else f"  (target >= {target:.0f}x: {'met' if ratio >= target else 'NOT met'})"
            print(f"  {name:44s} {sec:7.2f} s  {n / sec:8.0f} img/s  {ratio:6.1f}x{goal}")

        print(f"\nreference (NetDissect-Lite-like): {ref['total_s']:.2f} s = thresholds {ref['thresholds_s']:.2f} + "
              f"label PNGs {ref['labels_s']:.2f} + tally {ref['tally_s']:.2f} ({n / ref['total_s']:.1f} img/s)")
        print("neurosem (ratio = reference time / neurosem time):")
        st = warm["stages"]
        row("dissect(), label cache warm: whole call", warm["wall_s"], ref["total_s"], 10)
        row("  thresholds + tally", st["thresholds"] + st["tally"], ref_tt, 20)
        row("  thresholds", st["thresholds"], ref["thresholds_s"])
        row("  tally (labels from the cache)", st["tally"], ref["tally_s"] + ref["labels_s"])
        row("  reports (CSV, JSON, HTML, figure)", st["reports"], ref["total_s"])
        row("dissect(), label cache empty: whole call", cold["wall_s"], ref["total_s"])
        row("  building the label cache (once per Broden)", cold["stages"]["labels"], ref["labels_s"])
        row("dissect(--no-report), cache warm", bare["wall_s"], ref["total_s"])
        row("`neurosem dissect` command (process start-up too)", cli, ref["total_s"])
        for t, r in by_threads.items():
            row(f"  --no-report --threads {t}: thresholds + tally", r["stages"]["thresholds"] + r["stages"]["tally"], ref_tt)
        print(f"IoU against the reference: max |difference| {max(diffs):.2e}; same best label for "
              f"{equal}/{units} units (PIL upsamples in float32, neurosem exactly in float64)")
        print(f"label cache: {cache_mb:.1f} MB for {n} images ({cache_mb * 1024 / n:.1f} kB per image; "
              f"broden1_224's 63,305 images: about {cache_mb / n * 63305 / 1024:.1f} GB at this rate)")
        print(f"torch imported by dissect(): {warm['torch_imported']}")
        # memory: half the images against all of them
        half = work / "run_half"
        if not (half / "activations.h5").exists():
            copy_prefix(run, half, n // 2)
        small = run_child(half, broden)
        grow = (warm["rss_peak_mb"] - warm["rss_before_mb"]) / max(1e-9, small["rss_peak_mb"] - small["rss_before_mb"])
        print(f"peak RSS of dissect(): {n // 2} images +{small['rss_peak_mb'] - small['rss_before_mb']:.0f} MB, "
              f"{n} images +{warm['rss_peak_mb'] - warm['rss_before_mb']:.0f} MB -> {grow:.2f}x for 2x the images "
              f"({'flat' if grow < 1.3 else 'GROWS'})")
        try:
            import torch

            if torch.cuda.is_available():
                gpu = run_child(run, broden, device="cuda")
                row("dissect() on the GPU, cache warm", gpu["wall_s"], ref["total_s"])
        except ImportError:
            pass
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
