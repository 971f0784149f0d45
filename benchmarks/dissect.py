"""Benchmark: the fast dissection tally against a straightforward per-image, per-unit reference.

Both read the same stored activations (``activations.h5``: random ReLU-like maps with ResNet18's
layer3/layer4 shapes at a 224-pixel input) and the same label planes of a synthetic Broden-format
set (224-pixel images, 112 x 112 label maps, as broden1_224). The thresholds are the exact
``1 - 0.005`` quantiles (pass 1, timed too).

- reference: NetDissect-Lite's ``tally_job`` loop — per image, per unit: skip the map when its
  maximum is below the threshold, otherwise upsample it (torch's bilinear in float64, one map at a
  time, as NetDissect-Lite's ``imresize``; PIL's float ``resize`` costs the same, ~35 us a map),
  ``argwhere`` the mask and ``bincount`` the labels under it on every plane, in numpy;
- fast: :class:`neurosem.dissect.tally.Tally` (batched, on the device), per layer with the
  layer's own label preparation; then all layers at once with the labels of a
  batch prepared once (:meth:`Tally.labels`), as ``dissect()`` runs, against the sum of the
  layers' reference times.

Both are timed as the best of 3 passes. The two must give identical tallies on the images the
reference sees (checked, printed). Target:
the fast tally is >= 20x faster on the CPU. Then peak memory of a full ``dissect()`` run (both
passes and the reports, in a fresh process each) for two dataset sizes: it must not grow with the
number of images.

Usage: python benchmarks/dissect.py [--quick] [--device auto] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS = {"layer3": (256, 14), "layer4": (512, 7)}   # C, H = W at a 224-pixel input
TARGET = 20.0


def write_store(path: Path, ids: list[str], seed: int = 0, batch: int = 64) -> None:
    """Random ReLU-like activations (smooth maps, per-unit scale and offset), float16."""
    import torch
    import torch.nn.functional as F

    from neurosem.store import ActivationStore

    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    shapes = {name: (c, h, h) for name, (c, h) in LAYERS.items()}
    prov = {"model": "random-relu", "weights": "none", "data": "synthetic", "n_images": n}
    store = ActivationStore.create(path, shapes, n, provenance=prov)
    try:
        for s in range(0, n, batch):
            b = min(batch, n - s)
            acts = {}
            for name, (c, h) in LAYERS.items():
                noise = torch.randn(b, c, h + 2, h + 2, generator=g)
                smooth = F.avg_pool2d(noise, 3, stride=1)
                scale = 0.5 + torch.rand(1, c, 1, 1, generator=torch.Generator().manual_seed(seed + c))
                acts[name] = torch.relu(smooth * scale * 2 - 0.3).half().numpy()
            store.append(acts, ids[s:s + b])
        store.mark_complete()
    finally:
        store.close()


def reference_tally(acts: np.ndarray, seg: np.ndarray, img: np.ndarray, thr: np.ndarray,
                    primary: np.ndarray, n_categories: int):
    """NetDissect-Lite's tally_job, image by image and unit by unit (numpy + one-map upsampling)."""
    import torch
    import torch.nn.functional as F

    n_img, c = acts.shape[:2]
    n_labels = primary.shape[0]
    sh, sw = seg.shape[-2:]
    labelcat = np.zeros((n_labels, n_categories), dtype=np.int64)
    ok = primary >= 0
    labelcat[np.flatnonzero(ok), primary[ok]] = 1
    gt = np.zeros(n_labels, dtype=np.int64)
    both = np.zeros((c, n_labels), dtype=np.int64)
    act = np.zeros((c, n_categories), dtype=np.int64)
    for i in range(n_img):
        pixels = seg[i]
        scalars = [int(x) for x in img[i] if x]
        for s in scalars:
            gt[s] += sh * sw
        tally_label = np.bincount(pixels.ravel())
        tally_label[0] = 0
        gt[:len(tally_label)] += tally_label
        for u in range(c):
            fmap = acts[i, u].astype(np.float64)
            if not fmap.max() > thr[u]:
                continue
            up = F.interpolate(torch.from_numpy(fmap)[None, None], size=(sh, sw), mode="bilinear",
                               align_corners=False)[0, 0].numpy()
            idx = np.argwhere(up > thr[u])
            bt = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(), minlength=1)
            bt[0] = 0
            cat = bt @ labelcat[:len(bt)]
            both[u, :len(bt)] += bt
            for s in scalars:
                cat = cat + labelcat[s]
                both[u, s] += len(idx)
            act[u] += len(idx) * (cat > 0)
    return gt, both, act


def load_labels(ds, n: int):
    seg = np.stack([ds.load_seg(i) for i in range(n)])
    img = np.stack([ds.load_image_labels(i) for i in range(n)])
    return seg, img


def speed(root: Path, store_path: Path, n_ref: int, device: str, batch: int = 64, repeat: int = 3) -> bool:
    """Per layer: the fast tally (best of ``repeat`` passes over all images, labels prepared by
    the layer's own tally) and the reference (best of ``repeat`` passes over ``n_ref`` images); then all layers at once, the
    labels prepared once per batch for every layer as :func:`neurosem.dissect.dissect` does."""
    import torch

    from neurosem._device import resolve_device
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect.quantile import TopQuantile
    from neurosem.dissect.tally import Tally
    from neurosem.store import ActivationStore

    dev = resolve_device(device)
    ds = BrodenDataset(root)
    k = len(ds.categories)
    store = ActivationStore.open(store_path)
    n = store.n_done
    seg_all, img_all = load_labels(ds, n)
    seg_t = torch.from_numpy(seg_all)
    img_t = torch.from_numpy(img_all)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"{n} images, labels {ds.seg_size[0]}x{ds.seg_size[1]}, {ds.max_planes} planes, "
          f"{len(ds.categories)} categories, device {dev}")
    print(f"{'layer':8s} {'units':>5s} {'map':>6s} {'pass 1 img/s':>13s} {'fast img/s':>11s} "
          f"{'reference img/s':>16s} {'ratio':>7s} {'agree':>6s}")
    all_ok = True
    thresholds, acts = {}, {}
    t_ref_total = 0.0                        # reference seconds per image, all layers
    for name, (c, h) in LAYERS.items():
        acts_all = acts[name] = store.read(name, 0, n)
        sync()
        t0 = time.perf_counter()
        tq = TopQuantile(c, 0.005, total=n * h * h, device=dev)
        for s in range(0, n, batch):
            tq.add(torch.from_numpy(acts_all[s:s + batch]).to(dev))
        thr = thresholds[name] = tq.result()
        sync()
        t_q = time.perf_counter() - t0
        # fast tally, all images (a warm-up batch first)
        tally = Tally(thr, ds.primary_category, k, device=dev)
        tally.add(torch.from_numpy(acts_all[:batch]).to(dev), seg_t[:batch], img_t[:batch])
        t_fast = float("inf")
        for _ in range(repeat):
            tally = Tally(thr, ds.primary_category, k, device=dev)
            sync()
            t0 = time.perf_counter()
            for s in range(0, n, batch):
                tally.add(torch.from_numpy(acts_all[s:s + batch]).to(dev), seg_t[s:s + batch].to(dev),
                          img_t[s:s + batch].to(dev))
            tally.result()
            sync()
            t_fast = min(t_fast, time.perf_counter() - t0)
        # reference on the first n_ref images, and the fast tally on the same images
        thr_np = thr.numpy()
        t_ref = float("inf")
        for _ in range(repeat):                     # best of `repeat`, as the fast tally
            t0 = time.perf_counter()
            gt, both, act = reference_tally(acts_all[:n_ref], seg_all[:n_ref], img_all[:n_ref], thr_np,
                                            ds.primary_category, k)
            t_ref = min(t_ref, time.perf_counter() - t0)
        check = Tally(thr, ds.primary_category, k, device=dev)
        check.add(torch.from_numpy(acts_all[:n_ref]).to(dev), seg_t[:n_ref], img_t[:n_ref])
        agree = (np.array_equal(check.gt.cpu().numpy()[1:], gt[1:])
                 and np.array_equal(check.both[:, 1:].cpu().numpy(), both[:, 1:])
                 and np.array_equal(check.act.cpu().numpy(), act))
        all_ok &= agree
        fast_rate, ref_rate = n / t_fast, n_ref / t_ref
        t_ref_total += 1 / ref_rate
        active = float(np.mean(acts_all.reshape(n, c, -1).max(2) > thr_np.astype(np.float32)))
        print(f"{name:8s} {c:5d} {h:>3d}x{h:<2d} {n / t_q:13.0f} {fast_rate:11.1f} {ref_rate:16.2f} "
              f"{fast_rate / ref_rate:6.1f}x {'yes' if agree else 'NO':>6s}   "
              f"({active:.0%} of maps exceed the threshold)")
        ratio = fast_rate / ref_rate
        print(f"         fast / reference = {ratio:.1f}x (target >= {TARGET:.0f}x on the CPU: "
              f"{'met' if ratio >= TARGET else 'NOT met'}; ratio to target {ratio / TARGET:.2f})")
    # all layers at once: the labels of a batch checked and prepared once (as dissect() does)
    tallies = {name: Tally(thresholds[name], ds.primary_category, k, device=dev) for name in LAYERS}
    t_all = t_labels = float("inf")
    for _ in range(repeat):
        for name in LAYERS:
            tallies[name].reset()
        sync()
        t0 = time.perf_counter()
        t_lab = 0.0
        for s in range(0, n, batch):
            t1 = time.perf_counter()
            first = next(iter(tallies.values()))
            labels = first.labels(seg_t[s:s + batch].to(dev), img_t[s:s + batch].to(dev))
            sync()
            t_lab += time.perf_counter() - t1
            for name in LAYERS:
                tallies[name].add(torch.from_numpy(acts[name][s:s + batch]).to(dev), labels)
        for name in LAYERS:
            tallies[name].result()
        sync()
        t_all, t_labels = min(t_all, time.perf_counter() - t0), min(t_labels, t_lab)
    ratio = (n * t_ref_total) / t_all
    print(f"{'all':8s} {sum(c for c, _ in LAYERS.values()):5d} {'':6s} {'':13s} {n / t_all:11.1f} "
          f"{1 / t_ref_total:16.2f} {ratio:6.1f}x           (labels prepared once per batch for "
          f"both layers: {t_labels / t_all:.0%} of the fast time)")
    print(f"         fast / reference, all layers = {ratio:.1f}x (target >= {TARGET:.0f}x on the CPU: "
          f"{'met' if ratio >= TARGET else 'NOT met'}; ratio to target {ratio / TARGET:.2f})")
    for name in LAYERS:                      # the shared labels give the same tallies
        single = Tally(thresholds[name], ds.primary_category, k, device=dev)
        for s in range(0, n, batch):
            single.add(torch.from_numpy(acts[name][s:s + batch]).to(dev), seg_t[s:s + batch], img_t[s:s + batch])
        same = all(torch.equal(getattr(single, a), getattr(tallies[name], a))
                   for a in ("gt", "both", "act", "unit_pixels"))
        all_ok &= same
        if not same:
            print(f"{name}: the tallies with shared labels differ from the layer's own: NO")
    store.close()
    return all_ok


def memory_child(run: str, broden: str, device: str) -> None:
    """In a fresh process: a full dissect() (both passes and the reports); prints JSON."""
    import resource
    import tracemalloc

    import torch

    from neurosem.dissect import dissect

    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    torch.zeros(1)
    import h5py  # noqa: F401  (import cost outside the measurement)
    import matplotlib  # noqa: F401
    import seaborn  # noqa: F401
    before = rss_mb()
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    tracemalloc.start()
    t0 = time.perf_counter()
    dissect(run=run, broden=broden, device=device, batch_size=64, progress=False)
    wall = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"wall_s": wall, "rss_before_mb": before, "rss_peak_mb": peak,
           "python_peak_mb": py_peak / 2 ** 20}
    if torch.cuda.is_available() and device != "cpu":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("MEMORY " + json.dumps(out))


def memory(work: Path, broden: Path, ids: list[str], sizes: list[int], device: str,
           threads: int) -> list[dict]:
    rows = []
    for n in sizes:
        run = work / f"run_{n}"
        run.mkdir(parents=True, exist_ok=True)
        write_store(run / "activations.h5", ids[:n])
        env = dict(os.environ, NEUROSEM_NO_PROGRESS="1")
        proc = subprocess.run([sys.executable, __file__, "--memory-child", str(run), str(broden), device,
                               "--threads", str(threads)],
                              capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"memory run for {n} images failed")
        rows.append({"images": n, **json.loads(line[len("MEMORY "):])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--keep", default=None, help="keep the generated data in this directory")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the reference is single-threaded, and small "
                         "ops on a busy machine get slower with more threads)")
    ap.add_argument("--memory-child", nargs=3, metavar=("RUN", "BRODEN", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    from neurosem._device import resolve_device
    from neurosem.data.synthetic import write_synthetic_broden

    device = str(resolve_device(args.device))
    n_big, n_small, n_ref = (256, 64, 8) if args.quick else (1024, 256, 24)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="neurosem-bench-dissect-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        info = write_synthetic_broden(work / "broden", n_images=n_big, image_size=224, seg_size=112, seed=0)
        print(f"synthetic Broden: {n_big} images 224x224, labels 112x112 ({time.perf_counter() - t0:.1f} s); "
              f"torch threads: {torch.get_num_threads()}")
        store = work / "speed.h5"
        write_store(store, info.image_ids)
        ok = speed(work / "broden", store, n_ref, device)
        print()
        print(f"peak memory of a full dissect() (2 layers, {sum(c for c, _ in LAYERS.values())} units; "
              f"fresh process each; RSS includes torch itself):")
        rows = memory(work, work / "broden", info.image_ids, [n_small, n_big], device, args.threads)
        for r in rows:
            extra = f", CUDA peak {r['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in r else ""
            print(f"  {r['images']:5d} images: peak RSS {r['rss_peak_mb']:.0f} MB (before the run "
                  f"{r['rss_before_mb']:.0f} MB, +{r['rss_peak_mb'] - r['rss_before_mb']:.0f} MB), python "
                  f"allocations peak {r['python_peak_mb']:.1f} MB{extra}, {r['wall_s']:.1f} s")
        a, b = rows
        grow = (b["rss_peak_mb"] - b["rss_before_mb"]) / max(1e-9, a["rss_peak_mb"] - a["rss_before_mb"])
        print(f"  {b['images'] // a['images']}x the images -> {grow:.2f}x the peak RSS increase "
              f"({'does not grow' if grow < 1.5 else 'GROWS'} with the number of images)")
        if not ok:
            raise SystemExit("the fast tally and the reference disagree")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
