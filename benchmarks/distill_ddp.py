"""Benchmark: `neurosem distill` on one process against two (torchrun, gloo on CPU; NCCL on GPUs).

A CIFAR-format folder of ``--images`` random images (100 classes) is written to a scratch folder;
``neurosem distill --method METHOD`` trains ``--student`` for ``--epochs`` epochs with the global
batch ``--batch-size`` as one process and as ``--nproc`` processes under
``python -m torch.distributed.run``. Reported: the training seconds per epoch from each run's
``distill.json`` (process start-up and evaluation left out), the speed-up (ideal: the number of
processes), the wall time of each command, the time one process spends reading and augmenting the
global batches (every rank reads all of them, see :mod:`neurosem.distill._ddp`) as a share of a
one-process epoch, and the largest weight difference between the two runs.

On a CPU each process runs one thread (``OMP_NUM_THREADS=1``): two processes on two free cores can
at best halve the epoch. On a shared machine the load average is printed with the numbers.

Usage: python benchmarks/distill_ddp.py [--images 1024] [--epochs 1] [--batch-size 64]
       [--student resnet8x4] [--method ce] [--nproc 2] [--device cpu]
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


def _write_data(root: Path, n: int, n_test: int) -> None:
    import numpy as np

    from neurosem.data.cifar import write_cifar

    rng = np.random.default_rng(0)

    def make(k: int):
        return (rng.integers(0, 256, size=(k, 32, 32, 3), dtype=np.uint8),
                [int(v) for v in rng.integers(0, 100, size=k)])

    write_cifar(root, make(n), make(n_test), name="cifar100")


def _loader_seconds(root: Path, batch_size: int) -> float:
    """One epoch of reading and augmenting the training set (the loader alone, as distill runs it)."""
    import torch

    from neurosem.distill.loop import _collate, _datasets

    train, _, _ = _datasets(f"cifar100:{root}")
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=0,
                                         collate_fn=_collate, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--method", default="ce", help="a method that needs no teacher: ce or skd-random")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="neurosem-ddp-"))
    try:
        data = tmp / "cifar"
        _write_data(data, args.images, 64)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NEUROSEM_NO_PROGRESS": "1"}
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(key, None)
        base = ["distill", "--student", args.student, "--method", args.method, "--data", f"cifar100:{data}",
                "--protocol", "paper", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                "--workers", "0", "--device", args.device, "-q"]
        runs = {}
        for name, prefix in (("1 process", [sys.executable, "-m", "neurosem"]),
                             (f"{args.nproc} processes", [sys.executable, "-m", "torch.distributed.run",
                                                          "--standalone", f"--nproc-per-node={args.nproc}",
                                                          "-m", "neurosem", "--"])):
            run = tmp / name.replace(" ", "-")
            t0 = time.perf_counter()
            r = subprocess.run([*prefix, *base, "--run", str(run)], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                print(f"{name} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                return 1
            out = json.loads((run / "distill.json").read_text())
            runs[name] = (wall, out, torch.load(run / "weights.pth", weights_only=True))
        read = _loader_seconds(data, args.batch_size)
        (w1, o1, s1), (w2, o2, s2) = runs.values()
        e1 = sum(o1["epoch_time"]) / len(o1["epoch_time"])
        e2 = sum(o2["epoch_time"]) / len(o2["epoch_time"])
        diff = max(float((s1[k].double() - s2[k].double()).abs().max()) for k in s1 if s1[k].is_floating_point())
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"{args.student}, --method {args.method}, {args.images} images, global batch {args.batch_size}, "
              f"{args.epochs} epoch(s), device {args.device}; load average {load:.1f}")
        print(f"{'':<14}{'s/epoch':>10}{'wall s':>10}")
        print(f"{'1 process':<14}{e1:>10.2f}{w1:>10.1f}")
        print(f"{f'{args.nproc} processes':<14}{e2:>10.2f}{w2:>10.1f}")
        print(f"speed-up of the epoch: {e1 / e2:.2f}x (ideal {args.nproc}x)")
        print(f"reading + augmenting the global batches: {read:.2f} s per epoch = {100 * read / e1:.1f}% of a "
              f"one-process epoch (every rank pays it)")
        print(f"largest weight difference, {args.nproc} processes vs 1: {diff:.2e} (float summation order)")
        print(f"test accuracy: {o1['final_acc']:.2f}% vs {o2['final_acc']:.2f}%")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
