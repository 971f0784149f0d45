"""Distillation losses: static knowledge distillation (paper eq. 2) and the CRD-protocol baselines.

Every loss is a small ``nn.Module`` whose docstring holds its formula. Shapes: feature maps
``f: [B, C, H, W]``, pooled features ``e: [B, D]``, logits ``z: [B, classes]``. The student's
tensors carry gradients; the teacher's (and SKD's vectors) never do.

The total loss follows the CRD code (RepDistiller ``train_student.py``):
``L = gamma * CE + alpha * KD + beta * L_method``, with the weights of its published script
``scripts/run_cifar_distill.sh`` (each method's ``weights`` in :mod:`neurosem.distill.methods`): KD uses ``gamma = 0.1, alpha = 0.9``;
every feature/relation method uses ``gamma = 1, alpha = 0`` (no KD term) and its own beta. SKD
follows the paper: ``L = CE + beta * L_SKD``, beta = 0.5 (0.05 for vgg13 -> vgg8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Norm floor of the cosine similarities (the convention of ``neurosem.embed``: an all-zero map
#: has cosine 0 with every map, itself included).
EPS = 1e-12


@dataclass(frozen=True)
class LossWeights:
    """``L = ce * CE + kd * KD + beta * L_method``."""

    ce: float
    kd: float
    beta: float


#: SKD's beta for pairs where the paper departs from 0.5: (teacher, student) -> beta.
SKD_PAIR_BETA: dict[tuple[str, str], float] = {("vgg13", "vgg8"): 0.05}


def _normalize_rows(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_logits(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``x: [..., C, D] -> cos(x_i, x_j) / tau: [..., C, C]`` (maps ``[B, C, H, W]`` are flattened)."""
    if x.dim() == 4:
        x = x.flatten(2)
    xn = _normalize_rows(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    return xn @ xn.transpose(-1, -2) / temperature


def batch_cosine_logits(f: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``cos(a_ni, a_nj) / tau`` of maps ``f: [B, C, H, W]`` (or ``[B, C, D]``): ``[B, C, C]``.

    The maps are normalised, then multiplied (one ``bmm``); an all-zero map has cosine 0 with
    every map.
    """
    x = f.flatten(2) if f.dim() == 4 else f
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    xn = x * x.pow(2).sum(-1, keepdim=True).clamp_min(EPS * EPS).rsqrt()
    return xn @ xn.transpose(1, 2) / temperature


#: Up to this ``1 / tau`` the backward of :class:`_SKDLayerLoss` builds ``W + W^T`` from the
#: softmax and its row sums (ratios up to ``e^(2 / tau)`` stay finite in float32); above it, by a
#: transposed read.
SYMMETRIC_MAX_INV_TEMPERATURE = 40.0


class _SKDLayerLoss(torch.autograd.Function):
    """One layer of eq. 2 with a hand-written backward that reads the ``[B, C, C]`` and
    ``[B, C, D]`` tensors as few times as possible. ``x: [B, C, D]`` (float), ``P: [C, C]`` (rows
    sum to 1), ``a_i = 1 / max(|x_i|, eps)``, ``z_ij = a_i a_j <x_i, x_j> / tau``::

        L = mean_{n,i} lse_ni - (1/C) sum_ij P_ij mean_n z_nij,   lse_ni = log sum_j exp(z_nij)
        Q = softmax_j(z),   W = (Q - P) / (B C),   S = W + W^T
        dx_i = sum_j S_ij a_i a_j x_j / tau - a_i^2 (sum_j S_ij z_ij) x_i

    (the last term is the derivative through the norms; it vanishes where the norm is clamped).
    ``lse_i = z_ii - log Q_ii`` needs logs of the diagonal only. As ``z`` is symmetric,
    ``Q_ji = Q_ij e^(lse_i - lse_j)``, so ``(B C) S = Q * (1 + u_j / u_i) - (P + P^T)`` with
    ``u = e^(c - lse)``, ``c = 1/tau``: no exponential and no transposed read of a ``[B, C, C]``
    tensor in the backward (a transposed read costs ten contiguous passes on a CPU). When
    ``D >= C`` the Gram matrix of the raw maps is formed (the maps are never normalised and
    copied); else the maps are normalised first.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, P: torch.Tensor, temperature: float) -> torch.Tensor:
        b, c_, d = x.shape
        c = 1.0 / temperature
        gram = d >= c_
        if gram:
            G = torch.bmm(x, x.transpose(1, 2))                                  # [B, C, C]
            sq = torch.diagonal(G, dim1=1, dim2=2)
            inv = sq.clamp_min(EPS * EPS).rsqrt()                                # [B, C]
            live = (sq > EPS * EPS).to(x.dtype)
            z = G.mul_(inv.unsqueeze(2) * c).mul_(inv.unsqueeze(1))              # cos / tau
            saved: tuple[torch.Tensor, ...] = (x, inv, live)
        else:
            inv = x.pow(2).sum(-1).clamp_min(EPS * EPS).rsqrt()                  # [B, C]
            xn = x * inv.unsqueeze(-1)
            z = torch.bmm(xn, xn.transpose(1, 2)).mul_(c)
            saved = (xn, inv)
        q = torch.softmax(z, dim=-1)
        lse = torch.diagonal(z, dim1=1, dim2=2) - torch.diagonal(q, dim1=1, dim2=2).log()   # [B, C]
        loss = lse.mean() - (P * z.sum(0)).sum() / (b * c_)
        ctx.save_for_backward(q, lse, P, *saved, *((z,) if gram else ()))
        ctx.c, ctx.gram = c, gram
        return loss

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        q, lse, P, *saved = ctx.saved_tensors
        b, c_, _ = q.shape
        if ctx.c <= SYMMETRIC_MAX_INV_TEMPERATURE:
            u = (ctx.c - lse).exp_()                                            # [B, C]
            sym = torch.addcmul(torch.ones((), dtype=q.dtype, device=q.device), (1 / u).unsqueeze(2),
                                u.unsqueeze(1)).mul_(q).sub_(P + P.t())
        else:
            w = q - P
            sym = w + w.transpose(1, 2)
        scale = g * ctx.c / (b * c_)
        if ctx.gram:
            x, inv, live, z = saved
            r = (sym * z).sum(-1)                                               # sum_j S_ij z_ij
            sym.mul_(inv.unsqueeze(2)).mul_(inv.unsqueeze(1))
            dx = torch.bmm(sym, x).mul_(scale)
            coef = (inv * inv * r * live).mul_(g / (b * c_))
            return dx.addcmul_(x, coef.unsqueeze(-1), value=-1), None, None
        xn, inv = saved
        dxn = torch.bmm(sym, xn).mul_(scale)                                    # [B, C, D]
        dot = (xn * dxn).sum(-1, keepdim=True)
        return dxn.addcmul_(xn, dot, value=-1).mul_(inv.unsqueeze(-1)), None, None


# ------------------------------------------------------------------------------------------------
# static knowledge distillation

class SKDLoss(nn.Module):
    """Static knowledge distillation, paper eq. 2.

    For aligned layer l with teacher vectors ``S_l: [C_l, K]`` (fixed buffers, no gradient) and
    the student's maps ``A_l: [B, C_l, H, W]``::

        P_S(j|i)  = softmax_j( cos(s_i, s_j) / tau )
        Q_n(j|i)  = softmax_j( cos(a_ni, a_nj) / tau )
        L_SKD     = -(1/L) sum_l (1/C_l) sum_i sum_j mean_n P_S(j|i) log Q_n(j|i)

    The sums over j include j = i (as eq. 1 and 2 do). ``tau = 1`` is the paper's formula.
    Computed by :class:`_SKDLayerLoss` (a hand-written backward; the same value and gradient).

    Example:
        >>> loss = SKDLoss([torch.randn(8, 16)])
        >>> float(loss([torch.rand(2, 8, 4, 4)])) > 0
        True
    """

    def __init__(self, vectors: Sequence[torch.Tensor], temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.n_layers = len(vectors)
        for l, s in enumerate(vectors):
            s = torch.as_tensor(s).detach().clone().float()
            if s.dim() != 2:
                raise ValueError(f"vectors[{l}] must be [C, K], got {tuple(s.shape)}")
            self.register_buffer(f"vectors_{l}", s)
            self.register_buffer(f"target_{l}", cosine_logits(s, self.temperature).softmax(-1))

    def targets(self) -> list[torch.Tensor]:
        """``P_S`` per layer: ``[C_l, C_l]`` (rows sum to 1)."""
        return [getattr(self, f"target_{l}") for l in range(self.n_layers)]

    def widths(self) -> list[int]:
        return [int(p.shape[0]) for p in self.targets()]

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != self.n_layers:
            raise ValueError(f"SKD expects {self.n_layers} feature maps, got {len(feats)}")
        total = 0.0
        for f, p in zip(feats, self.targets()):
            if f.shape[1] != p.shape[0]:
                raise ValueError(f"student map has {f.shape[1]} channels, teacher vectors {p.shape[0]}")
            x = f.flatten(2) if f.dim() == 4 else f
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            total = total + _SKDLayerLoss.apply(x, p.to(x.dtype), self.temperature)
        return total / self.n_layers


class SKDRandomLoss(SKDLoss):
    """The SKD loss with fixed random vectors instead of the teacher's (the ablation).

    ``S_l ~ N(0, I)`` of shape ``[C_l, K]`` from a generator seeded with ``seed`` (the same shape as
    the teacher's vectors); everything else is :class:`SKDLoss`. If this matches SKD, the gain
    comes from the regulariser's shape, not from the teacher's knowledge.

    Example:
        >>> SKDRandomLoss([8, 16], dim=4, seed=0).widths()
        [8, 16]
    """

    def __init__(self, channels: Sequence[int], dim: int = 16, seed: int = 0,
                 temperature: float = 1.0) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        vectors = [torch.randn(int(c), int(dim), generator=gen) for c in channels]
        super().__init__(vectors, temperature=temperature)


# ------------------------------------------------------------------------------------------------
# logits

class KDLoss(nn.Module):
    """Hinton et al. (2015), as in the CRD code::

        L_KD = T^2 * mean_b sum_c p_t(c) (log p_t(c) - log p_s(c)),   p = softmax(z / T)

    T = 4 in the CRD protocol.

    Example:
        >>> z = torch.randn(3, 5)
        >>> float(KDLoss()(z, z))
        0.0
    """

    def __init__(self, T: float = 4.0) -> None:
        super().__init__()
        self.T = float(T)

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        log_ps = F.log_softmax(logits_s / self.T, dim=1)
        log_pt = F.log_softmax(logits_t / self.T, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()
        return kl * self.T ** 2


# ------------------------------------------------------------------------------------------------
# feature maps

def regressor_conv(s_channels: int, t_channels: int, s_hw: Sequence[int], t_hw: Sequence[int]) -> nn.Module:
    """CRD's (RepDistiller ``ConvReg``) convolution from a student map ``[B, s_channels, *s_hw]`` to
    the teacher's ``[B, t_channels, *t_hw]``: a 3x3 stride-2 conv when the student's map is twice
    the size, a 4x4 stride-2 transposed conv when it is half, else a ``(1 + s - t)`` kernel
    (1x1 for equal sizes). Any other pair raises ``ValueError``."""
    (sh, sw), (th, tw) = tuple(s_hw), tuple(t_hw)
    if sh == 2 * th:
        return nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
    if sh * 2 == th:
        return nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
    if sh >= th and sw >= tw:
        return nn.Conv2d(s_channels, t_channels, kernel_size=(1 + sh - th, 1 + sw - tw))
    raise ValueError(f"no regressor from a {sh}x{sw} map to a {th}x{tw} map (the student's may be at most "
                     "half the teacher's size)")


class FitNetLoss(nn.Module):
    """FitNets hint (Romero et al. 2015), as in the CRD code (``ConvReg`` + ``HintLoss``)::

        r(f_s) = relu(BN(conv(f_s)))          (trainable regressor, student map -> teacher's shape)
        L      = mean over b, c, h, w of (r(f_s) - f_t)^2

    on RepDistiller's ``hint_layer`` (2: the middle feature). ``conv`` is
    :func:`regressor_conv`: 1x1 for maps of equal size, else strided, transposed or larger kernels.

    Example:
        >>> loss = FitNetLoss(4, 8)
        >>> float(loss(torch.rand(2, 4, 3, 3), torch.rand(2, 8, 3, 3)).detach()) > 0
        True
    """

    def __init__(self, s_channels: int, t_channels: int, s_hw: Sequence[int] = (1, 1),
                 t_hw: Sequence[int] = (1, 1)) -> None:
        super().__init__()
        self.conv = regressor_conv(s_channels, t_channels, s_hw, t_hw)
        self.bn = nn.BatchNorm2d(t_channels)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        r = torch.relu(self.bn(self.conv(f_s)))
        if r.shape != f_t.shape:
            raise ValueError(f"FitNet's regressor maps {tuple(f_s.shape)} to {tuple(r.shape)}, "
                             f"the teacher's map is {tuple(f_t.shape)}")
        return F.mse_loss(r, f_t)


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``f: [B, C, H, W] -> normalize_rows(mean_c f^p): [B, H*W]`` (Zagoruyko & Komodakis)."""
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1)


class ATLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis 2017), as in the CRD code::

        a(f) = vec(mean_c f^p) / ||vec(mean_c f^p)||_2       [B, H*W],  p = 2
        L    = sum_layers mean_{b, k} (a(f_s) - a(f_t))^2

    over the stage outputs (RepDistiller ``feat[1:-1]``); a larger map is average-pooled to the
    smaller one's size.

    Example:
        >>> f = [torch.rand(2, 4, 3, 3)]
        >>> float(ATLoss()(f, f))
        0.0
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for f_s, f_t in zip(feats_s, feats_t):
            hs, ht = f_s.shape[2], f_t.shape[2]
            if hs > ht:
                f_s = F.adaptive_avg_pool2d(f_s, (ht, ht))
            elif ht > hs:
                f_t = F.adaptive_avg_pool2d(f_t, (hs, hs))
            total = total + (attention_map(f_s, self.p) - attention_map(f_t, self.p)).pow(2).mean()
        return total


class SPLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori 2019)::

        G = F F^T with F = f.view(B, -1);  G~ = G with each row L2-normalised   [B, B]
        L = sum_layers ||G~_t - G~_s||_F^2 / B^2

    on the last stage's output (RepDistiller ``feat[-2]``).

    Example:
        >>> f = [torch.rand(3, 4, 2, 2)]
        >>> float(SPLoss()(f, f))
        0.0
    """

    def forward(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for f_s, f_t in zip(feats_s, feats_t):
            b = f_s.shape[0]
            g_s = F.normalize(f_s.flatten(1) @ f_s.flatten(1).t(), dim=1)
            g_t = F.normalize(f_t.flatten(1) @ f_t.flatten(1).t(), dim=1)
            total = total + (g_t - g_s).pow(2).sum() / (b * b)
        return total


# ------------------------------------------------------------------------------------------------
# pooled features (relations between the samples of a batch)

class CCLoss(nn.Module):
    """Correlation congruence (Peng et al. 2019) on linear embeddings of the pooled features.

    Both features go through trainable linear maps to ``dim = 128`` (the CRD code's ``LinearEmbed``
    on student and teacher), ``u = W_s e_s``, ``v = W_t e_t`` (``[B, dim]``). Then

    - ``kernel="crd"`` (default; the code the CC authors sent to CRD, which produced the CRD and
      SKD papers' CC numbers)::

          d_b = |u_b - v_b|;   L = mean_{b < B} sum_k d_b[k] * d_{b+1}[k]

    - ``kernel="rbf"`` (the paper's formula: a Gaussian RBF kernel by its order-P Taylor expansion on
      L2-normalised embeddings, P = 2, gamma = 0.4)::

          k(x, y) = sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! * (x . y)^p
          L = mean_{i, j} (k(u~_i, u~_j) - k(v~_i, v~_j))^2

    Example:
        >>> loss = CCLoss(4, 6, dim=3)
        >>> float(loss(torch.rand(5, 4), torch.rand(5, 6)).detach()) >= 0
        True
    """

    def __init__(self, s_dim: int, t_dim: int, dim: int = 128, kernel: str = "crd",
                 gamma: float = 0.4, order: int = 2) -> None:
        super().__init__()
        if kernel not in ("crd", "rbf"):
            raise ValueError(f"kernel must be 'crd' or 'rbf', got {kernel!r}")
        self.embed_s = nn.Linear(s_dim, dim)
        self.embed_t = nn.Linear(t_dim, dim)
        self.kernel = kernel
        self.gamma = float(gamma)
        self.order = int(order)

    def correlation(self, x: torch.Tensor) -> torch.Tensor:
        """Taylor-expanded Gaussian RBF correlation of the rows of ``x: [B, D] -> [B, B]``."""
        x = F.normalize(x, dim=1)
        sim = x @ x.t()
        g = self.gamma
        return sum(math.exp(-2 * g) * (2 * g) ** p / math.factorial(p) * sim.pow(p)
                   for p in range(self.order + 1))

    def forward(self, e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
        u = self.embed_s(e_s.flatten(1))
        v = self.embed_t(e_t.flatten(1))
        if self.kernel == "crd":
            d = (u - v).abs()
            return (d[:-1] * d[1:]).sum(1).mean()
        return (self.correlation(u) - self.correlation(v)).pow(2).mean()


def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances of the rows: ``[B, D] -> [B, B]``, exactly 0 on the diagonal."""
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


class RKDLoss(nn.Module):
    """Relational KD (Park et al. 2019), distance and angle terms, as in the CRD code::

        psi_D(i, j)   = ||e_i - e_j|| / mu,   mu = mean of the non-zero distances of the batch
        psi_A(i,j,k)  = < (e_j - e_i)/||e_j - e_i||, (e_k - e_i)/||e_k - e_i|| >   (0 when j or k = i)
        L = w_d * mean_{i,j} huber(psi_D^s - psi_D^t) + w_a * mean_{i,j,k} huber(psi_A^s - psi_A^t)

    with ``huber`` = smooth L1 (threshold 1), ``w_d = 25``, ``w_a = 50``, on the pooled features.

    Example:
        >>> e = torch.randn(4, 3)
        >>> float(RKDLoss()(e, e))
        0.0
    """

    def __init__(self, w_d: float = 25.0, w_a: float = 50.0) -> None:
        super().__init__()
        self.w_d = float(w_d)
        self.w_a = float(w_a)

    @staticmethod
    def _distance(e: torch.Tensor) -> torch.Tensor:
        d = _pairwise_distances(e)
        return d / d[d > 0].mean()

    @staticmethod
    def _angle(e: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)   # [i, j] = unit(e_j - e_i)
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    def forward(self, e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
        e_s, e_t = e_s.flatten(1), e_t.flatten(1)
        with torch.no_grad():
            d_t, a_t = self._distance(e_t), self._angle(e_t)
        loss_d = F.smooth_l1_loss(self._distance(e_s), d_t)
        loss_a = F.smooth_l1_loss(self._angle(e_s), a_t)
        return self.w_d * loss_d + self.w_a * loss_a


class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018), as in the CRD code::

        c_ij = (cos(e_i, e_j) + 1) / 2;   p_ij = c_ij / sum_j c_ij     (teacher t, student s)
        L    = mean_{i, j} t_ij * log((t_ij + eps) / (s_ij + eps)),   eps = 1e-7

    (a mean over all B^2 pairs, which is what CRD's weight 30000 was tuned for).

    Example:
        >>> e = torch.randn(4, 3)
        >>> abs(float(PKTLoss()(e, e))) < 1e-6
        True
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = float(eps)

    def _probs(self, e: torch.Tensor) -> torch.Tensor:
        e = e.flatten(1)
        e = e / (e.norm(dim=1, keepdim=True) + self.eps)
        c = (e @ e.t() + 1.0) / 2.0
        return c / c.sum(1, keepdim=True)

    def forward(self, e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
        s, t = self._probs(e_s), self._probs(e_t)
        return (t * torch.log((t + self.eps) / (s + self.eps))).mean()
