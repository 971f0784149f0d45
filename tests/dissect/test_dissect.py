"""dissect(): a planted model on the synthetic Broden set, the outputs, reuse and bad input."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurosem.data.synthetic import COLORS
from neurosem.dissect import Dissection, dissect, load_dissection
from neurosem.errors import DataError, NeurosemError

from .test_tally import plain_tally

QUANTILE = 0.5      # planted units are 0/1 maps: the threshold must fall on the zeros (see below)
EPS_IOU = 1e-9      # IoU = n / (n + 1e-10) for a perfect match


class PlantedUnits(nn.Module):
    """``x: [B, 3, 64, 64]`` in [0, 1] -> ``[B, 5, 32, 32]`` at the label resolution:

    0. red: 1 where the label cell's colour is exactly the colour label ``red`` (the balls);
    1. street: 1 everywhere on images with an orange (car) cell, else 0 (an image-level concept:
       the synthetic scene is ``street`` exactly when the image holds a car);
    2. a constant 0.5; 3. all zero; 4. the green channel (a continuous, unplanted map).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("red", torch.tensor(COLORS["red"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("orange", torch.tensor(COLORS["orange"], dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = F.avg_pool2d(x, 2) * 255                       # one value per 2 x 2 label cell
        red = ((rgb - self.red).abs() < 0.5).all(1).float()
        orange = ((rgb - self.orange).abs() < 0.5).all(1).float()
        street = orange.flatten(1).amax(1)[:, None, None].expand_as(red)
        return torch.stack([red, street, torch.full_like(red, 0.5), torch.zeros_like(red),
                            rgb[:, 1] / 255], 1)


class Planted(nn.Module):
    """``fine``: the units above at 32 x 32; ``coarse``: the same averaged to 8 x 8."""

    def __init__(self) -> None:
        super().__init__()
        self.fine = PlantedUnits()
        self.coarse = nn.AvgPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coarse(self.fine(x))


def planted_model():
    from neurosem.models import LoadedModel

    return LoadedModel(model=Planted().eval(), spec="planted", weights="planted", mean=(0.0, 0.0, 0.0),
                       std=(1.0, 1.0, 1.0), input_size=(3, 64, 64), default_layers=["fine", "coarse"])


@pytest.fixture(scope="module")
def planted(tmp_path_factory, synthetic_broden):
    run = tmp_path_factory.mktemp("dissect") / "run"
    dis = dissect(run=run, broden=synthetic_broden, model=planted_model(), quantile=QUANTILE,
                  device="cpu", batch_size=16, progress=False)
    return run, dis


def _col(dis: Dissection, name: str) -> int:
    return dis.label_names.index(name)


def _store_acts(run: Path, layer: str) -> np.ndarray:
    from neurosem.store import ActivationStore

    with ActivationStore.open(run / "activations.h5") as st:
        return st.read(layer)


# ------------------------------------------------------------------ the numbers
def test_planted_units_get_iou_one(planted, synthetic_broden):
    run, dis = planted
    fine = _store_acts(run, "fine")
    # the threshold falls on the zeros only while the concept covers less than q of the values
    assert 0 < fine[:, 0].mean() < QUANTILE and 0 < fine[:, 1].mean() < QUANTILE
    red, street = _col(dis, "red"), _col(dis, "street")
    assert dis.label_categories[red] == "color" and dis.label_categories[street] == "scene"
    assert abs(dis.iou("fine")[0, red] - 1) < EPS_IOU
    assert dis.unit_label("fine", 0)[:2] == ("red", "color")
    for layer in ("fine", "coarse"):                    # image level: any resolution
        assert abs(dis.iou(layer)[1, street] - 1) < EPS_IOU
        assert dis.unit_label(layer, 1)[:2] == ("street", "scene")
        assert np.all(dis.iou(layer)[2:4] == 0)         # constant and dead units: exactly 0
    assert dis.iou("coarse")[0, red] < 0.9              # 8 x 8 cannot draw the balls exactly


def test_driver_equals_the_plain_reference(planted, synthetic_broden):
    from neurosem.data.broden import BrodenDataset

    run, dis = planted
    ds = BrodenDataset(synthetic_broden)
    seg = np.stack([ds.load_seg(i) for i in range(len(ds))])
    img = np.stack([ds.load_image_labels(i) for i in range(len(ds))])
    for layer in ("fine", "coarse"):
        acts = _store_acts(run, layer)
        thr = np.quantile(np.moveaxis(acts, 1, 0).reshape(acts.shape[1], -1).astype(np.float64),
                          1 - QUANTILE, axis=1)
        np.testing.assert_array_equal(dis.threshold(layer, exact=True), thr)
        t32 = dis.threshold(layer)
        assert t32.dtype == np.float32 and np.all(t32 <= thr) and np.all(np.nextafter(t32, np.float32(np.inf)) > thr)
        cols, iou, gt, _, _ = plain_tally(acts, seg, img, thr, ds.primary_category, len(ds.categories))
        assert dis.label_numbers.tolist() == cols.tolist()
        np.testing.assert_allclose(dis.iou(layer), iou, rtol=1e-6, atol=1e-7)
        best, best_iou = dis.best(layer)
        assert best.tolist() == iou.argmax(1).tolist()
        np.testing.assert_allclose(best_iou, iou.max(1), rtol=1e-6)
        assert dis.label_gt.tolist() == gt[cols].tolist()


# ------------------------------------------------------------------ the outputs
def test_dissect_h5_layout(planted):
    import h5py

    run, dis = planted
    with h5py.File(run / "dissect.h5", "r") as f:
        args = json.loads(f.attrs["args"])
        assert args["quantile"] == QUANTILE and args["iou_threshold"] == 0.04
        assert args["layers"] == ["fine", "coarse"] and f.attrs["broden_fingerprint"]
        n_labels = f["labels/number"].shape[0]
        assert f["labels/name"].shape == f["labels/category"].shape == (n_labels,)
        assert [c.decode() for c in f["categories"][()]] == dis.categories
        for layer in ("fine", "coarse"):
            g = f["layers"][layer]
            assert g["threshold"].dtype == np.float32 and g["threshold"].shape == (5,)
            assert g["iou"].dtype == np.float32 and g["iou"].shape == (5, n_labels)
            assert g["best_label"].shape == g["best_iou"].shape == g["best_category"].shape == (5,)
            assert g["top_images"].shape == (5, 4)
    assert "stone" not in dis.label_names                 # never occurs: no column


def test_csv_rows_match_the_dissection(planted):
    run, dis = planted
    for layer in dis.layers:
        rows = list(csv.DictReader(open(run / "dissect" / f"{layer}.csv")))
        assert len(rows) == 5
        cat_best, cat_iou = dis.category_best(layer)
        for u, row in enumerate(rows):
            label, cat, iou = dis.unit_label(layer, u)
            assert (int(row["unit"]), row["label"], row["category"]) == (u, label, cat)
            assert row["iou"] == f"{iou:.6f}"
            for k, c in enumerate(dis.categories):
                assert row[f"{c}_label"] == dis.label_names[cat_best[u, k]]
                assert row[f"{c}_iou"] == f"{float(cat_iou[u, k]):.6f}"
    assert rows[1]["scene_label"] == "street" and rows[1]["scene_iou"] == "1.000000"


def test_summary_html_figure_and_run_json(planted):
    run, dis = planted
    summary = json.loads((run / "dissect" / "summary.json").read_text())
    for layer in dis.layers:
        s = summary["layers"][layer]
        assert s["by_category"] == dis.counts(layer)
        assert s["interpretable"] == int(dis.interpretable(layer).sum()) == sum(s["by_category"].values())
    assert summary["layers"]["fine"]["by_category"]["scene"] >= 1
    index = (run / "dissect" / "index.html").read_text()
    assert "fine.html" in index and "coarse.html" in index and "data:image/svg+xml;base64," in index
    page = (run / "dissect" / "fine.html").read_text()
    assert page.count("class='unit") == 5 and "unit 0</b> &middot; red (color)" in page
    assert page.count("class='tile") == 5 * 4                 # top 4 images per unit
    for html_text in (index, page):                           # self-contained: nothing to fetch
        assert "http://" not in html_text and "https://" not in html_text
        assert "src='data:" in html_text and "src='" not in html_text.replace("src='data:", "")
    import xml.etree.ElementTree as ET

    svg = ET.parse(run / "dissect" / "summary.svg").getroot()       # the report's figure, valid SVG
    bars = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if r.find("{http://www.w3.org/2000/svg}title") is not None]
    present = [c for c in dis.categories if any(dis.counts(layer)[c] for layer in dis.layers)]
    assert len(bars) == len(dis.layers) * len(present)
    titles = sorted(b.find("{http://www.w3.org/2000/svg}title").text for b in bars)
    assert titles == sorted(f"{layer}: {dis.counts(layer)[c]} {c} units" for layer in dis.layers for c in present)
    meta = json.loads((run / "run.json").read_text())["dissect"]
    assert meta["quantile"] == QUANTILE and meta["outputs"]["html"].endswith("index.html")
    n_fine = int((dis.iou("fine").max(1) >= np.float32(0.04)).sum())
    assert n_fine >= 2 and f"fine: {n_fine}/5 units interpretable" in str(dis)


def test_top_images_rank_by_mask_size(planted, synthetic_broden):
    """Top images: the largest mask (the pixels the tally counts), then the larger peak, then the
    earlier image; the planted red unit's top images are the images with the most red."""
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect.tally import unit_masks

    run, dis = planted
    acts = _store_acts(run, "fine").astype(np.float32)
    n = acts.shape[0]
    thr = torch.from_numpy(dis.threshold("fine", exact=True))
    size = unit_masks(torch.from_numpy(acts), thr, (32, 32)).flatten(2).sum(2).numpy()
    peak = acts.reshape(n, 5, -1).max(2)
    idx, val = dis.top_images("fine")
    sizes, maps = dis.top_maps("fine")
    for u in range(5):
        order = sorted(range(n), key=lambda i: (-size[i, u], -peak[i, u], i))[:4]
        assert idx[u].tolist() == order
        np.testing.assert_array_equal(val[u], peak[order, u])
        np.testing.assert_array_equal(sizes[u], size[order, u])
        np.testing.assert_array_equal(maps[u].astype(np.float32), acts[order, u])
    ds = BrodenDataset(synthetic_broden)
    red = ds.label_names.index("red")
    red_px = np.array([int((ds.load_seg(i) == red).sum()) for i in range(n)])
    assert (red_px[idx[0]] > 0).all()
    assert red_px[idx[0]].tolist() == sorted(red_px.tolist(), reverse=True)[:4]


def test_report_masks_are_the_tally_masks(planted, synthetic_broden):
    from neurosem.dissect.run import top_masks
    from neurosem.dissect.tally import unit_masks

    run, dis = planted
    acts = _store_acts(run, "coarse").astype(np.float32)             # 8 x 8 maps, 32 x 32 labels
    idx, _ = dis.top_images("coarse")
    thr = torch.from_numpy(dis.threshold("coarse", exact=True))
    ref = unit_masks(torch.from_numpy(acts), thr, (32, 32)).numpy()   # [N, C, 32, 32]
    got = top_masks(dis, "coarse", (32, 32))
    got_torch = top_masks(dis, "coarse", (32, 32), engine="torch")
    for u in range(idx.shape[0]):
        for j, i in enumerate(idx[u]):
            assert np.array_equal(got[u, j], ref[i, u]) and np.array_equal(got_torch[u, j], ref[i, u])


# ------------------------------------------------------------------ reuse
@pytest.fixture()
def copied_run(planted, tmp_path):
    run, _ = planted
    dst = tmp_path / "run"
    dst.mkdir()
    for name in ("activations.h5", "dissect.h5", "run.json"):
        shutil.copy(run / name, dst / name)
    return dst


def test_same_arguments_reuse_other_arguments_recompute(copied_run, synthetic_broden, monkeypatch, capsys):
    import neurosem.dissect.tally as tally

    before = load_dissection(copied_run)

    def refuse(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(tally.Tally, "add", refuse)
    again = dissect(run=copied_run, broden=synthetic_broden, quantile=QUANTILE, progress=False)
    np.testing.assert_array_equal(again.iou("fine"), before.iou("fine"))
    strict = dissect(run=copied_run, broden=synthetic_broden, quantile=QUANTILE, iou_threshold=0.99,
                     progress=False)                       # only the reports change: no recount
    assert strict.iou_threshold == 0.99
    assert {c: n for c, n in strict.counts("fine").items() if n} == {"color": 1, "scene": 1}
    summary = json.loads((copied_run / "dissect" / "summary.json").read_text())
    assert summary["iou_threshold"] == 0.99 and summary["layers"]["fine"]["interpretable"] == 2
    monkeypatch.undo()
    other = dissect(run=copied_run, broden=synthetic_broden, quantile=0.01, layers=["coarse"], progress=False)
    assert "recomputing" in capsys.readouterr().err
    assert other.args["quantile"] == 0.01 and other.layers == ["coarse"]
    assert not np.array_equal(other.threshold("coarse"), before.threshold("coarse"))


def test_rerecorded_activations_are_never_reused(copied_run, synthetic_broden, capsys):
    """Same arguments, but the store was recorded anew (e.g. a changed factory model): recompute."""
    import h5py

    first = dissect(run=copied_run, broden=synthetic_broden, quantile=QUANTILE, progress=False)
    assert first.args["store_id"]
    capsys.readouterr()
    with h5py.File(copied_run / "activations.h5", "r+") as h5:
        h5.attrs["store_id"] = "another-recording"
    again = dissect(run=copied_run, broden=synthetic_broden, quantile=QUANTILE, progress=False)
    assert "recomputing" in capsys.readouterr().err
    assert again.args["store_id"] == "another-recording"


def test_activations_of_another_broden_set_with_the_same_names_are_refused(copied_run, tmp_path):
    from neurosem.data.synthetic import write_synthetic_broden

    other = tmp_path / "other"
    write_synthetic_broden(other, n_images=48, image_size=64, seg_size=32, seed=5)   # same image names
    with pytest.raises(DataError, match="though the image names agree") as info:
        dissect(run=copied_run, broden=other, quantile=QUANTILE, progress=False)
    assert "\n" not in str(info.value) and "--force" in str(info.value)


def test_image_level_categories_alone(copied_run, synthetic_broden):
    """No pixel-level category selected: no label planes at all (this once divided by zero)."""
    only = dissect(run=copied_run, broden=synthetic_broden, quantile=QUANTILE, categories=["scene"],
                   progress=False)
    assert set(only.label_categories) == {"scene"}
    assert abs(only.iou("fine")[1, _col(only, "street")] - 1) < EPS_IOU
    assert only.unit_label("fine", 1)[:2] == ("street", "scene")


def test_new_layers_are_added_to_a_matching_dissection(copied_run, synthetic_broden):
    only = dissect(run=copied_run, broden=synthetic_broden, quantile=0.3, layers=["coarse"], progress=False)
    assert only.layers == ["coarse"]
    both = dissect(run=copied_run, broden=synthetic_broden, quantile=0.3, layers=["fine"], progress=False)
    assert both.layers == ["fine", "coarse"]
    np.testing.assert_array_equal(both.iou("coarse"), only.iou("coarse"))


# ------------------------------------------------------------------ bad input
def test_bad_arguments_are_one_line_errors(copied_run, synthetic_broden, tiny_broden, tmp_path):
    cases = [
        (dict(layers=["nope"]), NeurosemError, "layer 'nope' is not in"),
        (dict(categories=["smell"]), DataError, "no category 'smell'"),
        (dict(quantile=1.5), NeurosemError, "--quantile"),
        (dict(iou_threshold=-1), NeurosemError, "--iou-threshold"),
        (dict(broden=tiny_broden), DataError, "holds 48 images but"),
        (dict(broden=tmp_path / "missing"), DataError, "does not exist"),
        (dict(run=tmp_path / "empty"), NeurosemError, "no activations in"),
    ]
    for kwargs, error, message in cases:
        args = dict(run=copied_run, broden=synthetic_broden, progress=False)
        args.update(kwargs)
        with pytest.raises(error, match=message) as info:
            dissect(**args)
        assert "\n" not in str(info.value)
    assert (copied_run / "dissect.h5").exists() and (copied_run / "activations.h5").exists()


def test_load_dissection_without_one():
    with pytest.raises(NeurosemError, match="neurosem dissect"):
        load_dissection(Path("/nonexistent/run"))


def _tiny_copy(tiny_broden: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny set and a run whose activations are random maps of its images."""
    from neurosem.data.broden import BrodenDataset
    from neurosem.store import ActivationStore

    root = tmp_path / "tiny"
    shutil.copytree(tiny_broden, root)
    ids = BrodenDataset(root).image_ids
    run = tmp_path / "run"
    acts = np.random.default_rng(0).standard_normal((len(ids), 3, 4, 4)).astype(np.float16)
    store = ActivationStore.create(run / "activations.h5", {"layer": (3, 4, 4)}, len(ids), {"model": "random"})
    with store:
        store.append({"layer": acts}, ids)
        store.mark_complete()
    return root, run


def test_unknown_label_in_a_png_and_mixed_sizes(tiny_broden, tmp_path):
    from PIL import Image

    root, run = _tiny_copy(tiny_broden, tmp_path)
    assert dissect(run=run, broden=root, quantile=0.1, progress=False).layers == ["layer"]
    rows = (root / "index.csv").read_text().splitlines()
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(",")))
    png = root / "images" / first["color"].split(";")[0]
    arr = np.array(Image.open(png).convert("RGB"))
    arr[0, 0] = (231, 3, 0)                                 # label 231 + 256 * 3 = 999
    Image.fromarray(arr).save(png)
    kept = (run / "dissect.h5").read_bytes()
    with pytest.raises(DataError, match="999") as info:
        dissect(run=run, broden=root, quantile=0.2, progress=False)
    assert "\n" not in str(info.value) and (run / "dissect.h5").read_bytes() == kept   # nothing lost
    fields = rows[2].split(",")
    fields[header.index("sh")] = "8"
    (root / "index.csv").write_text("\n".join([rows[0], rows[1], ",".join(fields), *rows[3:]]) + "\n")
    with pytest.raises(DataError, match="different sizes"):
        dissect(run=run, broden=root, progress=False)


@pytest.mark.parametrize("cache", [True, False])
def test_torch_and_cpu_engines_give_the_same_passes(planted, synthetic_broden, cache):
    """The GPU path (torch tally) and the compiled CPU kernels: the same thresholds, tallies and top
    images, with labels from the cache or straight from the PNGs."""
    from neurosem.data.broden import BrodenDataset
    from neurosem.data.label_cache import open_label_cache
    from neurosem.dissect._kernels import HAVE_NUMBA
    from neurosem.dissect.passes import LabelSource, run_passes
    from neurosem.store import ActivationStore

    if not HAVE_NUMBA:
        pytest.skip("numba is not installed")
    run, _ = planted
    ds = BrodenDataset(synthetic_broden)
    src = LabelSource(ds, open_label_cache(ds, progress=False) if cache else None)
    with ActivationStore.open(run / "activations.h5") as store:
        a = run_passes(store, ["fine", "coarse"], src, QUANTILE, "cpu", "cpu", 7, 3, False)
        b = run_passes(store, ["fine", "coarse"], src, QUANTILE, "torch", torch.device("cpu"), 16, 3, False)
    for name in ("fine", "coarse"):
        np.testing.assert_array_equal(a[name].threshold, b[name].threshold)
        for field in ("labels", "gt", "both", "act", "unit_pixels"):
            np.testing.assert_array_equal(getattr(a[name].result, field), getattr(b[name].result, field))
        np.testing.assert_array_equal(a[name].result.iou, b[name].result.iou)
        np.testing.assert_array_equal(a[name].top.images, b[name].top.images)
        np.testing.assert_array_equal(a[name].top.sizes, b[name].top.sizes)


def test_a_float32_store_gives_the_same_passes_on_both_engines(synthetic_broden, tmp_path):
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect._kernels import HAVE_NUMBA
    from neurosem.dissect.passes import LabelSource, run_passes
    from neurosem.record import record
    from neurosem.store import ActivationStore

    if not HAVE_NUMBA:
        pytest.skip("numba is not installed")
    run = tmp_path / "f32"
    record(planted_model(), str(synthetic_broden), run=run, dtype="float32", device="cpu", progress=False,
           num_workers=0)
    ds = BrodenDataset(synthetic_broden)
    with ActivationStore.open(run / "activations.h5") as store:
        assert store.dtype == "float32"
        a = run_passes(store, ["fine", "coarse"], LabelSource(ds), QUANTILE, "cpu", "cpu", 16, 2, False)
        b = run_passes(store, ["fine", "coarse"], LabelSource(ds), QUANTILE, "torch", torch.device("cpu"), 16, 2,
                       False)
    for name in ("fine", "coarse"):
        np.testing.assert_array_equal(a[name].threshold, b[name].threshold)
        np.testing.assert_array_equal(a[name].result.both, b[name].result.both)
        np.testing.assert_array_equal(a[name].top.images, b[name].top.images)
    dis = dissect(run=run, broden=synthetic_broden, quantile=QUANTILE, device="cpu", progress=False, report=False)
    assert dis.best("fine")[1][0] >= 1 - 1e-6           # the planted red unit, from a float32 store
