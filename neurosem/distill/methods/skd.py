"""Static knowledge distillation (the paper's eq. 2) and its random-vector ablation.

Both read the stage ends (``zoo.ALIGNED_LAYERS``) of the student only; the teacher never runs.
"""
from __future__ import annotations

import torch

from neurosem.distill import losses as L
from neurosem.distill import zoo
from neurosem.distill.methods import register
from neurosem.distill.methods.base import Batch, BuildContext, LossWeights, Method, MethodOptions, Taps


@register
class SKD(Method):
    """``CE + beta L_SKD`` with the teacher's fixed vectors (:class:`~neurosem.distill.losses.SKDLoss`);
    beta 0.5 (the paper; 0.05 for vgg13 -> vgg8, :data:`~neurosem.distill.losses.SKD_PAIR_BETA`)."""

    name = "skd"
    weights = LossWeights(ce=1.0, kd=0.0, beta=0.5)
    needs_teacher = False
    summary = "static knowledge distillation (paper eq. 2): the teacher's vectors, no teacher forward"

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        if ctx.vectors is None:
            raise ValueError("skd needs the teacher's vectors")
        self.loss = L.SKDLoss(ctx.vectors, temperature=ctx.options.temperature)

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(maps=tuple(zoo.ALIGNED_LAYERS[model]))

    def widths(self) -> list[int]:
        return self.loss.widths()

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(batch.fs)


@register
class SKDRandom(SKD):
    """SKD with fixed random vectors ``N(0, I)`` of the teacher's shape (the ablation)."""

    name = "skd-random"
    summary = "SKD with random vectors (ablation)"

    def __init__(self, ctx: BuildContext) -> None:
        Method.__init__(self, ctx)
        widths = [ctx.s_shapes[k][1] for k in ctx.s_taps.maps]
        dim = int(ctx.vectors[0].shape[1]) if ctx.vectors else ctx.options.vector_dim
        self.loss = L.SKDRandomLoss(widths, dim=dim, seed=ctx.options.seed, temperature=ctx.options.temperature)
