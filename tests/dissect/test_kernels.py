"""The compiled CPU kernels give exactly the torch tally's numbers, numpy's quantiles and its masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neurosem.dissect import _f16quantile as Q
from neurosem.dissect import _kernels as K
from neurosem.dissect.tally import Tally, unit_masks

pytestmark = pytest.mark.skipif(not K.HAVE_NUMBA, reason="numba is not installed")


def _acts(rng: np.random.Generator, b: int, c: int, h: int, w: int) -> np.ndarray:
    """ReLU-like float16 maps with many exact ties (zeros and a few repeated values)."""
    x = np.maximum(rng.standard_normal((b, c, h, w)), 0)
    x[rng.random(x.shape) < 0.1] = 1.5                       # ties at one value
    return x.astype(np.float16)


def _labels(rng: np.random.Generator, b: int, planes: int, sh: int, sw: int, n_labels: int):
    # blocky planes (runs along the rows), some zero, and one image-level label per image
    seg = rng.integers(0, n_labels, size=(b, planes, sh // 4 + 1, sw // 4 + 1))
    seg = np.repeat(np.repeat(seg, 4, 2), 4, 3)[:, :, :sh, :sw]
    seg[rng.random(seg.shape) < 0.05] = 0
    il = rng.integers(0, n_labels, size=(b, 1))
    return seg.astype(np.int64), il.astype(np.int64)


@pytest.mark.parametrize("h,w,sh,sw", [(7, 7, 112, 112), (14, 14, 28, 28), (5, 3, 32, 16), (8, 8, 8, 8),
                                       (16, 16, 8, 8), (1, 1, 4, 4)])
def test_tally_equals_the_torch_tally(h, w, sh, sw):
    rng = np.random.default_rng(h * 100 + sw)
    b, c, planes, n_labels, k = 6, 5, 2, 9, 3
    acts = _acts(rng, b, c, h, w)
    seg, il = _labels(rng, b, planes, sh, sw, n_labels)
    primary = np.array([-1, 0, 0, 1, 1, 2, 2, 0, 1])
    thr = np.quantile(acts.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1), 0.8, axis=1)
    ref = Tally(torch.from_numpy(thr), primary, k)
    ref.add(torch.from_numpy(acts), torch.from_numpy(seg), torch.from_numpy(il))
    both = np.zeros((c, n_labels), np.int64)
    act = np.zeros((c, k), np.int64)
    pix = np.zeros(c, np.int64)
    n_planes = np.full(b, planes)
    n_planes[0] = 1                                           # image 0: its second plane is not read
    seg_k = seg.copy()
    seg_k[0, 1] = 0
    ref0 = Tally(torch.from_numpy(thr), primary, k)
    ref0.add(torch.from_numpy(acts), torch.from_numpy(seg_k), torch.from_numpy(il))
    seg_k[0, 1] = 7                                           # garbage past n_planes is ignored
    sizes, maxes = K.tally_batch(acts, thr, seg_k.reshape(b, planes, -1).astype(np.uint16), n_planes, il,
                                 np.where(primary < 0, k, primary), k, K.Geometry(h, w, sh, sw), both, act, pix)
    np.testing.assert_array_equal(both[:, 1:], ref0.both.numpy()[:, 1:])
    np.testing.assert_array_equal(act, ref0.act.numpy())
    np.testing.assert_array_equal(pix, ref0.unit_pixels.numpy())
    masks = unit_masks(torch.from_numpy(acts.astype(np.float32)), torch.from_numpy(thr), (sh, sw))
    np.testing.assert_array_equal(sizes, masks.flatten(2).sum(2).numpy())
    np.testing.assert_array_equal(maxes, acts.astype(np.float64).reshape(b, c, -1).max(2))
    np.testing.assert_array_equal(ref0.last_sizes.view(b, c).numpy(), sizes)


@pytest.mark.parametrize("h,w,sh,sw", [(7, 7, 112, 112), (5, 3, 32, 16), (8, 8, 8, 8)])
def test_masks_equal_unit_masks_and_a_plain_interpolation(h, w, sh, sw):
    rng = np.random.default_rng(3)
    acts = _acts(rng, 4, 3, h, w)
    thr = np.quantile(acts.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1), 0.9, axis=1)
    geo = K.Geometry(h, w, sh, sw)
    units = np.tile(np.arange(3), 4)
    got = K.map_masks(acts.reshape(-1, h, w), thr, units, geo).reshape(4, 3, sh, sw)
    ref = unit_masks(torch.from_numpy(acts.astype(np.float32)), torch.from_numpy(thr), (sh, sw)).numpy()
    np.testing.assert_array_equal(got, ref)
    up = torch.nn.functional.interpolate(torch.from_numpy(acts.astype(np.float64)), size=(sh, sw),
                                         mode="bilinear", align_corners=False).numpy()
    plain = up > thr[None, :, None, None]
    assert np.mean(plain != got) < 1e-3                       # equal but for rounding at the threshold
    assert got.any()


def test_float32_maps_give_the_same_masks_as_float16():
    rng = np.random.default_rng(4)
    acts = _acts(rng, 3, 2, 7, 7)
    thr = np.array([0.7, 1.2])
    geo = K.Geometry(7, 7, 56, 56)
    units = np.tile(np.arange(2), 3)
    a = K.map_masks(acts.reshape(-1, 7, 7), thr, units, geo)
    b = K.map_masks(acts.astype(np.float32).reshape(-1, 7, 7), thr, units, geo)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("q", [0.005, 0.0, 0.5, 0.3333])
def test_f16_quantile_is_numpys(q):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((40, 6, 5, 5)) * 3).astype(np.float16)
    x[:, 1] = 0.0                                           # a constant unit
    x[:10, 2] = -0.0
    x[:, 3] = np.float16(65504)                             # the largest float16
    x[3, 4, 0, 0] = -np.inf
    ref = np.quantile(x.astype(np.float64).transpose(1, 0, 2, 3).reshape(6, -1), 1 - q, axis=1)
    for total in (None, 40 * 25):                   # without / with skipping what cannot matter
        fq = Q.F16Quantile(6, q, total=total)
        for s in range(0, 40, 7):
            fq.add(x[s:s + 7])
        np.testing.assert_array_equal(fq.result(), ref)


def test_f16_quantile_skipping_is_exact_on_skewed_streams():
    """The floor rises after early batches of large values; later small values are skipped."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((64, 3, 4, 4)) * np.linspace(5, 0.1, 64)[:, None, None, None]).astype(np.float16)
    x[40:, 0] = 300.0                                # a late burst of large values in unit 0
    for q in (0.005, 0.05, 0.4):
        ref = np.quantile(x.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1), 1 - q, axis=1)
        fq = Q.F16Quantile(3, q, total=64 * 16)
        for s in range(0, 64, 5):
            fq.add(x[s:s + 5])
        np.testing.assert_array_equal(fq.result(), ref)
        assert (fq.floor > 0).all()


def test_f16_quantile_nan_unit_is_nan():
    x = np.ones((2, 2, 3, 3), dtype=np.float16)
    x[1, 0, 1, 1] = np.nan
    fq = Q.F16Quantile(2, 0.005)
    fq.add(x)
    r = fq.result()
    assert np.isnan(r[0]) and r[1] == 1.0


def test_axis_tables_match_the_tally_geometry():
    from neurosem.dissect.tally import _axis

    for n_in, n_out in [(7, 112), (56, 112), (5, 32), (16, 8), (3, 3)]:
        lo, lam, first, stop = K.axis_tables(n_in, n_out)
        ax = _axis(n_in, n_out, "cpu", torch.float64)
        # every output of piece v sits at lam[v, k] in _axis: the same weights
        for v in range(ax.first.shape[0]):
            f, c = int(ax.first[v]), int(ax.count[v])
            np.testing.assert_array_equal(lam[f:f + c], ax.lam[v, :c].numpy())
        assert (np.diff(lo) >= 0).all() and (stop - first).sum() == n_out


def test_tally_with_negative_maps_and_rows():
    """Signed maps (some rows entirely negative, some maps below every threshold) and ±inf."""
    rng = np.random.default_rng(9)
    b, c, h, w, sh, sw, planes, n_labels, k = 5, 4, 6, 6, 24, 24, 2, 9, 3
    acts = (rng.standard_normal((b, c, h, w)) * 2 - 1).astype(np.float16)
    acts[:, 1, :3] = -5.0                                     # negative rows
    acts[2, 2] = -1.0                                         # a map entirely negative
    acts[3, 0, 0, 0] = np.inf
    acts[4, 3, 5, 5] = -np.inf
    seg, il = _labels(rng, b, planes, sh, sw, n_labels)
    primary = np.array([-1, 0, 0, 1, 1, 2, 2, 0, 1])
    thr = np.array([-0.5, 0.3, 1.1, -2.0])
    ref = Tally(torch.from_numpy(thr), primary, k)
    ref.add(torch.from_numpy(acts), torch.from_numpy(seg), torch.from_numpy(il))
    both, act, pix = np.zeros((c, n_labels), np.int64), np.zeros((c, k), np.int64), np.zeros(c, np.int64)
    sizes, maxes = K.tally_batch(acts, thr, seg.reshape(b, planes, -1).astype(np.uint16), np.full(b, planes), il,
                                 np.where(primary < 0, k, primary), k, K.Geometry(h, w, sh, sw), both, act, pix)
    np.testing.assert_array_equal(both[:, 1:], ref.both.numpy()[:, 1:])
    np.testing.assert_array_equal(act, ref.act.numpy())
    np.testing.assert_array_equal(maxes, acts.astype(np.float64).reshape(b, c, -1).max(2))
    np.testing.assert_array_equal(sizes, ref.last_sizes.view(b, c).numpy())


def test_threads_give_the_same_tallies_and_thresholds_as_one():
    """Workers hands blocks of 8 (tally) and 16 (quantile) units to the threads: 3 threads and
    37 units (uneven blocks) must give exactly the one-thread numbers."""
    rng = np.random.default_rng(11)
    b, c, h, w, sh, sw, planes, n_labels, k = 5, 37, 6, 6, 24, 24, 2, 9, 3
    acts = _acts(rng, b, c, h, w)
    seg, il = _labels(rng, b, planes, sh, sw, n_labels)
    seg = seg.reshape(b, planes, -1).astype(np.uint16)
    primary = np.array([-1, 0, 0, 1, 1, 2, 2, 0, 1])
    cat_of = np.where(primary < 0, k, primary)
    out = []
    for n in (1, 3):
        with K.Workers(n) as workers:
            fq = Q.F16Quantile(c, 0.05, total=b * h * w, workers=workers)
            fq.add(acts[:2])
            fq.add(acts[2:])
            thr = fq.result()
            both, act, pix = np.zeros((c, n_labels), np.int64), np.zeros((c, k), np.int64), np.zeros(c, np.int64)
            sizes, maxes = K.tally_batch(acts, thr, seg, np.full(b, planes), il, cat_of, k, K.Geometry(h, w, sh, sw),
                                         both, act, pix, workers=workers)
        out.append((thr, both, act, pix, sizes, maxes))
    ref = np.quantile(acts.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1), 0.95, axis=1)
    np.testing.assert_array_equal(out[0][0], ref)
    for one, three in zip(*out):
        np.testing.assert_array_equal(one, three)
    assert out[0][4].sum() > 0
