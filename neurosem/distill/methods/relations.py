"""Methods on the pooled features ``e: [B, D]`` (relations between the samples of a batch):
CC (CRD's kernel and Peng et al.'s RBF one), RKD and PKT. The formulas are in
:mod:`neurosem.distill.losses`."""
from __future__ import annotations

import torch

from neurosem.distill import losses as L
from neurosem.distill import zoo
from neurosem.distill.methods import register
from neurosem.distill.methods.base import Batch, BuildContext, LossWeights, Method, MethodOptions, Taps


class _Pooled(Method):
    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(pooled=zoo.CLASSIFIER[model])

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(batch.fs[0], batch.ft[0])


@register
class CC(_Pooled):
    """Correlation congruence with CRD's kernel, ``beta = 0.02``."""

    name = "cc"
    weights = LossWeights(ce=1.0, kd=0.0, beta=0.02)
    summary = "correlation congruence (CRD's kernel) on the pooled features"
    kernel = "crd"

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        (s,), (t,) = ctx.shapes()
        self.loss = L.CCLoss(s[1], t[1], dim=ctx.options.feat_dim, kernel=self.kernel)


@register
class CCRBF(CC):
    """Correlation congruence with Peng et al.'s Taylor-expanded RBF kernel (CRD's beta kept)."""

    name = "cc-rbf"
    summary = "correlation congruence (Gaussian RBF kernel) on the pooled features"
    kernel = "rbf"


@register
class RKD(_Pooled):
    """Relational KD (distance 25, angle 50 inside), ``beta = 1``."""

    name = "rkd"
    weights = LossWeights(ce=1.0, kd=0.0, beta=1.0)
    summary = "relational KD (distances and angles) on the pooled features"

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.loss = L.RKDLoss()


@register
class PKT(_Pooled):
    """Probabilistic knowledge transfer, ``beta = 30000``."""

    name = "pkt"
    weights = LossWeights(ce=1.0, kd=0.0, beta=30000.0)
    summary = "probabilistic knowledge transfer on the pooled features"

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.loss = L.PKTLoss()
