"""A tiny CIFAR-100-format folder whose class is the brightest colour channel (shared by the
distillation tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_bright_cifar(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write ``n_train`` / ``n_test`` 32x32 images of 4 classes into ``root`` (class c < 3: channel c
    lifted by 150; class 3: none) and return ``root``. The same seed gives the same files."""
    from neurosem.data.cifar import write_cifar

    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.integers(0, 4, size=n)
        x = rng.integers(0, 80, size=(n, 32, 32, 3))
        for i, c in enumerate(labels):
            if c < 3:
                x[i, :, :, c] += 150
        return x.astype(np.uint8), [int(v) for v in labels]

    write_cifar(root, make(n_train), make(n_test), name="cifar100")
    return root
