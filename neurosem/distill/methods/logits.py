"""Methods on the logits only: plain cross-entropy (``ce``) and Hinton's KD (``kd``).

KD's term is the ``alpha``-weighted one every method may add (RepDistiller's ``criterion_div``),
so ``kd`` itself adds no ``beta`` term: its default weights are ``0.1 CE + 0.9 KD`` (T = 4).
"""
from __future__ import annotations

import torch

from neurosem.distill.methods import register
from neurosem.distill.methods.base import Batch, LossWeights, Method


@register
class CE(Method):
    """Cross-entropy alone (also how teachers are trained)."""

    has_main_term = False
    name = "ce"
    weights = LossWeights(ce=1.0, kd=0.0, beta=0.0)
    needs_teacher = False
    summary = "cross-entropy only"

    def forward(self, batch: Batch) -> torch.Tensor | None:
        return None


@register
class KD(Method):
    """Knowledge distillation (Hinton et al. 2015): ``0.1 CE + 0.9 KD`` with ``-r 0.1 -a 0.9 -b 0``;
    the KD term itself is :class:`neurosem.distill.losses.KDLoss`."""

    has_main_term = False
    name = "kd"
    weights = LossWeights(ce=0.1, kd=0.9, beta=0.0)
    summary = "Hinton's KD on the logits (T = 4)"

    def forward(self, batch: Batch) -> torch.Tensor | None:
        return None
