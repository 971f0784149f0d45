"""The run's model, its linear head after global average pooling, and the exact logit decomposition.

A layer *feeds a linear head through global pooling* when the model's output equals
``V · mean_hw(a(x)) + c`` for one ``nn.Linear`` (``V [n_classes, C]``); :func:`linear_head` finds
that module and checks it on a random input (a layer followed by more computation is refused).

Decomposition (:func:`decompose_logit`): with the pooled feature ``f [C]`` and the concept basis
``W [K, C]``, least squares gives ``f = Wᵀβ + r`` (``β = pinv(Wᵀ) f``, ``r`` the residual), so
``logit_k = Σ_c β_c (V_k · w_c) + V_k · r + c_k`` exactly: the parts add up to the logit. Concepts
with (nearly) the same vector (e.g. ``car`` and ``orange`` on a set where every car is orange)
make the basis ill-conditioned: singular values below :data:`RCOND` times the largest are cut
(truncated SVD, the minimum-norm solution), so such concepts share their part instead of
cancelling with huge opposite parts; what is cut goes to the residual and the sum stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from neurosem.errors import NeurosemError

#: relative tolerance of the check that the head is linear after global average pooling
HEAD_RTOL = 1e-4
#: relative singular-value cutoff of the least-squares split over the concept basis
RCOND = 1e-2


@dataclass
class LinearHead:
    """``weight [n_classes, C]``, ``bias [n_classes]`` (float64) of the module ``name``."""

    name: str
    weight: np.ndarray
    bias: np.ndarray


def run_model(cv: Any, model: Any = None) -> tuple[Any, str | None]:
    """``(LoadedModel, None)`` for the run of concept vectors ``cv`` (``model`` when given), or
    ``(None, why)`` when the recorded model cannot be loaded here, or loads with other weights
    than the recorded ones (an unseeded factory)."""
    from neurosem.models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model, None
    prov = cv.args.get("provenance") or {}
    spec = model if isinstance(model, str) else prov.get("model")
    if not spec:
        return None, "the run does not record its model"
    weights = prov.get("weights_arg") or "default"
    try:
        lm = load_model(spec, weights, warn=False)
    except NeurosemError as exc:
        return None, f"the model {spec!r} cannot be loaded ({exc})"
    recorded = prov.get("weights")
    if recorded and lm.weights != recorded and not isinstance(model, str):
        return None, (f"the model {spec!r} built now has other weights ({lm.weights}) than the recorded ones "
                      f"({recorded}): its factory is not seeded; pass the model itself")
    return lm, None


def _forward(lm: Any, layer: str, x: Any) -> tuple[Any, Any]:
    """``(output [B, n], layer maps [B, C, h, w])`` of one forward pass."""
    from neurosem.record import Recorder

    with Recorder(lm.model, [layer], to_cpu=False) as rec:
        out = rec.forward(x)
    return out, rec.outputs[layer]


def layer_and_logits(lm: Any, layer: str, image: Any, mean: Any, std: Any) -> tuple[Any, Any]:
    """``(logits [n] float64, maps [C, h, w])`` of one image ``[3, H, W]`` in [0, 1] normalised by ``mean, std``."""
    import torch

    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    with torch.inference_mode():
        out, maps = _forward(lm, layer, (image[None].float() - m) / s)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise NeurosemError("the model's output is not a [batch, classes] tensor; explain needs a classifier")
    return out[0].double(), maps[0].float()


def linear_head(lm: Any, layer: str, input_size: tuple[int, int, int], seed: int = 0) -> tuple[LinearHead | None, str]:
    """The linear head ``layer`` feeds through global average pooling, or ``(None, why not)``.

    Checked on a random input: the model's output must equal ``V · mean_hw(maps) + c`` of one
    ``nn.Linear`` whose ``in_features`` is the layer's width.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((2, *input_size), generator=gen)
    with torch.inference_mode():
        out, maps = _forward(lm, layer, x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return None, "the model's output is not a [batch, classes] tensor"
    pooled = maps.double().mean((2, 3))
    c = pooled.shape[1]
    for name, mod in lm.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.in_features == c and mod.out_features == out.shape[1]:
            w = mod.weight.detach().double()
            b = mod.bias.detach().double() if mod.bias is not None else torch.zeros(mod.out_features, dtype=torch.float64)
            pred = pooled @ w.T + b
            scale = float(out.double().abs().max()) + 1.0
            if float((pred - out.double()).abs().max()) <= HEAD_RTOL * scale:
                return LinearHead(name, w.numpy(), b.numpy()), ""
    return None, (f"{layer} does not feed a linear classifier through global average pooling (no nn.Linear "
                  f"of {c} inputs reproduces the output from the pooled maps)")


@dataclass
class Decomposition:
    """One class logit split over the concept basis: ``logit = Σ parts + residual + bias``.

    Attributes:
        logit (the model's), parts ``[K]`` (β_c · V_k·w_c), coef ``[K]`` (β), residual (V_k · r), bias (c_k).
    """

    logit: float
    parts: np.ndarray
    coef: np.ndarray
    residual: float
    bias: float

    @property
    def total(self) -> float:
        """``Σ parts + residual + bias`` (equal to :attr:`logit` up to float64 rounding)."""
        return float(self.parts.sum() + self.residual + self.bias)


def decompose_logit(pooled: np.ndarray, W: np.ndarray, head: LinearHead, k: int) -> Decomposition:
    """Split class ``k``'s logit of the pooled feature ``pooled [C]`` over the concept vectors ``W [K, C]``.

    Example:
        >>> head = LinearHead("fc", np.array([[1.0, 2.0]]), np.array([0.5]))
        >>> d = decompose_logit(np.array([1.0, 1.0]), np.array([[1.0, 0.0]]), head, 0)
        >>> d.parts.tolist(), d.residual, d.bias, d.logit
        ([1.0], 2.0, 0.5, 3.5)
    """
    f = np.asarray(pooled, dtype=np.float64)
    basis = np.asarray(W, dtype=np.float64)                    # [K, C]
    coef = np.linalg.lstsq(basis.T, f, rcond=RCOND)[0]         # [K]
    r = f - basis.T @ coef
    v = head.weight[k]
    return Decomposition(logit=float(v @ f + head.bias[k]), parts=coef * (basis @ v), coef=coef,
                         residual=float(v @ r), bias=float(head.bias[k]))
