"""Tally (NetDissect IoU): hand-computed cases, the counting rules, and a plain per-image, per-unit
reference on the synthetic Broden set."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neurosem.dissect.quantile import TopQuantile
from neurosem.dissect.tally import (LabelBatch, Tally, activated_pixels, best_labels, bilinear_value,
                                    label_keys, threshold_for_dtype, unit_masks)
from neurosem.errors import DataError, NeurosemError


# ------------------------------------------------------------------ the plain reference
def plain_bilinear(a: np.ndarray, sh: int, sw: int) -> np.ndarray:
    """Bilinear upsampling, align_corners=False, float64, output row by output row."""
    a = np.asarray(a, dtype=np.float64)
    h, w = a.shape
    sx = np.maximum((np.arange(sw) + 0.5) * (w / sw) - 0.5, 0.0)
    x0 = np.minimum(np.floor(sx).astype(int), w - 1)
    x1, lx = np.minimum(x0 + 1, w - 1), sx - x0
    out = np.empty((sh, sw))
    for r in range(sh):
        sy = max((r + 0.5) * (h / sh) - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), h - 1)
        y1, ly = min(y0 + 1, h - 1), sy - y0
        out[r] = bilinear_value(a[y0, x0], a[y0, x1], a[y1, x0], a[y1, x1], ly, lx)
    return out


def plain_tally(acts, seg, image_labels, thresholds, primary, n_categories):
    """NetDissect-Lite's rules, image by image and unit by unit."""
    n, c = acts.shape[:2]
    sh, sw = seg.shape[-2:]
    n_labels = len(primary)
    gt = np.zeros(n_labels, dtype=np.int64)
    both = np.zeros((c, n_labels), dtype=np.int64)
    act = np.zeros((c, n_categories), dtype=np.int64)
    for i in range(n):
        planes = [seg[i, p] for p in range(seg.shape[1])]
        scalars = [int(x) for x in image_labels[i] if x != 0]
        for plane in planes:
            gt += np.bincount(plane.ravel(), minlength=n_labels)
        for label in scalars:
            gt[label] += sh * sw
        for u in range(c):
            if not acts[i, u].astype(np.float64).max() > thresholds[u]:
                continue
            mask = plain_bilinear(acts[i, u], sh, sw) > thresholds[u]
            size = int(mask.sum())
            hit = set()
            for plane in planes:
                under = np.bincount(plane[mask], minlength=n_labels)
                under[0] = 0
                both[u] += under
                hit.update(int(primary[l]) for l in np.flatnonzero(under))
            for label in scalars:
                both[u, label] += size
                if size:
                    hit.add(int(primary[label]))
            for cat in hit:
                act[u, cat] += size
    gt[0] = 0
    cols = np.flatnonzero(gt > 0)
    iou = both[:, cols] / (act[:, primary[cols]] + gt[cols] - both[:, cols] + 1e-10)
    return cols, iou, gt, both, act


# ------------------------------------------------------------------ hand-computed cases
def test_hand_computed_case():
    # labels 1, 2: colour (category 0); 3: object (1); 4: scene (2, image level); 5 never occurs
    primary = [-1, 0, 0, 1, 2, 1]
    seg = torch.tensor([[[[1, 1, 2, 0], [1, 1, 2, 0]],
                         [[3, 0, 0, 0], [3, 3, 0, 0]]]])                          # [1, 2, 2, 4]
    acts = torch.zeros(1, 4, 2, 4)
    acts[0, 0, 0, :2] = 1.0                    # unit 0: pixels (0,0), (0,1)
    acts[0, 1, :, 2:] = 1.0                    # unit 1: the right half
    acts[0, 2] = 0.7                           # unit 2: constant, threshold = its value
    t = Tally(torch.tensor([0.5, 0.5, 0.7, 0.0]), primary, 3)
    t.add(acts, seg, torch.tensor([[4]]))
    r = t.result()
    assert r.labels.tolist() == [1, 2, 3, 4]                     # 0 and the unseen 5 left out
    assert r.gt.tolist() == [4, 2, 3, 8]                         # scene: 2 x 4 pixels
    assert r.both.tolist() == [[2, 0, 1, 2], [0, 2, 0, 4], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert r.act.tolist() == [[2, 2, 2], [4, 0, 4], [0, 0, 0], [0, 0, 0]]
    expected = [[2 / 4, 0 / 4, 1 / 4, 2 / 8],
                [0 / 8, 2 / 4, 0 / 3, 4 / 8],
                [0, 0, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(r.iou, expected, rtol=1e-9, atol=0)
    assert r.label_category.tolist() == [0, 0, 1, 2]
    assert r.unit_pixels.tolist() == [2, 4, 0, 0] and r.n_images == 1


def test_a_label_on_two_planes_counts_twice():
    # NetDissect-Lite concatenates the planes: label 1 on both planes at pixel 0 counts 2.
    seg = torch.tensor([[[[1, 0]], [[1, 1]]]])                   # [1, P=2, 1, 2]
    acts = torch.tensor([[[[1.0, 0.0]]]])
    t = Tally(torch.tensor([0.5]), [-1, 0], 1)
    t.add(acts, seg)
    r = t.result()
    assert r.gt.tolist() == [3] and r.both.tolist() == [[2]] and r.act.tolist() == [[1]]
    assert r.iou[0, 0] == 2 / (1 + 3 - 2 + 1e-10)              # IoU = both / (act + gt - both + eps)


def test_a_category_counts_only_where_an_activated_pixel_hits_it():
    # label 1 (category 0) under the mask, label 2 (category 1) elsewhere in the image:
    # act[u, 1] stays 0 (NetDissect-Lite: tally_cat comes from the activated pixels).
    seg = torch.tensor([[[[1, 2]]]])
    t = Tally(torch.tensor([0.5]), [-1, 0, 1], 2)
    t.add(torch.tensor([[[[1.0, 0.0]]]]), seg)
    r = t.result()
    assert r.act.tolist() == [[1, 0]]
    np.testing.assert_allclose(r.iou, [[1.0, 0.0]], atol=1e-9)


def test_image_level_label_of_an_empty_mask_hits_nothing():
    t = Tally(torch.tensor([5.0]), [-1, 0, 1], 2)
    t.add(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), torch.tensor([[2]]))
    r = t.result()
    assert r.labels.tolist() == [2] and r.gt.tolist() == [4]
    assert r.act.tolist() == [[0, 0]] and r.iou.tolist() == [[0.0]]


def test_best_labels_overall_and_per_category():
    iou = np.array([[0.1, 0.3, 0.3, 0.05],
                    [0.0, 0.0, 0.0, 0.0]])
    best, best_iou, cat_best, cat_iou = best_labels(iou, np.array([0, 1, 0, 2]), 4)
    assert best.tolist() == [1, 0] and best_iou.tolist() == [0.3, 0.0]           # ties: first column
    assert cat_best.tolist() == [[2, 1, 3, -1], [0, 1, 3, -1]]                    # category 3: none
    assert cat_iou.tolist() == [[0.3, 0.3, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0]]
    empty = best_labels(np.zeros((2, 0)), np.zeros(0, dtype=int), 1)
    assert empty[0].tolist() == [-1, -1] and empty[2].tolist() == [[-1], [-1]]


# ------------------------------------------------------------------ the upsampled masks
def test_bilinear_value_has_the_geometry_of_f_interpolate():
    a = np.random.default_rng(0).standard_normal((5, 7))
    for sh, sw in [(32, 16), (5, 7), (3, 4), (11, 2)]:
        ref = F.interpolate(torch.from_numpy(a)[None, None], size=(sh, sw), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(plain_bilinear(a, sh, sw), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("h,w,sh,sw", [(7, 7, 112, 112), (7, 7, 32, 32), (5, 9, 16, 16), (20, 24, 16, 16),
                                       (3, 3, 32, 8), (1, 1, 4, 4), (2, 1, 5, 3), (4, 4, 4, 4)])
def test_activated_pixels_equal_a_dense_bilinear_threshold(h, w, sh, sw):
    rng = np.random.default_rng(h * 100 + w)
    maps = rng.standard_normal((12, h, w)).astype(np.float16)
    maps[0] = 0.25                                                       # constant map: none
    thr = np.quantile(maps.reshape(12, -1).astype(np.float64), 0.8, axis=1)
    ref = np.stack([plain_bilinear(maps[i], sh, sw).ravel() > thr[i] for i in range(12)])
    ref[0] = False
    for max_elements in (2 ** 22, 40):                                   # also in tiny chunks
        m, p = activated_pixels(torch.from_numpy(maps), torch.from_numpy(thr), (sh, sw),
                                max_elements=max_elements)
        got = np.zeros_like(ref)
        got[m.numpy(), p.numpy()] = True
        assert len(m) == got.sum()                                       # no pixel twice
        np.testing.assert_array_equal(got, ref)
    masks = unit_masks(torch.from_numpy(maps)[None], torch.from_numpy(thr), (sh, sw))[0]
    np.testing.assert_array_equal(masks.reshape(12, -1).numpy(), ref)


@pytest.mark.parametrize("h,w,sh,sw", [(3, 3, 48, 48), (7, 5, 30, 17), (4, 6, 13, 29)])
def test_activated_pixels_are_exact_where_rounding_decides_the_boundary(h, w, sh, sw):
    # maps that are nearly flat (differences of 1e-17 .. 1e-13 on values ~1 in float64, 1e-8 ..
    # 1e-4 in float32): whether a pixel exceeds the threshold is decided by the last bits of the value,
    # where the fast path's estimate of a row's boundary can be off and must be checked exactly.
    rng = np.random.default_rng(h * w + sh)
    n = 150
    base = rng.standard_normal((n, 1, 1))
    for dtype, lo in ((np.float64, -17), (np.float32, -8)):
        maps = base + rng.standard_normal((n, h, w)) * 10.0 ** rng.integers(lo, lo + 5, (n, 1, 1))
        m64 = maps.astype(dtype).astype(np.float64)
        thr = np.array([np.quantile(x, 0.6) for x in m64])
        ref = np.stack([plain_bilinear(m64[i], sh, sw).ravel() > thr[i] for i in range(n)])
        m, p = activated_pixels(torch.from_numpy(maps.astype(dtype)), torch.from_numpy(thr), (sh, sw))
        got = np.zeros_like(ref)
        got[m.numpy(), p.numpy()] = True
        assert len(m) == got.sum() and ref.sum() > 1000                  # no pixel twice; not vacuous
        np.testing.assert_array_equal(got, ref)


def test_label_keys_tell_single_label_runs():
    seg = torch.tensor([[[[3, 3, 5, 5, 3], [0, 0, 0, 7, 7]]]])       # [1, 1, 2, 5]
    keys = label_keys(seg)
    assert keys.dtype == torch.int32
    assert ((keys & 0xFFFF) == seg.reshape(-1)).all()
    rng = np.random.default_rng(0)
    seg = torch.from_numpy(rng.integers(0, 4, (3, 2, 6, 40)) * (rng.random((3, 2, 6, 40)) < 0.9))
    seg = torch.repeat_interleave(seg, 3, dim=-1)                       # runs of equal labels
    for n_labels in (None, 4, 70000):                                  # int32 and int64 keys
        keys = label_keys(seg, n_labels)
        mask = 0xFFFF if keys.dtype == torch.int32 else 0xFFFFFFFF
        assert keys.dtype == (torch.int64 if n_labels == 70000 else torch.int32)
        assert torch.equal((keys & mask).long(), seg.reshape(-1))
        rows = seg.reshape(-1, 120)
        for _ in range(300):
            r, c0 = int(rng.integers(rows.shape[0])), int(rng.integers(120))
            n = int(rng.integers(1, 121 - c0))
            e = r * 120 + c0
            one = bool(keys[e] == keys[e + n - 1])
            assert one == (len(set(rows[r, c0:c0 + n].tolist())) == 1)


def test_labels_prepared_once_serve_every_layer(synthetic_labels):
    ds, seg, img = synthetic_labels
    k = len(ds.categories)
    rng = np.random.default_rng(3)
    acts = {c: np.maximum(rng.standard_normal((20, c, s, s)) + 0.3, 0).astype(np.float16)
            for c, s in ((4, 7), (3, 12))}
    thr = {c: np.quantile(np.moveaxis(a, 1, 0).reshape(c, -1).astype(np.float64), 0.95, axis=1)
           for c, a in acts.items()}
    shared = {c: Tally(thr[c], ds.primary_category, k) for c in acts}
    own = {c: Tally(thr[c], ds.primary_category, k) for c in acts}
    for s in range(0, 20, 10):
        batch = shared[4].labels(seg[s:s + 10], img[s:s + 10])
        assert isinstance(batch, LabelBatch)
        for c in acts:
            shared[c].add(acts[c][s:s + 10], batch)
            own[c].add(acts[c][s:s + 10], seg[s:s + 10], img[s:s + 10])
    for c in acts:
        a, b = shared[c].result(), own[c].result()
        np.testing.assert_array_equal(a.both, b.both)
        np.testing.assert_array_equal(a.act, b.act)
        np.testing.assert_array_equal(a.gt, b.gt)
        assert a.n_images == b.n_images == 20 and a.both.sum() > 0
    other = Tally(thr[4], [-1] * len(ds.primary_category), k)
    with pytest.raises(NeurosemError, match="other labels"):
        other.add(acts[4][:10], batch)
    with pytest.raises(NeurosemError, match="image labels"):
        shared[4].add(acts[4][:10], batch, img[:10])
    with pytest.raises(NeurosemError, match="label planes"):
        shared[4].add(acts[4][:3], batch)


def test_threshold_rounding_keeps_strict_comparisons_exact():
    rng = np.random.default_rng(1)
    t64 = torch.from_numpy(rng.standard_normal(2000))
    t32 = threshold_for_dtype(t64, torch.float32)
    x = t64.float()                                     # the float32 values nearest the thresholds
    for cand in (x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)):
        assert torch.equal(cand > t32, cand.double() > t64)


# ------------------------------------------------------------------ against the reference
@pytest.fixture(scope="module")
def synthetic_labels(synthetic_broden):
    from neurosem.data.broden import BrodenDataset

    ds = BrodenDataset(synthetic_broden)
    seg = np.stack([ds.load_seg(i) for i in range(len(ds))])
    img = np.stack([ds.load_image_labels(i) for i in range(len(ds))])
    return ds, seg, img


@pytest.mark.parametrize("size", [7, 16, 32])
def test_fast_tally_equals_the_plain_reference_on_the_synthetic_set(synthetic_labels, size):
    ds, seg, img = synthetic_labels
    n, c = seg.shape[0], 6
    assert seg.shape[-1] == 32                                       # 32 = the label size
    rng = np.random.default_rng(size)
    acts = np.maximum(rng.standard_normal((n, c, size, size)) + 0.3, 0).astype(np.float16)
    acts[:, 0] = 0.75                                                # constant unit
    acts[:, 1] = 0.0                                                 # dead unit
    tq = TopQuantile(c, q=0.05, total=n * size * size)
    tq.add(torch.from_numpy(acts))
    thr = tq.result().numpy()
    k = len(ds.categories)
    cols, iou, gt, both, act = plain_tally(acts, seg, img, thr, ds.primary_category, k)
    for max_elements in (None, 4000):                                # 4000: many small chunks
        t = Tally(thr, ds.primary_category, k, max_elements=max_elements)
        for s in range(0, n, 10):
            t.add(torch.from_numpy(acts[s:s + 10]), torch.from_numpy(seg[s:s + 10]),
                  torch.from_numpy(img[s:s + 10]))
        r = t.result()
        assert r.labels.tolist() == cols.tolist()
        np.testing.assert_array_equal(r.gt, gt[cols])
        np.testing.assert_array_equal(r.both, both[:, cols])
        np.testing.assert_array_equal(r.act, act)
        np.testing.assert_allclose(r.iou, iou, rtol=1e-6, atol=1e-12)
    assert np.all(r.iou[:2] == 0.0)                                  # constant and dead units
    assert (r.both > 0).sum() > 100 and (r.act > 0).sum() > 10      # the comparison is not vacuous
    stone = ds.label_names.index("stone")                           # a material that never occurs
    assert stone not in r.labels.tolist() and len(r.labels) == int((gt[1:] > 0).sum())


def test_state_dict_round_trip(synthetic_labels):
    ds, seg, img = synthetic_labels
    acts = np.random.default_rng(4).standard_normal((20, 3, 7, 7)).astype(np.float16)
    thr = np.quantile(np.moveaxis(acts, 1, 0).reshape(3, -1).astype(np.float64), 0.9, axis=1)
    k = len(ds.categories)
    whole = Tally(thr, ds.primary_category, k)
    whole.add(acts, seg[:20], img[:20])
    first = Tally(thr, ds.primary_category, k)
    first.add(acts[:8], seg[:8], img[:8])
    second = Tally(thr, ds.primary_category, k)
    second.load_state_dict(first.state_dict())
    second.add(acts[8:], seg[8:20], img[8:20])
    np.testing.assert_array_equal(second.result().iou, whole.result().iou)
    assert second.n_images == 20
    with pytest.raises(NeurosemError, match="other thresholds"):
        Tally(thr + 1, ds.primary_category, k).load_state_dict(first.state_dict())


# ------------------------------------------------------------------ bad input
def test_bad_labels_are_one_line_errors_and_count_nothing():
    t = Tally(torch.tensor([0.5]), [-1, 0, -1, 1], 2)        # label 2 has no category
    acts = torch.ones(1, 1, 2, 2)
    with pytest.raises(DataError, match="label number 7 .*label.csv"):
        t.add(acts, torch.full((1, 1, 2, 2), 7))
    with pytest.raises(DataError, match="label number 2 .*no category"):
        t.add(acts, torch.tensor([[[[1, 2], [0, 0]]]]))
    with pytest.raises(DataError, match="label number 2 .*no category"):
        t.add(acts, torch.ones(1, 1, 2, 2, dtype=torch.long), torch.tensor([[2]]))
    with pytest.raises(DataError, match="negative"):
        t.add(acts, torch.full((1, 1, 2, 2), -1))
    assert t.n_images == 0 and int(t.gt.sum()) == 0 and int(t.both.sum()) == 0


def test_bad_shapes():
    t = Tally(torch.tensor([0.5, 0.5]), [-1, 0], 1)
    with pytest.raises(NeurosemError, match=r"activations \[B, 2, h, w\]"):
        t.add(torch.ones(1, 3, 2, 2), torch.ones(1, 1, 2, 2, dtype=torch.long))
    with pytest.raises(NeurosemError, match="label planes"):
        t.add(torch.ones(2, 2, 2, 2), torch.ones(1, 1, 2, 2, dtype=torch.long))
    with pytest.raises(NeurosemError, match="image labels"):
        t.add(torch.ones(1, 2, 2, 2), torch.ones(1, 1, 2, 2, dtype=torch.long), torch.ones(3, 1, dtype=torch.long))
    with pytest.raises(NeurosemError, match="thresholds must be"):
        Tally(torch.ones(2, 2), [-1, 0], 1)
    with pytest.raises(NeurosemError, match="NaN"):
        Tally(torch.tensor([float("nan")]), [-1, 0], 1)
