"""The KL metric of paper Fig. 4: exact values, the three curves, the files, the errors."""
from __future__ import annotations

import csv
import json
import math
from typing import Sequence

import numpy as np
import pytest

from neurosem.analysis import kl as klmod
from neurosem.errors import NeurosemError, RunMismatchError

from . import build_pipeline_run, write_dissection, write_embedding


def ref_probs(X: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Plain loops: softmax over all j (diagonal included) of cos/tau; a zero row has cos 0."""
    C = len(X)
    P = np.zeros((C, C))
    for i in range(C):
        for j in range(C):
            ni, nj = np.linalg.norm(X[i]), np.linalg.norm(X[j])
            c = 0.0 if ni == 0 or nj == 0 else float(X[i] @ X[j]) / (ni * nj)
            P[i, j] = math.exp(c / tau)
        P[i] /= P[i].sum()
    return P


def ref_kl(T: np.ndarray, S: np.ndarray, tau: float = 1.0) -> float:
    P, Q = ref_probs(T, tau), ref_probs(S, tau)
    return float(np.mean([sum(P[i, j] * math.log(P[i, j] / Q[i, j]) for j in range(len(T))) for i in range(len(T))]))


T_TINY = np.array([[0.20, 0.00, 0.05], [0.00, 0.30, 0.10], [0.10, 0.10, 0.00], [0.0, 0.0, 0.0]])
S_TINY = np.array([[1.0, 0.5], [-0.3, 2.0], [0.7, 0.7], [0.2, -1.0]])


def test_kl_closed_form_two_units():
    # T = I: P(.|i) = (e, 1)/(e + 1); S parallel rows: Q uniform 1/2.
    p = math.e / (math.e + 1)
    expected = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    got = klmod.kl_divergence(np.eye(2), np.array([[1.0, 0.0], [3.0, 0.0]]))
    assert got == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_kl_matches_plain_loops_with_zero_row(tau):
    got = klmod.kl_divergence(T_TINY, S_TINY, tau)
    assert got == pytest.approx(ref_kl(T_TINY, S_TINY, tau), abs=1e-13)
    # The zero target row gives a uniform P row.
    assert np.allclose(np.exp(klmod.similarity_log_probs(T_TINY, tau))[3], 0.25)


def test_kl_is_zero_when_vectors_reproduce_targets():
    assert klmod.kl_divergence(T_TINY, T_TINY) == pytest.approx(0.0, abs=1e-15)
    # Same cosines, other vectors: a rotation and positive rescaling of the rows.
    R = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))[0]
    S = (T_TINY @ R) * np.array([[2.0], [0.5], [3.0], [1.0]])
    assert klmod.kl_divergence(T_TINY, S) == pytest.approx(0.0, abs=1e-14)


def test_kl_per_snapshot_equals_single_evaluations():
    snaps = np.stack([S_TINY, S_TINY[::-1], T_TINY[:, :2]])
    got = klmod.kl_per_snapshot(T_TINY, snaps, 0.7)
    assert np.allclose(got, [ref_kl(T_TINY, s, 0.7) for s in snaps], atol=1e-13, rtol=0)


def test_kl_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    T, S = rng.uniform(0, 1, (6, 4)), rng.standard_normal((6, 3))
    log_p = klmod.similarity_log_probs(T, 0.7)
    value, grad = klmod.kl_and_grad(S, log_p, 0.7)
    assert value == pytest.approx(ref_kl(T, S, 0.7), abs=1e-13)
    h = 1e-6
    for idx in np.ndindex(S.shape):
        up, down = S.copy(), S.copy()
        up[idx] += h
        down[idx] -= h
        fd = (klmod.kl_divergence(T, up, 0.7) - klmod.kl_divergence(T, down, 0.7)) / (2 * h)
        assert grad[idx] == pytest.approx(fd, abs=1e-8)


def test_torch_evaluator_equals_numpy():
    import torch

    rng = np.random.default_rng(4)
    T, S = rng.uniform(0, 1, (7, 5)), rng.standard_normal((7, 3))
    log_p = klmod.similarity_log_probs(T, 0.5)
    v1, g1 = klmod.kl_and_grad(S, log_p, 0.5)
    v2, g2 = klmod._torch_kl_and_grad(torch.device("cpu"), log_p, 0.5)(S)
    assert v2 == pytest.approx(v1, abs=1e-14) and np.allclose(g1, g2, atol=1e-14, rtol=0)


def test_optimise_kl_reaches_zero_when_dimension_suffices():
    kl, S = klmod.optimise_kl(T_TINY, dim=3, seed=1)
    assert kl < 1e-7
    assert klmod.kl_divergence(T_TINY, S) == pytest.approx(kl, abs=1e-15)
    # Deterministic: the same seed gives the same result.
    assert klmod.optimise_kl(T_TINY, dim=3, seed=1)[0] == kl


def _tiny_run(tmp_path, tau=1.0):
    run = tmp_path / "run"
    rng = np.random.default_rng(3)
    T2 = rng.uniform(0, 0.3, size=(5, 4))
    S3 = np.column_stack([S_TINY, [0.3, -0.2, 0.5, 1.0]])
    snaps1 = np.stack([S3, S3 * [1.0, -1.0, 2.0], T_TINY])     # the last snapshot reproduces T
    S2 = rng.standard_normal((5, 2))
    snaps2 = np.stack([rng.standard_normal((5, 2)), rng.standard_normal((5, 2)), S2])
    write_embedding(run, {"l1": T_TINY, "l2": S2}, {"l1": snaps1, "l2": snaps2}, steps=[0, 4, 16],
                    config={"temperature": tau})
    # One label set for all layers: l1's three IoU columns plus a fourth label it never hits.
    T1 = np.concatenate([T_TINY, np.zeros((4, 1))], axis=1)
    write_dissection(run, {"l1": T1, "l2": T2}, ["a", "b", "c", "d"], ["object", "part", "color", "color"])
    f32 = lambda a: np.asarray(a, dtype=np.float32).astype(np.float64)  # noqa: E731 - as stored
    return run, f32(T1), f32(T2), f32(snaps1), f32(snaps2), f32(S2)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_kl_curves_on_a_run(tmp_path, tau):
    run, T1, T2, snaps1, snaps2, S2 = _tiny_run(tmp_path, tau)
    res = klmod.kl_curves(run, n_random=4, seed=7)
    assert res["temperature"] == tau and res["steps"] == [0, 4, 16]
    l1, l2 = res["layers"]["l1"], res["layers"]["l2"]
    assert np.allclose(l1["embedding"], [ref_kl(T1, s, tau) for s in snaps1], atol=1e-12, rtol=0)
    assert l1["embedding"][-1] == pytest.approx(0.0, abs=1e-12)
    assert l1["final"] == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(l2["embedding"], [ref_kl(T2, s, tau) for s in snaps2], atol=1e-12, rtol=0)
    assert l2["final"] == pytest.approx(ref_kl(T2, S2, tau), abs=1e-12)
    # Random baseline: standard-normal S of the same shape, seeds 7..10.
    vals = [ref_kl(T2, np.random.default_rng(7 + r).standard_normal((5, 2)), tau) for r in range(4)]
    assert np.allclose(l2["random"]["values"], vals, atol=1e-12, rtol=0)
    assert l2["random"]["mean"] == pytest.approx(np.mean(vals), abs=1e-12)
    assert l2["random"]["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
    # Upper bound: never above the trained S (warm start) and ~0 for l1 where S = T is reachable.
    assert l1["upper_bound"]["kl"] < 1e-9
    assert l2["upper_bound"]["kl"] <= l2["final"] + 1e-12
    assert l1["n_zero_targets"] == 1 and l2["n_zero_targets"] == 0
    # Mean over layers.
    assert np.allclose(res["mean"]["embedding"], (np.array(l1["embedding"]) + l2["embedding"]) / 2, atol=1e-15)
    assert res["mean"]["upper_bound"] == pytest.approx((l1["upper_bound"]["kl"] + l2["upper_bound"]["kl"]) / 2)
    # Files: kl.json holds the same numbers, kl.csv one row per layer and step.
    on_disk = json.loads((run / "kl.json").read_text())
    assert on_disk["layers"]["l2"]["embedding"] == l2["embedding"]
    assert on_disk["mean"] == res["mean"]
    with open(run / "kl.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["layer"], int(r["step"])) for r in rows] == [(n, s) for n in ("l1", "l2", "mean") for s in (0, 4, 16)]
    for r in rows:
        lay = res["mean"] if r["layer"] == "mean" else res["layers"][r["layer"]]
        i = [0, 4, 16].index(int(r["step"]))
        assert float(r["embedding"]) == lay["embedding"][i]
        assert float(r["random_mean"]) == lay["random"]["mean"]
        ub = lay["upper_bound"]["kl"] if isinstance(lay["upper_bound"], dict) else lay["upper_bound"]
        assert float(r["upper_bound"]) == ub


def _planted(seed: int = 0):
    """24 units in 4 groups; each group fires on its own random regions and has IoU with its own
    3 concepts: activation similarity and IoU similarity share the block structure."""
    rng = np.random.default_rng(seed)
    G, per, N, h = 4, 6, 40, 8
    C = G * per
    group = np.repeat(np.arange(G), per)
    regions = rng.random((N, G, h, h)) < 0.3
    acts = regions[:, group].astype(np.float64) * (1 + 0.3 * rng.random((N, C, h, h))) + 0.05 * rng.random((N, C, h, h))
    L = 3 * G
    T = rng.uniform(0.0, 0.02, size=(C, L))
    for u in range(C):
        T[u, 3 * group[u]:3 * group[u] + 3] = rng.uniform(0.1, 0.3, size=3)
    return acts, T


def _train_plain(acts: np.ndarray, dim: int, steps: Sequence[int], seed: int = 0):
    """Eq. 1 against P-bar (numpy P-bar; Adam on S with the cross-entropy gradient, which is the
    gradient of KL(P-bar || Q), checked above by finite differences): snapshots at ``steps``."""
    X = acts.reshape(len(acts), acts.shape[1], -1)
    log_pbar = np.log(np.mean([ref_probs_fast(x) for x in X], axis=0))
    S = np.random.default_rng(seed).standard_normal((acts.shape[1], dim))
    m, v, lr, b1, b2 = np.zeros_like(S), np.zeros_like(S), 0.05, 0.9, 0.999
    snaps = []
    for step in range(max(steps) + 1):
        if step in steps:
            snaps.append(S.copy())
        _, g = klmod.kl_and_grad(S, log_pbar)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        S = S - lr * (m / (1 - b1 ** (step + 1))) / (np.sqrt(v / (1 - b2 ** (step + 1))) + 1e-8)
    return np.stack(snaps)


def ref_probs_fast(X: np.ndarray) -> np.ndarray:
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    E = np.exp(Xn @ Xn.T)
    return E / E.sum(1, keepdims=True)


def test_planted_upper_bound_below_trained_below_random(tmp_path):
    acts, T = _planted()
    steps = [0, 5, 25, 100, 300]
    snaps = _train_plain(acts, dim=4, steps=steps)
    run = tmp_path / "run"
    write_embedding(run, {"layer4": snaps[-1]}, {"layer4": snaps}, steps=steps)
    write_dissection(run, {"layer4": T}, [f"c{i}" for i in range(T.shape[1])], ["object"] * T.shape[1])
    res = klmod.kl_curves(run, n_random=8, warm_start=False)
    lay = res["layers"]["layer4"]
    trained, rand, ub = lay["final"], lay["random"], lay["upper_bound"]
    # Upper bound from a random start alone (no warm start) <= the trained embedding < the random baseline.
    assert ub["start"] == "random"
    assert ub["kl"] <= trained
    assert trained < rand["mean"] - 3 * rand["std"]
    assert trained < 0.5 * rand["mean"]
    # The curve starts at a random initialisation and decreases over training.
    assert lay["embedding"][0] > 2 * trained
    assert lay["embedding"][-1] == pytest.approx(trained, abs=1e-12)
    # With the warm start the bound can only get lower.
    res2 = klmod.kl_curves(run, n_random=2, write=False)
    assert res2["layers"]["layer4"]["upper_bound"]["kl"] <= ub["kl"] + 1e-12


def test_pipeline_run_on_synthetic_broden(synthetic_broden, tmp_path):
    """record -> dissect -> embed on the synthetic Broden set, then the three curves."""
    from neurosem.dissect import load_dissection
    from neurosem.embed import load_embedding

    run = build_pipeline_run(tmp_path, synthetic_broden)
    res = klmod.kl_curves(run, n_random=10, progress=False)
    emb, dis = load_embedding(run), load_dissection(run)
    assert list(res["layers"]) == ["layer3", "layer4"]
    for name, lay in res["layers"].items():
        T = dis.iou(name).astype(np.float64)
        assert lay["embedding"][0] == pytest.approx(ref_kl(T, emb.snapshots(name)[0].astype(np.float64)), abs=1e-12)
        assert lay["final"] == pytest.approx(ref_kl(T, emb.vectors(name).astype(np.float64)), abs=1e-12)
        assert lay["upper_bound"]["kl"] <= lay["final"] < lay["random"]["mean"] - 3 * lay["random"]["std"]
    fin = res["final"]
    assert fin["upper_bound"] <= fin["embedding"] < fin["random"]


def test_kl_needs_dissection_and_embedding(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(NeurosemError, match=r"`neurosem embed"):
        klmod.kl_curves(run)
    write_embedding(run, {"l1": S_TINY})
    with pytest.raises(NeurosemError, match=r"`neurosem dissect") as err:
        klmod.kl_curves(run)
    assert "\n" not in str(err.value)
    assert not (run / "kl.json").exists()


def test_kl_unit_count_mismatch_and_missing_layers(tmp_path):
    run = tmp_path / "run"
    write_embedding(run, {"l1": S_TINY})
    write_dissection(run, {"l1": np.ones((5, 2))}, ["a", "b"], ["object", "part"])
    with pytest.raises(RunMismatchError, match="4"):
        klmod.kl_curves(run)
    write_dissection(run, {"other": np.ones((4, 2))}, ["a", "b"], ["object", "part"])
    with pytest.raises(NeurosemError, match="neurosem dissect"):
        klmod.kl_curves(run)


def test_read_kl_json_is_stale_after_a_new_embedding(tmp_path):
    run, *_ = _tiny_run(tmp_path)
    klmod.kl_curves(run, n_random=2)
    assert klmod.read_kl_json(run) is not None
    import os
    import time

    write_embedding(run, {"l1": S_TINY, "l2": np.ones((5, 2))})
    later = time.time() + 5
    os.utime(run / "embedding.h5", (later, later))
    assert klmod.read_kl_json(run) is None


# ------------------------------------------------------------------ speed without changing a bit

def _plain_kl_and_grad(S, log_p, tau):
    """The formula written out with fresh temporaries (kl_and_grad before its work buffers)."""
    c = S.shape[0]
    p = np.exp(log_p)
    neg_entropy = float(np.sum(p * log_p) / c)
    norms = np.maximum(np.linalg.norm(S, axis=1), klmod.COS_EPS)
    Sn = S / norms[:, None]
    Z = Sn @ Sn.T / tau
    Z -= Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    total = E.sum(axis=1, keepdims=True)
    value = neg_entropy - float(np.sum(p * (Z - np.log(total))) / c)
    G = (E / total - p) / c
    g = (G + G.T) @ Sn / tau
    return value, (g - np.sum(g * Sn, axis=1, keepdims=True) * Sn) / norms[:, None]


@pytest.mark.parametrize("c, k, tau", [(4, 2, 1.0), (37, 5, 0.3), (130, 16, 1.0)])
def test_work_buffers_give_the_same_bits(c, k, tau):
    rng = np.random.default_rng(c)
    T = rng.uniform(0, 1, (c, 9)) * (rng.uniform(0, 1, (c, 9)) < 0.4)
    log_p = klmod.similarity_log_probs(T, tau)
    work = tuple(np.full((c, c), np.nan) for _ in range(3))        # garbage left in the buffers
    for _ in range(3):                                              # reused across calls
        S = rng.standard_normal((c, k))
        S[0] = 0.0                                                  # a zero row
        v0, g0 = _plain_kl_and_grad(S, log_p, tau)
        v1, g1 = klmod.kl_and_grad(S, log_p, tau, work=work)
        assert v1 == v0 and np.array_equal(g1, g0)


def test_upper_bounds_side_by_side_equal_one_by_one():
    rng = np.random.default_rng(5)
    targets = {"a": rng.uniform(0, 1, (6, 4)), "b": T_TINY, "c": rng.uniform(0, 1, (9, 3))}
    dims = {"a": 2, "b": 2, "c": 3}
    warm = {"a": rng.standard_normal((6, 2)), "b": None, "c": rng.standard_normal((9, 3))}
    one = klmod.upper_bounds(targets, dims, 0.8, seed=3, warm_starts=warm, max_iter=200, workers=1)
    three = klmod.upper_bounds(targets, dims, 0.8, seed=3, warm_starts=warm, max_iter=200, workers=3)
    assert one == three and list(three) == ["a", "b", "c"]
    for name in targets:
        single = klmod.upper_bound(targets[name], dims[name], 0.8, seed=3, warm_start=warm[name], max_iter=200)
        assert single == one[name]
        rand = klmod.optimise_kl(targets[name], dims[name], 0.8, seed=3, max_iter=200)[0]
        assert one[name]["kl_random_start"] == rand
        if warm[name] is None:
            assert one[name] == {"kl": rand, "kl_random_start": rand, "kl_warm_start": None, "start": "random"}
        else:
            kl_warm = klmod.optimise_kl(targets[name], dims[name], 0.8, init=warm[name], max_iter=200)[0]
            assert one[name]["kl_warm_start"] == kl_warm and one[name]["kl"] == min(rand, kl_warm)
            assert one[name]["start"] == ("embedding" if kl_warm < rand else "random")


def test_evaluation_device_and_driver_check():
    from neurosem._device import gpu_driver_visible, resolve_device

    assert klmod.evaluation_device("cpu") is None and klmod.evaluation_device(" MPS ") is None
    assert klmod.evaluation_device(None) is None
    assert gpu_driver_visible("linux", exists=lambda path: False) is False
    assert gpu_driver_visible("linux", exists=lambda path: path == "/dev/nvidiactl") is True
    assert gpu_driver_visible("darwin", exists=lambda path: False) is True
    # Resolved once per spec: the same object comes back, whatever the spelling.
    assert resolve_device("auto") is resolve_device(" Auto ") is resolve_device(None)
    with pytest.raises(NeurosemError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_kl_on_the_cpu_does_not_import_torch(tmp_path):
    """`neurosem kl` on a machine without a GPU driver never pays torch's import."""
    import subprocess
    import sys

    from neurosem._device import gpu_driver_visible

    code = ("import sys, numpy as np\n"
            "from neurosem.analysis import kl\n"
            "kl.upper_bounds({'l': np.eye(3)}, {'l': 2}, device='auto', max_iter=20)\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(gpu_driver_visible())


def test_the_upper_bound_is_cached_under_its_inputs(tmp_path, monkeypatch):
    run, *_ = _tiny_run(tmp_path)
    first = klmod.kl_curves(run, n_random=2, seed=7)
    cache = run / ".cache" / "kl-upper-bounds.json"
    assert set(json.loads(cache.read_text())) == {"l1", "l2"}
    calls = []
    real = klmod.upper_bounds

    def counting(targets, *args, **kwargs):
        calls.append(sorted(targets))
        return real(targets, *args, **kwargs)

    monkeypatch.setattr(klmod, "upper_bounds", counting)
    again = klmod.kl_curves(run, n_random=2, seed=7)
    assert calls == [] and again["layers"] == first["layers"]            # read back, the same numbers
    klmod.kl_curves(run, n_random=2, seed=8)                              # another start: computed afresh
    klmod.kl_curves(run, n_random=2, seed=7, max_iter=50)
    klmod.kl_curves(run, n_random=2, seed=7, cache=False)
    assert calls == [["l1", "l2"]] * 3
    klmod.kl_curves(run, n_random=2, seed=7)        # the cache holds max_iter=50's bounds: computed again
    assert len(calls) == 4
    # new vectors for l2 only: l2's bound is recomputed, l1's read back
    S2 = np.random.default_rng(9).standard_normal((5, 2))
    write_embedding(run, {"l1": T_TINY, "l2": S2}, {"l1": np.stack([T_TINY] * 3), "l2": np.stack([S2] * 3)},
                    steps=[0, 4, 16], config={"temperature": 1.0})
    klmod.kl_curves(run, n_random=2, seed=7)
    assert calls[-1] == ["l2"]
    cache.write_text("{not json")                                         # damaged: computed afresh
    res = klmod.kl_curves(run, n_random=2, seed=7)
    assert calls[-1] == ["l1", "l2"] and res["layers"]["l1"]["upper_bound"]["kl"] >= 0
    assert klmod.upper_bound_key(T_TINY, 3, None, 1.0, 0, 10, "cpu") != klmod.upper_bound_key(
        T_TINY, 3, None, 0.5, 0, 10, "cpu")
