"""Concept vectors on a planted model: a concept carried by two units, an image-level concept, the files."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from neurosem.concepts import load_concepts, train_concepts
from neurosem.concepts.data import covered_counts, split_masks, spans
from neurosem.concepts.train import average_precision, units_holding
from neurosem.errors import NeurosemError

from .conftest import CONCEPTS


def _reference_unit_iou(run: Path, broden: Path, label: str) -> np.ndarray:
    """Set IoU on the val images of every unit's dissection mask with ``label`` (plain numpy)."""
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect import load_dissection
    from neurosem.store import ActivationStore

    ds = BrodenDataset(broden)
    with ActivationStore.open(run / "activations.h5") as st:
        acts = st.read("fine").astype(np.float32)              # [N, C, 32, 32] = the label size
    thr = load_dissection(run).threshold("fine")
    number = ds.label_names.index(label)
    val = [i for i in range(len(ds)) if i % 4 == 3]            # the synthetic set's val split
    inter = np.zeros(acts.shape[1])
    union = np.zeros(acts.shape[1])
    for i in val:
        lab = (ds.load_seg(i) == number).any(0)
        m = acts[i] > thr[:, None, None]
        inter += (m & lab).sum((1, 2))
        union += (m | lab).sum((1, 2))
    return inter / union


def test_concept_of_two_half_units_gets_iou_one(binary, planted_run, synthetic_broden):
    r = binary.layer("fine")
    k = binary.concepts.names.index("red")
    assert binary.concepts.categories[k] == "color" and binary.concepts.pixel[k]
    assert r.score[k] == 1.0                                   # every val pixel right
    ref = _reference_unit_iou(planted_run, synthetic_broden, "red")
    assert r.unit_score[k] == pytest.approx(ref.max(), abs=1e-12) and r.best_unit[k] == int(ref.argmax())
    assert 0.4 < ref[0] < 0.6 and 0.4 < ref[1] < 0.6            # each half alone: about 0.5
    assert set(np.argsort(-r.W[k])[:2].tolist()) == {0, 1}     # the vector uses both halves
    assert r.W[k, 0] > 0 and r.W[k, 1] > 0 and r.units_90[k] >= 2


def test_raw_input_also_recovers_the_union(planted_run, synthetic_broden, tmp_path):
    import shutil

    run = tmp_path / "raw"
    shutil.copytree(planted_run, run)
    cv = train_concepts(run, broden=synthetic_broden, concepts=["red"], input="raw", epochs=20,
                        batch_size=16, device="cpu", progress=False, figures=False)
    assert cv.args["input"] == "raw" and cv.layer("fine").score[0] == 1.0
    assert np.all(cv.layer("fine").norm_std > 0)
    assert load_concepts(run).args["input"] == "raw"


def test_image_level_concept_has_ap_one(binary):
    r = binary.layer("fine")
    k = binary.concepts.names.index("street")
    assert not binary.concepts.pixel[k] and binary.concepts.categories[k] == "scene"
    assert r.score[k] == 1.0 and r.unit_score[k] == 1.0 and r.best_unit[k] == 2


def test_split_and_alpha(binary, synthetic_broden):
    from neurosem.data.broden import BrodenDataset

    ds = BrodenDataset(synthetic_broden)
    assert binary.args["split"] == "index.csv split"
    assert binary.args["n_train"] == 36 and binary.args["n_val"] == 12
    k = binary.concepts.names.index("red")
    number = ds.label_names.index("red")
    train = [i for i in range(len(ds)) if i % 4 != 3]
    frac = np.mean([(ds.load_seg(i) == number).any(0).mean() for i in train])
    assert binary.layer("fine").alpha[k] == pytest.approx(1 - frac, abs=1e-12)
    s = binary.concepts.names.index("street")
    street = ds.label_names.index("street")
    pos = np.mean([street in ds.load_image_labels(i) for i in train])
    assert binary.layer("fine").alpha[s] == pytest.approx(1 - pos, abs=1e-12)


def test_files(binary, planted_run):
    cv = binary
    rows = list(csv.DictReader(open(planted_run / "concepts" / "fine.csv")))
    assert list(rows[0]) == ["concept", "category", "iou_vector", "iou_best_unit", "best_unit", "units_90"]
    assert [r["concept"] for r in rows] == cv.concepts.names == CONCEPTS
    r = cv.layer("fine")
    for k, row in enumerate(rows):
        assert float(row["iou_vector"]) == pytest.approx(r.score[k], abs=5e-5)
        assert int(row["best_unit"]) == r.best_unit[k] and int(row["units_90"]) == r.units_90[k]
    assert r.W.shape == (3, 5) and r.b.shape == (3,) and len(r.loss) == 20


def test_bad_input(binary, planted_run, synthetic_broden):
    with pytest.raises(NeurosemError, match=r"no concept 'redd'.*closest: red"):
        train_concepts(planted_run, broden=synthetic_broden, concepts=["redd"], progress=False)
    with pytest.raises(NeurosemError, match=r"layer 'nope' has no concept vectors.*fine"):
        binary.layer("nope")
    with pytest.raises(NeurosemError, match=r"--input 'mean'"):
        train_concepts(planted_run, broden=synthetic_broden, input="mean", progress=False)
    with pytest.raises(NeurosemError, match="--epochs must be >= 1"):
        train_concepts(planted_run, broden=synthetic_broden, epochs=0, progress=False)
    with pytest.raises(NeurosemError, match="no concept vectors at"):
        load_concepts(planted_run / "elsewhere")


# ------------------------------------------------------------------ the pieces, against plain references
def test_split_masks_fall_back_to_a_seeded_holdout():
    tr, va, how = split_masks(["train"] * 8, 8, seed=3)
    assert how.startswith("seeded hold-out (2 of 8") and va.sum() == 2 and np.all(tr == ~va)
    tr2, va2, _ = split_masks(["train"] * 8, 8, seed=3)
    assert np.array_equal(va, va2)
    assert spans(np.array([0, 1, 1, 0, 1], dtype=bool)) == [(1, 3), (4, 5)]


def test_covered_counts_counts_a_pixel_once():
    seg = np.array([[[1, 2, 0], [1, 3, 0]], [[2, 2, 2], [0, 0, 0]]])     # [B=2, P=2, S=3]
    out = covered_counts(seg, 4)
    assert out[:, 1:].tolist() == [[1, 1, 1], [0, 3, 0]]


def test_average_precision_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((40, 3)), 1)                 # ties
    y = rng.random((40, 3)) < 0.4

    def plain(s, t):
        total = 0.0
        thresholds = sorted(set(s.tolist()), reverse=True)
        prev_recall = 0.0
        for th in thresholds:
            pred = s >= th
            tp = (pred & t).sum()
            recall = tp / t.sum()
            total += (recall - prev_recall) * tp / pred.sum()
            prev_recall = recall
        return total

    got = average_precision(scores, y)
    assert got == pytest.approx([plain(scores[:, j], y[:, j]) for j in range(3)], abs=1e-12)
    assert np.isnan(average_precision(scores[:, :1], np.zeros((40, 1), bool))[0])


def test_units_holding():
    assert units_holding(np.array([[0.5, 0.3, 0.2], [0.0, 0.0, 0.0], [0.9, 0.1, 0.0]])).tolist() == [3, 0, 1]


def test_summary_lines(binary):
    from neurosem.concepts.run import summary_lines

    r = binary.layer("fine")
    lines = summary_lines(binary)
    assert lines[0].startswith(f"concept vectors: {binary.path} (3 concepts, input binary, 20 epochs; val: 12 images")
    k = binary.concepts.names.index("red")
    color = next(x for x in lines if x.strip().startswith("color"))
    assert color.split() == ["color", "1", "1.000", f"{r.unit_score[k]:.3f}", "1/1",
                             f"{float(np.median(r.units_90[[k]])):.1f}", "of", "5"]
    scene = next(x for x in lines if x.strip().startswith("scene"))
    assert scene.split()[:5] == ["scene", "1", "1.000", "1.000", "0/1"]      # tied with unit 2: not above it


def test_small_blocks_give_the_same_vectors(binary, planted_run, synthetic_broden, tmp_path, monkeypatch):
    """Concepts and images processed in blocks of a few thousand elements: the same numbers."""
    import shutil

    import neurosem.concepts.train as train

    run = tmp_path / "blocks"
    shutil.copytree(planted_run, run)
    monkeypatch.setattr(train, "BLOCK_ELEMENTS", 3000)        # 2 concepts x 1 image per block
    cv = train_concepts(run, broden=synthetic_broden, concepts=CONCEPTS, epochs=20, batch_size=16, device="cpu",
                        progress=False, figures=False)
    a, b = binary.layer("fine"), cv.layer("fine")
    np.testing.assert_allclose(b.W, a.W, atol=1e-5)
    np.testing.assert_allclose(b.score, a.score, atol=1e-12)
    np.testing.assert_allclose(b.unit_score, a.unit_score, atol=1e-12)
