"""``distill()`` in float64 (``python -m`` this file): the real training loop, checkpoints and
resume, with the float32 rounding that training amplifies out of the way.

``python -m tests.distributed._distill64 RUN DATA EPOCHS`` trains resnet8 with cross-entropy on
the CIFAR-format folder DATA (batches of 7: 24 images split unevenly over two ranks) into RUN.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(run: Path, data: str, epochs: int) -> None:
    from neurosem.distill import train as T

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    collate = T._collate
    T._collate = lambda items: (lambda b: (b[0].double(), b[1], b[2]))(collate(items))
    T.distill(student="resnet8", method="ce", data=f"cifar100:{data}", protocol="paper", epochs=epochs,
              batch_size=7, num_workers=0, device="cpu", run=run, progress=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
