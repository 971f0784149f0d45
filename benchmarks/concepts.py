"""Benchmark: concept-vector training speed and convergence on a synthetic Broden set.

Writes a synthetic Broden-format set (``--images``, 64×64 images, 32×32 labels), records and
dissects the quickstart's ``tiny_cnn`` (its factory's own initialisation, not trained) at
``--layers``, then trains every concept's vector for ``--epochs`` epochs (all concepts and layers
together, one pass over the training images per epoch) and prints:

- the seconds per epoch (the median over epochs) and training images per second;
- the epochs to converge per layer: the first epoch after which the mean training loss stays
  within 1% of its total decrease (epoch 1 to the last) of the last epoch's loss;
- concepts trained per second: concepts × layers / (the largest epochs-to-converge × seconds per epoch);
- the mean validation score of the vectors against the best single unit's.

Usage: python benchmarks/concepts.py [--images 1000] [--epochs 30] [--device auto] [--keep DIR] [--threads N]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def epochs_to_converge(loss: list[float], share: float = 0.01) -> int:
    """The first epoch (1-based) after which every loss is within ``share`` of the total decrease of the last.

    Example:
        >>> epochs_to_converge([1.0, 0.5, 0.2, 0.199, 0.2])
        3
    """
    x = np.asarray(loss, dtype=np.float64)
    tol = share * abs(x[0] - x[-1])
    ok = np.abs(x - x[-1]) <= tol
    bad = np.flatnonzero(~ok)
    return int(bad[-1] + 2) if bad.size else 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--layers", default="layer2,layer4")
    ap.add_argument("--input", default="binary", choices=["binary", "raw"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--keep", default=None, help="Keep the set and the run in this folder.")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads while training (default: as left by the dissection)")
    args = ap.parse_args(argv)

    import torch

    from neurosem.concepts import train_concepts
    from neurosem.data.synthetic import write_synthetic_broden
    from neurosem.dissect import dissect
    from neurosem.models import load_model

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="neurosem-concepts-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        broden = root / "broden"
        if not (broden / "index.csv").exists():
            write_synthetic_broden(broden, n_images=args.images, image_size=64, seg_size=32, seed=0)
        t_synth = time.perf_counter() - t0
        layers = [x for x in args.layers.split(",") if x]
        torch.manual_seed(0)                      # the factory's initialisation, made reproducible
        lm = load_model("neurosem.quickstart:tiny_cnn", "default", warn=False)
        t0 = time.perf_counter()
        dissect(run=root / "run", broden=broden, model=lm, layers=layers, device=args.device, progress=False,
                report=False)
        t_dissect = time.perf_counter() - t0
        if args.threads:
            torch.set_num_threads(args.threads)
        cv = train_concepts(root / "run", broden=broden, model=lm, layers=layers, epochs=args.epochs,
                            input=args.input, batch_size=args.batch_size, device=args.device, progress=False,
                            figures=False)
        per_epoch = float(np.median(cv.timings["epochs"]))
        k, n_layers = len(cv.concepts), len(cv.layers)
        conv = {name: epochs_to_converge(cv.layer(name).loss) for name in cv.layers}
        worst = max(conv.values())
        from neurosem._device import resolve_device

        dev = resolve_device(args.device)
        print(f"device {dev} ({torch.get_num_threads()} CPU threads); {args.images} images "
              f"({cv.args['n_train']} train, {cv.args['n_val']} val), {k} concepts x {n_layers} layers "
              f"({', '.join(cv.layers)}), input {args.input}, batch {args.batch_size}")
        print(f"synthetic set {t_synth:.1f} s, record + dissect {t_dissect:.1f} s, concepts {cv.timings['train']:.1f} s "
              f"({args.epochs} epochs + statistics and validation passes)")
        print(f"seconds per epoch: {per_epoch:.3f} (median of {len(cv.timings['epochs'])}); "
              f"{cv.args['n_train'] / per_epoch:.0f} training images/s")
        print("epochs to converge (loss within 1% of its decrease): "
              + ", ".join(f"{name} {e}" for name, e in conv.items()))
        print(f"concepts trained per second: {k * n_layers / (worst * per_epoch):.1f} "
              f"({k} x {n_layers} vectors in {worst} epochs of {per_epoch:.3f} s)")
        for name in cv.layers:
            r = cv.layer(name)
            pix = cv.concepts.pixel
            print(f"{name}: mean val IoU vector {r.score[pix].mean():.3f} vs best unit {r.unit_score[pix].mean():.3f}; "
                  f"mean AP vector {r.score[~pix].mean():.3f} vs best unit {r.unit_score[~pix].mean():.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
