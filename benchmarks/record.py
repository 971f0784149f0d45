"""Benchmark: recording a model's default layers against the bare forward pass, same batches.

Both sides read the same synthetic Broden images (written to a temp dir by
``neurosem.data.synthetic.write_synthetic_broden``) through the same DataLoader settings and
normalise on the device:

- ``forward``: ``model(x)`` under ``torch.inference_mode`` (channels_last on CUDA), outputs dropped;
- ``record``: the public ``neurosem.record.record(..., force=True)``: hooks, float16 cast,
  device-to-host copies, the background HDF5 writer, the store's creation and completion.

The two are interleaved (forward, record, forward, record, ...) after one warm-up of each, and
the ratio of the median times is printed (and of the best times, steadier on a shared machine).
Target: record / forward <= 1.15 on CPU.

Usage: python benchmarks/record.py [--quick] [--device auto] [--model resnet18] [--images N]
       [--size S] [--batch-size B] [--repeats R] [--threads T]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGET = 1.15


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=224, help="image size (Broden: 224)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers, both sides")
    args = ap.parse_args()

    from neurosem._device import resolve_device
    from neurosem.data import open_image_dataset
    from neurosem.data.synthetic import write_synthetic_broden
    from neurosem.models import load_model
    from neurosem.record import _collate, _Indexed, record
    from neurosem.store import ActivationStore

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    n = args.images or ((64 if args.quick else 256) if cuda else (32 if args.quick else 128))
    bs = args.batch_size or (64 if cuda else 32)
    repeats = args.repeats or (2 if args.quick else 3)

    tmp = Path(tempfile.mkdtemp(prefix="neurosem-bench-record-"))
    try:
        root = tmp / "broden"
        t0 = time.perf_counter()
        write_synthetic_broden(root, n_images=n, image_size=args.size, seg_size=max(1, args.size // 2), seed=0)
        print(f"synthetic Broden: {n} images of {args.size}x{args.size} written in {time.perf_counter() - t0:.1f} s")
        lm = load_model(args.model, weights="none")
        layers = lm.default_layers
        ds = open_image_dataset(str(root))
        mean = torch.tensor(lm.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(lm.std, device=device).view(1, 3, 1, 1)

        def bare() -> None:
            net = lm.model.to(device)
            if cuda:
                net = net.to(memory_format=torch.channels_last)
            loader = torch.utils.data.DataLoader(_Indexed(ds, 0, n), batch_size=bs, shuffle=False,
                                                 num_workers=args.workers, pin_memory=cuda, collate_fn=_collate)
            with torch.inference_mode():
                for images, _ids in loader:
                    x = images.to(device, non_blocking=cuda).float().sub_(mean).div_(std)
                    if cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    net(x)
            if cuda:
                torch.cuda.synchronize()
            net.to("cpu")
            if cuda:
                net.to(memory_format=torch.contiguous_format)

        def rec() -> None:
            record(lm, str(root), run=tmp / "run", batch_size=bs, device=device, force=True,
                   num_workers=args.workers, progress=False)

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        print(f"model {args.model} (random weights), layers {', '.join(layers)}, device {device}, "
              f"batch {bs}, torch threads {torch.get_num_threads()}, {repeats} interleaved repeats")
        timed(bare), timed(rec)  # warm-up: allocator, kernels, page cache
        t_fwd, t_rec = [], []
        for i in range(repeats):
            order = (bare, rec) if i % 2 == 0 else (rec, bare)
            for fn in order:
                (t_fwd if fn is bare else t_rec).append(timed(fn))
        with ActivationStore.open(tmp / "run" / "activations.h5") as store:
            assert store.complete and store.n_done == n
            mb = sum(store.shape(layer)[1] * store.shape(layer)[2] * store.shape(layer)[3] for layer in layers) * 2 * n / 2**20
        fwd, rc = statistics.median(t_fwd), statistics.median(t_rec)
        ratio = rc / fwd
        print(f"forward : {n / fwd:8.1f} images/s  (median of {[round(t, 3) for t in t_fwd]} s)")
        print(f"record  : {n / rc:8.1f} images/s  (median of {[round(t, 3) for t in t_rec]} s), "
              f"{mb:.1f} MB float16 written, {mb / rc:.1f} MB/s")
        best = min(t_rec) / min(t_fwd)
        verdict = "OK" if ratio <= TARGET else "ABOVE TARGET"
        print(f"record / forward = {ratio:.3f}x (medians), {best:.3f}x (best of each)  "
              f"(target <= {TARGET:.2f}x on {device.type}: {verdict})")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
