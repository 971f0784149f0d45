"""Exact per-unit top quantiles in one streaming pass, and the top-activating images per unit.

NetDissect thresholds each unit at the ``1 - q`` quantile (q = 0.005) of its raw activations over
all images and positions. NetDissect-Lite estimates it with a sketch; here it is exact and cheap:
with ``M`` values per unit, ``numpy.quantile(values, 1 - q)`` (method ``linear``) only looks at the
sorted positions ``floor((M - 1)(1 - q))`` and the one after it, so it is enough to keep the
``M - floor((M - 1)(1 - q))`` (about ``q·M + 1``) largest values of each unit. They are kept in a
buffer on the device; a batch only contributes the values above the unit's current k-th largest,
and the buffer is compacted with ``topk`` when it fills up, so the cost per batch is a few linear
passes and the memory is ``O(k)`` per unit, whatever the number of images.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from neurosem.errors import NeurosemError


def top_count(total: int, q: float) -> int:
    """How many of the largest values ``numpy.quantile(values, 1 - q)`` depends on.

    With ``total`` values the linear quantile sits at the sorted (ascending) position
    ``v = (total - 1)(1 - q)`` and interpolates between positions ``floor(v)`` and ``floor(v) + 1``,
    i.e. between the ``total - floor(v)``-th and the ``total - floor(v) - 1``-th largest values.

    Example:
        >>> top_count(1000, 0.005)
        6
    """
    if total <= 0:
        return 0
    v = (total - 1) * (1.0 - q)
    i = total - 1 if v >= total - 1 else math.floor(v)
    return total - i


def quantile_from_top(top: np.ndarray, total: int, q: float) -> np.ndarray:
    """``numpy.quantile(all_values, 1 - q)`` per row, from each row's largest values.

    Args:
        top: ``[C, k]`` the ``k >= top_count(total, q)`` largest values of each row, sorted in
            descending order.
        total: the number of values each row had.
        q: the upper tail fraction.

    Returns:
        ``[C]`` float64, bit-identical to ``numpy.quantile(values.astype(float64), 1 - q)``
        (numpy's ``linear`` method and its ``_lerp`` rounding).
    """
    top = np.asarray(top, dtype=np.float64)
    v = (total - 1) * (1.0 - q)
    if v >= total - 1:
        return top[:, 0].copy()
    i = math.floor(v)
    # ascending positions i and i + 1
    return lerp_quantile(top[:, total - 1 - i], top[:, total - 2 - i], total, q)


def lerp_quantile(a: np.ndarray, b: np.ndarray, total: int, q: float) -> np.ndarray:
    """numpy's ``linear`` interpolation between the values at the ascending positions
    ``floor(v)`` (``a``) and ``floor(v) + 1`` (``b``), ``v = (total - 1)(1 - q)``, with numpy's
    ``_lerp`` rounding; ``a`` alone when ``v`` is the last position.

    Example:
        >>> import numpy as np
        >>> float(lerp_quantile(np.array([1.0]), np.array([2.0]), total=5, q=0.1)[0])  # v = 3.6
        1.6
    """
    a = np.asarray(a, dtype=np.float64)
    v = (total - 1) * (1.0 - q)
    if v >= total - 1:
        return a.copy()
    t = np.float64(v - math.floor(v))
    b = np.asarray(b, dtype=np.float64)
    diff = b - a
    if t >= 0.5:
        return b - diff * (1 - t)
    return a + diff * t


class TopQuantile:
    """Exact streaming ``1 - q`` quantile of every unit's activations.

    Args:
        n_units: ``C``, the number of channels.
        q: the upper tail fraction (NetDissect: 0.005), ``0 <= q < 1``.
        total: the number of values each unit will receive (``N·H·W``). When given, memory is
            ``top_count(total, q) + 1`` values per unit and the result is always exact. When
            ``None`` the kept count grows with the values seen (twice what is needed so far), and
            :meth:`result` checks that nothing it needed was dropped (it raises if so, asking for
            ``total``).
        device: where the buffer lives (``None``: the device of the first batch).

    Example:
        >>> import torch, numpy as np
        >>> acts = torch.randn(10, 3, 4, 4)
        >>> tq = TopQuantile(3, q=0.05, total=10 * 16)
        >>> tq.add(acts[:6]); tq.add(acts[6:])
        >>> ref = np.quantile(acts.double().transpose(0, 1).reshape(3, -1).numpy(), 0.95, axis=1)
        >>> bool(np.allclose(tq.result().numpy(), ref, rtol=0, atol=0))
        True
    """

    def __init__(self, n_units: int, q: float = 0.005, total: int | None = None,
                 device: Any = None) -> None:
        if not 0.0 <= float(q) < 1.0:
            raise NeurosemError(f"quantile q={q} is out of range: use 0 <= q < 1 (NetDissect: 0.005)")
        if total is not None and int(total) <= 0:
            raise NeurosemError(f"total={total} values per unit: it must be positive")
        self.n_units = int(n_units)
        self.q = float(q)
        self.total = None if total is None else int(total)
        self.device = device
        self.count = 0                      # values seen per unit
        self.k = top_count(self.total, self.q) + 1 if self.total is not None else 64
        self._buf = None                    # [C, cap]; columns [0, fill) are valid
        self._fill = 0
        self._floor = None                  # [C] values <= floor can never matter (k-th largest kept)
        self._dropped = None                # [C] the largest value ever discarded

    # -- streaming -------------------------------------------------------------------------------
    def _alloc(self, dtype: Any, device: Any) -> None:
        import torch

        self.device = device if self.device is None else self.device
        self._dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._buf = torch.empty(self.n_units, 2 * self.k, dtype=self._dtype, device=self.device)
        ninf = torch.full((self.n_units,), -math.inf, dtype=self._dtype, device=self.device)
        self._floor, self._dropped = ninf, ninf.clone()

    def add(self, acts: Any) -> None:
        """Add a batch. ``acts``: ``[B, C, ...]`` (any trailing spatial shape), tensor or array."""
        import torch

        x = torch.as_tensor(acts)
        if x.dim() < 2 or x.shape[1] != self.n_units:
            raise NeurosemError(
                f"TopQuantile expects activations [B, {self.n_units}, ...], got {tuple(x.shape)}")
        if self._buf is None:
            self._alloc(x.dtype, x.device if self.device is None else self.device)
        n = x[0, 0].numel() * x.shape[0]
        if n == 0:
            return
        if self.total is not None and self.count + n > self.total:
            raise NeurosemError(
                f"TopQuantile got {self.count + n} values per unit but was told total={self.total}")
        flat = x.to(device=self.device, dtype=self._dtype).transpose(0, 1).reshape(self.n_units, -1)
        if bool(torch.isnan(flat).any()):
            unit = int(torch.isnan(flat).any(1).nonzero()[0])
            raise NeurosemError(f"unit {unit} has NaN activations: check the model and its weights")
        self.count += n
        if self.total is None:
            need = 2 * top_count(self.count, self.q) + 16
            if need > self.k:
                self._grow(need)

        # Values tied with the k-th largest kept one are dropped when `total` is known (the kept
        # copy has the same value); without `total` the kept count may still grow, so ties stay.
        floor = self._floor[:, None]
        keep = flat > floor if self.total is not None else flat >= floor
        dropped = torch.where(keep, torch.full_like(flat, -math.inf), flat).amax(1)
        self._dropped = torch.maximum(self._dropped, dropped)
        kc = int(keep.sum(1).max())
        if kc == 0:
            return
        cand = torch.where(keep, flat, torch.full_like(flat, -math.inf))
        if kc < cand.shape[1]:
            cand = cand.topk(kc, dim=1, sorted=False).values
        cap = self._buf.shape[1]
        if self._fill + kc <= cap:
            self._buf[:, self._fill:self._fill + kc] = cand
            self._fill += kc
        else:
            self._compact(cand)

    def _grow(self, k: int) -> None:
        import torch

        buf = torch.empty(self.n_units, 2 * k, dtype=self._dtype, device=self.device)
        buf[:, :self._fill] = self._buf[:, :self._fill]
        self._buf, self.k = buf, k

    def _compact(self, extra: Any = None) -> None:
        """Keep the k largest of the buffer (and ``extra``); remember the largest one dropped."""
        import torch

        merged = self._buf[:, :self._fill]
        if extra is not None:
            merged = torch.cat([merged, extra], dim=1)
        if merged.shape[1] > self.k:
            top = merged.topk(self.k + 1, dim=1, sorted=False).values
            low = top.argmin(dim=1)
            self._dropped = torch.maximum(self._dropped, top.gather(1, low[:, None])[:, 0])
            keep = torch.ones_like(top, dtype=torch.bool)
            keep[torch.arange(self.n_units, device=top.device), low] = False
            merged = top[keep].view(self.n_units, self.k)
            self._floor = merged.amin(1)
        self._buf[:, :merged.shape[1]] = merged
        self._fill = merged.shape[1]

    # -- results ---------------------------------------------------------------------------------
    def top_values(self) -> Any:
        """``[C, top_count(count, q)]`` the largest values per unit, descending (on the device)."""
        import torch

        if self.count == 0:
            raise NeurosemError("TopQuantile.result() before any add(): there are no activations")
        need = top_count(self.count, self.q)
        valid = self._buf[:, :self._fill]
        if valid.shape[1] < need:           # only without `total`: fewer kept than now needed
            pad = torch.full((self.n_units, need - valid.shape[1]), -math.inf, dtype=valid.dtype,
                             device=valid.device)
            valid = torch.cat([valid, pad], 1)
        top = valid.topk(need, dim=1, sorted=True).values
        # Exact unless a value dropped earlier is larger than one we now rely on (only possible
        # when `total` was not given and the largest values came late).
        if bool((top[:, -1] < self._dropped).any()):
            raise NeurosemError(
                "TopQuantile without `total` dropped values it needs: pass total=N*H*W up front")
        return top

    def result(self) -> Any:
        """``[C]`` float64 thresholds (CPU tensor), equal to ``numpy.quantile(values, 1 - q)``."""
        import torch

        top = self.top_values().cpu().double().numpy()
        return torch.from_numpy(quantile_from_top(top, self.count, self.q))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the kept values and the counters (CPU tensors)."""
        import torch

        empty = self._buf is None
        return {
            "n_units": self.n_units, "q": self.q, "total": self.total, "count": self.count,
            "k": self.k,
            "values": torch.empty(self.n_units, 0) if empty else self._buf[:, :self._fill].cpu(),
            "floor": None if empty else self._floor.cpu(),
            "dropped": None if empty else self._dropped.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (onto this object's device)."""
        import torch

        if int(state["n_units"]) != self.n_units:
            raise NeurosemError(
                f"TopQuantile state has {state['n_units']} units, this one {self.n_units}")
        self.q, self.total = float(state["q"]), state["total"]
        self.count, self.k = int(state["count"]), int(state["k"])
        if state["floor"] is None:
            self._buf = None
            self._fill = 0
            return
        values = state["values"]
        self._alloc(values.dtype, self.device if self.device is not None else torch.device("cpu"))
        self._fill = values.shape[1]
        self._buf[:, :self._fill] = values.to(self.device)
        self._floor = state["floor"].to(device=self.device, dtype=self._dtype)
        self._dropped = state["dropped"].to(device=self.device, dtype=self._dtype)


class TopImages:
    """The ``k`` images with the largest maximum activation, per unit (for the HTML report).

    Images with equal maxima (common for saturated or ReLU-clipped units) are ordered by their mean
    activation, then the earlier image first. ``result()`` gives ``(values [C, k], indices [C, k])``
    (values are the maxima), with index -1 (value -inf) where fewer than ``k`` images were seen.

    Example:
        >>> import torch
        >>> ti = TopImages(2, k=1)
        >>> ti.add(torch.tensor([[[[1.]], [[5.]]], [[[3.]], [[2.]]]]), start=0)
        >>> ti.result()[1].tolist()
        [[1], [0]]
    """

    def __init__(self, n_units: int, k: int = 4, device: Any = None) -> None:
        self.n_units, self.k, self.device = int(n_units), int(k), device
        self._values = None
        self._means = None
        self._indices = None

    def _empty(self) -> None:
        import torch

        self._values = torch.full((self.n_units, 0), -math.inf, device=self.device)
        self._means = torch.full((self.n_units, 0), -math.inf, device=self.device)
        self._indices = torch.full((self.n_units, 0), -1, dtype=torch.long, device=self.device)

    def add(self, acts: Any, start: int) -> None:
        """``acts``: ``[B, C, ...]`` for images ``start .. start + B - 1``."""
        import torch

        x = torch.as_tensor(acts)
        if self.device is None:
            self.device = x.device
        x = x.to(self.device)
        b = x.shape[0]
        flat = x.reshape(b, self.n_units, -1)
        peak = flat.amax(2).float().t()                                    # [C, B]
        mean = flat.float().mean(2).t()                                    # [C, B]
        idx = torch.arange(start, start + b, device=self.device).expand(self.n_units, b)
        if self._values is None:
            self._empty()
        vals = torch.cat([self._values, peak], dim=1)
        means = torch.cat([self._means, mean], dim=1)
        inds = torch.cat([self._indices, idx], dim=1)
        # Two stable sorts: by mean, then by peak; equal peaks keep the mean order, equal both
        # keep the earlier image (kept images come first and are earlier than the new batch).
        by_mean = torch.sort(means, dim=1, descending=True, stable=True).indices
        vals, means, inds = vals.gather(1, by_mean), means.gather(1, by_mean), inds.gather(1, by_mean)
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :self.k]
        self._values, self._means, self._indices = vals.gather(1, order), means.gather(1, order), inds.gather(1, order)

    def _padded(self) -> tuple[Any, Any, Any]:
        import torch

        if self._values is None:
            self._empty()
        pad = self.k - self._values.shape[1]
        vals, means, inds = self._values.cpu(), self._means.cpu(), self._indices.cpu()
        if pad > 0:
            fill = torch.full((self.n_units, pad), -math.inf)
            vals, means = torch.cat([vals, fill], 1), torch.cat([means, fill], 1)
            inds = torch.cat([inds, torch.full((self.n_units, pad), -1, dtype=torch.long)], 1)
        return vals, means, inds

    def result(self) -> tuple[Any, Any]:
        vals, _, inds = self._padded()
        return vals, inds

    def state_dict(self) -> dict[str, Any]:
        vals, means, inds = self._padded()
        return {"n_units": self.n_units, "k": self.k, "values": vals, "means": means, "indices": inds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_units, self.k = int(state["n_units"]), int(state["k"])
        dev = self.device if self.device is not None else "cpu"
        keep = state["indices"] >= 0
        n = int(keep.sum(1).min()) if keep.numel() else 0
        self._values = state["values"][:, :n].to(dev)
        self._means = state["means"][:, :n].to(dev)
        self._indices = state["indices"][:, :n].to(dev)
