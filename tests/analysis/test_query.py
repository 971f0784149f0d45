"""`neurosem query`: nearest units, additive combinations, tables, JSON and bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from neurosem.analysis import commands
from neurosem.analysis import query as qmod
from neurosem.errors import NeurosemError, RunMismatchError

from . import write_dissection, write_embedding


def brute_force(S: np.ndarray, index: int, add=(), sub=(), k=5):
    """Plain loops: cosine of v = s_index + sum(add) - sum(sub) with every other unit, sorted by
    (-cosine, index)."""
    v = [float(x) for x in S[index]]
    for a in add:
        v = [x + float(y) for x, y in zip(v, S[a])]
    for b in sub:
        v = [x - float(y) for x, y in zip(v, S[b])]
    nv = math.sqrt(sum(x * x for x in v))
    rows = []
    for j in range(len(S)):
        if j == index or j in add or j in sub:
            continue
        nj = math.sqrt(sum(float(y) ** 2 for y in S[j]))
        rows.append((-(sum(x * float(y) for x, y in zip(v, S[j])) / (nv * nj)), j))
    rows.sort()
    return [(j, -negsim) for negsim, j in rows[:k]]


@pytest.fixture()
def run(tmp_path):
    """layer4: 400 planted units (unit 5 = unit 312 + unit 77); layer3: 30 units; a dissection of layer4."""
    rng = np.random.default_rng(0)
    S4 = rng.standard_normal((400, 16)).astype(np.float32)
    S4[5] = S4[312] + S4[77]
    S3 = rng.standard_normal((30, 8)).astype(np.float32)
    path = tmp_path / "run"
    write_embedding(path, {"layer3": S3, "layer4": S4})
    labels = ["sky", "dog", "wheel", "red", "stripes"]
    cats = ["object", "object", "part", "color", "texture"]
    iou = rng.uniform(0, 0.1, size=(400, 5)).astype(np.float32)
    write_dissection(path, {"layer4": iou}, labels, cats)
    return path, S3, S4, iou, labels, cats


def test_neighbours_equal_brute_force(run):
    path, S3, S4, *_ = run
    for layer, S, unit in (("layer3", S3, 7), ("layer4", S4, 312)):
        got = qmod.query(path, f"{layer}:{unit}", k=8)
        ref = brute_force(S.astype(np.float64), unit, k=8)
        assert [r["index"] for r in got] == [j for j, _ in ref]
        assert np.allclose([r["similarity"] for r in got], [s for _, s in ref], atol=1e-12, rtol=0)
        assert [r["rank"] for r in got] == list(range(1, 9))
        assert all(r["neuron"] == f"{layer}:{r['index']}" and r["layer"] == layer for r in got)


def test_combinations_equal_brute_force(run):
    path, S3, *_ = run
    got = qmod.query(path, "layer3:2", add=["layer3:9", "layer3:11"], sub=["layer3:4"], k=30)
    ref = brute_force(S3.astype(np.float64), 2, add=(9, 11), sub=(4,), k=30)
    assert len(got) == 26                                  # 30 units minus the 4 operands
    assert [r["index"] for r in got] == [j for j, _ in ref]
    assert np.allclose([r["similarity"] for r in got], [s for _, s in ref], atol=1e-12, rtol=0)


def test_planted_sum_is_found_first(run):
    path, *_ = run
    got = qmod.query(path, "layer4:312", add=["layer4:77"], k=3)
    assert got[0]["index"] == 5 and got[0]["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert got[1]["similarity"] < 0.9
    # Operands are excluded; the sum's own parts never come back.
    assert {r["index"] for r in qmod.query(path, "layer4:312", add=["layer4:77"], k=400)}.isdisjoint({312, 77})


def test_ties_are_broken_by_index():
    S = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [5.0, 0.0], [1.0, 1.0]])
    assert qmod.nearest_units(S, 0, k=3) == [(2, 1.0), (4, 1.0), (5, pytest.approx(math.sqrt(0.5)))]
    assert [j for j, _ in qmod.nearest_units(S, 5, k=5)] == [0, 1, 2, 3, 4]


def test_labels_come_from_the_dissection(run):
    path, _, _, iou, labels, cats = run
    got = qmod.query(path, "layer4:10", k=4)
    for r in got:
        best = int(np.argmax(iou[r["index"]]))
        assert r["label"] == labels[best] and r["category"] == cats[best]
        assert r["iou"] == pytest.approx(float(iou[r["index"], best]))
        assert r["interpretable"] == (iou[r["index"], best] >= 0.04)
    # A layer without dissection has no label columns.
    assert all("label" not in r for r in qmod.query(path, "layer3:1", k=3))


def test_table_and_json_report(run):
    path, *_ = run
    results = qmod.query(path, "layer4:312", add=["layer4:77"], k=3)
    table = qmod.format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["rank", "neuron", "similarity", "label", "category", "IoU"]
    for line, r in zip(lines[2:], results):
        cells = line.split()
        assert cells[:3] == [str(r["rank"]), r["neuron"], f"{r['similarity']:.4f}"]
        assert cells[3:] == [r["label"], r["category"], f"{r['iou']:.4f}"]
    text = commands.query_report(path, "layer4:312", add=["layer4:77"], k=3)
    assert "layer4:312 + layer4:77" in text and table in text and "operands:" in text
    payload = json.loads(commands.query_report(path, "layer4:312", add=["layer4:77"], k=3, as_json=True))
    assert payload["results"] == json.loads(json.dumps(results))
    assert payload["expression"] == "layer4:312 + layer4:77"
    assert [op["neuron"] for op in payload["operands"]] == ["layer4:312", "layer4:77"]


@pytest.mark.parametrize("neuron, add, sub, pattern", [
    ("layer4-3", (), (), "malformed neuron id"),
    ("layer4:x", (), (), "must be an integer"),
    ("layer4:400", (), (), "out of range: layer4 has 400 units"),
    ("layer2:1", (), (), r"layer 'layer2' .*no embedding.*neurosem embed"),
    ("layer4:1", ("layer3:1",), (), "must be in the query's layer"),
    ("layer4:1", (), ("layer4:-1",), "must be >= 0"),
    ("layer4:1", (), ("layer4:1",), "combined vector is zero"),
])
def test_bad_input_is_one_line(run, neuron, add, sub, pattern):
    path, *_ = run
    with pytest.raises(NeurosemError, match=pattern) as err:
        qmod.query(path, neuron, add=add, sub=sub)
    assert "\n" not in str(err.value)


def test_bad_k(run):
    with pytest.raises(NeurosemError, match="-k must be at least 1"):
        qmod.query(run[0], "layer4:1", k=0)


def test_query_before_embed(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / "run.json").write_text("{}")
    with pytest.raises(NeurosemError, match=r"no embedding .*run `neurosem embed"):
        qmod.query(path, "layer4:1")
    with pytest.raises(NeurosemError, match="does not exist"):
        qmod.query(tmp_path / "missing", "layer4:1")


def test_dissection_of_another_model(tmp_path):
    path = tmp_path / "run"
    write_embedding(path, {"layer4": np.eye(6, 3)})
    write_dissection(path, {"layer4": np.ones((8, 2))}, ["a", "b"], ["object", "part"])
    with pytest.raises(RunMismatchError, match="8 units"):
        qmod.query(path, "layer4:1")


def test_run_is_found_under_runs(tmp_path, monkeypatch, run):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    (runs / "only").mkdir(parents=True)
    (runs / "only" / "run.json").write_text("{}")
    write_embedding(runs / "only", {"l": np.eye(4, 2) + 0.1})
    assert [r["index"] for r in qmod.query(None, "l:0", k=2)] == [j for j, _ in brute_force(np.eye(4, 2) + 0.1, 0, k=2)]
    (runs / "other").mkdir()
    (runs / "other" / "run.json").write_text("{}")
    with pytest.raises(NeurosemError, match="several runs.*--run"):
        qmod.query(None, "l:0")
