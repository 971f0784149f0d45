"""Static knowledge distillation (paper eq. 2) and the CRD baselines on the CIFAR model zoo.

``zoo`` (models, aligned layers), ``losses`` (SKD and baselines), ``train`` (:func:`distill`,
:func:`train_teacher`). Submodules import torch; this package file does not.
"""
from __future__ import annotations

from typing import Any

__all__ = ["distill", "train_teacher"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from neurosem.distill import train

        return getattr(train, name)
    raise AttributeError(f"module 'neurosem.distill' has no attribute {name!r}")
