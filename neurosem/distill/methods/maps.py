"""Methods on feature maps without a regressor: AT, SP, NST and FSP.

Layers as in RepDistiller: AT and NST read every stage (``FEATURE_LAYERS[1:]``), SP the last one,
FSP every feature including the stem's (and has an initialisation stage, as CRD's benchmark).
Shapes: ``f: [B, C, H, W]``.
"""
from __future__ import annotations

import torch
from torch import nn

from neurosem.distill import losses as L
from neurosem.distill import zoo
from neurosem.distill.methods import register
from neurosem.distill.methods.base import (Batch, BuildContext, LossWeights, Method, MethodOptions, Taps,
                                           feature_modules, shape_error, stage_shapes)
from neurosem.distill.methods.hints import pool_to_smaller


@register
class AT(Method):
    """Attention transfer, ``beta = 1000`` (:class:`~neurosem.distill.losses.ATLoss`)."""

    name = "at"
    weights = LossWeights(ce=1.0, kd=0.0, beta=1000.0)
    summary = "attention transfer on every stage"

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(maps=tuple(zoo.FEATURE_LAYERS[model][1:]))

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        stage_shapes(self.name, ctx)
        self.loss = L.ATLoss()

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(batch.fs, batch.ft)


@register
class SP(Method):
    """Similarity-preserving KD on the last stage, ``beta = 3000`` (:class:`~neurosem.distill.losses.SPLoss`)."""

    name = "sp"
    weights = LossWeights(ce=1.0, kd=0.0, beta=3000.0)
    summary = "similarity preserving on the last stage"

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(maps=(zoo.FEATURE_LAYERS[model][-1],))

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.loss = L.SPLoss()

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(batch.fs, batch.ft)


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017), squared MMD with the kernel ``k(x, y) = (x.y)^2``
    over the channels' L2-normalised maps ``x = f[b, i] / ||f[b, i]||`` (``[H W]`` vectors)::

        L = mean_{b,i,j} k(t_i, t_j) + mean_{b,i,j} k(s_i, s_j) - 2 mean_{b,i,j} k(s_i, t_j)

    (the teacher-teacher term carries no gradient); the larger map is pooled to the smaller size.
    """
    f_s, f_t = pool_to_smaller(f_s, f_t)
    s = nn.functional.normalize(f_s.flatten(2), dim=2)
    t = nn.functional.normalize(f_t.flatten(2), dim=2)
    k_tt = (t @ t.transpose(1, 2)).pow(2).mean().detach()
    k_ss = (s @ s.transpose(1, 2)).pow(2).mean()
    k_st = (s @ t.transpose(1, 2)).pow(2).mean()
    return k_tt + k_ss - 2 * k_st


@register
class NST(Method):
    """NST on every stage (``FEATURE_LAYERS[1:]``), summed; ``beta = 50``."""

    name = "nst"
    weights = LossWeights(ce=1.0, kd=0.0, beta=50.0)
    summary = "neuron selectivity transfer (polynomial-kernel MMD) on every stage"

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(maps=tuple(zoo.FEATURE_LAYERS[model][1:]))

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        stage_shapes(self.name, ctx)

    def forward(self, batch: Batch) -> torch.Tensor:
        return sum(nst_loss(f_s, f_t) for f_s, f_t in zip(batch.fs, batch.ft))


def fsp_matrices(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """FSP ("flow of solution procedure", Yim et al. 2017) of consecutive maps ``bot: [B, m, H, W]``
    and ``top: [B, n, H, W]`` (the larger pooled to the smaller's size)::

        G[b, i, j] = mean_{h,w} top[b, i, h, w] * bot[b, j, h, w]        [B, n, m]
    """
    out = []
    for bot, top in zip(feats[:-1], feats[1:]):
        bot, top = pool_to_smaller(bot, top)
        out.append(top.flatten(2) @ bot.flatten(2).transpose(1, 2) / bot.shape[2] / bot.shape[3])
    return out


@register
class FSP(Method):
    """FSP as in CRD's benchmark: an initialisation stage trains the student's feature layers on
    ``sum_l mean (G_s^l - G_t^l)^2`` over every feature (``FEATURE_LAYERS``, the stem's included),
    then the main stage is CE alone (RepDistiller's ``loss_kd = 0``; ``beta = 50`` multiplies nothing).
    Student and teacher need equal channels at every feature."""

    has_main_term = False
    name = "fsp"
    weights = LossWeights(ce=1.0, kd=0.0, beta=50.0)
    init_stage = True
    main_uses_teacher = False
    summary = "flow of solution procedure matrices (initialisation stage), then CE"

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(maps=tuple(zoo.FEATURE_LAYERS[model]))

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        stage_shapes(self.name, ctx)
        ss, ts = ctx.shapes()
        for s_name, t_name, s, t in zip(ctx.s_taps.maps, ctx.t_taps.maps, ss, ts):
            if s[1] != t[1]:
                stage = s_name if s_name == t_name else f"{s_name} / {t_name}"
                raise shape_error(self.name, stage, s, t, "FSP needs equal channels at every feature")
        self.feat_modules = list(zoo.FEAT_MODULES[ctx.student])

    def forward(self, batch: Batch) -> None:
        return None

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return feature_modules(student, self.feat_modules)

    def init_loss(self, batch: Batch) -> torch.Tensor:
        return sum((g_s - g_t).pow(2).mean() for g_s, g_t in zip(fsp_matrices(batch.fs), fsp_matrices(batch.ft)))
