"""Permutation p-values and Benjamini–Hochberg: plain references, the identity pairing reproducing
the dissection, a planted unit at p = 1/(R+1) and units independent of the labels."""
from __future__ import annotations

import numpy as np
import pytest

from neurosem.dissect.formulas import OR, FormulaStats, build_label_table, formula_iou
from neurosem.dissect.significance import (benjamini_hochberg, label_ious, permutations, permuted_points,
                                           unit_pvalues)

from .test_formulas import Plain


@pytest.fixture(scope="module")
def tables(synthetic_broden):
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect.passes import LabelSource

    ds = BrodenDataset(synthetic_broden)
    table = build_label_table(LabelSource(ds, None), len(ds), np.asarray(ds.primary_category), len(ds.categories))
    return ds, table, Plain(ds)


def plain_bh(p, alpha):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    k = 0
    for rank in range(m, 0, -1):
        if p[order[rank - 1]] <= alpha * rank / m:
            k = rank
            break
    out = [False] * m
    for i in order[:k]:
        out[i] = True
    return out


def test_benjamini_hochberg_equals_the_plain_procedure():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 30))
        p = np.round(rng.random(m) ** 3, 3)                   # ties and small values
        assert benjamini_hochberg(p, 0.05).tolist() == plain_bh(p.tolist(), 0.05)
    assert benjamini_hochberg(np.array([0.001, 0.002, 0.003]), 0.05).all()
    assert benjamini_hochberg(np.array([0.02, 0.03, 0.04]), 0.05).all()          # step-up: the largest k
    assert benjamini_hochberg(np.array([0.03, 0.9]), 0.05).tolist() == [False, False]   # 0.03 > 0.05 / 2
    assert benjamini_hochberg(np.array([np.nan, 0.001]), 0.05).tolist() == [False, True]
    assert benjamini_hochberg(np.zeros(0), 0.05).tolist() == []


def plain_netdissect(plain, table, mask, columns):
    """NetDissect's IoU of ``mask [N, S]`` against each column, image by image."""
    both = np.zeros(table.n_labels)
    act = np.zeros(table.n_categories)
    for i in range(plain.n):
        m = mask[i]
        size = int(m.sum())
        if not size:
            continue
        hit = set()
        for plane in plain.seg[i]:
            under = np.bincount(plane.reshape(-1)[m], minlength=table.n_labels)
            under[0] = 0
            both += under
            hit |= {int(table.category_of[x]) for x in np.flatnonzero(under)}
        for lab in plain.img[i]:
            if lab:
                both[lab] += size
                hit.add(int(table.category_of[lab]))
        for c in hit:
            act[c] += size
    b = both[columns]
    return b / (act[table.category_of[columns]] + table.gt[columns] - b + 1e-10)


def test_permuted_counts_equal_the_plain_pairing(tables):
    ds, t, plain = tables
    rng = np.random.default_rng(3)
    mask = plain.label(ds.label_names.index("ball")) | (rng.random((plain.n, plain.s)) < 0.05)
    points = np.flatnonzero(mask.reshape(-1))
    perm = permutations(plain.n, 1, seed=5)[0]
    moved = np.zeros_like(mask)
    moved[perm] = mask                      # the mask of image j now meets the labels of image perm[j]
    idx = permuted_points(points, perm, t.pixels)
    assert sorted(idx.tolist()) == np.flatnonzero(moved.reshape(-1)).tolist()
    stats = FormulaStats(t)
    f = (ds.label_names.index("ball"), OR, ds.label_names.index("dotted"))
    assert formula_iou(f, t.sets[idx], stats) == plain.iou(moved, f)
    cols = np.flatnonzero(t.gt > 0)
    np.testing.assert_allclose(label_ious(t, points, t.raw[idx], cols), plain_netdissect(plain, t, moved, cols),
                               rtol=1e-12)
    np.testing.assert_allclose(label_ious(t, points, t.raw[points], cols), plain_netdissect(plain, t, mask, cols),
                               rtol=1e-12)
    shuffled = rng.permutation(points)                         # not sorted by image: the same numbers
    np.testing.assert_array_equal(label_ious(t, shuffled, t.raw[shuffled], cols),
                                  label_ious(t, points, t.raw[points], cols))


def test_identity_pairing_is_the_dissection(tmp_path, synthetic_broden):
    """The label statistic without permutation is the dissection's IoU, column for column."""
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect import dissect
    from neurosem.dissect._kernels import Geometry, map_masks
    from neurosem.dissect.formulas import unit_points
    from neurosem.dissect.passes import LabelSource
    from neurosem.store import ActivationStore

    from .test_dissect import QUANTILE, planted_model

    dis = dissect(run=tmp_path / "run", broden=synthetic_broden, model=planted_model(), quantile=QUANTILE,
                  device="cpu", batch_size=16, progress=False, report=False)
    ds = BrodenDataset(synthetic_broden)
    t = build_label_table(LabelSource(ds, None), len(ds), np.asarray(ds.primary_category), len(ds.categories))
    assert t.gt[dis.label_numbers].tolist() == dis.label_gt.tolist()
    with ActivationStore.open(tmp_path / "run" / "activations.h5") as st:
        for layer in dis.layers:
            pts = unit_points(st, layer, dis.threshold(layer, exact=True), tuple(ds.seg_size), batch_size=5)
            acts = st.read(layer)
            n, c, h, w = acts.shape
            masks = map_masks(acts.reshape(n * c, h, w), dis.threshold(layer, exact=True), np.tile(np.arange(c), n),
                              Geometry(h, w, *ds.seg_size)).reshape(n, c, -1)
            for u, p in enumerate(pts):
                assert p.tolist() == np.flatnonzero(masks[:, u]).tolist()         # the kernels' masks
                got = label_ious(t, p, t.raw[p], dis.label_numbers)
                np.testing.assert_allclose(got, dis.iou(layer)[u], rtol=1e-6, atol=1e-7)


def test_a_planted_unit_has_the_smallest_p(tables):
    ds, t, plain = tables
    points = np.flatnonzero(plain.label(ds.label_names.index("tree")).reshape(-1))
    cands = np.array(sorted(ds.label_names.index(x) for x in ("tree", "ball", "striped", "wood")))
    out = unit_pvalues(t, FormulaStats(t), points, permutations(plain.n, R := 19, seed=0),
                       np.flatnonzero(t.gt > 0), cands, length=2, beam=3)
    assert out["iou_formula"] == 1.0
    assert out["p_formula"] == out["p_label"] == 1 / (R + 1)


def test_units_independent_of_the_labels_pass_no_more_than_chance(tables):
    """20 units whose masks are drawn independently of the images (i.i.d. per image and pixel, 10%):
    under the null, P(p <= 0.05) <= 0.05 for each, so 1 of 20 is expected; the seeded draw is held
    to at most 3 (a binomial(20, 0.05) exceeds 3 with probability 1.6%)."""
    ds, t, plain = tables
    rng = np.random.default_rng(11)
    perms = permutations(plain.n, 19, seed=1)
    cols = np.flatnonzero(t.gt > 0)
    cands = np.array(sorted(ds.label_names.index(x) for x in ("tree", "ball", "box", "striped", "wood", "red")))
    stats = FormulaStats(t)
    p_label, p_formula = [], []
    for _ in range(20):
        points = np.flatnonzero(rng.random(plain.n * plain.s) < 0.1)
        out = unit_pvalues(t, stats, points, perms, cols, cands, length=2, beam=2)
        p_label.append(out["p_label"])
        p_formula.append(out["p_formula"])
    assert sum(p <= 0.05 for p in p_label) <= 3 and sum(p <= 0.05 for p in p_formula) <= 3
    assert len(set(p_label)) > 3                               # spread, not all at one value
    assert not benjamini_hochberg(np.array(p_label), 0.05).any()
