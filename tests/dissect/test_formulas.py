"""Formula search (Mu & Andreas): counts against a plain per-pixel reference, beam against
exhaustive search, planted formula units through dissect(), the outputs and bad options."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurosem.data.synthetic import COLORS
from neurosem.dissect.formulas import (AND, AND_NOT, OPS, OR, FormulaStats, beam_search, build_label_table,
                                       candidate_labels, dedup_rows, formula_iou, formula_string)
from neurosem.errors import NeurosemError

QUANTILE = 0.5
R = 19


# ------------------------------------------------------------------ the plain reference
class Plain:
    """Label masks ``bool [N, S]`` image by image from the PNGs (any plane; the whole image for an
    image-level label) and formulas evaluated on them."""

    def __init__(self, ds):
        self.seg = np.stack([ds.load_seg(i) for i in range(len(ds))])              # [N, P, sh, sw]
        self.img = np.stack([ds.load_image_labels(i) for i in range(len(ds))])     # [N, M]
        n, _, sh, sw = self.seg.shape
        self.n, self.s = n, sh * sw

    def label(self, lab: int) -> np.ndarray:
        m = (self.seg == lab).any(1).reshape(self.n, self.s)
        return m | (self.img == lab).any(1)[:, None]

    def formula(self, f: tuple) -> np.ndarray:
        m = self.label(f[0])
        for op, lab in zip(f[1::2], f[2::2]):
            x = self.label(lab)
            m = {AND: m & x, OR: m | x, AND_NOT: m & ~x}[op]
        return m

    def iou(self, mask: np.ndarray, f: tuple) -> float:
        fm = self.formula(f)
        union = int((mask | fm).sum())
        return int((mask & fm).sum()) / union if union else 0.0


def all_formulas(labels, length):
    """Every left-deep formula of up to ``length`` distinct labels."""
    out = [(int(a),) for a in labels]
    frontier = list(out)
    for _ in range(1, length):
        nxt = [f + (op, int(b)) for f in frontier for op in OPS for b in labels if b not in f[0::2]]
        out += nxt
        frontier = nxt
    return out


@pytest.fixture(scope="module")
def tables(synthetic_broden):
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect.passes import LabelSource

    ds = BrodenDataset(synthetic_broden)
    table = build_label_table(LabelSource(ds, None), len(ds), np.asarray(ds.primary_category), len(ds.categories),
                              batch_size=7)
    return ds, table, Plain(ds)


def _masks(ds, plain, seed):
    """Structured random masks ``bool [N, S]``: label masks mixed with noise."""
    rng = np.random.default_rng(seed)
    n = ds.label_names.index
    a, b = plain.label(n("ball")), plain.label(n("striped"))
    noise = rng.random(a.shape)
    return [(a | (b & (noise < 0.3))) ^ (noise > 0.97), a & ~plain.label(n("wood")) | (noise < 0.02),
            noise < 0.1]


def test_table_counts_equal_the_plain_ones(tables):
    ds, t, plain = tables
    for lab in range(1, t.n_labels):
        m = plain.label(lab)
        assert t.label_size[lab] == m.sum()
        assert t.image_count[lab] == m.any(1).sum() == t.images_of[lab].size
    assert dedup_rows(np.array([[2, 2, 0], [5, 0, 5]])).tolist() == [[0, 2, 0], [0, 5, 0]]


def test_formula_iou_equals_the_plain_reference(tables):
    ds, t, plain = tables
    stats = FormulaStats(t, chunk=3000)                # a few images per chunk
    labels = [ds.label_names.index(x) for x in ("ball", "box", "striped", "wood", "wheel")]
    forms = all_formulas(labels, 3)
    assert len(forms) == 5 + 60 + 540
    for mask in _masks(ds, plain, 0)[:2]:
        sets = t.sets[np.flatnonzero(mask.reshape(-1))]
        for f in forms:
            assert formula_iou(f, sets, stats) == plain.iou(mask, f), formula_string(f, ds.label_names)


@pytest.mark.parametrize("seed", [1, 2])
def test_beam_equals_exhaustive_search(tables, seed):
    ds, t, plain = tables
    stats = FormulaStats(t)
    cands = np.array(sorted(ds.label_names.index(x) for x in ("ball", "box", "tree", "striped", "wood")))
    forms = all_formulas(cands, 3)
    for mask in _masks(ds, plain, seed):
        sets = t.sets[np.flatnonzero(mask.reshape(-1))]
        ref = np.array([plain.iou(mask, f) for f in forms])
        wide = beam_search(sets, stats, cands, length=3, beam=len(forms))
        assert wide.iou == ref.max()
        assert plain.iou(mask, wide.formula) == wide.iou
        singles = ref[:len(cands)]
        assert wide.iou_single == singles.max() and wide.single == cands[singles.argmax()]
        narrow = beam_search(sets, stats, cands, length=3, beam=5)
        assert narrow.iou <= wide.iou and plain.iou(mask, narrow.formula) == narrow.iou
        assert [i for _, i in narrow.beam] == sorted((i for _, i in narrow.beam), reverse=True)
        one = beam_search(sets, stats, cands, length=1, beam=5)
        assert one.formula == (wide.single,) and one.iou == one.iou_single


def test_candidates_and_strings(tables):
    ds, t, _ = tables
    c = candidate_labels(t, 1)
    assert 0 not in c and ds.label_names.index("stone") not in c          # never occurs
    many = candidate_labels(t, 40)
    assert set(many) == {k for k in range(1, t.n_labels) if t.image_count[k] >= 40}
    assert formula_string(None, ds.label_names) == "-"
    names = ["", "a", "b", "c"]
    assert formula_string((1, AND, 2, OR, 3), names) == "(a AND b) OR c"
    empty = beam_search(t.sets[:0], FormulaStats(t), c)
    assert empty.formula is None and empty.iou == 0.0 and empty.single == -1


# ------------------------------------------------------------------ planted formula units
class PlantedFormulas(nn.Module):
    """``x: [B, 3, 64, 64]`` -> ``[B, 3, 32, 32]`` (label resolution):

    0. ``red OR blue`` (the balls and the boxes; ``ball``/``box`` are the same pixels);
    1. ``tree AND NOT forest``: the green trees on images with a car (orange) or a house (yellow);
    2. all zero (an empty mask).
    """

    def __init__(self) -> None:
        super().__init__()
        for name in ("red", "blue", "green", "orange", "yellow"):
            self.register_buffer(name, torch.tensor(COLORS[name], dtype=torch.float32).view(1, 3, 1, 1))

    def _is(self, rgb: torch.Tensor, name: str) -> torch.Tensor:
        return ((rgb - getattr(self, name)).abs() < 0.5).all(1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = F.avg_pool2d(x, 2) * 255
        either = torch.maximum(self._is(rgb, "red"), self._is(rgb, "blue"))
        built = torch.maximum(self._is(rgb, "orange"), self._is(rgb, "yellow")).flatten(1).amax(1)
        tree = self._is(rgb, "green") * built[:, None, None]
        return torch.stack([either, tree, torch.zeros_like(tree)], 1)


class FormulaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.units = PlantedFormulas()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


def formula_model():
    from neurosem.models import LoadedModel

    return LoadedModel(model=FormulaNet().eval(), spec="planted-formulas", weights="planted",
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=(3, 64, 64), default_layers=["units"])


@pytest.fixture(scope="module")
def explained(tmp_path_factory, synthetic_broden):
    from neurosem.dissect import dissect

    run = tmp_path_factory.mktemp("formulas") / "run"
    dis = dissect(run=run, broden=synthetic_broden, model=formula_model(), layers=["units"], quantile=QUANTILE,
                  device="cpu", batch_size=16, progress=False, formulas=3, beam=5, min_images=1, permutations=R)
    return run, dis


def _rows(run, layer):
    return list(csv.DictReader(open(run / "dissect" / f"{layer}_formulas.csv")))


def test_planted_formulas_are_found(explained):
    run, dis = explained
    layer = dis.layers[0]
    rows = {int(r["unit"]): r for r in _rows(run, layer)}
    either = {f"{a} OR {b}" for a in ("red", "ball") for b in ("blue", "box")}
    either |= {f"{b} OR {a}" for a in ("red", "ball") for b in ("blue", "box")}
    assert rows[0]["formula"] in either and rows[0]["iou_formula"] == "1.000000"
    assert float(rows[0]["iou_single"]) < 1
    assert rows[1]["formula"] in {"tree AND NOT forest", "green AND NOT forest"}
    assert rows[1]["iou_formula"] == "1.000000" and float(rows[1]["iou_single"]) < 1
    assert rows[1]["single"] in ("tree", "green")
    assert rows[2]["formula"] == "-" and rows[2]["iou_formula"] == "0.000000"
    for u in (0, 1):                    # no permutation reaches a perfect formula
        assert float(rows[u]["p_value"]) == pytest.approx(1 / (R + 1), abs=1e-6)
    assert rows[2]["p_value"] == "1.000000" and rows[2]["p_value_label"] == "1.000000"
    best, best_iou = dis.best(layer)
    for u in range(3):                  # the identity pairing is the dissection's own IoU
        assert float(rows[u]["iou_label"]) == pytest.approx(float(best_iou[u]), rel=1e-6, abs=1e-7)


def test_formulas_json_and_html(explained):
    run, dis = explained
    layer = dis.layers[0]
    doc = json.loads((run / "dissect" / f"{layer}_formulas.json").read_text())
    assert doc["options"] == {"formulas": 3, "beam": 5, "min_images": 1, "permutations": R, "seed": 0, "alpha": 0.05}
    assert [r["unit"] for r in doc["units"]] == [0, 1, 2]
    assert doc["units"][0]["iou_formula"] == 1.0
    assert doc["interpretable"] == int(dis.interpretable(layer).sum()) == 2
    # three units, p >= 1/20 each: BH at 5% needs p <= 0.05 * k / 3, so nothing passes
    assert doc["interpretable_bh"] == 0 and doc["formulas_bh"] == 0
    page = (run / "dissect" / f"{layer}.html").read_text()
    f0 = _rows(run, layer)[0]["formula"]
    assert f"formula: <b>{f0}</b> (IoU <span class='iou'>1.000</span>" in page
    from neurosem.dissect.explain import report_lines

    lines = report_lines(dis)
    assert lines[0] == "formulas and significance:"
    assert lines[1] == (f"  {layer}: 2 interpretable, 0 after Benjamini-Hochberg at 0.05 ({R} permutations), "
                        "0 units with a significant formula")


def test_bad_options_are_one_line(tmp_path, synthetic_broden):
    from neurosem.dissect import dissect

    for kw, word in (({"formulas": -1}, "--formulas"), ({"formulas": 2, "beam": 0}, "--beam"),
                     ({"formulas": 2, "min_images": 0}, "--min-images"), ({"permutations": -3}, "--permutations"),
                     ({"baseline": "shuffled"}, "--baseline")):
        with pytest.raises(NeurosemError, match=word):
            dissect(run=tmp_path / "r", broden=synthetic_broden, model=formula_model(), progress=False, **kw)


def test_exhaustive_count():
    assert len(all_formulas([1, 2, 3], 2)) == 3 + 3 * 2 * 3
    assert len(all_formulas([1, 2, 3], 3)) == 3 + 18 + 18 * 3


# ------------------------------------------------------------------ the random baseline, the command line
class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():                      # "trained": unit k detects colour channel k
            self.conv.weight.zero_()
            for k in range(3):
                self.conv.weight[k, k, 1, 1] = 1.0
            self.conv.bias.fill_(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def tiny_model():
    from neurosem.models import LoadedModel

    return LoadedModel(model=TinyConv().eval(), spec="tiny-conv", weights="set", mean=(0.0, 0.0, 0.0),
                       std=(1.0, 1.0, 1.0), input_size=(3, 32, 32), default_layers=["conv"])


def test_random_baseline_is_dissected_beside(tmp_path, tiny_broden):
    from neurosem.dissect import dissect, load_dissection
    from neurosem.dissect.explain import random_model, report_lines

    lm = tiny_model()
    a, b = random_model(lm, {}), random_model(lm, {})
    assert torch.equal(a.model.conv.weight, b.model.conv.weight)             # seeded: the same every time
    assert not torch.equal(a.model.conv.weight, lm.model.conv.weight) and a.weights == "random"
    dis = dissect(run=tmp_path / "run", broden=tiny_broden, model=lm, quantile=0.05, device="cpu",
                  batch_size=8, progress=False, report=False, baseline="random")
    base = load_dissection(tmp_path / "run" / "baseline-random")
    doc = json.loads((tmp_path / "run" / "dissect" / "baseline_random.json").read_text())
    d = doc["layers"]["conv"]
    assert d["units"] == 4 and d["model"]["interpretable"] == int(dis.interpretable("conv").sum())
    assert d["random"]["interpretable"] == int(base.interpretable("conv").sum())
    assert d["random"]["by_category"] == base.counts("conv")
    assert not np.array_equal(base.iou("conv"), dis.iou("conv"))
    assert report_lines(dis)[-1] == (f"  conv: {d['random']['interpretable']}/4 units interpretable "
                                     f"(the model: {d['model']['interpretable']})")
    assert dis.outputs["baseline"] == str(base.path)


def test_command_line_formulas(tmp_path, explained, synthetic_broden):
    import shutil

    from click.testing import CliRunner

    from neurosem.cli import cli

    run, _ = explained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    res = CliRunner().invoke(cli, ["dissect", "--run", str(copy), "--broden", str(synthetic_broden), "--quantile",
                                   str(QUANTILE), "--formulas", "2", "--min-images", "1", "--permutations", "4",
                                   "--no-report", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "formulas and significance:" in res.output
    assert "units: 2 interpretable, 0 after Benjamini-Hochberg at 0.05 (4 permutations)" in res.output
    rows = _rows(copy, "units")
    assert rows[1]["formula"] in {"tree AND NOT forest", "green AND NOT forest"} and rows[1]["p_value"] == "0.200000"
    bad = CliRunner().invoke(cli, ["dissect", "--run", str(copy), "--broden", str(synthetic_broden), "--beam", "0"])
    assert bad.exit_code == 2 and "--beam" in bad.output


def test_a_table_too_large_for_memory_is_one_line(synthetic_broden, monkeypatch):
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect import label_table
    from neurosem.dissect.passes import LabelSource

    ds = BrodenDataset(synthetic_broden)
    monkeypatch.setattr(label_table, "memory_bytes", lambda: 10 ** 6)
    with pytest.raises(NeurosemError, match=r"the label table of 48 images at 32x32 needs about 1 MB, more than this machine's memory allows \(1 MB\).*--limit N"):
        build_label_table(LabelSource(ds, None), len(ds), np.asarray(ds.primary_category), len(ds.categories))


def test_without_permutations_the_label_iou_is_still_given(tmp_path, explained, synthetic_broden):
    import shutil

    from neurosem.dissect import dissect

    run, dis = explained
    shutil.copytree(run, tmp_path / "run")
    again = dissect(run=tmp_path / "run", broden=synthetic_broden, layers=["units"], quantile=QUANTILE,
                    device="cpu", progress=False, report=False, formulas=2, min_images=1, permutations=0)
    rows = _rows(tmp_path / "run", "units")
    assert [r["p_value"] for r in rows] == ["", "", ""] and [r["p_value_label"] for r in rows] == ["", "", ""]
    best_iou = again.best("units")[1]
    assert [float(r["iou_label"]) for r in rows] == pytest.approx(best_iou.tolist(), rel=1e-6, abs=1e-7)
    doc = json.loads((tmp_path / "run" / "dissect" / "units_formulas.json").read_text())
    assert doc["interpretable_bh"] is None and doc["options"]["formulas"] == 2


def test_no_store_gives_the_same_formulas(tmp_path, explained, synthetic_broden):
    from neurosem.dissect import dissect

    run, _ = explained
    dissect(run=tmp_path / "run", broden=synthetic_broden, model=formula_model(), layers=["units"], quantile=QUANTILE,
            device="cpu", batch_size=16, progress=False, report=False, no_store=True, formulas=3, min_images=1,
            permutations=0)
    assert not (tmp_path / "run" / "activations.h5").exists()
    got = [(r["formula"], r["iou_formula"]) for r in _rows(tmp_path / "run", "units")]
    assert got == [(r["formula"], r["iou_formula"]) for r in _rows(run, "units")]
