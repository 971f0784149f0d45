"""dissect.h5 round trips, Dissection queries, the CSV/JSON/HTML writers, on hand-made numbers."""
from __future__ import annotations

import base64
import io
import json

import h5py
import numpy as np
import pytest

from neurosem.dissect.report import (LayerDissection, UnitTiles, load_dissection,
                                     mask_overlay, overlay_data_uri, summary_dict, write_dissection,
                                     write_index_html, write_layer_csv, write_layer_html,
                                     write_summary_figure)
from neurosem.errors import NeurosemError
from neurosem.run import RunDir

CATEGORIES = ["color", "object", "scene"]
NAMES = ["red", "blue", "dog", "cat", "beach"]
LABEL_CATS = ["color", "color", "object", "object", "scene"]
IOU = np.array([[0.50, 0.10, 0.00, 0.02, 0.01],      # red (color)
                [0.00, 0.00, 0.03, 0.20, 0.20],      # cat (object), tie with beach: first column
                [0.00, 0.00, 0.00, 0.00, 0.00],      # nothing
                [0.01, 0.00, 0.00, 0.00, 0.05]])     # beach (scene)


def _layer(name: str = "layer4", iou: np.ndarray = IOU) -> LayerDissection:
    from neurosem.dissect.tally import best_labels

    cats = np.array([CATEGORIES.index(c) for c in LABEL_CATS])
    best, best_iou, cat_best, cat_iou = best_labels(iou, cats, len(CATEGORIES))
    c = iou.shape[0]
    return LayerDissection(layer=name, threshold=np.linspace(0.1, 0.4, c) + 1e-9, iou=iou,
                           best_label=best, best_iou=best_iou, category_best_label=cat_best,
                           category_best_iou=cat_iou, top_images=np.tile(np.arange(3), (c, 1)),
                           top_values=np.ones((c, 3)))


@pytest.fixture()
def run(tmp_path):
    args = {"quantile": 0.005, "iou_threshold": 0.04, "layers": ["layer4", "layer3"], "broden": "B"}
    write_dissection(tmp_path / "dissect.h5", args, "abc", np.array([3, 5, 8, 9, 12]), NAMES, LABEL_CATS,
                     np.array([10, 20, 30, 40, 50]), CATEGORIES, [_layer("layer4"), _layer("layer3", IOU[:2])])
    return tmp_path


def test_round_trip_and_queries(run):
    d = load_dissection(run)
    assert d.layers == ["layer4", "layer3"] and d.categories == CATEGORIES
    assert d.label_names == NAMES and d.label_categories == LABEL_CATS
    assert d.label_numbers.tolist() == [3, 5, 8, 9, 12] and d.label_gt.tolist() == [10, 20, 30, 40, 50]
    np.testing.assert_array_equal(d.iou("layer4"), IOU.astype(np.float32))
    assert d.unit_label("layer4", 0) == ("red", "color", pytest.approx(0.5))
    assert d.unit_label("layer4", 1)[:2] == ("cat", "object")          # tie: the first column
    assert d.unit_label("layer4", 3)[:2] == ("beach", "scene")
    assert d.interpretable("layer4").tolist() == [True, True, False, True]
    assert d.interpretable("layer4", 0.1).tolist() == [True, True, False, False]
    assert d.counts("layer4") == {"color": 1, "object": 1, "scene": 1}
    assert d.counts("layer3") == {"color": 1, "object": 1, "scene": 0}
    cat_best, cat_iou = d.category_best("layer4")
    assert cat_best[1].tolist() == [0, 3, 4] and cat_iou[1].tolist() == pytest.approx([0.0, 0.2, 0.2])
    exact = d.threshold("layer4", exact=True)
    f32 = d.threshold("layer4")
    assert exact.dtype == np.float64 and f32.dtype == np.float32
    assert np.all(f32 <= exact) and np.all(np.nextafter(f32, np.float32(1)) > exact)
    assert str(d).splitlines()[1] == "  layer4: 3/4 units interpretable (color 1, object 1, scene 1)"
    # the same through a RunDir and through the file
    assert load_dissection(RunDir(run)).layers == load_dissection(run / "dissect.h5").layers


def test_errors_are_one_line(run, tmp_path):
    d = load_dissection(run)
    with pytest.raises(NeurosemError, match="layer 'fc' is not in the dissection"):
        d.iou("fc")
    with pytest.raises(NeurosemError, match=r"layer4:7 is out of range: layer4 has 4 units \(0..3\)"):
        d.unit_label("layer4", 7)
    with pytest.raises(NeurosemError, match="neurosem dissect --broden PATH --run"):
        load_dissection(tmp_path / "nowhere")
    bad = tmp_path / "bad" / "dissect.h5"
    bad.parent.mkdir()
    bad.write_bytes(b"not hdf5")
    with pytest.raises(NeurosemError, match="is not a readable dissection") as info:
        load_dissection(bad.parent)
    assert "\n" not in str(info.value)


def test_a_minimal_file_still_answers(tmp_path):
    # the contract's datasets only (as other modules' tests write them)
    str_dt = h5py.string_dtype("utf-8")
    with h5py.File(tmp_path / "dissect.h5", "w") as f:
        f.attrs["args"] = json.dumps({"iou_threshold": 0.04})
        f["labels/number"] = np.arange(1, 6)
        f.create_dataset("labels/name", data=NAMES, dtype=str_dt)
        f.create_dataset("labels/category", data=LABEL_CATS, dtype=str_dt)
        f.create_dataset("categories", data=CATEGORIES, dtype=str_dt)
        g = f.create_group("layers/l")
        g["threshold"] = np.zeros(4, dtype=np.float32)
        g["iou"] = IOU.astype(np.float32)
        g["best_label"] = IOU.argmax(1)
        g["best_iou"] = IOU.max(1).astype(np.float32)
        g.create_dataset("best_category", data=[LABEL_CATS[j] for j in IOU.argmax(1)], dtype=str_dt)
    d = load_dissection(tmp_path)
    assert d.category_best("l")[0][1].tolist() == [0, 3, 4]
    assert d.top_images("l")[0].shape == (4, 0) and d.label_gt is None
    np.testing.assert_array_equal(d.threshold("l", exact=True), np.zeros(4, dtype=np.float32))


def test_csv_exact_text(run, tmp_path):
    path = write_layer_csv(tmp_path / "l3.csv", load_dissection(run), "layer3")
    assert path.read_text().splitlines() == [
        "unit,label,category,iou,color_label,color_iou,object_label,object_iou,scene_label,scene_iou",
        "0,red,color,0.500000,red,0.500000,cat,0.020000,beach,0.010000",
        "1,cat,object,0.200000,red,0.000000,cat,0.200000,beach,0.200000",
    ]


def test_summary_dict(run):
    s = summary_dict(load_dissection(run), n_top=2)
    assert s["iou_threshold"] == 0.04 and s["categories"] == CATEGORIES and s["labels"] == 5
    l4 = s["layers"]["layer4"]
    assert (l4["units"], l4["interpretable"], l4["unique_labels"]) == (4, 3, 3)
    assert l4["by_category"] == {"color": 1, "object": 1, "scene": 1}
    assert [(t["unit"], t["label"]) for t in l4["top_units"]] == [(0, "red"), (1, "cat")]


def test_mask_overlay_and_its_png():
    m = np.zeros((4, 5), dtype=bool)
    m[1:3, 1:4] = True
    assert mask_overlay(m).tolist() == [[1, 1, 1, 1, 1],
                                        [1, 2, 2, 2, 1],
                                        [1, 2, 2, 2, 1],
                                        [1, 1, 1, 1, 1]]
    m = np.zeros((5, 5), dtype=bool)
    m[1:4, 1:4] = True
    assert mask_overlay(m)[2, 2] == 0                      # inside, off the edge: clear
    from PIL import Image

    uri = overlay_data_uri(m)
    assert uri.startswith("data:image/png;base64,")
    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGBA"))
    assert rgba[2, 2, 3] == 0 and tuple(rgba[0, 0]) == (0, 0, 0, 170) and tuple(rgba[1, 1]) == (255, 214, 0, 255)



def test_the_compiled_overlay_gives_the_same_pngs_as_numpy():
    from neurosem.dissect import _kernels as K
    from neurosem.dissect.report_html import _OVERLAY_ALPHA, _OVERLAY_PALETTE, _overlay_uris, palette_png

    if not K.HAVE_NUMBA:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(3)
    for h, w in ((7, 9), (12, 12), (1, 5), (5, 1)):
        masks = rng.random((6, h, w)) < 0.6
        masks[0] = True                       # all inside: the border repeats, so no edge
        masks[1] = False
        import base64

        ref = [palette_png(o, _OVERLAY_PALETTE, _OVERLAY_ALPHA) for o in mask_overlay(masks)]
        got = [base64.b64decode(u.split(",", 1)[1]) for u in _overlay_uris(list(masks))]
        assert got == ref

def test_html_pages_are_self_contained_and_sorted(run, tmp_path):
    d = load_dissection(run)
    thumbs = {i: np.full((8, 8, 3), 40 * i, dtype=np.uint8) for i in range(3)}
    tiles = [UnitTiles(images=[0, 2], masks=[np.eye(4, dtype=bool)] * 2) for _ in range(4)]
    page = write_layer_html(tmp_path / "layer4.html", d, "layer4", thumbs, tiles, ["a.jpg", "b.jpg", "c.jpg"], 8)
    text = page.read_text()
    order = [text.index(f"id='u{u}'") for u in (0, 1, 3, 2)]            # by best IoU, descending
    assert order == sorted(order)
    assert text.count("class='unit dim'") == 1 and text.count("class='tile") == 8
    assert "title='c.jpg'" in text and ".i2{background-image:url(data:image/jpeg;base64," in text
    index = write_index_html(tmp_path / "index.html", d, {"layer4": "layer4.html"}).read_text()
    assert "<a href='layer4.html'>layer4</a>" in index and "<td>3</td><td>4</td>" in index
    for t in (text, index):
        assert "http" not in t


def test_summary_figure_files(run, tmp_path):
    paths = write_summary_figure(tmp_path / "figures" / "dissect_summary", load_dissection(run))
    assert sorted(p.suffix for p in paths) == [".pdf", ".png", ".svg"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_summary_figure_shows_only_categories_with_units_in_distinct_colours(tmp_path):
    from matplotlib.colors import to_rgb

    from neurosem.analysis._plotstyle import CATEGORY_COLORS
    from neurosem.dissect.report import summary_figure

    args = {"quantile": 0.005, "iou_threshold": 0.04, "layers": ["layer4"], "broden": "B"}
    write_dissection(tmp_path / "dissect.h5", args, "abc", np.array([3, 5, 8, 9, 12]), NAMES, LABEL_CATS,
                     np.array([10, 20, 30, 40, 50]), CATEGORIES + ["part"], [_layer("layer4")])
    d = load_dissection(tmp_path)
    fig = summary_figure(d)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    present = [c for c in d.categories if any(d.counts(layer)[c] for layer in d.layers)]
    assert labels == present and set(present) < set(d.categories)       # empty categories: no entry
    heights = sorted(round(p.get_height()) for p in ax.patches)
    expected = sorted(d.counts(layer)[c] for layer in d.layers for c in present)
    assert heights == expected
    # the six Broden categories: every pair far apart in RGB (no two near-identical hues)
    rgb = np.array([to_rgb(c) for c in CATEGORY_COLORS.values()])
    dist = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
    assert dist[np.triu_indices(len(rgb), 1)].min() > 0.3


def test_a_full_disk_while_writing_dissect_h5_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch):
    import errno

    import neurosem.dissect.report as rep
    from neurosem.errors import DiskFullError

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rep, "_write_dissection_file", full)
    args = {"quantile": 0.005, "iou_threshold": 0.04, "layers": ["layer4"], "broden": "B"}
    with pytest.raises(DiskFullError, match="not enough disk space for .*dissect.h5.*the activations are kept"):
        write_dissection(tmp_path / "dissect.h5", args, "abc", np.array([3, 5, 8, 9, 12]), NAMES, LABEL_CATS,
                         np.array([10, 20, 30, 40, 50]), CATEGORIES, [_layer("layer4")])
    assert list(tmp_path.iterdir()) == []
