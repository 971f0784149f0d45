"""The semantic map's own t-SNE and PCA (neurosem.analysis._tsne) and its coordinate cache (maps)."""
from __future__ import annotations

import numpy as np
import pytest

from neurosem.analysis import _tsne as T
from neurosem.analysis import maps


def _clusters(n_per: int = 30, k: int = 4, dim: int = 10, seed: int = 0, spread: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    X = np.repeat(centres, n_per, axis=0) + spread * rng.standard_normal((k * n_per, dim))
    return X, np.repeat(np.arange(k), n_per)


def test_affinities_reach_the_perplexity_and_are_a_joint_distribution():
    X, _ = _clusters(20, 3)
    D = T.cosine_distances(X)
    Pc = T.conditional_affinities(D, 12.0)
    assert np.allclose(Pc.sum(axis=1), 1.0) and np.all(np.diag(Pc) == 0)
    entropy = -(Pc * np.log(np.where(Pc > 0, Pc, 1.0))).sum(axis=1)
    assert np.allclose(entropy, np.log(12.0), atol=1e-5)
    P = T.joint_affinities(D, 12.0)
    assert np.allclose(P, P.T) and np.isclose(P.sum(), 1.0, atol=1e-12) and np.all(np.diag(P) == 0)
    assert np.allclose(P, (Pc + Pc.T) / (2 * len(X)), atol=1e-15)      # rows of Pc sum to 1


def test_cosine_distances_by_hand():
    X = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])
    D = T.cosine_distances(X)
    assert np.allclose(D, [[0, 1, 2, 1], [1, 0, 1, 1], [2, 1, 0, 1], [1, 1, 1, 0]])


def test_kl_of_by_hand():
    """Three points on a line at 0, 1, 3: q_ij ∝ 1 / (1 + d²) = 1/2, 1/10, 1/5 per pair."""
    Y = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    P = np.array([[0, 0.2, 0.1], [0.2, 0, 0.2], [0.1, 0.2, 0]])
    w = np.array([[0, 1 / 2, 1 / 10], [1 / 2, 0, 1 / 5], [1 / 10, 1 / 5, 0]])
    Q = w / w.sum()
    off = ~np.eye(3, dtype=bool)
    assert np.isclose(T.kl_of(P, Y), float((P[off] * np.log(P[off] / Q[off])).sum()), rtol=1e-12)


def test_tsne_separates_planted_clusters_and_is_deterministic():
    X, label = _clusters(25, 4)
    D, start = T.cosine_distances(X), T.pca_2d(X)
    Y, kl = T.tsne(D, start, perplexity=15.0)
    again, kl2 = T.tsne(D, start, perplexity=15.0)
    assert np.array_equal(Y, again) and kl == kl2
    d2 = ((Y[:, None] - Y[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    assert np.array_equal(label[np.argmin(d2, axis=1)], label)          # every nearest point is its cluster's
    start_kl = T.kl_of(T.joint_affinities(D, 15.0), start / np.std(start[:, 0]) * 1e-4)
    assert kl < 0.5 * start_kl


def test_pca_matches_scikit_learn_signs_included():
    decomposition = pytest.importorskip("sklearn.decomposition")
    X, _ = _clusters(10, 3, dim=6, seed=3)
    ref = decomposition.PCA(n_components=2, random_state=0).fit_transform(X)
    assert np.allclose(T.pca_2d(X), ref, atol=1e-10)


@pytest.mark.parametrize("seed,n", [(0, 120), (1, 200)])
def test_tsne_is_as_good_as_scikit_learn(seed, n):
    """Against scikit-learn's TSNE with the settings the map used before (Barnes-Hut, cosine, PCA
    start): the KL (ours evaluated exactly on both maps) is no higher and the trustworthiness (10
    neighbours) no lower than scikit-learn's, within 0.02."""
    manifold = pytest.importorskip("sklearn.manifold")
    X, _ = _clusters(n // 4, 4, dim=16, seed=seed, spread=0.8)
    X = X / np.linalg.norm(X, axis=1)[:, None]
    perplexity = 30.0
    D = T.cosine_distances(X)
    ours, kl = T.tsne(D, T.pca_2d(X), perplexity=perplexity)
    ref = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0, metric="cosine",
                        n_jobs=1).fit_transform(X)
    P = T.joint_affinities(D, perplexity)
    assert np.isclose(kl, T.kl_of(P, ours))
    assert kl <= T.kl_of(P, ref) + 0.02
    trust = [manifold.trustworthiness(X, Y, n_neighbors=10, metric="cosine") for Y in (ours, ref)]
    assert trust[0] >= trust[1] - 0.02


# ------------------------------------------------------------------------------ the cache
def test_cache_reuses_coordinates_and_invalidates_when_the_vectors_change(tmp_path, monkeypatch):
    S = np.random.default_rng(4).standard_normal((60, 6))
    cache = tmp_path / "figures" / ".cache" / "map-l.npz"
    calls = []
    real = maps.embed_2d

    def counting(S_, method="auto", seed=0):
        calls.append(np.array(S_))
        return real(S_, method)

    monkeypatch.setattr(maps, "embed_2d", counting)
    xy, how = maps.cached_embed_2d(S, "auto", cache)
    assert how == "t-SNE" and len(calls) == 1 and cache.exists()
    again, how2 = maps.cached_embed_2d(S, "auto", cache)             # same vectors: read back
    assert len(calls) == 1 and np.array_equal(again, xy) and how2 == "t-SNE"
    with np.load(cache) as data:
        assert str(data["key"]) == maps.map_key(S, "auto")
    S2 = S.copy()
    S2[7, 2] += 1e-9                                                   # any change: computed afresh
    assert maps.map_key(S2, "auto") != maps.map_key(S, "auto")
    xy2, _ = maps.cached_embed_2d(S2, "auto", cache)
    assert len(calls) == 2 and np.array_equal(calls[-1], S2)
    with np.load(cache) as data:                                       # ... and replaces the entry
        assert str(data["key"]) == maps.map_key(S2, "auto")
    maps.cached_embed_2d(S2, "pca", cache)                             # another method: another key
    assert len(calls) == 3 and maps.map_key(S2, "pca") != maps.map_key(S2, "auto")
    cache.write_bytes(b"not an npz")                                   # unreadable: computed afresh
    xy3, how3 = maps.cached_embed_2d(S, "auto", cache)
    assert len(calls) == 4 and np.array_equal(xy3, xy) and how3 == "t-SNE"
    maps.cached_embed_2d(S, "auto", None)                              # no cache: always computed
    assert len(calls) == 5


def test_map_key_depends_on_the_version(monkeypatch):
    S = np.ones((3, 2))
    key = maps.map_key(S, "auto")
    monkeypatch.setattr(maps, "TSNE_VERSION", maps.TSNE_VERSION + 1)
    assert maps.map_key(S, "auto") != key


def test_semantic_map_figure_caches_in_the_run(tmp_path, monkeypatch):
    from tests.analysis import write_embedding

    write_embedding(tmp_path / "r", {"layer.4": np.random.default_rng(0).standard_normal((60, 6))})
    first = maps.semantic_map_figure(tmp_path / "r").neurosem_info["xy"]
    assert (tmp_path / "r" / "figures" / ".cache" / "map-layer.4.npz").exists()
    monkeypatch.setattr(maps, "embed_2d", lambda *a, **k: pytest.fail("the cached map was not used"))
    assert np.array_equal(maps.semantic_map_figure(tmp_path / "r").neurosem_info["xy"], first)
