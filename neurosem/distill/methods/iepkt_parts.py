"""The pieces of IEPKT (Lee & Song, "Interpretable Embedding Procedure Knowledge Transfer via
Stacked Principal Component Analysis and Graph Neural Network", AAAI 2021, arXiv 2104.13561).

Written for this project in PyTorch from the algorithm of the authors' TensorFlow code
(``sseung0703/IEPKT``; ``file:line`` below cite that repository). :mod:`.iepkt` assembles them
into the methods ``iepkt`` and ``iepkt-bb``.

- :func:`first_pca`: per image, the top singular pair of the sensing point ``F`` as ``[HW, C]``
  (``nets/SVP.py:7-51``), sign fixed by :func:`fix_sign` (``nets/Distillation.py:38-39``);
- :func:`student_vector`: the student's channel vector along the teacher's spatial vector
  (``Distillation.py:46-47``);
- :func:`plane_map`: the sphere-to-plane map with centre ``c = 1/sqrt(C)`` (``Distillation.py:7-12``);
- :class:`IncrementalPCA`: the second, batch-incremental PCA and its projection
  (``Distillation.py:119-157``);
- :func:`cosine_affinity`, :func:`kl_rows`: the graph and the KL the code sums over rows
  (``Distillation.py:14-17, 221-223``);
- :class:`MPNN`: the message-passing network between consecutive sensing points
  (``Distillation.py:78-117``);
- :class:`AttentionHeads`, :class:`Estimator`: the black-box (multi-head graph) term of
  ``iepkt-bb`` (``Distillation.py:159-219``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def tf_linear(in_dim: int, out_dim: int, bias: bool = False) -> nn.Linear:
    """A linear layer initialised as the code's ``tcl.fully_connected`` under ``WResNet_arg_scope``
    (``nets/WResNet.py:116-122``): truncated normal, std ``sqrt(1.3 * 2 / fan_out)`` cut at 2 std
    (TF's ``variance_scaling_initializer(mode='FAN_OUT')``), no bias unless asked (zeros then)."""
    lin = nn.Linear(in_dim, out_dim, bias=bias)
    std = math.sqrt(2.6 / out_dim)
    nn.init.trunc_normal_(lin.weight, 0.0, std, -2 * std, 2 * std)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


def column_sign(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``sign(max + min)`` of ``x`` along ``dim`` (kept), 0 replaced by 1: +1 where the entry of
    largest magnitude is positive (TF's ``sign`` gives 0 on an exact tie; 1 keeps the vector)."""
    s = torch.sign(x.amax(dim, keepdim=True) + x.amin(dim, keepdim=True))
    return torch.where(s == 0, torch.ones_like(s), s)


def fix_sign(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u: [B, HW]``, ``v: [B, C]`` -> both multiplied by ``sign(max v + min v)`` per row
    (``Distillation.py:38-39``), so the result does not depend on the sign an SVD returns."""
    s = column_sign(v, 1)
    return u * s, v * s


def first_pca(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top singular pair of each image's map as ``X = [HW, C]``, unit length, sign fixed.

    ``f: [B, C, H, W]`` -> ``u: [B, HW]`` (spatial), ``v: [B, C]`` (channels). As the code's
    ``SVD_eid`` (``SVP.py:21-42``), through the eigenvectors of the smaller Gram matrix
    (``XᵀX`` when ``HW >= C``, else ``XXᵀ``); the other vector is ``Xv`` (or ``Xᵀu``) normalised.
    Not differentiated (the code stops the gradient, ``SVP.py:19``; only the teacher's is taken).
    """
    b, c, h, w = f.shape
    with torch.no_grad():
        x = f.reshape(b, c, h * w).transpose(1, 2)                    # [B, HW, C]
        if h * w >= c:
            v = torch.linalg.eigh(x.transpose(1, 2) @ x)[1][..., -1]  # [B, C]
            u = F.normalize((x @ v.unsqueeze(-1)).squeeze(-1), dim=1)
        else:
            u = torch.linalg.eigh(x @ x.transpose(1, 2))[1][..., -1]  # [B, HW]
            v = F.normalize((x.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1), dim=1)
        return fix_sign(u, v)


def student_vector(f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``normalize(Fᵀ u)``: the student's channel vector along the teacher's spatial vector
    (``Distillation.py:46-47``). ``f: [B, C, H, W]``, ``u: [B, HW]`` -> ``[B, C]`` (differentiable in ``f``)."""
    b, c = f.shape[:2]
    return F.normalize(torch.bmm(f.reshape(b, c, -1), u.unsqueeze(-1)).squeeze(-1), dim=1)


def plane_map(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``p = (v + c) * 2 / (1 + <v, c>) - 2c`` with ``c = 1/sqrt(C)`` (``Distillation.py:7-12``:
    the code's ``1/cos²(acos(<v,c>)/2)`` is ``2/(1 + <v,c>)``). ``v: [B, C]`` unit -> ``[B, C]``,
    orthogonal to ``c``, of norm ``2 tan(theta/2)`` (theta the angle between ``v`` and ``c``).
    ``1 + <v,c>`` is floored at ``eps`` (only ``v = -c`` reaches it)."""
    c = torch.full((1, v.shape[1]), 1.0 / math.sqrt(v.shape[1]), dtype=v.dtype, device=v.device)
    scale = 2.0 / (1.0 + (v * c).sum(1, keepdim=True)).clamp_min(eps)
    return (v + c) * scale - 2 * c


class IncrementalPCA(nn.Module):
    """The second PCA, over batches (``Distillation.py:119-148``): state ``mean: [C]``,
    ``sigma: [C/2]``, ``basis: [C, C/2]`` (buffers, saved with the method).

    :meth:`update` takes an SVD of ``[P - m; (sigma * basis)ᵀ; mean - m]`` (``m`` the batch mean;
    on the first update ``mean`` is taken as ``m``, as the code's zero-state test), keeps ``C/2``
    right singular vectors with :func:`column_sign` per column, and sets
    ``mean <- (1 - rate) mean + rate m`` (rate 0.9, so the first mean is ``0.9 m``, as the code).
    :meth:`project` is ``(P - mean) basis`` with the stored statistics (no gradient to them).
    """

    def __init__(self, dim: int, rate: float = 0.9) -> None:
        super().__init__()
        self.dim, self.k, self.rate = dim, dim // 2, rate
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("sigma", torch.zeros(self.k))
        self.register_buffer("basis", torch.zeros(dim, self.k))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, p: torch.Tensor) -> None:
        """Fold the batch ``p: [B, C]`` into the statistics."""
        m = p.mean(0)
        prev = m if int(self.updates) == 0 else self.mean
        rows = torch.cat([p - m, self.sigma[:, None] * self.basis.T, (prev - m)[None]], 0)  # [B + C/2 + 1, C]
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)
        v = vh.T[:, : self.k]
        self.basis.copy_(v * column_sign(v, 0))
        self.sigma.copy_(s[: self.k])
        self.mean.mul_(1 - self.rate).add_(self.rate * m)
        self.updates += 1

    def project(self, p: torch.Tensor) -> torch.Tensor:
        """``p: [B, C]`` -> ``(p - mean) @ basis: [B, C/2]``."""
        return (p - self.mean) @ self.basis


def cosine_affinity(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the rows: ``x: [B, D]`` -> ``[B, B]`` (``Distillation.py:14-17``)."""
    x = F.normalize(x, dim=-1)
    return x @ x.transpose(-1, -2)


def kl_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum softmax(x) (log_softmax(x) - log_softmax(y))`` over the last axis, summed over every
    row (``Distillation.py:221-223``: the code sums, it does not average). ``x, y: [..., N]`` -> scalar."""
    lx = F.log_softmax(x, -1)
    return (lx.exp() * (lx - F.log_softmax(y, -1))).sum()


def _bn_pairs(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over every axis but the last (TF's ``batch_norm`` of a ``[B, B, D]`` tensor)."""
    return bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class MPNN(nn.Module):
    """The message-passing network between sensing points ``l-1`` and ``l`` (``Distillation.py:78-117``).

    Vertices ``h_vw = c_v - c_w`` from point ``l`` (``[B, B, Dv]``); edges
    ``e0_vw = D (e_v * e_w)``, ``e_v = normalize(BN(FC(c_{l-1,v})))``; ``iters`` iterations with
    shared weights: ``x = [h_vw; mean_d e_vw]``, ``m = BN(FC x) * sigmoid(BN(FC x))``, ``e <- e + m``.
    Returns the readout ``mean_d e: [B, B]`` and the messages ``[m0; m1]: [B, B, iters * D]``.
    FC layers have no bias; BN is affine (momentum 0.1, eps 1e-5: the code's ``decay=0.9``).
    """

    def __init__(self, vertex_dim: int, edge_dim: int, hidden: int, iters: int = 2) -> None:
        super().__init__()
        self.hidden, self.iters = hidden, iters
        self.edge_fc, self.edge_bn = tf_linear(edge_dim, hidden), nn.BatchNorm1d(hidden)
        self.msg_fc, self.msg_bn = tf_linear(vertex_dim + 1, hidden), nn.BatchNorm1d(hidden)
        self.gate_fc, self.gate_bn = tf_linear(vertex_dim + 1, hidden), nn.BatchNorm1d(hidden)

    def forward(self, c: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``c: [B, Dv]`` (point ``l``), ``c_prev: [B, De]`` (point ``l-1``) -> ``([B, B], [B, B, iters*D])``."""
        e = F.normalize(self.edge_bn(self.edge_fc(c_prev)), dim=-1)        # [B, D]
        edges = e[:, None, :] * e[None, :, :] * self.hidden                 # [B, B, D]
        h = c[:, None, :] - c[None, :, :]                                   # [B, B, Dv]
        messages = []
        for _ in range(self.iters):
            x = torch.cat([h, edges.mean(-1, keepdim=True)], -1)
            m = _bn_pairs(self.msg_bn, self.msg_fc(x)) * torch.sigmoid(_bn_pairs(self.gate_bn, self.gate_fc(x)))
            edges = edges + m
            messages.append(m)
        return edges.mean(-1), torch.cat(messages, -1)


class AttentionHeads(nn.Module):
    """The black-box graph's heads (``Distillation.py:173-188``): ``heads`` graphs
    ``G_h = S_h R_hᵀ`` with ``S = BN(FC(c_l))``, ``R = BN(FC(c_{l-1}))`` reshaped ``[B, D, heads]``.
    ``c: [B, Dk]``, ``c_prev: [B, Dq]`` -> ``[heads, B, B]``."""

    def __init__(self, key_dim: int, query_dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.hidden, self.heads = hidden, heads
        self.s_fc, self.s_bn = tf_linear(key_dim, hidden * heads), nn.BatchNorm1d(hidden * heads)
        self.r_fc, self.r_bn = tf_linear(query_dim, hidden * heads), nn.BatchNorm1d(hidden * heads)

    def forward(self, c: torch.Tensor, c_prev: torch.Tensor) -> torch.Tensor:
        b = c.shape[0]
        s = self.s_bn(self.s_fc(c)).reshape(b, self.hidden, self.heads).permute(2, 0, 1)       # [H, B, D]
        r = self.r_bn(self.r_fc(c_prev)).reshape(b, self.hidden, self.heads).permute(2, 1, 0)  # [H, D, B]
        return s @ r


class Estimator(nn.Module):
    """What trains the black-box heads (``Distillation.py:190-219``): estimate ``c_l`` from
    ``c_{l-1}`` through the softmaxed heads plus the extrinsic graph (the MPNN's mean message),
    half of the heads dropped per sample (``drop_head``: noise above its mean over heads).

    ``c_prev: [B, Dx]``, ``g: [H, B, B]`` (logits), ``extrinsic: [B, B]`` -> ``[B, Dy]`` unit rows.
    """

    def __init__(self, x_dim: int, y_dim: int, heads: int) -> None:
        super().__init__()
        hidden = (x_dim + y_dim) // 2
        self.fc0, self.bn0 = tf_linear(x_dim, hidden), nn.BatchNorm1d(hidden)
        self.fc1 = tf_linear(hidden * heads, y_dim, bias=True)

    def forward(self, c_prev: torch.Tensor, g: torch.Tensor, extrinsic: torch.Tensor | None) -> torch.Tensor:
        b = c_prev.shape[0]
        g = torch.softmax(g, -1)
        if extrinsic is not None:
            g = torch.cat([g, extrinsic.detach()[None]], 0)
        n = g.shape[0]
        noise = torch.randn(n, b, 1, dtype=g.dtype, device=g.device)
        g = g * (noise - noise.mean(0, keepdim=True) > 0).to(g.dtype)
        x = torch.relu(self.bn0(self.fc0(c_prev)))                          # [B, D]
        x = (g.reshape(n * b, b) @ x).reshape(n, b, -1).transpose(0, 1).reshape(b, -1)
        return F.normalize(self.fc1(x), dim=-1)


def clip_scale(norm: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """The factor of ``tf.clip_by_norm``: ``limit / max(norm, limit)`` (1 where both are 0)."""
    top = torch.maximum(norm, limit)
    return torch.where(top > 0, limit / torch.where(top > 0, top, torch.ones_like(top)), torch.ones_like(top))


def ramp(epoch: int) -> float:
    """The author's ramp of the clipping norm, ``sigmoid(epoch)`` (1 once above ``1 - 1e-8``), at
    the student phase's ``epoch`` (0-based): 0.5, 0.731, 0.881, ... (the ``sigmoid`` of the author's
    ``op_util.py`` in ``sseung0703/KD_methods_with_TF``, used by its MHGD optimiser; IEPKT's is missing)."""
    s = 1.0 / (1.0 + math.exp(-float(epoch)))
    return 1.0 if s > 1 - 1e-8 else s
