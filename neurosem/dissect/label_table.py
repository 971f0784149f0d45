"""The label pixels of a dissection's images as a table, and the units' exact mask pixels: what the
formula search (:mod:`neurosem.dissect.formulas`) and the permutation p-values
(:mod:`neurosem.dissect.significance`) count on.

:class:`LabelTable` has one row per (image, label pixel): the labels of its planes, then the
image-level labels of its image. :func:`unit_points` gives each unit's mask pixels with the
dissection's compiled kernels (the same thresholds, upsampling and rule as the tally). The compiled
scans :func:`cooccurrence` and :func:`conjunction_counts` count labels on the rows that carry a
set of labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from neurosem.dissect._kernels import HAVE_NUMBA
from neurosem.errors import NeurosemError

if HAVE_NUMBA:
    from numba import njit


@dataclass
class LabelTable:
    """Every label pixel of the first ``n_images`` images, one row per (image, pixel).

    Attributes:
        raw: ``[N * S, K]`` label numbers of each pixel: its planes (padded with 0), then the
            image-level labels of its image (NetDissect's counting: a label on two planes twice).
        sets: ``[N * S, K]`` the same rows sorted with repeated labels set to 0 (set semantics).
        seg_size: ``(sh, sw)``; n_labels: label numbers ``0 .. n_labels - 1``.
        image_count: ``[n_labels]`` images in which each label occurs.
        label_size: ``[n_labels]`` pixels carrying each label (set semantics).
        gt: ``[n_labels]`` NetDissect's label counts (planes counted apart; label 0 zeroed).
        category_of: ``[n_labels]`` primary category index (``n_categories`` for none).
        images_of: per label, the sorted images where it occurs.
    """

    raw: np.ndarray
    sets: np.ndarray
    seg_size: tuple[int, int]
    n_images: int
    n_labels: int
    n_categories: int
    image_count: np.ndarray
    label_size: np.ndarray
    gt: np.ndarray
    category_of: np.ndarray
    images_of: list[np.ndarray] = field(repr=False, default_factory=list)

    @property
    def pixels(self) -> int:
        """``S = sh * sw``."""
        return self.seg_size[0] * self.seg_size[1]


def dedup_rows(rows: np.ndarray) -> np.ndarray:
    """``[n, K]`` label rows sorted along K with repeated labels replaced by 0.

    Example:
        >>> dedup_rows(np.array([[3, 1, 3], [0, 2, 2]])).tolist()
        [[1, 3, 0], [0, 2, 0]]
    """
    s = np.sort(rows, axis=1)
    if s.shape[1] > 1:
        dup = np.zeros(s.shape, dtype=bool)
        dup[:, 1:] = s[:, 1:] == s[:, :-1]
        s[dup] = 0
    return s


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def memory_bytes() -> int:
    """The machine's physical memory in bytes (0 when unknown)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def build_label_table(source: Any, n_images: int, primary: np.ndarray, n_categories: int,
                      batch_size: int = 64) -> LabelTable:
    """The :class:`LabelTable` of images ``0 .. n_images - 1`` from a
    :class:`~neurosem.dissect.passes.LabelSource`.

    Args:
        source: the label source; n_images: ``N``; primary: ``[n_labels]`` primary category of
            each label number (-1: none); n_categories: ``K``; batch_size: images per read.
    """
    sh, sw = source.size
    s = sh * sw
    n_labels = int(primary.shape[0])
    dtype = np.uint16 if n_labels <= 65535 else np.int32
    ds = getattr(source, "ds", None)
    if ds is not None:
        width = int(getattr(ds, "max_planes", 1)) + int(getattr(ds, "max_image_labels", 0))
        need = 2 * n_images * s * max(1, width) * np.dtype(dtype).itemsize
        have = memory_bytes()
        if have and need > 0.75 * have:
            raise NeurosemError(
                f"the label table of {n_images} images at {sh}x{sw} needs about {_size(need)}, more than "
                f"this machine's memory allows ({_size(have)}): explain the units on fewer images "
                "(record them with --limit N) or on a machine with more memory")
    parts, widths = [], []
    for start in range(0, n_images, batch_size):
        stop = min(n_images, start + batch_size)
        seg, _, il = source.batch(start, stop)
        b = stop - start
        pix = np.ascontiguousarray(np.transpose(seg.reshape(b, -1, s), (0, 2, 1)))     # [B, S, P]
        img = np.broadcast_to(il[:, None, :], (b, s, il.shape[1]))                       # [B, S, M]
        parts.append((pix, img))
        widths.append((pix.shape[2], img.shape[2]))
    p_max = max((w[0] for w in widths), default=1)
    m_max = max((w[1] for w in widths), default=0)
    raw = np.zeros((n_images * s, max(1, p_max + m_max)), dtype=dtype)
    row = 0
    for pix, img in parts:
        b = pix.shape[0]
        block = raw[row:row + b * s]
        block[:, :pix.shape[2]] = pix.reshape(b * s, -1)
        if img.shape[2]:
            block[:, p_max:p_max + img.shape[2]] = img.reshape(b * s, -1)
        row += b * s
    if raw.size and int(raw.max()) >= n_labels:
        raise NeurosemError(f"label number {int(raw.max())} is past label.csv's numbers (< {n_labels}): "
                            "fix the label PNGs or label.csv")
    sets = dedup_rows(raw)
    gt = np.bincount(raw.reshape(-1).astype(np.int64), minlength=n_labels)
    gt[0] = 0
    label_size = np.bincount(sets.reshape(-1).astype(np.int64), minlength=n_labels)
    label_size[0] = 0
    present = np.zeros((n_images, n_labels), dtype=bool)          # [N, n_labels] label in image
    step = max(1, (1 << 22) // max(1, s * sets.shape[1]))
    for a in range(0, n_images, step):
        b = min(n_images, a + step)
        block = sets[a * s:b * s].astype(np.int64)
        codes = np.repeat(np.arange(b - a, dtype=np.int64) * n_labels, s)[:, None] + block
        present[a:b] = np.bincount(codes.reshape(-1), minlength=(b - a) * n_labels).reshape(b - a, n_labels) > 0
    present[:, 0] = False
    image_count = present.sum(0).astype(np.int64)
    images_of = [np.flatnonzero(present[:, k]).astype(np.int64) for k in range(n_labels)]
    category_of = np.where(primary < 0, n_categories, primary).astype(np.int64)
    return LabelTable(raw=raw, sets=sets, seg_size=(sh, sw), n_images=int(n_images), n_labels=n_labels,
                      n_categories=int(n_categories), image_count=image_count, label_size=label_size,
                      gt=gt, category_of=category_of, images_of=images_of)


def unit_points(store: Any, layer: str, thresholds: np.ndarray, seg_size: tuple[int, int],
                batch_size: int = 16, units: Sequence[int] | None = None) -> list[np.ndarray]:
    """Each unit's mask of the dissection as the sorted flat indices ``image * S + pixel`` of its
    pixels (``int64``), found by the tally's own compiled steps (``_scan_map``, ``_active`` of
    :mod:`neurosem.dissect._kernels`; torch's :func:`~neurosem.dissect.tally.unit_masks` where numba
    is missing): the dissection's masks, bit for bit.

    Args:
        store: an open store (``iter_batches``); layer; thresholds: ``[C]`` float64 exact;
        seg_size: ``(sh, sw)``; batch_size: images per batch; units: the units (default all).
    """
    _, c, h, w = store.shape(layer)
    units = list(range(c)) if units is None else [int(u) for u in units]
    s = seg_size[0] * seg_size[1]
    out: list[list[np.ndarray]] = [[] for _ in units]
    sel = np.asarray(units, dtype=np.int64)
    thr = np.ascontiguousarray(thresholds, dtype=np.float64)
    from neurosem.dissect._kernels import F16_TABLE, SCAN_BLOCK, Geometry, _as_input, threshold_bits

    geo = Geometry(h, w, *seg_size)
    for start, batch in store.iter_batches([layer], batch_size):
        x = batch[layer][:, sel]                                                      # [B, U, h, w]
        b = x.shape[0]
        if HAVE_NUMBA:
            xin = _as_input(x)
            t_u = np.ascontiguousarray(thr[sel])
            offs = np.zeros((len(units), b), dtype=np.int64)
            flat = np.zeros(0, dtype=np.int64)
            _map_points(xin, F16_TABLE, t_u, threshold_bits(t_u), *geo.args(), start, offs, flat, False, SCAN_BLOCK)
            counts = offs.copy()
            ends = np.cumsum(counts.reshape(-1))
            offs = (ends - counts.reshape(-1)).reshape(counts.shape)
            flat = np.empty(int(ends[-1]) if ends.size else 0, dtype=np.int64)
            _map_points(xin, F16_TABLE, t_u, threshold_bits(t_u), *geo.args(), start, offs, flat, True, SCAN_BLOCK)
            for k in range(len(units)):
                a = int(offs[k, 0]) if b else 0
                out[k].append(flat[a:a + int(counts[k].sum())])
            continue
        else:  # pragma: no cover - numba is a dependency
            import torch

            from neurosem.dissect.tally import unit_masks

            m = unit_masks(torch.from_numpy(x.astype(np.float32)), torch.as_tensor(thr[sel]),
                           seg_size).reshape(b, len(units), s).numpy()
        img, unit, pix = np.nonzero(m)
        order = np.lexsort((pix, img, unit))
        img, unit, pix = img[order], unit[order], pix[order]
        bounds = np.searchsorted(unit, np.arange(len(units) + 1))
        flat = (img.astype(np.int64) + start) * s + pix
        for k in range(len(units)):
            out[k].append(flat[bounds[k]:bounds[k + 1]])
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in out]


if HAVE_NUMBA:
    from neurosem.dissect._kernels import _active, _int16_view, _scan_map

    @njit(cache=True, nogil=True)
    def _map_points(x, table, thr, tbits, lo_y, lam_y, f_y, s_y, lam_x, f_x, s_x, sh, sw, same, start, offs,
                    out, write, scan_block):  # pragma: no cover - compiled
        """The mask pixels of every map of ``x [B, U, h, w]`` (unit ``u`` at ``thr[u]``) by the
        kernels' own :func:`_scan_map` and :func:`_active` (the tally's masks): with ``write``
        false their counts into ``offs [U, B]``; with ``write`` true the sorted flat indices
        ``(start + b) * S + pixel`` into ``out`` from ``offs[u, b]`` on."""
        b_n, c_n, h, w = x.shape
        flat = x.reshape(-1)
        flat16 = _int16_view(flat)
        n_blocks = (h * w) // scan_block        # outside the loops (see _kernels._scan_map)
        hot = np.empty(h * w, dtype=np.int64)
        mark = np.zeros(h * w, dtype=np.int64)
        pix = np.empty(sh * sw, dtype=np.int64)
        s = sh * sw
        stamp = 0
        for u in range(c_n):
            for b in range(b_n):
                base = (b * c_n + u) * h * w
                _, nh = _scan_map(flat, flat16, base, h * w, table, thr[u], tbits[u], hot, scan_block, n_blocks)
                n = 0
                if nh > 0:
                    stamp += 1
                    n = _active(flat, base, h, w, table, thr[u], hot, nh, stamp, mark, lam_y, f_y, s_y, lam_x,
                                f_x, s_x, sw, same, pix)
                if write:
                    o = offs[u, b]
                    got = np.sort(pix[:n])
                    for q in range(n):
                        out[o + q] = (start + b) * s + got[q]
                else:
                    offs[u, b] = n


if HAVE_NUMBA:
    @njit(cache=True, nogil=True)
    def _conjunction(sets, images, s, need, co):  # pragma: no cover - compiled
        """Rows of images ``images`` (``s`` rows each) of ``sets [n, K]`` that carry every label of
        ``need``: their count, and into ``co`` the count of each label on them."""
        size = 0
        k_n = sets.shape[1]
        for ii in range(images.shape[0]):
            base = images[ii] * s
            for r in range(base, base + s):
                ok = True
                for q in range(need.shape[0]):
                    found = False
                    for k in range(k_n):
                        if sets[r, k] == need[q]:
                            found = True
                            break
                    if not found:
                        ok = False
                        break
                if ok:
                    size += 1
                    for k in range(k_n):
                        co[sets[r, k]] += 1
        return size


    @njit(cache=True, nogil=True)
    def _cooccurrence(sets, co):  # pragma: no cover - compiled
        """``co[a, b] += 1`` for every row of ``sets [n, K]`` (deduplicated) carrying labels ``a`` and ``b``
        (``a == b``: the label's own count)."""
        k_n = sets.shape[1]
        for r in range(sets.shape[0]):
            for i in range(k_n):
                a = sets[r, i]
                if a == 0:
                    continue
                for j in range(k_n):
                    b = sets[r, j]
                    if b != 0:
                        co[a, b] += 1


def cooccurrence(table: LabelTable) -> np.ndarray:
    """``[n_labels, n_labels]`` int64: pixels carrying both labels (the diagonal: each label's
    pixels), one scan of the table."""
    co = np.zeros((table.n_labels, table.n_labels), dtype=np.int64)
    if HAVE_NUMBA:
        _cooccurrence(table.sets, co)
    else:  # pragma: no cover - numba is a dependency
        k = table.sets.shape[1]
        for i in range(k):
            for j in range(k):
                a, b = table.sets[:, i].astype(np.int64), table.sets[:, j].astype(np.int64)
                keep = (a > 0) & (b > 0)
                co += np.bincount(a[keep] * table.n_labels + b[keep],
                                  minlength=table.n_labels ** 2).reshape(co.shape)
    co[0, :] = 0
    co[:, 0] = 0
    return co


if HAVE_NUMBA:
    @njit(cache=True, nogil=True)
    def _formula_counts(sets, labels, ops, co):  # pragma: no cover - compiled
        """Rows of ``sets [n, K]`` where the left-deep formula ``labels[0] ops[1] labels[1] ...``
        holds (ops: 1 AND, 2 OR, 3 AND NOT): their count, and into ``co`` each label's count on them."""
        k_n = sets.shape[1]
        size = 0
        for r in range(sets.shape[0]):
            m = False
            for q in range(labels.shape[0]):
                x = False
                for k in range(k_n):
                    if sets[r, k] == labels[q]:
                        x = True
                        break
                if q == 0:
                    m = x
                elif ops[q] == 1:
                    m = m and x
                elif ops[q] == 2:
                    m = m or x
                else:
                    m = m and not x
            if m:
                size += 1
                for k in range(k_n):
                    co[sets[r, k]] += 1
        return size


def formula_counts(sets: np.ndarray, f: tuple, n_labels: int) -> tuple[int, np.ndarray]:
    """``(rows where formula f holds, [n_labels] labels on them)`` of deduplicated rows ``sets [n, K]``
    (label 0 zeroed); one compiled pass."""
    labels = np.array((f[0],) + tuple(f[2::2]), dtype=np.int64)
    ops = np.array((0,) + tuple(f[1::2]), dtype=np.int64)
    co = np.zeros(n_labels, dtype=np.int64)
    if HAVE_NUMBA:
        size = int(_formula_counts(sets, labels, ops, co))
    else:  # pragma: no cover - numba is a dependency
        m = (sets == labels[0]).any(1)
        for op, lab in zip(ops[1:], labels[1:]):
            x = (sets == lab).any(1)
            m = m & x if op == 1 else (m | x if op == 2 else m & ~x)
        size = int(m.sum())
        co = np.bincount(sets[m].reshape(-1).astype(np.int64), minlength=n_labels)
    co[0] = 0
    return size, co


def conjunction_counts(table: LabelTable, labels: Sequence[int], chunk: int = 1 << 20) -> tuple[int, np.ndarray]:
    """``(|∧S|, [n_labels] |∧S ∧ L|)``: the rows carrying every label of ``labels`` (a scan of the
    images that hold them all)."""
    t = table
    need = np.array(sorted(int(x) for x in labels), dtype=np.int64)
    imgs = t.images_of[int(need[0])]
    for lab in need[1:]:
        imgs = np.intersect1d(imgs, t.images_of[int(lab)], assume_unique=True)
    co = np.zeros(t.n_labels, dtype=np.int64)
    if HAVE_NUMBA:
        size = int(_conjunction(t.sets, imgs.astype(np.int64), t.pixels, need, co))
    else:  # pragma: no cover - numba is a dependency
        size = 0
        s = t.pixels
        step = max(1, chunk // s)
        ar = np.arange(s, dtype=np.int64)
        for k in range(0, imgs.shape[0], step):
            rows = t.sets[(imgs[k:k + step, None] * s + ar).reshape(-1)]
            m = np.ones(rows.shape[0], dtype=bool)
            for lab in need:
                m &= (rows == lab).any(1)
            size += int(m.sum())
            co += np.bincount(rows[m].reshape(-1).astype(np.int64), minlength=t.n_labels)
    co[0] = 0
    return size, co
