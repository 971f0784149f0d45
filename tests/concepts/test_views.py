"""Global views: concept similarities, units per concept, class projections, the semantic-vector link."""
from __future__ import annotations

import json

import numpy as np
import pytest

from neurosem.concepts.views import cluster_order, cosine_rows, mean_pair_cosine, semantic_link

from .conftest import planted_model


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_semantic_link_against_plain_loops():
    rng = np.random.default_rng(1)
    S = rng.normal(size=(6, 3))
    S[1] = S[0] * 2.0                                  # units 0 and 1 point the same way
    W = np.array([[5.0, 4.0, 0.1, 0.0, -1.0, 0.0],    # carried by units 0 and 1
                  [0.0, 0.0, 0.0, 3.0, 2.0, 1.0]])
    out = semantic_link(W, S, ["a", "b"], m=2, n_random=200, seed=0)
    a, b = out["per_concept"]
    assert a["units"] == [0, 1] and a["top_cos"] == pytest.approx(1.0)
    assert b["units"] == [3, 4] and b["top_cos"] == pytest.approx(_cos(S[3], S[4]))
    rng2 = np.random.default_rng(0)
    base = [_cos(*S[rng2.choice(6, size=2, replace=False)]) for _ in range(200)]
    assert out["random_mean_cos"] == pytest.approx(np.mean(base))
    assert a["p"] == pytest.approx((sum(x >= a["top_cos"] - 1e-12 for x in base) + 1) / 201)
    pairs = [(u, v) for u in range(6) for v in range(u + 1, 6)]
    sem = [_cos(S[u], S[v]) for u, v in pairs]
    prof = [_cos(W[:, u], W[:, v]) if np.linalg.norm(W[:, v]) > 0 else 0.0 for u, v in pairs]
    assert out["profile_semantic_pearson"] == pytest.approx(np.corrcoef(sem, prof)[0, 1])
    assert mean_pair_cosine(S, [0, 1, 2]) == pytest.approx(np.mean([_cos(S[0], S[1]), _cos(S[0], S[2]),
                                                                     _cos(S[1], S[2])]))


def test_cluster_order_groups_similar_rows():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.05], [0.05, 1.0]])
    order = cluster_order(cosine_rows(x))
    assert sorted(order) == [0, 1, 2, 3]
    pos = {k: i for i, k in enumerate(order)}
    assert abs(pos[0] - pos[2]) == 1 and abs(pos[1] - pos[3]) == 1


def test_views_of_the_planted_run(binary, planted_run):
    from neurosem.embed import load_embedding

    cv, run = binary, planted_run
    views = json.loads((run / "concepts" / "global.json").read_text())
    v = views["layers"]["fine"]
    W = cv.layer("fine").W
    ref = [[_cos(W[i], W[j]) for j in range(3)] for i in range(3)]
    assert np.allclose(v["similarity"], ref, atol=1e-6) and sorted(v["order"]) == [0, 1, 2]
    assert {u for u, _ in v["top_units"]["red"][:2]} == {0, 1}
    assert v["top_units"]["street"][0][0] == 2
    # the planted head: class weight vectors projected on the concept vectors
    fc = planted_model().model.fc.weight.detach().double().numpy()
    assert v["classes"]["head"] == "fc"
    assert np.allclose(v["classes"]["cosine"], [[_cos(fc[k], W[j]) for j in range(3)] for k in range(4)], atol=1e-6)
    S = load_embedding(run).vectors("fine")
    sem = v["semantic"]
    assert sem["per_concept"][0]["top_cos"] == pytest.approx(mean_pair_cosine(S, np.argsort(-W[0], kind="stable")[:5]))
    names = {p.rsplit("/", 1)[1] for p in cv.outputs["figures"]}
    assert names == {"concepts_fine_similarity.pdf", "concepts_fine_similarity.png", "concepts_vector_vs_unit.pdf",
                     "concepts_vector_vs_unit.png",
                     "concepts_fine_semantic.pdf", "concepts_fine_semantic.png"}
