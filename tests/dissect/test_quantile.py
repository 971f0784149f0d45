"""TopQuantile (exact streaming 1 - q quantile) and TopImages (top-activating images per unit)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neurosem.dissect.quantile import TopImages, TopQuantile, quantile_from_top, top_count
from neurosem.errors import NeurosemError


def _numpy_quantile(acts: np.ndarray, q: float) -> np.ndarray:
    """The definition: numpy's linear quantile over all values of each unit, in float64."""
    c = acts.shape[1]
    values = np.moveaxis(np.asarray(acts, dtype=np.float64), 1, 0).reshape(c, -1)
    return np.quantile(values, 1 - q, axis=1)


def _stream(acts: np.ndarray, q: float, batch: int, total: int | None = -1) -> TopQuantile:
    n, c = acts.shape[:2]
    per_unit = int(np.prod(acts.shape[2:])) * n
    tq = TopQuantile(c, q=q, total=per_unit if total == -1 else total)
    for s in range(0, n, batch):
        tq.add(torch.from_numpy(acts[s:s + batch]))
    return tq


def _activations(seed: int, shape: tuple[int, ...], dtype=np.float16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    acts = np.maximum(rng.standard_normal(shape) * 2.0, 0.0).astype(dtype)   # ReLU-like: many ties at 0
    acts[:, 0] = 1.5                                                          # a constant unit
    if shape[1] > 2:
        acts[:, 2] = np.round(acts[:, 2])                                     # heavy ties
    return acts


@pytest.mark.parametrize("q", [0.005, 0.05, 0.3, 0.0, 0.9])
@pytest.mark.parametrize("shape,batch", [((40, 5, 7, 7), 6), ((33, 4, 3, 5), 32), ((9, 3, 1, 1), 2),
                                         ((12, 3, 16, 16), 5)])
def test_thresholds_equal_numpy_quantile(q, shape, batch):
    acts = _activations(1, shape)
    got = _stream(acts, q, batch).result().numpy()
    np.testing.assert_array_equal(got, _numpy_quantile(acts, q))      # bit-identical, not just close


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_other_input_dtypes_are_exact_too(dtype):
    acts = np.random.default_rng(2).standard_normal((20, 3, 6, 6)).astype(dtype)
    np.testing.assert_array_equal(_stream(acts, 0.01, 7).result().numpy(), _numpy_quantile(acts, 0.01))


def test_without_total_exact_when_nothing_needed_was_dropped():
    acts = _activations(3, (60, 4, 5, 5))
    tq = _stream(acts, 0.02, 8, total=None)
    np.testing.assert_array_equal(tq.result().numpy(), _numpy_quantile(acts, 0.02))


def test_without_total_refuses_an_inexact_answer():
    # Without `total` the tracker sizes its buffer from the values seen so far; when many more
    # values come later, those below the early k-th largest were dropped although the final
    # quantile needs them. result() must notice instead of answering wrongly.
    small = np.linspace(0, 1, 4000, dtype=np.float32).reshape(1, 1, 1, 4000)
    mid = np.full((1, 1, 1, 200_000), 0.5, dtype=np.float32)
    tq = TopQuantile(1, q=0.01, total=None)
    tq.add(torch.from_numpy(small))
    tq.add(torch.from_numpy(mid))
    with pytest.raises(NeurosemError, match="pass total"):
        tq.result()
    exact = TopQuantile(1, q=0.01, total=204_000)
    exact.add(torch.from_numpy(small))
    exact.add(torch.from_numpy(mid))
    assert exact.result().item() == np.quantile(np.concatenate([small.ravel(), mid.ravel()]).astype(np.float64), 0.99)


def test_top_count_is_what_numpy_needs():
    # quantile_from_top with exactly top_count values reproduces numpy for every size and q.
    rng = np.random.default_rng(4)
    for total in [1, 2, 3, 7, 50, 199, 200, 1001]:
        for q in [0.0, 0.005, 0.01, 0.25, 0.5, 0.999]:
            values = rng.standard_normal(total)
            k = top_count(total, q)
            assert 1 <= k <= total and k <= math.ceil((total - 1) * q) + 2
            top = np.sort(values)[::-1][:k][None, :]
            assert quantile_from_top(top, total, q)[0] == np.quantile(values, 1 - q)


def test_memory_is_bounded_by_k_not_by_n():
    c, hw, n = 3, 49, 400
    tq = TopQuantile(c, q=0.005, total=n * hw)
    rng = np.random.default_rng(5)
    widths = []
    for _ in range(n // 20):
        tq.add(torch.from_numpy(rng.standard_normal((20, c, 7, 7)).astype(np.float32)))
        widths.append(tq.state_dict()["values"].shape[1])
    k = top_count(n * hw, 0.005) + 1
    assert max(widths) <= 2 * k < n * hw / 50


def test_state_dict_round_trip_mid_stream():
    acts = _activations(6, (30, 4, 6, 6))
    a = TopQuantile(4, q=0.03, total=30 * 36)
    for s in range(0, 14, 7):
        a.add(torch.from_numpy(acts[s:s + 7]))
    b = TopQuantile(4, q=0.5)                     # q and total come from the state
    b.load_state_dict(a.state_dict())
    for s in range(14, 30, 8):
        b.add(torch.from_numpy(acts[s:s + 8]))
    np.testing.assert_array_equal(b.result().numpy(), _numpy_quantile(acts, 0.03))


def test_bad_input():
    with pytest.raises(NeurosemError, match="0 <= q < 1"):
        TopQuantile(3, q=1.0)
    with pytest.raises(NeurosemError, match="0 <= q < 1"):
        TopQuantile(3, q=-0.1)
    tq = TopQuantile(3, q=0.1, total=8)
    with pytest.raises(NeurosemError, match=r"\[B, 3, \.\.\.\]"):
        tq.add(torch.zeros(2, 4, 2, 2))
    with pytest.raises(NeurosemError, match="before any add"):
        tq.result()
    with pytest.raises(NeurosemError, match="total=8"):
        tq.add(torch.zeros(3, 3, 2, 2))
    bad = torch.zeros(1, 3, 2, 2)
    bad[0, 1, 0, 0] = float("nan")
    with pytest.raises(NeurosemError, match="unit 1 has NaN"):
        TopQuantile(3, q=0.1).add(bad)
    with pytest.raises(NeurosemError, match="units"):
        TopQuantile(4).load_state_dict(tq.state_dict())


def test_top_images_match_a_sort_and_keep_earlier_images_on_ties():
    rng = np.random.default_rng(7)
    acts = rng.standard_normal((23, 5, 3, 3)).astype(np.float32)
    acts[4, 0] = acts[9, 0] = 100.0             # a tie: image 4 comes first
    acts[:, 1] = 2.0                            # all tied: images 0..3
    acts[:, 3] = np.minimum(acts[:, 3], 0.5)    # saturated peaks: ties broken by the mean
    ti = TopImages(5, k=4)
    for s in range(0, 23, 6):
        ti.add(torch.from_numpy(acts[s:s + 6]), start=s)
    vals, idx = ti.result()
    peak = acts.reshape(23, 5, -1).max(2)
    mean = acts.reshape(23, 5, -1).mean(2)
    assert (peak[:, 3] == 0.5).sum() > 4        # the saturated unit really has tied peaks
    for u in range(5):
        order = sorted(range(23), key=lambda i: (-peak[i, u], -mean[i, u], i))[:4]
        assert idx[u].tolist() == order
        np.testing.assert_array_equal(vals[u].numpy(), peak[order, u])
    assert idx[0, :2].tolist() == [4, 9] and idx[1].tolist() == [0, 1, 2, 3]
    # round trip, and fewer images than k pad with -1
    t2 = TopImages(5, k=4)
    t2.load_state_dict(ti.state_dict())
    assert torch.equal(t2.result()[1], idx)
    few = TopImages(2, k=3)
    few.add(torch.ones(2, 2, 1, 1), start=0)
    assert few.result()[1].tolist() == [[0, 1, -1], [0, 1, -1]]
