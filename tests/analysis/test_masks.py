"""The figures' masks in numpy (neurosem.analysis.masks.dissection_masks) against the dissection's kernel."""
from __future__ import annotations

import numpy as np
import pytest

from neurosem.analysis.masks import axis_geometry, dissection_masks

K = pytest.importorskip("neurosem.dissect._kernels")


@pytest.mark.parametrize("n_in,n_out", [(7, 112), (56, 112), (4, 4), (3, 9), (5, 13), (1, 6), (112, 112)])
def test_axis_geometry_is_the_kernels(n_in, n_out):
    lo, lam, _, _ = K.axis_tables(n_in, n_out)
    mine = axis_geometry(n_in, n_out)
    assert np.array_equal(mine[0], lo) and np.array_equal(mine[1], lam)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape,size", [((7, 7), (112, 112)), ((3, 5), (9, 13)), ((4, 4), (4, 4)), ((1, 1), (5, 3)),
                                        ((14, 14), (112, 112))])
def test_masks_equal_the_kernels_bit_for_bit(dtype, shape, size):
    """Random maps with ties at the threshold, NaN, infinities and negative thresholds."""
    if not K.HAVE_NUMBA:
        pytest.skip("numba is not installed: the kernel is not there to compare with")
    rng = np.random.default_rng(sum(shape) + size[0])
    u_n, i_n = 5, 3
    raw = rng.standard_normal((u_n, i_n, *shape)).astype(dtype)
    thr = np.quantile(raw.astype(np.float64).reshape(u_n, -1), 0.8, axis=1)
    thr[1] = float(raw[1].reshape(-1)[0])                      # a threshold equal to a value (a tie)
    thr[2] = -0.5                                              # a negative threshold
    raw[3].reshape(-1)[::7] = np.nan
    raw[4].reshape(-1)[::11] = np.inf
    raw[0, 0] = raw[0, 0].reshape(-1)[0]                       # a constant map at its threshold: empty
    thr[0] = float(raw[0, 0, 0, 0])
    ref = K.map_masks(raw.reshape(u_n * i_n, *shape), thr, np.repeat(np.arange(u_n), i_n), K.Geometry(*shape, *size))
    mine = dissection_masks(raw, thr, size)
    assert mine.shape == (u_n, i_n, *size) and mine.dtype == bool
    assert np.array_equal(mine, ref.reshape(u_n, i_n, *size))
    assert not mine[0, 0].any() and mine.any()
    # in chunks of one map, the same
    assert np.array_equal(dissection_masks(raw, thr, size, max_elements=1), mine)


def test_masks_by_hand():
    """A 2x2 map [[0, 1], [0, 0]] upsampled to 4x4: pixel (0, 3) has the value 1 and (1, 2) the value
    0.75 * 0.75 * ... computed by hand: rows 0..3 sit at source 0, 0.25, 0.75, 1 (clamped)."""
    raw = np.array([[[[0.0, 1.0], [0.0, 0.0]]]], dtype=np.float32)
    lam = np.array([0.0, 0.25, 0.75, 1.0])                     # source position of each output row/col
    ys, xs = np.meshgrid(lam, lam, indexing="ij")
    value = (1 - ys) * xs                                      # bilinear weight of the corner (0, 1)
    for t in (0.1, 0.5, 0.7):
        assert np.array_equal(dissection_masks(raw, np.array([t]), (4, 4))[0, 0], value > t)
