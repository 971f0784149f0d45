"""Semantic vectors per neuron (paper arXiv 2211.07647, eq. 1).

For a layer with C units, image n gives activation maps A_n in R^{C x HW} and

    P_n(j|i) = softmax_j( cos(a_ni, a_nj) / tau )        (targets, from the activations)
    Q(j|i)   = softmax_j( cos(s_i, s_j) / tau )          (model, from S in R^{C x K})
    L_emb    = -(1/C) sum_i sum_j mean_n P_n(j|i) log Q(j|i),   averaged over layers.

Conventions (fixed here, used everywhere):

- The sum over j includes j = i, as in eq. 1 (the paper sums over all pairs i, j). The diagonal
  holds cos = 1 for every non-zero map and vector.
- A map (or vector) that is all zero is normalised with an epsilon, so it has cosine 0 with every
  map, itself included: never NaN.
- ``temperature`` (tau) divides the cosines before both softmaxes; tau = 1 is the paper's formula.
  Cosines of non-negative (post-ReLU) maps lie in [0, 1], so with tau = 1 no two logits of a row
  differ by more than 1 and every P(j|i) lies within a factor e of every other: the targets are
  nearly uniform (row entropy close to log C) and the loss changes little with S. A smaller tau
  sharpens both P and Q (logit range 1/tau), so the vectors follow the strongest similarities more
  closely; as tau -> 0 each row of P concentrates on i itself (the diagonal) and then on the most
  similar units. ``benchmarks/embed.py`` prints the spread of P-bar and the neighbour overlap for
  several tau.

Q does not depend on the image, so the loss is linear in P and P-bar = mean_n P_n is a sufficient
statistic: the ``fit`` trainer accumulates P-bar in one streaming pass (:class:`PbarAccumulator`)
and minimises the same objective at full batch; the ``paper`` trainer runs the paper's SGD protocol
on mini-batches. The trainers live in :mod:`neurosem._embed_train`; this module holds the loss, the
accumulator, :func:`embed` (the stage) and :func:`load_embedding`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from neurosem.errors import NeurosemError, RunMismatchError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

#: Norm floor used to normalise maps and vectors (an all-zero row gets cosine 0 with everything).
EPS = 1e-12
#: Elements allowed in one temporary [b, C, C] / [b, C, D] block while accumulating P-bar.
_BLOCK_ELEMENTS = 1 << 25


# ---------------------------------------------------------------------------------------------
# the loss

def cosine_matrix(x: "torch.Tensor", eps: float = EPS) -> "torch.Tensor":
    """Pairwise cosine similarities of the rows: ``x [..., C, D] -> [..., C, C]``.

    Half-precision input is computed in float32; an all-zero row has cosine 0 with every row.

    Example:
        >>> import torch
        >>> cosine_matrix(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        tensor([[1., 0.],
                [0., 0.]])
    """
    import torch

    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        x = x.float()
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    return xn @ xn.transpose(-1, -2)


def similarity_probs(x: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
    """Row-wise softmax of cosine similarities: ``x [B, C, D] -> P [B, C, C]`` (or ``[C, D] -> [C, C]``).

    ``P[b, i, j] = exp(cos(x_bi, x_bj)/tau) / sum_j' exp(cos(x_bi, x_bj')/tau)``; the diagonal j = i
    is included (eq. 1 sums over all i, j). ``x`` may also be activation maps ``[B, C, H, W]``; the
    spatial dimensions are flattened.

    Example:
        >>> import torch
        >>> similarity_probs(torch.eye(2)[None]).sum(-1)
        tensor([[1., 1.]])
    """
    _check_temperature(temperature)
    if x.dim() == 4:
        x = x.flatten(2)
    return (cosine_matrix(x) / temperature).softmax(dim=-1)


def log_similarity_probs(s: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
    """``log Q`` for vectors ``s [..., C, K]`` (a numerically stable log-softmax): ``[..., C, C]``."""
    _check_temperature(temperature)
    return (cosine_matrix(s) / temperature).log_softmax(dim=-1)


def embedding_loss(P: "torch.Tensor", S: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
    """Eq. 1 for one layer: ``-(1/C) sum_i sum_j P(j|i) log Q(j|i)`` with Q from ``S [C, K]``.

    ``P`` is ``[C, C]`` (e.g. P-bar) or ``[B, C, C]`` (one P_n per image; the loss is then the mean
    over the batch, which equals the loss of the batch mean). The multi-layer loss is the mean of
    this over layers. Computed in the wider dtype of ``P`` and ``S``.

    Example:
        >>> import torch
        >>> P = torch.full((3, 3), 1 / 3)
        >>> round(float(embedding_loss(P, torch.eye(3))), 4)  # log(e + 2) - 1/3
        1.2301
    """
    import torch

    C = S.shape[0]
    if P.shape[-2:] != (C, C) or P.dim() not in (2, 3):
        raise ValueError(f"P must be [C, C] or [B, C, C] with C = {C}; got {tuple(P.shape)}")
    dtype = torch.promote_types(P.dtype, S.dtype)
    log_q = log_similarity_probs(S.to(dtype), temperature)
    P = P.to(dtype)
    if P.dim() == 3:
        P = P.mean(0)
    return -(P * log_q).sum() / C


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise NeurosemError(f"--temperature must be > 0 (got {temperature}); 1 is the paper's formula")


# ---------------------------------------------------------------------------------------------
# P-bar

def accumulation_device(device: "torch.device") -> "torch.device":
    """Where float64 statistics live: ``device`` itself, except MPS (no float64) -> CPU."""
    import torch

    return torch.device("cpu") if device.type == "mps" else device


def as_tensor(acts: Any, device: "torch.device | None" = None) -> "torch.Tensor":
    """A NumPy array or tensor on ``device`` (transferred as is, e.g. float16; cast on the device)."""
    import torch

    t = acts if isinstance(acts, torch.Tensor) else torch.from_numpy(acts)
    if device is not None and t.device != device:
        t = t.to(device, non_blocking=True)
    return t


def check_finite(acts: "torch.Tensor", layer: str, start: int | None = None,
                 image_ids: Sequence[str] | None = None) -> None:
    """Raise a one-line error naming the layer and the first image whose activations are NaN/Inf.

    ``acts [B, ...]`` are images ``start .. start + B`` of the data (``start=None``: batch-relative).
    """
    import torch

    if bool(torch.isfinite(acts).all()):
        return
    bad = int((~torch.isfinite(acts.flatten(1))).any(1).nonzero()[0, 0])
    where = f"image {bad}" + (" of this batch" if start is None else "") if start is None else f"image {start + bad}"
    if image_ids is not None and start is not None and start + bad < len(image_ids):
        where += f" ({image_ids[start + bad]})"
    raise NeurosemError(
        f"activations of layer {layer!r} are NaN/Inf at {where}: check the model and its weights "
        "(a float16 store overflows above 65504: use --no-store), then record again with --force")


class PbarAccumulator:
    """Streaming mean of P_n over images for one layer, in float64 on the device.

    Args:
        n_units: C, the number of units (channels) of the layer.
        temperature: tau of :func:`similarity_probs`.
        device: where the [C, C] float64 sum lives (default: the device of the first batch;
            MPS -> CPU, which has no float64).
        name: the layer name, used in error messages.

    Example:
        >>> import torch
        >>> acc = PbarAccumulator(2)
        >>> acc.add(torch.ones(3, 2, 4, 4))
        >>> acc.result()
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]], dtype=torch.float64)
    """

    def __init__(self, n_units: int, temperature: float = 1.0, device: "torch.device | str | None" = None,
                 name: str = "") -> None:
        _check_temperature(temperature)
        self.n_units = int(n_units)
        self.temperature = float(temperature)
        self.name = name
        self._device = None if device is None else _as_device(device)
        self._sum: "torch.Tensor | None" = None
        self.count = 0

    def add(self, acts: Any, start: int | None = None, image_ids: Sequence[str] | None = None) -> None:
        """Add a batch ``acts [B, C, H, W]`` (or ``[B, C, D]``; tensor or NumPy array, any float dtype).

        ``start`` (the index of the batch's first image) only serves error messages.
        """
        import torch

        x = as_tensor(acts, self._device)
        if x.dim() < 3 or x.shape[1] != self.n_units:
            raise ValueError(f"expected activations [B, {self.n_units}, ...] for layer {self.name!r}; "
                             f"got {tuple(x.shape)}")
        x = x.flatten(2)
        check_finite(x, self.name, start, image_ids)
        if self._sum is None:
            dev = accumulation_device(self._device or x.device)
            self._sum = torch.zeros(self.n_units, self.n_units, dtype=torch.float64, device=dev)
        C, D = self.n_units, x.shape[2]
        step = max(1, _BLOCK_ELEMENTS // max(C * C, C * D))
        for b in range(0, x.shape[0], step):
            P = similarity_probs(x[b:b + step], self.temperature)
            self._sum += P.sum(0, dtype=torch.float64).to(self._sum.device)
        self.count += x.shape[0]

    def result(self) -> "torch.Tensor":
        """P-bar ``[C, C]`` float64 (each row sums to 1)."""
        if self.count == 0 or self._sum is None:
            raise NeurosemError(f"no images were seen for layer {self.name!r}: the dataset is empty")
        return self._sum / self.count

    def state_dict(self) -> dict[str, Any]:
        return {"n_units": self.n_units, "temperature": self.temperature, "count": self.count,
                "sum": None if self._sum is None else self._sum.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["n_units"]) != self.n_units or float(state["temperature"]) != self.temperature:
            raise ValueError(f"state for C={state['n_units']}, tau={state['temperature']} does not match "
                             f"C={self.n_units}, tau={self.temperature}")
        self.count = int(state["count"])
        s = state["sum"]
        if s is None:
            self._sum = None
        else:
            dev = accumulation_device(self._device or s.device)
            self._sum = s.to(dev, dtype=s.dtype).clone()


def _as_device(device: "torch.device | str") -> "torch.device":
    import torch

    return device if isinstance(device, torch.device) else torch.device(device)


def accumulate_pbar(batches: Iterable[tuple[int, Mapping[str, Any]]], n_units: Mapping[str, int],
                    temperature: float = 1.0, device: "torch.device | str | None" = None,
                    image_ids: Sequence[str] | None = None) -> "dict[str, torch.Tensor]":
    """One pass over ``(start, {layer: acts [B, C, H, W]})`` batches -> ``{layer: P-bar [C, C] float64}``.

    ``batches`` is e.g. ``ActivationStore.iter_batches(layers)``; NaN/Inf raise a one-line error
    naming the layer and the first bad image.

    Example:
        >>> import torch
        >>> pbar = accumulate_pbar([(0, {"l": torch.rand(4, 3, 2, 2)})], {"l": 3})
        >>> pbar["l"].shape
        torch.Size([3, 3])
    """
    accs = {layer: PbarAccumulator(c, temperature, device, name=layer) for layer, c in n_units.items()}
    for start, acts in batches:
        for layer, acc in accs.items():
            acc.add(acts[layer], start, image_ids)
    return {layer: acc.result() for layer, acc in accs.items()}
