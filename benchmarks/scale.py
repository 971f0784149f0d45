"""Benchmark: the whole pipeline at growing sizes, extrapolated to Broden (63,305 images).

ResNet18 with random weights (``--weights none``) on synthetic Broden-format sets
(``neurosem.data.synthetic.write_synthetic_broden``: 224x224 images, 112x112 labels) of each size in
``--sizes``; all four default layers (layer1..layer4). Every stage runs as the command line does,
in a fresh process: ``record``, ``dissect``, ``embed --trainer fit``, ``kl``, ``figures``.

For each stage and size: wall time, peak RSS of the stage's process (VmHWM; its DataLoader
workers not included), bytes written (growth of the run directory) and, on a GPU, the peak CUDA memory torch
allocated. Then, per stage, least-squares lines ``time = a + b n`` and ``disk = a + b n`` and their
values at ``--target`` images, ``activations.h5`` per layer at that size (bytes per image x n), and
the peak memory; memory must not grow with n: a stage whose peak RSS grows by more than
``--rss-slack`` (default 25 %) from half the largest size to the largest is flagged ``GROWS`` and
the script exits 1 (below half the largest size, read-ahead buffers are still filling: ``embed``
reads the store 256 images at a time with one batch read ahead). The
load average is printed before and after each stage (a shared machine makes
the times noisy, not the memory or the bytes). The table is printed and written as JSON.

Usage: python benchmarks/scale.py [--sizes 250,500,1000,2000] [--device auto] [--keep DIR]
       [--json PATH] [--target 63305]
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

STAGES = ("record", "dissect", "embed", "kl", "figures")
BRODEN_IMAGES = 63_305
LAYERS = ("layer1", "layer2", "layer3", "layer4")

#: Runs one ``neurosem`` command in this process and appends the CUDA peak (when torch used CUDA)
#: as one JSON line to the file named by the first argument.
_CHILD = """
import json, sys
out, argv = sys.argv[1], sys.argv[2:]
from neurosem.cli import main
code = 0
try:
    main(argv)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
extra = {}
try:  # this process's own high-water mark (ru_maxrss would include the parent's at fork/exec)
    with open("/proc/self/status") as fh:
        extra["rss_peak_bytes"] = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    import resource
    extra["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
torch = sys.modules.get("torch")
if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
    extra["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
with open(out, "w") as fh:
    json.dump(extra, fh)
sys.exit(code)
"""


def tree_bytes(path: Path) -> int:
    """Sum of the sizes of the files under ``path`` (0 when it does not exist)."""
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def run_stage(argv: list[str], work: Path) -> dict:
    """Run ``neurosem ARGV`` in a fresh process: wall time, peak RSS, CUDA peak; raises on failure."""
    extra_file = work / "stage-extra.json"
    extra_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(extra_file), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read() if proc.stdout else b""
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`neurosem {' '.join(argv)}` failed ({proc.returncode}):\n{out.decode()[-3000:]}")
    return {"wall_s": wall, **json.loads(extra_file.read_text())}


def resolve_device(spec: str) -> str:
    """The device ``spec`` resolves to, asked in a child process (this one stays without torch)."""
    code = "import sys; from neurosem._device import resolve_device; print(resolve_device(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"bad --device {spec}")
    return out.stdout.strip()


def activations_per_layer(path: Path) -> dict[str, int]:
    """Bytes each layer's dataset holds in ``activations.h5``."""
    import h5py

    with h5py.File(path, "r") as f:
        return {name: int(ds.id.get_storage_size()) for name, ds in f["acts"].items()}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` -> ``(a, b)``; a negative slope is taken as 0 (``a`` = the mean)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if b < 0:                       # noise on a quantity that does not grow: flat at the mean
        b = 0.0
    return my - b * mx, b


def measure(sizes: list[int], work: Path, device: str, model: str) -> list[dict]:
    """Every stage at every size -> rows ``{images, stage, wall_s, rss_peak_bytes, bytes_written, ...}``."""
    from neurosem.data.synthetic import write_synthetic_broden

    rows = []
    for n in sizes:
        broden, run = work / f"broden{n}", work / f"run{n}"
        t0 = time.perf_counter()
        write_synthetic_broden(broden, n_images=n, image_size=224, seg_size=112, seed=0)
        print(f"\n{n} images: synthetic Broden written in {time.perf_counter() - t0:.1f} s "
              f"({tree_bytes(broden) / 1e6:.1f} MB)", flush=True)
        commands = {
            "record": ["record", model, "--weights", "none", "--data", str(broden), "--run", str(run), "-q"],
            "dissect": ["dissect", model, "--weights", "none", "--broden", str(broden), "--run", str(run), "-q"],
            "embed": ["embed", "--run", str(run), "--trainer", "fit", "-q"],
            "kl": ["kl", "--run", str(run), "-q"],
            "figures": ["figures", "--run", str(run)],
        }
        for stage in STAGES:
            argv = commands[stage]
            if stage in ("record", "dissect", "embed"):
                argv = argv + ["--device", device]
            before, load_before = tree_bytes(run), load()
            row = {"images": n, "stage": stage, **run_stage(argv, work)}
            row["bytes_written"] = tree_bytes(run) - before
            row["load"] = f"{load_before} -> {load()}"
            if stage == "record":
                row["activations_per_layer"] = activations_per_layer(run / "activations.h5")
            rows.append(row)
            cuda = f", CUDA {row['cuda_peak_bytes'] / 2**20:.0f} MiB" if "cuda_peak_bytes" in row else ""
            print(f"  {stage:<8} {row['wall_s']:7.1f} s  peak RSS {row['rss_peak_bytes'] / 2**20:6.0f} MiB"
                  f"{cuda}  wrote {row['bytes_written'] / 1e6:8.1f} MB  (load {row['load']})", flush=True)
        if n != sizes[-1]:
            shutil.rmtree(broden, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
    return rows


def extrapolate(rows: list[dict], target: int, rss_slack: float) -> dict:
    """Per stage: the time and disk lines, their value at ``target`` images, and the memory check."""
    out: dict = {"target_images": target, "stages": {}}
    for stage in STAGES:
        mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["images"])
        xs = [float(r["images"]) for r in mine]
        ta, tb = fit_line(xs, [r["wall_s"] for r in mine])
        da, db = fit_line(xs, [float(r["bytes_written"]) for r in mine])
        rss = [r["rss_peak_bytes"] for r in mine]
        # the check compares the sizes from half the largest on: below that, read-ahead buffers
        # (embed: two batches of 256 images) and caches are still filling, which is not growth
        big = [v for r, v in zip(mine, rss) if r["images"] * 2 >= mine[-1]["images"]]
        growth = big[-1] / big[0] - 1.0
        entry = {"time_s": {"a": ta, "per_image": tb, "at_target": ta + tb * target},
                 "disk_bytes": {"a": da, "per_image": db, "at_target": max(0.0, da + db * target)},
                 "rss_peak_bytes": {"measured": rss, "max": max(rss), "growth": growth,
                                    "grows": growth > rss_slack}}
        cuda = [r["cuda_peak_bytes"] for r in mine if "cuda_peak_bytes" in r]
        if cuda:
            entry["cuda_peak_bytes"] = {"measured": cuda, "max": max(cuda)}
        out["stages"][stage] = entry
    last = max((r for r in rows if r["stage"] == "record"), key=lambda r: r["images"])
    out["activations_per_layer_at_target"] = {
        layer: size / last["images"] * target for layer, size in last["activations_per_layer"].items()}
    return out


def table(rows: list[dict], fit: dict) -> str:
    sizes = sorted({r["images"] for r in rows})
    head = (f"{'stage':<8} " + " ".join(f"{f'{n} img s':>10}" for n in sizes)
            + f" {'s/1k img':>9} {'at ' + format(fit['target_images'], ','):>11}"
            + f" {'disk at target':>15} {'peak RSS MiB':>16} {'memory':>7}")
    lines = [head, "-" * len(head)]
    for stage in STAGES:
        mine = {r["images"]: r for r in rows if r["stage"] == stage}
        e = fit["stages"][stage]
        rss = "/".join(f"{v / 2**20:.0f}" for v in e["rss_peak_bytes"]["measured"])
        t_target = e["time_s"]["at_target"]
        lines.append(
            f"{stage:<8} " + " ".join(f"{mine[n]['wall_s']:>10.1f}" for n in sizes)
            + f" {e['time_s']['per_image'] * 1000:>9.2f} {_duration(t_target):>11}"
            + f" {e['disk_bytes']['at_target'] / 1e9:>12.2f} GB {rss:>16}"
            + f" {'GROWS' if e['rss_peak_bytes']['grows'] else 'flat':>7}")
    total = sum(fit["stages"][s]["time_s"]["at_target"] for s in STAGES)
    lines.append(f"{'total':<8} " + " ".join(f"{sum(r['wall_s'] for r in rows if r['images'] == n):>10.1f}"
                                             for n in sizes) + f" {'':>9} {_duration(total):>11}")
    acts = fit["activations_per_layer_at_target"]
    lines.append(f"activations.h5 at {fit['target_images']:,} images: "
                 + ", ".join(f"{layer} {v / 1e9:.1f} GB" for layer, v in acts.items())
                 + f" (total {sum(acts.values()) / 1e9:.1f} GB)")
    peak = max(fit["stages"].values(), key=lambda e: e["rss_peak_bytes"]["max"])
    stage = next(s for s, e in fit["stages"].items() if e is peak)
    lines.append(f"peak memory: {peak['rss_peak_bytes']['max'] / 2**20:.0f} MiB RSS ({stage}); "
                 + ("it does not grow with the number of images" if not any(
                     e["rss_peak_bytes"]["grows"] for e in fit["stages"].values())
                    else "it GROWS with the number of images in: " + ", ".join(
                        s for s, e in fit["stages"].items() if e["rss_peak_bytes"]["grows"])))
    cuda = {s: e["cuda_peak_bytes"]["max"] for s, e in fit["stages"].items() if "cuda_peak_bytes" in e}
    if cuda:
        lines.append("CUDA peak (torch allocations): " + ", ".join(f"{s} {v / 2**20:.0f} MiB" for s, v in cuda.items()))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="250,500,1000,2000", help="comma-separated numbers of images")
    ap.add_argument("--device", default="auto", help="device of record, dissect and embed")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--target", type=int, default=BRODEN_IMAGES, help="images to extrapolate to")
    ap.add_argument("--rss-slack", type=float, default=0.25,
                    help="allowed relative growth of a stage's peak RSS from the smallest to the largest size")
    ap.add_argument("--keep", default=None, help="work in this directory and keep the largest run")
    ap.add_argument("--json", default=None, help="write the rows and the fit here (default: scale.json here, or in --keep DIR)")
    args = ap.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if len(sizes) < 2 or sizes[0] < 1:
        raise SystemExit("--sizes needs at least two sizes >= 1, e.g. 250,500,1000,2000")

    device = resolve_device(args.device)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="neurosem-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.model} (random weights), layers {','.join(LAYERS)}, 224x224 images, 112x112 labels; "
          f"device {device}; {cpus} CPU cores; load {load()}")
    try:
        rows = measure(sizes, work, device, args.model)
        fit = extrapolate(rows, args.target, args.rss_slack)
        print()
        print(table(rows, fit))
        out = Path(args.json) if args.json else (work if args.keep else Path.cwd()) / "scale.json"
        result = {"model": args.model, "device": device, "sizes": sizes, "cpus": cpus, "rows": rows, "fit": fit}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    grows = [s for s, e in fit["stages"].items() if e["rss_peak_bytes"]["grows"]]
    return 1 if grows else 0


if __name__ == "__main__":
    sys.exit(main())
