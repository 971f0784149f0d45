"""Benchmark: ``neurosem figures`` (and ``kl``, ``--help``) on a finished run against "a few seconds".

Each command runs as the user runs it, in a fresh process (start-up included): ``neurosem figures
--run RUN`` twice (``cold``: no cached map coordinates; ``warm``: the second call, the t-SNE read
back from ``RUN/figures/.cache``), then ``neurosem kl --run RUN`` and ``neurosem --help``. For each:
the wall time, the CPU time of the process and its children (the figure workers), and the ratio of
the wall time to the limit (``--limit``, default 5 s: the issue's "a few seconds"; <= 1 passes).
The load average is printed before and after each command: the machine may be shared, and the wall
times are only as good as its quiet.

The run: ``--run PATH`` (a finished run: embedding.h5, dissect.h5, ideally activations.h5 and
kl.json), used through a scratch copy (small files copied with their times, so an up-to-date kl.json
stays up to date; activations.h5 linked), so the given run is not touched. Without ``--run``, a run
is made first: ResNet18 with random weights on a synthetic Broden-format set (224x224 images, 112x112
labels) of ``--images`` images
(``record``, ``dissect``, ``embed --trainer fit``, ``kl``; about a minute at 250 images).

Usage: python benchmarks/figures.py [--run PATH] [--images 250] [--limit 5] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = ("run.json", "embedding.h5", "dissect.h5", "kl.json", "kl.csv")


def load() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def timed(argv: list[str]) -> dict:
    """Run ``neurosem ARGV`` in a fresh process: wall and CPU seconds (children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = load()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "neurosem", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"`neurosem {' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load_before": load0, "load_after": load()}


def scratch_copy(run: Path, dest: Path) -> Path:
    """``dest`` holding ``run``'s small files (times kept) and a link to its activations.h5."""
    dest.mkdir(parents=True)
    for name in SMALL:
        if (run / name).exists():
            shutil.copy2(run / name, dest / name)
    if (run / "activations.h5").exists():
        (dest / "activations.h5").symlink_to((run / "activations.h5").resolve())
    return dest


def make_run(work: Path, n_images: int) -> Path:
    """A finished ResNet18 run (random weights, all four default layers) on a synthetic Broden set."""
    from neurosem.data.synthetic import write_synthetic_broden

    data, run = work / "broden", work / "run"
    write_synthetic_broden(data, n_images=n_images, image_size=224, seg_size=112, seed=0)
    for argv in (["record", "resnet18", "--weights", "none", "--data", str(data), "--run", str(run), "-q"],
                 ["dissect", "resnet18", "--weights", "none", "--broden", str(data), "--run", str(run), "-q"],
                 ["embed", "--run", str(run), "--trainer", "fit", "-q"],
                 ["kl", "--run", str(run), "-q"]):
        print(f"making the run: neurosem {argv[0]} ...", flush=True)
        timed(argv)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="A finished run (not modified: a scratch copy is used).")
    ap.add_argument("--images", type=int, default=250, help="Images of the generated run (without --run).")
    ap.add_argument("--limit", type=float, default=5.0, help="The wall-time limit, seconds.")
    ap.add_argument("--keep", type=Path, default=None, help="Work here and keep it (default: a temporary folder).")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="neurosem-figbench-")) if args.keep is None else args.keep
    try:
        source = args.run if args.run is not None else make_run(work / "made", args.images)
        run = scratch_copy(source, work / "scratch")
        rows = [("figures (cold)", timed(["figures", "--run", str(run)])),
                ("figures (warm)", timed(["figures", "--run", str(run)])),
                ("kl", timed(["kl", "--run", str(run), "-q"])),
                ("--help", timed(["--help"]))]
        print(f"run: {source}  ({os.cpu_count()} CPUs)")
        print(f"{'command':<16} {'wall s':>7} {'cpu s':>7} {'wall/limit':>10}  load before -> after")
        for name, r in rows:
            print(f"{name:<16} {r['wall']:7.2f} {r['cpu']:7.2f} {r['wall'] / args.limit:10.2f}  "
                  f"{r['load_before']} -> {r['load_after']}")
        worst = max(r["wall"] for name, r in rows if name.startswith("figures (cold)"))
        print(f"figures: {worst:.2f} s against the {args.limit:g} s limit: ratio {worst / args.limit:.2f} "
              f"({'within' if worst <= args.limit else 'OVER'} the limit)")
        return 0 if worst <= args.limit else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
