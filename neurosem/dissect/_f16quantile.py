"""The exact ``1 - q`` quantile per unit of float16 activations (:class:`F16Quantile`): a histogram
of the 65,536 possible bit patterns per unit that skips the values which can no longer be among the
top q·M, computed by compiled kernels (numba) on blocks of units (:class:`~neurosem.dissect._kernels.Workers`).
The result is bit-identical to ``numpy.quantile`` of the values in float64
(tests/dissect/test_kernels.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from neurosem.dissect._kernels import F16_TABLE, HAVE_NUMBA, Workers

if HAVE_NUMBA:
    from numba import njit

    from neurosem.dissect._kernels import _sort_key

#: sortable key (uint16 order = value order) -> float16 bit pattern
_KEY_TO_BITS = np.where(np.arange(65536) >= 0x8000, np.arange(65536) ^ 0x8000,
                        (~np.arange(65536)) & 0xFFFF).astype(np.uint16)


if HAVE_NUMBA:
    @njit(cache=True, nogil=True, inline="always")
    def _raise_floor(hist, coarse, u, f, need):  # pragma: no cover - compiled
        """The highest key ``>= f`` with at least ``need`` counted values at or above it: the bucket
        (key high byte) from the coarse counts, then the key within it from the fine ones."""
        seen = 0
        k = 255
        while k >= (f >> 8):
            if seen + coarse[u, k] >= need:
                break
            seen += coarse[u, k]
            k -= 1
        if k < (f >> 8):
            return f
        key = k * 256 + 255
        while key > f:
            seen += hist[u, key]
            if seen >= need:
                return key
            key -= 1
        return f

    @njit(cache=True, nogil=True)
    def _histogram(bits, hist, coarse, floor, pending, nan, need, u0, u1):  # pragma: no cover - compiled
        """Count the float16 values of ``bits [B, C, S]`` per unit by sortable key (``hist [C, 65536]``,
        and by the key's high byte in ``coarse [C, 256]``), skipping the values whose key is below
        ``floor[u]``: at least ``need`` values were already counted at or above it, so they can never
        be among the ``need`` largest (floors only rise, so every count at or above the floor is
        complete). The floor is raised once 256 more values were counted (amortised, one scan of
        at most 256 fine counts); while it lies among the positive values, a value below it is
        rejected by one comparison of its bits. Units ``u0 .. u1 - 1`` only (one task of
        :class:`Workers`); the images are the outer loop (contiguous reads)."""
        b_n, c_n, s_n = bits.shape
        for b in range(b_n):
            for u in range(u0, u1):
                f = floor[u]
                # positive float16 bits below `low` have a key below f (and are no NaN)
                low = f - 0x8000 if f >= 0x8000 else 0
                counted = 0
                for s in range(s_n):
                    v = np.int64(bits[b, u, s])
                    if v < low:
                        continue
                    if (v & 0x7FFF) > 0x7C00:
                        nan[u] += 1
                        continue
                    key = _sort_key(v)
                    if key >= f:
                        hist[u, key] += 1
                        coarse[u, key >> 8] += 1
                        counted += 1
                if counted:
                    pending[u] += counted
                    if pending[u] >= 256 or f == 0:
                        floor[u] = _raise_floor(hist, coarse, u, f, need)
                        pending[u] = 0

    @njit(cache=True, nogil=True)
    def _prime_floors(bits, floor, need, u0, u1):  # pragma: no cover - compiled
        """For the units whose floor is still 0: the lowest key of the highest bucket (key high
        byte) holding, with the buckets above it, at least ``need`` of this batch's values
        (``bits [B, C, S]``). Those values are counted by the histogram that follows, so every value
        below the floor may be skipped from the start; the fine counts then touch only the few
        buckets near the top (each first-touched page of the ``[C, 65536]`` counts costs a page
        fault, several microseconds on a virtual machine)."""
        b_n, c_n, s_n = bits.shape
        for u in range(u0, u1):
            if floor[u] != 0:
                continue
            local = np.zeros(256, dtype=np.int64)
            for b in range(b_n):
                for s in range(s_n):
                    v = np.int64(bits[b, u, s])
                    if (v & 0x7FFF) > 0x7C00:
                        continue                                  # NaN: never counted
                    local[_sort_key(v) >> 8] += 1
            seen = 0
            k = 255
            while k > 0:
                seen += local[k]
                if seen >= need:
                    break
                k -= 1
            floor[u] = k * 256

    @njit(cache=True, nogil=True)
    def _ranked(hist, coarse, rank):  # pragma: no cover - compiled
        """Per unit, the key of the ``rank[u]``-th largest value (0 = the largest): the bucket from
        the coarse counts (complete at and above the floor, where the answer lies), then the key
        within it, so only one 256-entry row of the fine counts is read."""
        c_n = hist.shape[0]
        out = np.empty(c_n, dtype=np.int64)
        for u in range(c_n):
            seen = 0
            k = 255
            while k > 0 and seen + coarse[u, k] <= rank[u]:
                seen += coarse[u, k]
                k -= 1
            key = k * 256 + 255
            while key > k * 256:
                seen += hist[u, key]
                if seen > rank[u]:
                    break
                key -= 1
            out[u] = key
        return out


def lazy_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero array on an anonymous memory map: a page costs only when it is first written.

    The quantile's ``[C, 65536]`` counts (128 MB for 512 units) are mostly never written; numpy's
    ``zeros`` would ask for transparent huge pages there, which the kernel then zeroes (and may
    compact memory for) in full on the first write of each 2 MB.

    Example:
        >>> lazy_zeros((2, 3), np.int32).sum()
        0
    """
    import mmap

    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class F16Quantile:
    """Exact ``1 - q`` quantile per unit of float16 activations from a histogram of their bit
    patterns (at most 65,536 distinct values per unit): ``C × 65,536`` counts, one pass, the result
    bit-identical to ``numpy.quantile`` of the values in float64.

    Args:
        n_units: ``C``; q: the upper tail fraction; total: the number of values each unit will get
            (``N·H·W``): when given, values that can no longer be among the ``top_count`` largest
            are skipped, which makes the pass several times faster; workers: the threads
            (:class:`Workers`; default one, the calling thread).

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float16)
        >>> fq = F16Quantile(3, q=0.05, total=100); fq.add(x[:2]); fq.add(x[2:])
        >>> ref = np.quantile(x.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1), 0.95, axis=1)
        >>> bool((fq.result() == ref).all())
        True
    """

    def __init__(self, n_units: int, q: float, total: int | None = None, workers: Workers | None = None) -> None:
        self.n_units, self.q = int(n_units), float(q)
        self.workers = workers or Workers(1)
        self.total = None if total is None else int(total)
        self.hist = lazy_zeros((self.n_units, 65536), np.int32)
        self.coarse = np.zeros((self.n_units, 256), dtype=np.int64)
        self.floor = np.zeros(self.n_units, dtype=np.int64)       # sortable key, see _histogram
        self.pending = np.zeros(self.n_units, dtype=np.int64)
        self.nan = np.zeros(self.n_units, dtype=np.int64)
        self.count = 0

    def add(self, acts: np.ndarray) -> None:
        """Add a batch ``acts: [B, C, ...]`` float16."""
        if acts.dtype != np.float16:
            raise TypeError("F16Quantile takes float16 activations")
        b, c = acts.shape[:2]
        bits = np.ascontiguousarray(acts).view(np.uint16).reshape(b, c, -1)
        if self.hist.dtype == np.int32 and self.count + bits.shape[2] * b >= 2 ** 31:
            wide = lazy_zeros(self.hist.shape, np.int64)    # more values per unit than int32 counts
            wide[...] = self.hist
            self.hist = wide
        from neurosem.dissect.quantile import top_count

        # with the total known, only its top_count largest values matter: the rest are skipped
        need = top_count(self.total, self.q) if self.total is not None else np.iinfo(np.int64).max
        if self.total is not None and not self.floor.all():
            self.workers.blocks(_prime_floors, c, 16, bits, self.floor, need)
        self.workers.blocks(_histogram, c, 16, bits, self.hist, self.coarse, self.floor, self.pending, self.nan, need)
        self.count += bits.shape[2] * b

    def result(self) -> np.ndarray:
        """``[C]`` float64 thresholds (NaN for a unit that has a NaN value, as numpy gives)."""
        from neurosem.dissect.quantile import lerp_quantile, top_count

        total = self.count
        if total == 0:
            return np.full(self.n_units, np.nan)
        if self.total is not None and total != self.total:
            raise ValueError(f"F16Quantile was told of {self.total} values per unit and got {total}")
        k = top_count(total, self.q)             # the value at ascending position total - k ...
        lo_key = _ranked(self.hist, self.coarse, np.full(self.n_units, k - 1, dtype=np.int64))
        hi_key = _ranked(self.hist, self.coarse, np.full(self.n_units, max(k - 2, 0), dtype=np.int64))
        a = F16_TABLE[_KEY_TO_BITS[lo_key]]
        b = F16_TABLE[_KEY_TO_BITS[hi_key]] if k >= 2 else a
        out = lerp_quantile(a, b, total, self.q)
        out[self.nan > 0] = np.nan
        return out
