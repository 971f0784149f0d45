"""Is an IoU meaningful? Permutation p-values for every unit and the Benjamini–Hochberg correction.

The null keeps each unit's masks and each image's labels but pairs them with other images: under
permutation ``π`` of the images, the unit's mask on image ``j`` meets the labels of image ``π[j]``
(pixel for pixel). The counts are re-tallied exactly for every permutation, from the unit's mask
pixels (:func:`~neurosem.dissect.formulas.unit_points`) and the label table. The statistics are the
unit's *best* scores, re-selected under each permutation (so the choice of the best label or
formula is part of the null, and a unit independent of the labels gets valid p-values):

- ``label``: the best NetDissect IoU over the dissection's label columns (the dissection's own
  rule: planes counted apart, the category's mask pixels on the images where it is hit);
- ``formula``: the best formula IoU of the beam search
  (:func:`~neurosem.dissect.formulas.beam_search`, the same length, beam and candidates).

``p = (1 + #{r: stat_r >= stat}) / (R + 1)``, so a unit no permutation reaches gets ``1 / (R + 1)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from neurosem.dissect.formulas import FormulaStats, LabelTable, beam_search

IOU_EPS = 1e-10     # the dissection's (neurosem.dissect.tally.IOU_EPS)


def permutations(n_images: int, r: int, seed: int = 0) -> np.ndarray:
    """``[R, N]`` int64 random permutations of the images (seeded).

    Example:
        >>> permutations(4, 2, seed=0).shape
        (2, 4)
    """
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_images) for _ in range(r)]) if r > 0 else \
        np.zeros((0, n_images), dtype=np.int64)


def permuted_points(points: np.ndarray, perm: np.ndarray | None, pixels: int) -> np.ndarray:
    """Rows of the label table that the unit's mask pixels ``points [A]`` (``image * S + pixel``)
    meet under ``perm [N]`` (``None``: the identity)."""
    if perm is None:
        return points
    return perm[points // pixels] * pixels + points % pixels


def label_ious(table: LabelTable, points: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """NetDissect IoU ``[L]`` of a mask (pixels ``points [A]``, meeting the raw label rows
    ``rows [A, K]``) against the label numbers ``columns [L]``: ``both / (act + gt - both + 1e-10)``
    with the tally's rules (:mod:`neurosem.dissect.tally`)."""
    if points.size == 0:
        return np.zeros(columns.shape[0])
    both = np.bincount(rows.reshape(-1).astype(np.int64), minlength=table.n_labels)
    img = points // table.pixels
    if img.size > 1 and np.all(img[1:] >= img[:-1]):         # sorted by image (unit_points): no sort
        new = np.concatenate([[True], img[1:] != img[:-1]])
        image = np.cumsum(new) - 1
        sizes = np.diff(np.append(np.flatnonzero(new), img.size))
    else:
        _, image, sizes = np.unique(img, return_inverse=True, return_counts=True)
    kc = table.n_categories + 1
    codes = image[:, None] * kc + table.category_of[rows.astype(np.int64)]
    hit = np.bincount(codes.reshape(-1), minlength=sizes.size * kc).reshape(sizes.size, kc) > 0
    act = (hit * sizes[:, None]).sum(0)[:kc - 1].astype(np.float64)
    b = both[columns].astype(np.float64)
    a = act[table.category_of[columns]]
    return b / (a + table.gt[columns].astype(np.float64) - b + IOU_EPS)


def unit_pvalues(table: LabelTable, stats: FormulaStats, points: np.ndarray, perms: np.ndarray,
                 columns: np.ndarray, candidates: np.ndarray | None, length: int, beam: int
                 ) -> dict[str, Any]:
    """Observed best scores of one unit and their permutation p-values.

    Args:
        table: the label table; stats: formula counts (shared); points: ``[A]`` the unit's mask
        pixels; perms: ``[R, N]``; columns: the dissection's label numbers; candidates: the formula
        candidates (``None``: no formula search); length, beam: the search's.

    Returns:
        ``{"iou_label", "p_label", "iou_formula", "p_formula"}`` (formula entries ``None``
        without candidates; p-values ``None`` with ``R = 0``).
    """
    def label_stat(perm: np.ndarray | None) -> float:
        rows = table.raw[permuted_points(points, perm, table.pixels)]
        v = label_ious(table, points, rows, columns)
        return float(v.max()) if v.size else 0.0

    def formula_stat(perm: np.ndarray | None) -> float:
        sets = table.sets[permuted_points(points, perm, table.pixels)]
        return beam_search(sets, stats, candidates, length, beam).iou

    r = perms.shape[0]
    out: dict[str, Any] = {"iou_label": label_stat(None), "p_label": None, "iou_formula": None,
                           "p_formula": None}
    if r:
        null = np.array([label_stat(p) for p in perms])
        out["p_label"] = float((1 + np.sum(null >= out["iou_label"])) / (r + 1))
    if candidates is not None:
        out["iou_formula"] = formula_stat(None)
        if r:
            null = np.array([formula_stat(p) for p in perms])
            out["p_formula"] = float((1 + np.sum(null >= out["iou_formula"])) / (r + 1))
    return out


def benjamini_hochberg(p: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """``bool [m]``: the hypotheses rejected by the Benjamini–Hochberg step-up procedure at
    false discovery rate ``alpha`` (the largest ``k`` with ``p_(k) <= k·alpha/m``; NaN never).

    Example:
        >>> benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.5]), 0.05).tolist()
        [True, False, False, False]
    """
    p = np.asarray(p, dtype=np.float64)
    m = p.shape[0]
    out = np.zeros(m, dtype=bool)
    ok = ~np.isnan(p)
    if not ok.any():
        return out
    order = np.argsort(np.where(ok, p, np.inf), kind="stable")
    ranked = p[order]
    passes = ranked <= alpha * np.arange(1, m + 1) / m
    passes &= ~np.isnan(ranked)
    if passes.any():
        k = int(np.flatnonzero(passes).max())
        out[order[:k + 1]] = True
    return out
