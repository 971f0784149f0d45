"""Compiled CPU kernels of the dissection (numba): the NetDissect tally and the masks of single maps,
with the rules of :mod:`neurosem.dissect.tally`, the report's mask overlays, and the thread pool
(:class:`Workers`) they and the float16 quantile (:mod:`neurosem.dissect._f16quantile`) run on.

The activations arrive as the raw bits of the stored float16 values (``uint16``) and are turned
into float64 through a 65,536-entry table, or as float32. Every upsampled value is computed with
:func:`neurosem.dissect.tally.bilinear_value`'s exact order of operations in float64 and compared
with the float64 threshold, on the cells (between two source rows and two source columns) that have
a corner above the threshold, as the torch tally does: the masks, and so the tallies, are the same
bit for bit (tests/dissect/test_kernels.py compares them with the torch tally and with a plain
per-pixel reference).

Parallel over units by :class:`Workers` (Python threads running the GIL-free kernels on blocks of
units, handed out as threads free up): each block owns whole rows of the tallies, so nothing is
shared; a busy core slows the thread on it, which then takes fewer blocks (numba's ``prange``
splits statically: every thread waits for the one sharing a core with another process).

Importing this module compiles nothing; the first call of each kernel loads it from numba's on-disk
cache (or compiles it once, a few seconds, then caches it).
"""
from __future__ import annotations

from typing import Any

import numpy as np

try:  # numba is a dependency; without it (an unsupported Python) the torch tally is used
    import numba
    from numba import njit
    from numba.extending import overload

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

#: values per block of the maps' scan for values above the threshold (see ``_scan_map``)
SCAN_BLOCK = 64
#: float16 bit pattern -> its value as float64
F16_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)
def axis_tables(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear (``align_corners=False``) geometry of one axis, as the tally uses it.

    Returns:
        ``(lo [n_out], lam [n_out], first [n_in], stop [n_in])``: output ``o`` lies between source
        pixels ``lo[o]`` and ``min(lo[o] + 1, n_in - 1)`` at weight ``lam[o]`` (float64, the values
        of ``neurosem.dissect.tally._axis``); source ``i`` owns the outputs ``first[i] .. stop[i] - 1``.

    Example:
        >>> lo, lam, first, stop = axis_tables(2, 4)
        >>> lo.tolist(), lam.tolist(), first.tolist(), stop.tolist()
        ([0, 0, 0, 1], [0.0, 0.25, 0.75, 0.25], [0, 3], [3, 4])
    """
    o = np.arange(n_out, dtype=np.float64)
    src = np.maximum((o + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = src - lo.astype(np.float64)
    first = np.searchsorted(lo, np.arange(n_in), side="left").astype(np.int64)
    stop = np.searchsorted(lo, np.arange(n_in), side="right").astype(np.int64)
    return lo, lam, first, stop


if HAVE_NUMBA:
    def _value(x: Any, k: int, table: Any) -> float:  # pragma: no cover - replaced by overload
        raise NotImplementedError

    @overload(_value, inline="always")
    def _value_impl(x, k, table):  # noqa: ANN001 - numba typing hook
        if x.dtype == numba.types.uint16:
            return lambda x, k, table: table[x[k]]
        return lambda x, k, table: np.float64(x[k])

    @njit(cache=True, nogil=True, inline="always")
    def _sort_key(v):  # pragma: no cover - compiled
        """The float16 bit pattern ``v`` as a key whose integer order is the values' order."""
        return ((~v) & 0xFFFF) if v & 0x8000 else (v | 0x8000)

    @njit(cache=True, nogil=True, inline="always")
    def _key_bits(key):  # pragma: no cover - compiled
        """The inverse of :func:`_sort_key`."""
        return (key ^ 0x8000) if key >= 0x8000 else ((~key) & 0xFFFF)

    def _scan_map(x, x16, base, n, table, t, tb, hot, bl, nb):  # pragma: no cover - replaced by overload
        raise NotImplementedError

    @overload(_scan_map, inline="always")
    def _scan_map_impl(x, x16, base, n, table, t, tb, hot, bl, nb):  # noqa: ANN001 - numba typing hook
        """``(maximum, count)`` of the map ``x[base:base + n]``: its maximum (NaN ignored, as
        ``v > r`` does; ``-inf`` when all are NaN) and, into ``hot``, the positions of its values
        above ``t``. For float16 bits (``x16``: the same bits as int16) with ``tb >= 0`` (the
        largest bit pattern of a value <= t when ``t >= 0``) both are integer tests, in blocks of
        ``bl`` values: the block's int16 maximum (a vectorised loop), and only when it exceeds
        ``tb`` a scan of the block for the values above it (negative values and -NaN are negative
        int16; +NaN lies above 0x7C00 and is excluded). ``bl`` (:data:`SCAN_BLOCK`) arrives as an
        argument on purpose, and ``nb = n // bl`` is computed once by the caller, outside its loop
        over the maps: a literal block size gets the loop fully unrolled (2.4x slower), and the
        division inside the map loop keeps it from being vectorised (5x slower)."""
        if x.dtype == numba.types.uint16:
            def impl(x, x16, base, n, table, t, tb, hot, bl, nb):
                nh = 0
                if tb >= 0:
                    top = np.int16(-32768)
                    t16 = np.int16(tb)
                    ubl = np.uint64(bl)
                    for blk in range(nb):                 # a vectorised int16 maximum per block,
                        o = base + blk * bl               # then a scan only where it exceeds tb
                        uo = np.uint64(o)                 # unsigned: no negative-index wraparound
                        m = np.int16(-32768)              # test, which would stop the vectoriser
                        for k in range(ubl):
                            v = x16[uo + k]
                            m = v if v > m else m
                        top = m if m > top else top
                        if m > t16:
                            for k in range(bl):
                                v = x16[o + k]
                                if v > t16:
                                    if v <= 0x7C00:
                                        hot[nh] = blk * bl + k
                                        nh += 1
                    for k in range(nb * bl, n):
                        v = x16[base + k]
                        top = v if v > top else top
                        if v > t16:
                            if v <= 0x7C00:
                                hot[nh] = k
                                nh += 1
                    if 0 <= top <= 0x7C00:
                        return table[np.int64(top)], nh
                else:
                    for k in range(n):
                        if table[x[base + k]] > t:
                            hot[nh] = k
                            nh += 1
                best = -1                              # NaN or only negatives: by sortable keys
                for k in range(n):
                    v = np.int64(x[base + k])
                    if (v & 0x7FFF) > 0x7C00:
                        continue
                    key = _sort_key(v)
                    if key > best:
                        best = key
                if best < 0:
                    return -np.inf, nh
                return table[_key_bits(best)], nh
            return impl

        def impl_float(x, x16, base, n, table, t, tb, hot, bl, nb):
            mx = -np.inf
            nh = 0
            for k in range(n):
                v = np.float64(x[base + k])
                if v > mx:
                    mx = v
                if v > t:
                    hot[nh] = k
                    nh += 1
            return mx, nh
        return impl_float

    def _int16_view(x):  # pragma: no cover - replaced by overload
        raise NotImplementedError

    @overload(_int16_view, inline="always")
    def _int16_view_impl(x):  # noqa: ANN001 - numba typing hook
        """float16 bits as int16 (for integer order tests); other inputs as they are."""
        if x.dtype == numba.types.uint16:
            return lambda x: x.view(np.int16)
        return lambda x: x

    @njit(cache=True, nogil=True, inline="always")
    def _active(flat, base, h, w, table, t, hot, nh, stamp, mark, lam_y, f_y, s_y, lam_x, f_x, s_x, sw,
                same, pix):  # pragma: no cover - compiled
        """The activated pixels (flat indices into ``[sh, sw]``) of one map whose values above ``t``
        lie at ``hot[:nh]`` (positions in the ``[h, w]`` map at ``flat[base:]``). Only the cells
        (between two source rows and two source columns) with such a corner can hold one; each is
        visited once (``mark`` holds the ``stamp`` of the last map that visited it) and its pixels
        computed exactly as :func:`neurosem.dissect.tally.bilinear_value` computes them, in float64."""
        n = 0
        if same:
            for q in range(nh):
                k = hot[q]
                pix[n] = (k // w) * sw + (k % w)
                n += 1
            return n
        for q in range(nh):
            r = hot[q] // w
            c = hot[q] % w
            for i in range(max(r - 1, 0), r + 1):
                if f_y[i] == s_y[i]:
                    continue
                i1 = min(i + 1, h - 1)
                for j in range(max(c - 1, 0), c + 1):
                    if f_x[j] == s_x[j] or mark[i * w + j] == stamp:
                        continue
                    mark[i * w + j] = stamp
                    j1 = min(j + 1, w - 1)
                    a = _value(flat, base + i * w + j, table)
                    b = _value(flat, base + i * w + j1, table)
                    c_ = _value(flat, base + i1 * w + j, table)
                    d = _value(flat, base + i1 * w + j1, table)
                    ba = b - a
                    ca = c_ - a
                    dc = d - c_
                    for oy in range(f_y[i], s_y[i]):
                        ly = lam_y[oy]
                        aa = a + ly * ca
                        bb = ba + ly * (dc - ba)
                        row = oy * sw
                        for ox in range(f_x[j], s_x[j]):
                            if aa + lam_x[ox] * bb > t:
                                pix[n] = row + ox
                                n += 1
        return n

    @njit(cache=True, nogil=True)
    def _tally(x, table, thr, tbits, seg, n_planes, img_labels, cat_of, n_cat, lo_y, lam_y, f_y, s_y,
               lam_x, f_x, s_x, sh, sw, same, both, act, unit_pixels, sizes, maxes, scan_block, u0,
               u1):  # pragma: no cover
        """Tally units ``u0 .. u1 - 1`` of one batch of one layer (see :func:`tally_batch`; one task
        of :class:`Workers`). The images are the outer loop, so an image's label planes stay in the
        cache while the units read them."""
        b_n, c_n, h, w = x.shape
        m_n = img_labels.shape[1]
        flat = x.reshape(-1)
        flat16 = _int16_view(flat)
        n_blocks = (h * w) // scan_block
        hot = np.empty(h * w, dtype=np.int64)
        mark = np.zeros(h * w, dtype=np.int64)
        pix = np.empty(sh * sw, dtype=np.int64)
        hit = np.zeros(n_cat + 1, dtype=np.bool_)
        stamp = 0
        for b in range(b_n):
            for u in range(u0, u1):
                t = thr[u]
                base = (b * c_n + u) * h * w
                mx, nh = _scan_map(flat, flat16, base, h * w, table, t, tbits[u], hot, scan_block, n_blocks)
                maxes[b, u] = mx
                if nh == 0:
                    sizes[b, u] = 0
                    continue
                stamp += 1
                n = _active(flat, base, h, w, table, t, hot, nh, stamp, mark, lam_y, f_y, s_y, lam_x,
                            f_x, s_x, sw, same, pix)
                sizes[b, u] = n
                if n == 0:
                    continue
                hit[:] = False
                both_u = both[u]
                for p in range(n_planes[b]):
                    plane = seg[b, p]
                    for k in range(n):
                        lab = plane[np.uint64(pix[k])]     # unsigned: no wraparound test
                        if lab != 0:
                            both_u[lab] += 1
                            hit[cat_of[lab]] = True
                for k in range(m_n):
                    lab = img_labels[b, k]
                    if lab != 0:
                        both[u, lab] += n
                        hit[cat_of[lab]] = True
                for c in range(n_cat):
                    if hit[c]:
                        act[u, c] += n
                unit_pixels[u] += n

    @njit(cache=True, nogil=True)
    def _masks(x, table, thr, tbits, units, lo_y, lam_y, f_y, s_y, lam_x, f_x, s_x, sh, sw, same,
               out, scan_block):  # pragma: no cover - compiled
        """``out[k] = mask of map k`` for ``x [n, 1, h, w]`` thresholded at ``thr[units[k]]``."""
        n_maps, _, h, w = x.shape
        flat = x.reshape(-1)
        flat16 = _int16_view(flat)
        n_blocks = (h * w) // scan_block
        hot = np.empty(h * w, dtype=np.int64)
        mark = np.zeros(h * w, dtype=np.int64)
        pix = np.empty(sh * sw, dtype=np.int64)
        for k in range(n_maps):
            t = thr[units[k]]
            o = out[k].reshape(-1)
            o[:] = False
            _, nh = _scan_map(flat, flat16, k * h * w, h * w, table, t, tbits[units[k]], hot, scan_block,
                             n_blocks)
            if nh == 0:
                continue
            n = _active(flat, k * h * w, h, w, table, t, hot, nh, k + 1, mark, lam_y, f_y, s_y, lam_x, f_x,
                        s_x, sw, same, pix)
            for q in range(n):
                o[pix[q]] = True


if HAVE_NUMBA:
    @njit(cache=True, nogil=True)
    def _overlay_scanlines(masks, out):  # pragma: no cover - compiled
        """PNG scanlines (filter byte 0, then 2 bits per pixel) of the overlay indices of
        ``masks [n, h, w]``: 0 inside, 1 outside, 2 on the edge (inside, with a 4-neighbour
        outside; the border repeats the mask's own pixels)."""
        n_m, h, w = masks.shape
        for k in range(n_m):
            for i in range(h):
                out[k, i, 0] = 0
                up = max(i - 1, 0)
                dn = min(i + 1, h - 1)
                for g in range(out.shape[2] - 1):
                    byte = 0
                    for q in range(4):
                        j = g * 4 + q
                        v = 0
                        if j < w:
                            if not masks[k, i, j]:
                                v = 1
                            elif not (masks[k, up, j] and masks[k, dn, j] and masks[k, i, max(j - 1, 0)]
                                      and masks[k, i, min(j + 1, w - 1)]):
                                v = 2
                        byte |= v << (6 - 2 * q)
                    out[k, i, g + 1] = byte


def overlay_scanlines(masks: np.ndarray) -> np.ndarray | None:
    """``bool [n, h, w]`` -> ``uint8 [n, h, 1 + ceil(w / 4)]``: the raw PNG scanlines (2-bit palette
    indices of :func:`neurosem.dissect.report_html.mask_overlay`); ``None`` without numba."""
    if not HAVE_NUMBA:
        return None
    m = np.ascontiguousarray(masks, dtype=np.bool_)
    out = np.empty((m.shape[0], m.shape[1], 1 + -(-m.shape[2] // 4)), dtype=np.uint8)
    if m.shape[0]:
        _overlay_scanlines(m, out)
    return out


class Workers:
    """Runs a compiled kernel over blocks of units on ``n`` threads (the kernels release the GIL;
    each block owns its units' rows of every output, so nothing is shared). Blocks are handed out
    as threads free up: a thread on a core that another process keeps busy simply takes fewer
    blocks, where a static split would make every thread wait for the slowest. With ``n == 1`` the
    kernel runs once over all units in the calling thread.

    Example:
        >>> with Workers(2) as workers:
        ...     out = np.zeros(5, dtype=np.int64)
        ...     workers.blocks(lambda a, u0, u1: a.__setitem__(slice(u0, u1), u1 - u0), 5, 2, out)
        >>> out.tolist()
        [2, 2, 2, 2, 1]
    """

    def __init__(self, n: int = 1) -> None:
        self.n = max(1, int(n))
        self._pool: Any = None

    def blocks(self, fn: Any, n_units: int, block: int, *args: Any) -> None:
        """``fn(*args, u0, u1)`` for consecutive unit ranges covering ``0 .. n_units`` (``block`` each)."""
        if self.n == 1 or n_units <= block:
            fn(*args, 0, n_units)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="neurosem-kernel")
        spans = [(u, min(n_units, u + block)) for u in range(0, n_units, block)]
        for f in [self._pool.submit(fn, *args, u0, u1) for u0, u1 in spans]:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_input(acts: np.ndarray) -> np.ndarray:
    """float16 as its bits (``uint16``), float32/float64 as they are, contiguous."""
    acts = np.ascontiguousarray(acts)
    if acts.dtype == np.float16:
        return acts.view(np.uint16)
    if acts.dtype not in (np.float32, np.float64):
        return acts.astype(np.float32)
    return acts


def threshold_bits(thresholds: np.ndarray) -> np.ndarray:
    """Per threshold ``t >= 0`` the largest float16 bit pattern (0 .. 0x7C00) whose value is at most
    ``t``, so a non-negative float16 ``v`` (not NaN) exceeds ``t`` exactly when its bits exceed it;
    ``-1`` for a negative or NaN threshold (compared value by value).

    Example:
        >>> threshold_bits(np.array([0.0, 1.0, 1.0004, -2.0, np.inf])).tolist()
        [0, 15360, 15360, -1, 31744]
    """
    t = np.asarray(thresholds, dtype=np.float64)
    pos = F16_TABLE[:0x7C01]                       # increasing: +0 .. +inf
    out = np.searchsorted(pos, t, side="right").astype(np.int64) - 1
    out[~(t >= 0)] = -1
    return out


class Geometry:
    """The upsampling tables from ``(h, w)`` maps to ``(sh, sw)`` label maps."""

    def __init__(self, h: int, w: int, sh: int, sw: int) -> None:
        self.size = (int(sh), int(sw))
        self.same = (h, w) == (sh, sw)
        lo_y, self.lam_y, self.f_y, self.s_y = axis_tables(h, sh)
        _, self.lam_x, self.f_x, self.s_x = axis_tables(w, sw)
        self.lo_y = lo_y

    def args(self) -> tuple:
        return (self.lo_y, self.lam_y, self.f_y, self.s_y, self.lam_x, self.f_x, self.s_x,
                self.size[0], self.size[1], self.same)


def tally_batch(acts: np.ndarray, thresholds: np.ndarray, seg: np.ndarray, n_planes: np.ndarray,
                image_labels: np.ndarray, category_of: np.ndarray, n_categories: int,
                geometry: Geometry, both: np.ndarray, act: np.ndarray, unit_pixels: np.ndarray,
                workers: Workers | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Add one batch of one layer to the tallies (in place).

    Args:
        acts: ``[B, C, h, w]`` float16/float32 activations.
        thresholds: ``[C]`` float64.
        seg: ``[B, P, sh * sw]`` label numbers (uint16/int32/int64; 0 = none).
        n_planes: ``[B]`` planes of each image (planes past it are not read).
        image_labels: ``[B, M]`` image-level label numbers (0 = padding).
        category_of: ``[n_labels]`` category index of each label (``n_categories``: none).
        n_categories: ``K``.
        geometry: :class:`Geometry` of the layer.
        both: ``[C, n_labels]`` int64; act: ``[C, K]`` int64; unit_pixels: ``[C]`` int64.
        workers: the threads (:class:`Workers`; default one, the calling thread).

    Returns:
        ``(sizes [B, C] int64, maxes [B, C] float64)``: the mask size and the maximum of each map.
    """
    x = _as_input(acts)
    b, c = x.shape[:2]
    sizes = np.zeros((b, c), dtype=np.int64)
    maxes = np.empty((b, c), dtype=np.float64)
    thr = np.ascontiguousarray(thresholds, dtype=np.float64)
    (workers or Workers(1)).blocks(
        _tally, c, 8, x, F16_TABLE, thr, threshold_bits(thr), seg, np.ascontiguousarray(n_planes, dtype=np.int64),
        np.ascontiguousarray(image_labels, dtype=np.int64), np.ascontiguousarray(category_of, dtype=np.int64),
        int(n_categories), *geometry.args(), both, act, unit_pixels, sizes, maxes, SCAN_BLOCK)
    return sizes, maxes


def map_masks(maps: np.ndarray, thresholds: np.ndarray, units: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The dissection's masks of single maps.

    Args:
        maps: ``[n, h, w]`` float16/float32 raw maps.
        thresholds: ``[C]`` float64 thresholds of the layer.
        units: ``[n]`` the unit of each map.
        geometry: :class:`Geometry` of the layer.

    Returns:
        ``[n, sh, sw]`` bool, the pixels the tally counts for these maps.
    """
    x = _as_input(maps)
    x = x.reshape(x.shape[0], 1, *x.shape[1:])
    out = np.zeros((x.shape[0], *geometry.size), dtype=np.bool_)
    if x.shape[0]:
        thr = np.ascontiguousarray(thresholds, dtype=np.float64)
        _masks(x, F16_TABLE, thr, threshold_bits(thr), np.ascontiguousarray(units, dtype=np.int64),
               *geometry.args(), out, SCAN_BLOCK)
    return out


def warm_up() -> None:
    """Load every kernel once on tiny inputs (from numba's cache; compiled the first time)."""
    if not HAVE_NUMBA:
        return
    from neurosem.dissect._f16quantile import F16Quantile

    fq = F16Quantile(1, 0.5, total=4)
    fq.add(np.zeros((1, 1, 2, 2), dtype=np.float16))
    fq.result()
    geo = Geometry(1, 1, 2, 2)
    z = np.zeros
    tally_batch(z((1, 1, 1, 1), np.float16), z(1), z((1, 1, 4), np.uint16), z(1, np.int64), z((1, 1), np.int64),
                z(1, np.int64), 1, geo, z((1, 1), np.int64), z((1, 1), np.int64), z(1, np.int64))
    map_masks(z((1, 1, 1), np.float16), z(1), z(1, np.int64), geo)
    overlay_scanlines(z((1, 1, 1), np.bool_))
