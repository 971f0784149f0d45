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

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from neurosem.dissect.label_table import (LabelTable, build_label_table, conjunction_counts,  # noqa: F401
                                          cooccurrence, dedup_rows, formula_counts, unit_points)

AND, OR, AND_NOT = 1, 2, 3
OP_NAMES = {AND: "AND", OR: "OR", AND_NOT: "AND NOT"}
OPS = (AND, OR, AND_NOT)


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
        self.seconds = 0.0          # spent scanning the table (co-occurrence and conjunctions)

    def conjunction(self, labels: frozenset) -> tuple[int, np.ndarray]:
        """``(|∧S|, [n_labels] |∧S ∧ L|)`` of a set of labels ``S``."""
        hit = self.conjunctions.get(labels)
        if hit is not None:
            return hit
        import time

        t0 = time.perf_counter()
        if len(labels) == 1:                # single labels: rows of the co-occurrence matrix
            if self._co is None:
                self._co = cooccurrence(self.table)
            (lab,) = labels
            hit = (int(self._co[lab, lab]), self._co[lab].copy())
        else:
            hit = conjunction_counts(self.table, sorted(labels), self.chunk)
        self.conjunctions[labels] = hit
        self.seconds += time.perf_counter() - t0
        return hit

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
            mfl = formula_counts(sets, f, t.n_labels)[1][free]                    # |M ∧ F ∧ L|
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
