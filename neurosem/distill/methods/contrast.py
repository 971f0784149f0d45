"""Contrastive representation distillation (Tian et al., ICLR 2020), with its memory bank.

As in RepDistiller (``crd/``): both pooled features are embedded to ``feat_dim = 128`` and
L2-normalised (``u = Embed_s(e_s)``, ``v = Embed_t(e_t)``); two memory banks ``M_s, M_t: [N, 128]``
hold one vector per training image (N = the training set's size); each sample ``n`` (dataset
index ``i_n``) is scored against its own bank entry and ``K = 16384`` negatives drawn from images
of other classes (RepDistiller's ``mode="exact"``)::

    h_t[n, k] = exp(M_s[j_nk] . v_n / T) / Z_t,   h_s[n, k] = exp(M_t[j_nk] . u_n / T) / Z_s
    (j_n0 = i_n; T = 0.07; Z = N * mean of the first batch's exp-scores, then fixed)

    NCE(h) = -(1/B) sum_n [ log(h_n0 / (h_n0 + K/N + eps)) + sum_{k>=1} log((K/N) / (h_nk + K/N + eps)) ]
    L_CRD  = NCE(h_s) + NCE(h_t),     eps = 1e-7

after which ``M_s[i_n] <- normalize(m M_s[i_n] + (1 - m) u_n)`` (and ``M_t`` with ``v``), m = 0.5.
``beta = 0.8``. The banks start uniform in ``[-s, s]``, ``s = 1 / sqrt(128 / 3)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from neurosem.distill import zoo
from neurosem.distill.methods import register
from neurosem.distill.methods.base import Batch, BuildContext, LossWeights, Method, MethodOptions, Taps

NCE_EPS = 1e-7


class Embed(nn.Module):
    """``x: [B, D] -> normalize(W x + b): [B, dim]``."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.flatten(1))
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nce_loss(h: torch.Tensor, n_data: int) -> torch.Tensor:
    """CRD's NCE loss (eq. 18) of scores ``h: [B, 1 + K]`` (column 0: the positive)."""
    k = h.shape[1] - 1
    noise = k / float(n_data)
    log_pos = torch.log(h[:, 0] / (h[:, 0] + noise + NCE_EPS))
    log_neg = torch.log(noise / (h[:, 1:] + noise + NCE_EPS))
    return -(log_pos.sum() + log_neg.sum()) / h.shape[0]


def sample_contrast(index: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, 1 + k]`` dataset indices: each row's own index, then ``k`` images of other classes,
    distinct within a row when there are at least ``k`` of them (else drawn with replacement), as
    RepDistiller's ``CIFAR100InstanceSample`` (``mode="exact"``). Uses the global RNG of the device."""
    other = labels[None, :] != y[:, None]                              # [B, N]
    if int(other.sum(1).min()) >= k:
        r = torch.rand(other.shape, device=labels.device).masked_fill_(~other, 2.0)
        neg = r.topk(k, dim=1, largest=False, sorted=False).indices
    else:
        neg = torch.multinomial(other.float(), k, replacement=True)
    return torch.cat([index[:, None], neg], dim=1)


class ContrastMemory(nn.Module):
    """The two memory banks and their scores (see the module docstring); buffers, no gradient."""

    def __init__(self, dim: int, n_data: int, k: int, T: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        self.k, self.T, self.momentum, self.n_data = int(k), float(T), float(momentum), int(n_data)
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n_data, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))                 # (Z_s, Z_t); < 0: not set yet

    def forward(self, u: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                contrast: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u, v: [B, dim]``, ``index: [B]``, ``contrast: [B, 1 + K]`` -> ``(h_s, h_t)``, each ``[B, 1 + K]``."""
        b, dim = u.shape
        w_s = self.memory_s.index_select(0, contrast.reshape(-1)).view(b, -1, dim)
        w_t = self.memory_t.index_select(0, contrast.reshape(-1)).view(b, -1, dim)
        h_t = torch.exp(torch.bmm(w_s, v.unsqueeze(2)).squeeze(2) / self.T)
        h_s = torch.exp(torch.bmm(w_t, u.unsqueeze(2)).squeeze(2) / self.T)
        with torch.no_grad():
            first = torch.stack([h_s.mean(), h_t.mean()]) * self.n_data
            self.z.copy_(torch.where(self.z < 0, first, self.z))
            for bank, x in ((self.memory_s, u), (self.memory_t, v)):
                pos = bank.index_select(0, index) * self.momentum + x.detach() * (1 - self.momentum)
                bank.index_copy_(0, index, pos / pos.norm(dim=1, keepdim=True))
        return h_s / self.z[0], h_t / self.z[1]


@register
class CRD(Method):
    """CRD on the pooled features (see the module docstring); needs each sample's dataset index."""

    name = "crd"
    weights = LossWeights(ce=1.0, kd=0.0, beta=0.8)
    needs_index = True
    summary = "contrastive representation distillation (memory bank of 16,384 negatives)"

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(pooled=zoo.CLASSIFIER[model])

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        if ctx.labels is None or ctx.n_data is None:
            raise ValueError("crd needs the training set's labels and size")
        (s,), (t,) = ctx.shapes()
        o = ctx.options
        self.embed_s = Embed(s[1], o.feat_dim)
        self.embed_t = Embed(t[1], o.feat_dim)
        self.contrast = ContrastMemory(o.feat_dim, ctx.n_data, o.nce_k, o.nce_t, o.nce_m)
        self.register_buffer("labels", torch.as_tensor(ctx.labels, dtype=torch.long), persistent=False)

    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.index is None or batch.y is None:
            raise ValueError("crd needs the dataset index and the label of every sample")
        contrast = sample_contrast(batch.index, batch.y, self.labels, self.contrast.k)
        h_s, h_t = self.contrast(self.embed_s(batch.fs[0]), self.embed_t(batch.ft[0]), batch.index, contrast)
        return nce_loss(h_s, self.contrast.n_data) + nce_loss(h_t, self.contrast.n_data)
