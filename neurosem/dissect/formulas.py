"""Compositional explanations of units (Mu & Andreas, NeurIPS 2020): the logical formula of concepts
whose mask best matches a unit's dissection mask, found by beam search.

A formula is left-deep, ``((L0 op1 L1) op2 L2) ...`` with ``op`` one of ``AND``, ``OR``,
``AND NOT`` over the labels (pixel-level labels, and image-level labels that cover their whole
image). It is stored as a tuple ``(L0, op1, L1, op2, L2, ...)`` of label numbers and op codes
(:data:`AND`, :data:`OR`, :data:`AND_NOT`). Its score for unit ``u`` is the formula IoU summed over
all images and label pixels::

    IoU(u, F) = |M_u ∧ F| / (|M_u| + |F| - |M_u ∧ F|)        (0 when both are empty)

with ``M_u`` the unit's mask of the dissection (the same thresholds, upsampling and rule; see
:func:`unit_points`). A pixel carries a label when any of its planes (or the image) does.

All counts come from sums of label counts over point sets: for a formula ``F`` and every label
``L`` at once, ``|F ∧ L|`` (one bincount of the labels on the pixels of ``F``, computed on the
images where ``F`` can hold and cached per formula: it does not depend on the unit) and
``|M_u ∧ F ∧ L|`` (a bincount over the unit's active pixels where ``F`` holds). The three ops
follow from them::

    AND:      |M∧F∧L|                  |F∧L|
    OR:       |M∧F| + |M∧L| - |M∧F∧L|  |F| + |L| - |F∧L|
    AND NOT:  |M∧F| - |M∧F∧L|          |F| - |F∧L|

Beam search (the paper's): the beam starts with the ``beam`` best single labels; each step extends
every formula of the beam by every candidate label not in it with every op, and keeps the ``beam``
best of the old beam and the new formulas (ties: the earlier generated, so shorter formulas first).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from neurosem.dissect._kernels import HAVE_NUMBA
from neurosem.errors import NeurosemError

if HAVE_NUMBA:
    from numba import njit

AND, OR, AND_NOT = 1, 2, 3
OP_NAMES = {AND: "AND", OR: "OR", AND_NOT: "AND NOT"}
OPS = (AND, OR, AND_NOT)


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
    owner = np.repeat(np.arange(n_images, dtype=np.int64), s)
    codes = np.unique(owner[:, None] * n_labels + sets.astype(np.int64))
    lab, im = codes % n_labels, codes // n_labels
    keep = lab > 0
    lab, im = lab[keep], im[keep]
    image_count = np.bincount(lab, minlength=n_labels)
    order = np.argsort(lab, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(image_count)])
    images_sorted = im[order]
    images_of = [images_sorted[bounds[k]:bounds[k + 1]] for k in range(n_labels)]
    category_of = np.where(primary < 0, n_categories, primary).astype(np.int64)
    return LabelTable(raw=raw, sets=sets, seg_size=(sh, sw), n_images=int(n_images), n_labels=n_labels,
                      n_categories=int(n_categories), image_count=image_count, label_size=label_size,
                      gt=gt, category_of=category_of, images_of=images_of)


def unit_points(store: Any, layer: str, thresholds: np.ndarray, seg_size: tuple[int, int],
                batch_size: int = 16, units: Sequence[int] | None = None) -> list[np.ndarray]:
    """Each unit's mask of the dissection as the sorted flat indices ``image * S + pixel`` of its
    pixels (``int64``): the kernels' :func:`~neurosem.dissect._kernels.map_masks` (torch's
    :func:`~neurosem.dissect.tally.unit_masks` where numba is missing), the tally's own masks.

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
    from neurosem.dissect._kernels import HAVE_NUMBA, Geometry, map_masks

    geo = Geometry(h, w, *seg_size)
    for start, batch in store.iter_batches([layer], batch_size):
        x = batch[layer][:, sel]                                                      # [B, U, h, w]
        b = x.shape[0]
        if HAVE_NUMBA:
            m = map_masks(x.reshape(b * len(units), h, w), thr, np.tile(sel, b), geo).reshape(b, len(units), s)
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


# ------------------------------------------------------------------------------------ formulas
def formula_labels(f: tuple) -> tuple[int, ...]:
    """The label numbers of a formula, in order."""
    return (f[0],) + tuple(f[2::2])


def formula_string(f: tuple | None, names: Sequence[str]) -> str:
    """``(water OR river) AND NOT blue`` style text of a formula (``names[label number]``);
    ``-`` for none.

    Example:
        >>> formula_string((1, OR, 2, AND_NOT, 3), ["", "water", "river", "blue"])
        '(water OR river) AND NOT blue'
    """
    if not f:
        return "-"
    text = names[f[0]]
    for k, (op, lab) in enumerate(zip(f[1::2], f[2::2])):
        text = f"({text})" if k else text
        text = f"{text} {OP_NAMES[op]} {names[lab]}"
    return text


def evaluate(f: tuple, rows: np.ndarray) -> np.ndarray:
    """``bool [n]``: where formula ``f`` holds on label rows ``[n, K]``."""
    m = (rows == f[0]).any(1)
    for op, lab in zip(f[1::2], f[2::2]):
        x = (rows == lab).any(1)
        m = m & x if op == AND else (m | x if op == OR else m & ~x)
    return m


def set_bincount(sets: np.ndarray, n_labels: int) -> np.ndarray:
    """``[n_labels]`` int64: rows (deduplicated, :func:`dedup_rows`) carrying each label; label 0
    zeroed."""
    out = np.bincount(sets.reshape(-1).astype(np.int64), minlength=n_labels)
    out[0] = 0
    return out


def formula_polynomial(f: tuple) -> dict[frozenset, int]:
    """The indicator of formula ``f`` as a sum of conjunctions of its labels,
    ``{labels: coefficient}`` (``A OR B = A + B - AB``, ``A AND NOT B = A - AB``); exact in integers.

    Example:
        >>> sorted((sorted(k), v) for k, v in formula_polynomial((1, OR, 2, AND_NOT, 3)).items())
        [([1], 1), ([1, 2], -1), ([1, 2, 3], 1), ([1, 3], -1), ([2], 1), ([2, 3], -1)]
    """
    poly: dict[frozenset, int] = {frozenset([f[0]]): 1}
    for op, lab in zip(f[1::2], f[2::2]):
        prod: dict[frozenset, int] = {}
        for key, c in poly.items():
            k2 = key | {lab}
            prod[k2] = prod.get(k2, 0) + c
        if op == AND:
            poly = prod
        else:
            out = dict(poly)
            if op == OR:
                out[frozenset([lab])] = out.get(frozenset([lab]), 0) + 1
            for key, c in prod.items():
                out[key] = out.get(key, 0) - c
            poly = {k: v for k, v in out.items() if v}
    return poly


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


class FormulaStats:
    """``|F|`` and ``|F ∧ L|`` for every label ``L``, per formula (cached; unit-independent).

    A formula is a sum of conjunctions of its labels (:func:`formula_polynomial`); each
    conjunction's counts are one scan of the pixels of the images holding all its labels (compiled;
    cached: the formulas of all units share them), ``chunk`` pixels at a time without numba.
    """

    def __init__(self, table: LabelTable, chunk: int = 1 << 20) -> None:
        self.table, self.chunk = table, int(chunk)
        self.cache: dict[tuple, tuple[int, np.ndarray]] = {}
        self.conjunctions: dict[frozenset, tuple[int, np.ndarray]] = {}
        self.computed = 0
        self._co: np.ndarray | None = None

    def conjunction(self, labels: frozenset) -> tuple[int, np.ndarray]:
        """``(|∧S|, [n_labels] |∧S ∧ L|)`` of a set of labels ``S``."""
        hit = self.conjunctions.get(labels)
        if hit is not None:
            return hit
        t = self.table
        need = np.array(sorted(labels), dtype=np.int64)
        if need.size == 1:                  # single labels: rows of the co-occurrence matrix
            if self._co is None:
                self._co = cooccurrence(t)
            hit = (int(self._co[need[0], need[0]]), self._co[need[0]].copy())
            self.conjunctions[labels] = hit
            return hit
        imgs = t.images_of[int(need[0])]
        for lab in need[1:]:
            imgs = np.intersect1d(imgs, t.images_of[int(lab)], assume_unique=True)
        co = np.zeros(t.n_labels, dtype=np.int64)
        if HAVE_NUMBA:
            size = int(_conjunction(t.sets, imgs.astype(np.int64), t.pixels, need, co))
        else:  # pragma: no cover - numba is a dependency
            size = 0
            s = t.pixels
            step = max(1, self.chunk // s)
            ar = np.arange(s, dtype=np.int64)
            for k in range(0, imgs.shape[0], step):
                rows = t.sets[(imgs[k:k + step, None] * s + ar).reshape(-1)]
                m = np.ones(rows.shape[0], dtype=bool)
                for lab in need:
                    m &= (rows == lab).any(1)
                size += int(m.sum())
                co += np.bincount(rows[m].reshape(-1).astype(np.int64), minlength=t.n_labels)
        co[0] = 0
        self.conjunctions[labels] = (size, co)
        return size, co

    def get(self, f: tuple) -> tuple[int, np.ndarray]:
        """``(|F|, [n_labels] |F ∧ L|)``."""
        hit = self.cache.get(f)
        if hit is not None:
            return hit
        size, co = 0, np.zeros(self.table.n_labels, dtype=np.int64)
        for key, c in formula_polynomial(f).items():
            n, v = self.conjunction(key)
            size += c * n
            co += c * v
        self.cache[f] = (size, co)
        self.computed += 1
        return size, co


@dataclass
class Explanation:
    """One unit's result: ``formula`` (None for an empty mask) and its IoU, the best single label
    (label number, -1 for none) and its formula IoU, and the final beam ``[(formula, iou)]``."""

    formula: tuple | None
    iou: float
    single: int
    iou_single: float
    beam: list[tuple[tuple, float]]


def iou_of(inter: Any, msize: int, fsize: Any) -> np.ndarray:
    """Formula IoU ``inter / (msize + fsize - inter)`` in float64 (0 where the union is 0)."""
    inter = np.asarray(inter, dtype=np.float64)
    union = msize + np.asarray(fsize, dtype=np.float64) - inter
    return np.divide(inter, union, out=np.zeros(np.broadcast(inter, union).shape), where=union > 0)


def beam_search(sets: np.ndarray, stats: FormulaStats, candidates: np.ndarray, length: int = 3,
                beam: int = 5) -> Explanation:
    """The best formula of at most ``length`` labels for one unit.

    Args:
        sets: ``[A, K]`` the deduplicated label rows of the unit's mask pixels
            (``table.sets[points]``; ``A = |M_u|``).
        stats: the formula counts (shared by all units).
        candidates: ``[Lc]`` the label numbers formulas may use (ascending).
        length: the most labels in a formula (``N``); beam: the beam width ``B``.
    """
    t = stats.table
    msize = int(sets.shape[0])
    cand = np.asarray(candidates, dtype=np.int64)
    if msize == 0 or cand.size == 0:
        return Explanation(None, 0.0, -1, 0.0, [])
    ml = set_bincount(sets, t.n_labels)                                            # |M ∧ L|
    lsize = t.label_size
    single = iou_of(ml[cand], msize, lsize[cand])
    order = np.lexsort((np.arange(cand.size), -single))[:beam]
    # a beam entry: (formula, iou, |M ∧ F|, |F|)
    entries = [((int(cand[k]),), float(single[k]), int(ml[cand[k]]), int(lsize[cand[k]])) for k in order]
    best_single = (int(cand[order[0]]), float(single[order[0]]))
    for _ in range(1, length):
        pool_iou = [np.array([e[1] for e in entries])]
        pool_ref: list[tuple] = [("old", 0)]
        gen = []
        for k, (f, _, mf, fs) in enumerate(entries):
            used = np.isin(cand, formula_labels(f))
            free = cand[~used]
            if free.size == 0:
                continue
            mask = evaluate(f, sets)
            mfl = set_bincount(sets[mask], t.n_labels)[free]                      # |M ∧ F ∧ L|
            fsz, fl_all = stats.get(f)
            fl = fl_all[free]
            inter = {AND: mfl, OR: mf + ml[free] - mfl, AND_NOT: mf - mfl}
            size = {AND: fl, OR: fsz + lsize[free] - fl, AND_NOT: fsz - fl}
            for op in OPS:
                pool_iou.append(iou_of(inter[op], msize, size[op]))
                gen.append((f, op, free, inter[op], size[op]))
                pool_ref.append(("new", len(gen) - 1))
        lens = [len(a) for a in pool_iou]
        ious = np.concatenate(pool_iou)
        pick = np.lexsort((np.arange(ious.size), -ious))[:beam]
        starts = np.concatenate([[0], np.cumsum(lens)])
        new_entries = []
        for p in pick:
            blk = int(np.searchsorted(starts, p, side="right") - 1)
            off = int(p - starts[blk])
            kind, ref = pool_ref[blk]
            if kind == "old":
                new_entries.append(entries[off])
            else:
                f, op, free, inter, size = gen[ref]
                new_entries.append((f + (op, int(free[off])), float(ious[p]), int(inter[off]), int(size[off])))
        entries = new_entries
    return Explanation(entries[0][0], entries[0][1], best_single[0], best_single[1],
                       [(e[0], e[1]) for e in entries])


def candidate_labels(table: LabelTable, min_images: int, allowed: Sequence[int] | None = None) -> np.ndarray:
    """Label numbers (> 0) occurring in at least ``min_images`` images (and in ``allowed``)."""
    keep = table.image_count >= max(1, int(min_images))
    keep[0] = False
    if allowed is not None:
        mask = np.zeros_like(keep)
        mask[np.asarray(list(allowed), dtype=np.int64)] = True
        keep &= mask
    return np.flatnonzero(keep).astype(np.int64)


def formula_iou(f: tuple, sets: np.ndarray, stats: FormulaStats) -> float:
    """The formula IoU of ``f`` for the mask whose label rows are ``sets [A, K]``."""
    inter = int(evaluate(f, sets).sum())
    return float(iou_of(inter, int(sets.shape[0]), stats.get(f)[0]))
