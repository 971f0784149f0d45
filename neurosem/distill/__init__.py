"""Static knowledge distillation (paper eq. 2) and the CRD benchmark's methods on its CIFAR zoo.

``zoo``/``zoo_more`` (the 22 models, their named layers), ``methods`` (the registry: ce, kd, skd,
skd-random, fitnet, vid, ab, ft, at, sp, nst, fsp, cc, cc-rbf, rkd, pkt, crd), ``losses`` (the
formulas shared by several methods), ``distiller`` (one training step), ``train``
(:func:`distill`, :func:`train_teacher`), ``tables`` (runs over seeds, Table-1-style summaries).
Submodules import torch; this package file does not.
"""
from __future__ import annotations

from typing import Any

__all__ = ["distill", "train_teacher"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from neurosem.distill import train

        return getattr(train, name)
    raise AttributeError(f"module 'neurosem.distill' has no attribute {name!r}")
