"""Methods that regress the teacher's feature maps: FitNet, VID, AB and FT.

Each follows RepDistiller (the code of the CRD benchmark) in its layers, modules and weights;
AB and FT have an initialisation stage (``init_epochs``, 30 in CRD) before the main one.
Shapes: ``f_s: [B, C_s, H_s, W_s]``, ``f_t: [B, C_t, H_t, W_t]``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neurosem.distill import losses as L
from neurosem.distill import zoo
from neurosem.distill.methods import register
from neurosem.distill.methods.base import (Batch, BuildContext, LossWeights, Method, MethodOptions, Taps,
                                           feature_modules, shape_error, stage_shapes)


def pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two maps to the other's height (RepDistiller's convention)."""
    hs, ht = f_s.shape[2], f_t.shape[2]
    if hs > ht:
        f_s = F.adaptive_avg_pool2d(f_s, (ht, ht))
    elif ht > hs:
        f_t = F.adaptive_avg_pool2d(f_t, (hs, hs))
    return f_s, f_t


def _regressor(method: str, stage: str, s: Sequence[int], t: Sequence[int]) -> nn.Module:
    try:
        return L.regressor_conv(s[1], t[1], s[2:], t[2:])
    except ValueError as exc:
        raise shape_error(method, stage, s, t, str(exc)) from None


# ------------------------------------------------------------------------------------------------

@register
class FitNet(Method):
    """FitNets (Romero et al. 2015): ``beta = 100``, :class:`~neurosem.distill.losses.FitNetLoss`
    on ``FEATURE_LAYERS[hint_layer]`` (RepDistiller ``--hint_layer``, default 2)."""

    name = "fitnet"
    weights = LossWeights(ce=1.0, kd=0.0, beta=100.0)
    summary = "FitNets hint on one feature map, through a trainable regressor"

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        feats = zoo.FEATURE_LAYERS[model]
        if not 0 <= options.hint_layer < len(feats):
            raise ValueError(f"--hint-layer must be 0..{len(feats) - 1} for {model} "
                             f"({', '.join(feats)}), got {options.hint_layer}")
        return Taps(maps=(feats[options.hint_layer],))

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        (s,), (t,) = ctx.shapes()
        stage = f"hint ({ctx.s_taps.maps[0]} -> {ctx.t_taps.maps[0]})"
        conv = _regressor(self.name, stage, s, t)
        self.loss = L.FitNetLoss(s[1], t[1], s[2:], t[2:])
        self.loss.conv = conv

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(batch.fs[0], batch.ft[0])


# ------------------------------------------------------------------------------------------------

class VIDLoss(nn.Module):
    """Variational information distillation (Ahn et al. 2019) for one pair of maps::

        mu     = r(f_s)    (1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv, no bias)
        sigma2 = softplus(alpha_c) + eps                   per teacher channel c
        L      = mean_{b,c,h,w} [ (mu - f_t)^2 / (2 sigma2) + log(sigma2) / 2 ]

    ``alpha`` starts at ``softplus^-1(init_var - eps)`` (init_var 5). The larger map is pooled to
    the smaller one's size.
    """

    def __init__(self, s_channels: int, mid_channels: int, t_channels: int, init_var: float = 5.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(s_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, t_channels, 1, bias=False))
        self.log_scale = nn.Parameter(torch.full((t_channels,), math.log(math.expm1(init_var - eps))))
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        mu = self.regressor(f_s)
        var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        return (0.5 * ((mu - f_t) ** 2 / var + torch.log(var))).mean()


@register
class VID(Method):
    """VID: one :class:`VIDLoss` per stage (``FEATURE_LAYERS[1:]``), summed; ``beta = 1``."""

    name = "vid"
    weights = LossWeights(ce=1.0, kd=0.0, beta=1.0)
    summary = "variational information distillation on every stage"

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(maps=tuple(zoo.FEATURE_LAYERS[model][1:]))

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        ss, ts = stage_shapes(self.name, ctx)
        self.layers = nn.ModuleList([VIDLoss(s[1], t[1], t[1]) for s, t in zip(ss, ts)])

    def forward(self, batch: Batch) -> torch.Tensor:
        return sum(c(f_s, f_t) for c, f_s, f_t in zip(self.layers, batch.fs, batch.ft))


# ------------------------------------------------------------------------------------------------

def ab_layer_loss(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """AB's alternative L2 (Heo et al. 2019) summed over every element::

        sum (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]
    """
    neg = ((source > -margin) & (target <= 0)).to(source.dtype)
    pos = ((source <= margin) & (target > 0)).to(source.dtype)
    return ((source + margin) ** 2 * neg + (source - margin) ** 2 * pos).sum()


@register
class AB(Method):
    """Activation boundaries (Heo et al. 2019), as in CRD's benchmark: an initialisation stage trains
    the student's feature layers and a connector (identity for equal shapes, else conv + BN) on::

        L_init = sum_l 2^(l - n + 1) * ab_l(connector_l(p_s^l), p_t^l) / B * 3 / 1000

    with ``p`` the pre-activation maps of the ``n`` stages (``zoo.preact_layers``); the main stage
    is CE alone (RepDistiller's ``loss_kd = 0`` for ``abound``; its ``beta = 1`` multiplies nothing).
    """

    has_main_term = False
    name = "ab"
    weights = LossWeights(ce=1.0, kd=0.0, beta=1.0)
    init_stage = True
    summary = "activation boundaries (initialisation stage), then CE"
    main_uses_teacher = False

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(maps=tuple(zoo.preact_layers(model)))

    def __init__(self, ctx: BuildContext, margin: float = 1.0) -> None:
        super().__init__(ctx)
        ss, ts = stage_shapes(self.name, ctx)
        conns: list[nn.Module] = []
        for i, (s, t) in enumerate(zip(ss, ts)):
            if s[1] == t[1] and s[2] == t[2]:
                conns.append(nn.Identity())
            else:
                conns.append(nn.Sequential(_regressor(self.name, f"stage {i + 1}", s, t), nn.BatchNorm2d(t[1])))
        self.connectors = nn.ModuleList(conns)
        n = len(conns)
        self.layer_weights = [2.0 ** (i - n + 1) for i in range(n)]
        self.margin = margin
        self.feat_modules = list(zoo.FEAT_MODULES[ctx.student])

    def forward(self, batch: Batch) -> None:
        return None

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.connectors.parameters()) + feature_modules(student, self.feat_modules)

    def init_loss(self, batch: Batch) -> torch.Tensor:
        b = batch.fs[0].shape[0]
        return sum(w * ab_layer_loss(c(f_s), f_t, self.margin) / b / 1000 * 3
                   for w, c, f_s, f_t in zip(self.layer_weights, self.connectors, batch.fs, batch.ft))

    def main_parameters(self) -> list[nn.Parameter]:
        return []   # the connector is not trained in the main stage


# ------------------------------------------------------------------------------------------------

def _leaky() -> nn.Module:
    return nn.LeakyReLU(0.1)


class Paraphraser(nn.Module):
    """FT's teacher-side autoencoder on ``[B, C, H, W]``: three 3x3 convs to ``k C`` channels (the
    factor), three 3x3 transposed convs back; LeakyReLU(0.1) after each, no BN (RepDistiller)."""

    def __init__(self, channels: int, k: float = 0.5) -> None:
        super().__init__()
        out = int(channels * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1), _leaky(), nn.Conv2d(channels, out, 3, 1, 1), _leaky(),
            nn.Conv2d(out, out, 3, 1, 1), _leaky())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(out, out, 3, 1, 1), _leaky(), nn.ConvTranspose2d(out, channels, 3, 1, 1), _leaky(),
            nn.ConvTranspose2d(channels, channels, 3, 1, 1), _leaky())

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(f)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """FT's student-side encoder: three 3x3 convs (to ``k C_t`` channels), each with BN and LeakyReLU."""

    def __init__(self, s_channels: int, t_channels: int, k: float = 0.5) -> None:
        super().__init__()
        out = int(t_channels * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(s_channels, s_channels, 3, 1, 1), nn.BatchNorm2d(s_channels), _leaky(),
            nn.Conv2d(s_channels, out, 3, 1, 1), nn.BatchNorm2d(out), _leaky(),
            nn.Conv2d(out, out, 3, 1, 1), nn.BatchNorm2d(out), _leaky())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.encoder(f)


def factor_transfer_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``mean_{b,k} |phi(F_s) - phi(F_t)|`` with ``phi(F) = normalize(vec(mean_c F^p))`` (Kim et al. 2018,
    RepDistiller's ``FactorTransfer``); the larger factor map is pooled to the smaller one's size."""
    factor_s, factor_t = pool_to_smaller(factor_s, factor_t)

    def phi(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.pow(p).mean(1).view(f.shape[0], -1))

    return (phi(factor_s) - phi(factor_t)).abs().mean()


@register
class FT(Method):
    """Factor transfer (Kim et al. 2018) on the last stage (``FEATURE_LAYERS[-1]``): the
    initialisation stage trains the paraphraser to reconstruct the teacher's map (MSE; lr 0.01 for
    ResNet/WRN students, as RepDistiller); the main stage trains the translator and the student on
    :func:`factor_transfer_loss` against the frozen paraphraser's factor. ``beta = 200``."""

    name = "ft"
    weights = LossWeights(ce=1.0, kd=0.0, beta=200.0)
    init_stage = True
    summary = "factor transfer (paraphraser initialisation stage, then translator)"
    init_uses_student = False

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(maps=(zoo.FEATURE_LAYERS[model][-1],))

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        (s,), (t,) = ctx.shapes()
        self.paraphraser = Paraphraser(t[1])
        self.translator = Translator(s[1], t[1])

    def main_parameters(self) -> list[nn.Parameter]:
        return list(self.translator.parameters())   # the paraphraser is trained only in the initialisation stage

    def forward(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(batch.ft[0])
        return factor_transfer_loss(self.translator(batch.fs[0]), factor_t)

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.paraphraser.parameters())

    def init_loss(self, batch: Batch) -> torch.Tensor:
        _, rec = self.paraphraser(batch.ft[0])
        return F.mse_loss(rec, batch.ft[0])

    def init_lr(self, student: str, lr: float) -> float:
        return 0.01 if zoo._family(student) in ("resnet", "wrn") else lr

    def train(self, mode: bool = True) -> "FT":
        super().train(mode)
        self.paraphraser.eval()   # frozen in the main stage (RepDistiller module_list[2].eval())
        return self
