"""The figures: files written, not blank, and their numbers taken from the run."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from neurosem.analysis import figures as figmod
from neurosem.analysis import kl as klmod
from neurosem.analysis import query as qmod
from neurosem.analysis._plotstyle import save_figure
from neurosem.ids import NeuronId, parse_neuron

from . import build_pipeline_run, png_variance, write_activations, write_dissection, write_embedding

EMPTY = figmod.EMPTY_MASK_TEXT

N_IMAGES, SIZE, H, C = 10, 32, 4, 12
LABEL = 16                       # the dissection's label size: masks are 16x16, images 32x32, maps 4x4
A, B, TARGET = 3, 8, 10          # planted: s_10 = s_3 + s_8


def _write_images(folder):
    from PIL import Image

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    pixels = []
    for i in range(N_IMAGES):
        arr = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
        arr[: SIZE // 2] //= 3                                       # some structure
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")
        pixels.append(arr.astype(np.float32) / 255)
    return np.stack(pixels)


def _make_run(root, with_images=True, with_dissection=True, with_acts=True, label_size=(LABEL, LABEL)):
    """12 units in layer4 (4x4 maps) on 10 images; three groups of units share regions; unit 10's
    vector is the sum of units 3 and 8; the dissection's best label of unit u is label u % 5."""
    from neurosem.data import dataset_fingerprint

    rng = np.random.default_rng(0)
    run = root / "run"
    folder = root / "images"
    pixels = _write_images(folder) if with_images else None
    group = np.arange(C) % 3
    regions = rng.random((N_IMAGES, 3, H, H)) < 0.35
    acts = regions[:, group] * (1 + rng.random((N_IMAGES, C, H, H))) + 0.05 * rng.random((N_IMAGES, C, H, H))
    acts = acts.astype(np.float32)
    ids = [f"img{i:02d}.png" for i in range(N_IMAGES)]
    prov = {"data": str(folder.resolve()), "data_fingerprint": dataset_fingerprint(folder) if with_images else "x"}
    if with_acts:
        write_activations(run, {"layer3": acts[:, :6], "layer4": acts}, ids, provenance=prov)
    S = rng.standard_normal((C, 16))
    S[TARGET] = S[A] + S[B]
    snaps = np.stack([rng.standard_normal((C, 16)), 0.5 * (S + rng.standard_normal((C, 16))), S])
    write_embedding(run, {"layer3": rng.standard_normal((6, 4)), "layer4": S},
                    {"layer3": rng.standard_normal((3, 6, 4)), "layer4": snaps}, steps=[0, 10, 100],
                    config={"trainer": "paper"})
    labels = ["sky", "dog", "wheel", "red", "stripes"]
    cats = ["object", "object", "part", "color", "texture"]
    iou = np.full((C, 5), 0.01, dtype=np.float32)
    iou[np.arange(C), np.arange(C) % 5] = 0.025 + 0.01 * np.arange(C)   # unit 11 most interpretable
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(C, -1), 0.8, axis=1)
    if with_dissection:
        write_dissection(run, {"layer4": iou, "layer3": iou[:6]}, labels, cats,
                         thresholds={"layer4": thresholds, "layer3": thresholds[:6]}, label_size=label_size)
    return run, acts, S, iou, thresholds, pixels, folder


@pytest.fixture()
def planted(tmp_path):
    return _make_run(tmp_path)


def _titles(fig):
    return [ax.get_title(loc="left") for ax in fig.axes]


def reference_masks(maps, thresholds, size):
    """The dissection's rule written plainly: bilinear (align_corners=False) upsampling in float64
    of ``maps: [n, h, w]`` to ``size``, then ``> threshold`` (``thresholds: [n]``)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(maps, dtype=np.float64))[:, None]
    up = F.interpolate(x, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    return up > np.asarray(thresholds, dtype=np.float64)[:, None, None]


def reference_default_unit(run, layer, n_images=4, n_neighbours=3, n_scored=12, n_candidates=64):
    """The default unit's rule written plainly: over the interpretable units (all when none is), by
    decreasing IoU, those whose mask shows on each of their top images; of the first ``n_scored``
    of them, the one whose neighbours' masks show on the most of those images."""
    from neurosem.dissect import load_dissection
    from neurosem.store import ActivationStore

    dis = load_dissection(run)
    best_iou = dis.best(layer)[1]
    ranked = sorted(range(len(best_iou)), key=lambda u: (-float(best_iou[u]), u))
    cand = [u for u in ranked if best_iou[u] >= np.float32(dis.iou_threshold)] or ranked
    with ActivationStore.open(run / "activations.h5") as store:
        acts = np.asarray(store.read(layer, 0, store.n_done), dtype=np.float32)
    thr = dis.threshold(layer, exact=True)
    size = tuple(dis.args["label_size"])
    best, scored = None, 0
    for u in cand[:n_candidates]:
        flat = acts[:, u].reshape(len(acts), -1)
        peak, mean = flat.max(1), flat.mean(1)
        rows = sorted(range(len(acts)), key=lambda r: (-peak[r], -mean[r], r))[:n_images]
        units = [u] + [r["index"] for r in qmod.query(run, f"{layer}:{u}", k=n_neighbours)]
        shown = [[bool(reference_masks(acts[[r], v], [thr[v]], size).any()) for r in rows] for v in units]
        if not all(shown[0]):
            continue
        score = sum(map(sum, shown[1:]))
        if best is None or score > best[0]:
            best = (score, u)
        scored += 1
        if scored >= n_scored or score == n_neighbours * len(rows):
            break
    return best[1]


def test_mask_panels_are_the_dissections_masks(planted):
    from PIL import Image

    run, acts, S, iou, thr, pixels, _ = planted
    rd = qmod.run_dir(run)
    units = [NeuronId("layer4", u) for u in (11, 2, 5)]
    panels = figmod.mask_panels(rd, units, units[0], n_images=4)
    # Images: where unit 11 reaches its largest activation (ties by the mean, then by index).
    score = acts[:, 11].reshape(N_IMAGES, -1).max(1)
    mean = acts[:, 11].reshape(N_IMAGES, -1).astype(np.float32).mean(1)
    assert panels.rows == sorted(range(N_IMAGES), key=lambda n: (-score[n], -mean[n], n))[:4]
    assert panels.ids == [f"img{r:02d}.png" for r in panels.rows]
    assert panels.note is None and np.allclose(panels.images, pixels[panels.rows], atol=1e-6)
    assert panels.rule == "dissection" and panels.masks.shape == (3, 4, LABEL, LABEL)
    stored_thr = np.float32(thr)                      # dissect.h5 holds float32 thresholds here
    for ui, u in enumerate(units):
        # Maps (for display): PIL's bilinear upsampling of the stored maps to the label size.
        for ii, r in enumerate(panels.rows):
            ref = np.asarray(Image.fromarray(acts[r, u.index], mode="F").resize((LABEL, LABEL), Image.BILINEAR))
            assert np.allclose(panels.maps[ui, ii], ref, atol=1e-5)
        # Masks: the dissection's, at its label size, with its threshold.
        ref = reference_masks(acts[panels.rows, u.index], [stored_thr[u.index]] * 4, (LABEL, LABEL))
        assert np.array_equal(panels.masks[ui], ref)
    assert panels.thresholds == [float(stored_thr[u.index]) for u in units]
    assert panels.masks[0].reshape(4, -1).any(axis=1).all()      # the image unit shows on its images


def test_the_drawn_mask_is_the_mask_resized_by_nearest(planted):
    run, *_ = planted
    fig = figmod.neighbours_figure(run, "layer4:11", n_images=2)
    units = [parse_neuron(u) for u in fig.neurosem_info["units"]]
    panels = figmod.mask_panels(qmod.run_dir(run), units, units[0], 2)
    grid = [ax for ax in fig.axes if ax.get_images()]
    assert len(grid) == 4 * 2
    for k, ax in enumerate(grid):
        u, i = divmod(k, 2)
        (image,) = ax.get_images()                      # the photo with the light fill blended in
        scale = SIZE // LABEL
        alpha = np.where(panels.masks[u, i].repeat(scale, 0).repeat(scale, 1), figmod.MASK_ALPHA, 0.0)[..., None]
        expected = panels.images[i] * (1 - alpha) + np.asarray(figmod.MASK_COLOR) * alpha
        assert np.allclose(np.asarray(image.get_array()), expected, atol=1e-6)
        assert (EMPTY in [t.get_text() for t in ax.texts]) == (not panels.masks[u, i].any())
    assert fig.neurosem_info["mask_pixels"] == panels.masks.reshape(4, 2, -1).sum(2).tolist()


def _hot_pixel_run(root):
    """One unit whose map (4x4, the label size) has a single pixel just above its threshold: the
    dissection's mask is that pixel, but an upsampling to the 32x32 image never reaches it."""
    from neurosem.data import dataset_fingerprint

    folder = root / "images"
    _write_images(folder)
    acts = np.zeros((N_IMAGES, 3, H, H), dtype=np.float32)
    acts[:, :, 1, 1] = 1.0
    acts[:, 1:] += 0.5 * np.random.default_rng(0).random((N_IMAGES, 2, H, H)).astype(np.float32)
    run = root / "run"
    ids = [f"img{i:02d}.png" for i in range(N_IMAGES)]
    write_activations(run, {"layer4": acts}, ids,
                      provenance={"data": str(folder.resolve()), "data_fingerprint": dataset_fingerprint(folder)})
    write_embedding(run, {"layer4": np.eye(3, 4)})
    write_dissection(run, {"layer4": np.full((3, 2), 0.1)}, ["sky", "dog"], ["object", "object"],
                     thresholds={"layer4": np.full(3, 0.9)}, label_size=(H, H))
    return run, acts


def test_a_mask_at_the_label_size_shows_even_when_upsampling_to_the_image_loses_it(tmp_path):
    run, acts = _hot_pixel_run(tmp_path)
    unit = NeuronId("layer4", 0)
    assert not (figmod.upsample(acts[:, 0], (SIZE, SIZE)) > 0.9).any()     # the old rule: no mask at all
    panels = figmod.mask_panels(qmod.run_dir(run), [unit], unit, n_images=3)
    expected = np.zeros((H, H), dtype=bool)
    expected[1, 1] = True
    assert all(np.array_equal(m, expected) for m in panels.masks[0])
    fig = figmod.neighbours_figure(run, unit, n_neighbours=1, n_images=3)
    assert fig.neurosem_info["mask_pixels"][0] == [1, 1, 1]
    drawn = np.asarray(fig.axes[0].get_images()[0].get_array())          # the photo, the fill blended in
    changed = np.abs(drawn - panels.images[0]).max(axis=-1) > 1e-6
    assert int(changed.sum()) == (SIZE // H) ** 2


def test_neighbours_figure_shows_the_query_results(planted, tmp_path):
    run, *_ = planted
    results = qmod.query(run, "layer4:11", k=3)
    fig = figmod.neighbours_figure(run, "layer4:11", n_images=3)
    titles = [t for t in _titles(fig) if t]
    assert len(titles) == 4 and titles[0].startswith("layer4:11\n")
    for title, r in zip(titles[1:], results):
        assert title.startswith(r["neuron"] + "\n") and f"cos {r['similarity']:.3f}" in title
        kind = "" if r["interpretable"] else ", not interpretable"
        assert f"{r['label']} ({r['category']}, IoU {r['iou']:.3f}{kind})" in title
    assert fig.neurosem_info["units"] == ["layer4:11"] + [r["neuron"] for r in results]
    png = save_figure(fig, tmp_path / "nb", ("png",), dpi=40)[0]
    assert png_variance(png) > 100


def test_additive_figure_finds_the_planted_sum(planted):
    run, *_ = planted
    fig = figmod.additive_figure(run, f"layer4:{A}", add=[f"layer4:{B}"], n_images=2)
    titles = [t for t in _titles(fig) if t]
    assert titles[0].startswith(f"layer4:{A}\n") and titles[1].startswith(f"+ layer4:{B}\n")
    assert titles[2].startswith(f"→ layer4:{TARGET}\n") and "cos 1.000" in titles[2]
    assert fig.neurosem_info["target"] == f"layer4:{TARGET}"
    assert figmod.default_pair(run, "layer4") == (NeuronId("layer4", A), NeuronId("layer4", B),
                                                 NeuronId("layer4", TARGET))


def _kl_lines_match(ax, result, key):
    lay = result["mean"] if key is None else result["layers"][key]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"embedding", "random init", "upper bound"}
    assert np.array_equal(lines["embedding"].get_xdata(), result["steps"])
    assert np.array_equal(lines["embedding"].get_ydata(), lay["embedding"])
    assert set(lines["random init"].get_ydata()) == {lay["random"]["mean"]}
    ub = lay["upper_bound"]["kl"] if key else lay["upper_bound"]
    assert set(lines["upper bound"].get_ydata()) == {ub}
    assert ax.get_ylim()[0] < min(0.0, ub)          # the bound's line is inside the axes, not on the spine


def test_kl_figure_plots_kl_json(planted, tmp_path):
    run, *_ = planted
    klmod.kl_curves(run, n_random=3)
    result = json.loads((run / "kl.json").read_text())
    fig = figmod.kl_figure(result)
    # three panels in one row, every axes visible and drawn; the legend and the key below them
    assert [ax.get_title() for ax in fig.axes] == ["layer3", "layer4", "mean over layers"]
    assert all(ax.get_visible() and ax.get_lines() for ax in fig.axes)
    for ax, key in zip(fig.axes, ["layer3", "layer4", None]):
        _kl_lines_match(ax, result, key)
        assert ax.get_xlabel() == "epoch"
    assert len(fig.legends) == 1 and [t.get_text() for t in fig.legends[0].get_texts()] == [
        "embedding", "random init", "upper bound"]
    assert [t.get_text() for t in fig.texts] == [fig.neurosem_info["note"]]
    assert fig.neurosem_info["note"].startswith("Lower is better. random init: the KL of random vectors (mean ± std over 3 seeds)")
    one = figmod.kl_figure(result, layers=["layer3"])
    assert [ax.get_title() for ax in one.axes] == ["layer3"]
    png = save_figure(fig, tmp_path / "kl", ("png",), dpi=40)[0]
    assert png_variance(png) > 100


def test_kl_figure_has_no_empty_axes_and_explains_a_zero_bound(planted):
    run, *_ = planted
    result = klmod.kl_curves(run, n_random=2, write=False)
    lay = result["layers"]["layer4"]
    # five panels (four layers and the mean) on a 3-column grid: the sixth slot holds the legend
    result["layers"] = {f"l{i}": dict(lay, upper_bound={"kl": 0.0}) for i in range(4)}
    result["mean"] = dict(result["mean"], upper_bound=0.0)
    fig = figmod.kl_figure(result)
    assert [ax.get_title() for ax in fig.axes] == ["l0", "l1", "l2", "l3", "mean over layers"]
    assert all(ax.get_visible() and len(ax.get_lines()) == 3 for ax in fig.axes)
    for ax, key in zip(fig.axes, ["l0", "l1", "l2", "l3", None]):
        _kl_lines_match(ax, result, key)
    assert len(fig.legends) == 1
    note = fig.texts[0].get_text()
    assert "upper bound" in note and "it is 0 here" in note and note == fig.neurosem_info["note"]
    # with a bound above 0 the key says what it is, and does not claim 0
    result["layers"]["l0"]["upper_bound"] = {"kl": 0.01}
    assert "it is 0 here" not in figmod.kl_figure(result).neurosem_info["note"]


def test_heatmap_is_the_clustered_cosine_matrix(planted):
    run, _, S, *_ = planted
    fig = figmod.similarity_heatmap_figure(run, "layer4")
    order = fig.neurosem_info["order"]
    assert sorted(order) == list(range(C))
    Sn = S / np.linalg.norm(S, axis=1, keepdims=True)
    image = [im for ax in fig.axes for im in ax.get_images()][0]
    assert np.allclose(image.get_array(), (Sn @ Sn.T)[np.ix_(order, order)], atol=1e-12)
    # The planted pair sits next to its sum in the clustering order... at least one of them.
    pos = {u: i for i, u in enumerate(order)}
    assert min(abs(pos[A] - pos[TARGET]), abs(pos[B] - pos[TARGET])) == 1
    # the colour bar says what the colours are; both axes say what the rows and columns are
    heat, cbar = fig.axes[1], fig.axes[2]
    assert cbar.get_ylabel() == "cosine similarity"
    assert heat.get_xlabel() == heat.get_ylabel() == "unit (clustering order)"


def test_heatmap_groups_planted_clusters(tmp_path):
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((3, 8)) * 3
    S = np.repeat(centres, 5, axis=0) + 0.1 * rng.standard_normal((15, 8))
    perm = rng.permutation(15)
    write_embedding(tmp_path / "r", {"l": S[perm]})
    order = figmod.similarity_heatmap_figure(tmp_path / "r").neurosem_info["order"]
    cluster_of = {new: old // 5 for new, old in enumerate(perm)}
    runs = [cluster_of[int(u)] for u in order]
    assert sum(a != b for a, b in zip(runs, runs[1:])) == 2        # three contiguous blocks


def _label_boxes(fig):
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in fig.axes[0].texts]


def _overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_semantic_map_labels_the_most_interpretable_units(planted):
    run, _, S, iou, *_ = planted
    fig = figmod.semantic_map_figure(run, "layer4", n_labels=3)
    info = fig.neurosem_info
    assert info["method"] == "PCA"
    assert info["labelled"] == [11, 10, 9]
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["11 dog", "10 sky", "9 stripes"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("PC 1", "PC 2")
    # every point is drawn once (plus a ring around each labelled point)
    scatter = [c.get_offsets() for c in ax.collections]
    assert np.allclose(np.sort(np.concatenate(scatter[:-1]), axis=0), np.sort(info["xy"], axis=0))
    assert np.allclose(scatter[-1], info["xy"][[11, 10, 9]])
    # Category colours: interpretable units (IoU >= 0.04: units 2..11) by category, the rest grey.
    assert info["categories"][:2] == ["not interpretable"] * 2
    assert info["categories"][2:] == [["object", "object", "part", "color", "texture"][u % 5] for u in range(2, C)]


def test_semantic_map_labels_never_overlap(tmp_path):
    """40 units on four tight clusters, all interpretable: only the labels that fit are drawn, the
    highest IoU first, and no two overlap nor leave the axes."""
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((4, 6)) * 4
    S = np.repeat(centres, 10, axis=0) + 0.01 * rng.standard_normal((40, 6))
    iou = np.full((40, 2), 0.01)
    iou[:, 0] = 0.05 + 0.001 * rng.permutation(40)
    write_embedding(tmp_path / "r", {"l": S})
    write_dissection(tmp_path / "r", {"l": iou}, ["a long label name", "b"], ["object", "part"])
    fig = figmod.semantic_map_figure(tmp_path / "r", method="pca", n_labels=20)
    labelled = fig.neurosem_info["labelled"]
    ranked = [int(u) for u in np.argsort(-iou[:, 0], kind="stable")]
    assert 4 <= len(labelled) < 20 and labelled[0] == ranked[0]
    assert labelled == [u for u in ranked if u in labelled]               # in IoU order
    boxes = _label_boxes(fig)
    assert len(boxes) == len(labelled)
    assert not any(_overlap(a, b) for k, a in enumerate(boxes) for b in boxes[k + 1:])
    frame = fig.axes[0].get_window_extent(fig.canvas.get_renderer())
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)


def test_semantic_map_uses_tsne_for_many_units(tmp_path):
    rng = np.random.default_rng(0)
    write_embedding(tmp_path / "r", {"l": rng.standard_normal((60, 6))})
    fig = figmod.semantic_map_figure(tmp_path / "r")
    assert fig.neurosem_info["method"] == "t-SNE" and fig.neurosem_info["xy"].shape == (60, 2)


def test_make_figures_writes_every_figure(planted, caplog):
    run, *_ = planted
    paths = figmod.make_figures(run, formats=("pdf", "png", "svg"), dpi=40, n_images=3)
    names = ["neighbours", "additive", "dissect_summary", "kl_curves", "semantic_map", "similarity_heatmap"]
    assert sorted(p.name for p in paths) == sorted(f"{n}.{f}" for n in names for f in ("pdf", "png", "svg"))
    for p in paths:
        assert p.parent == run / "figures" and p.stat().st_size > 1000
        if p.suffix == ".png":
            assert png_variance(p) > 100, p
        if p.suffix == ".pdf":
            data = p.read_bytes()
            assert b"/FontFile2" in data and b"/Type3" not in data        # TrueType embedded
        if p.suffix == ".svg":
            assert "<text" in p.read_text()                                # text kept as text
    manifest = json.loads((run / "figures" / "figures.json").read_text())
    unit = reference_default_unit(run, "layer4", n_images=3)
    assert figmod.default_unit(run, n_images=3) == NeuronId("layer4", unit)
    best = qmod.query(run, f"layer4:{unit}", k=3)
    assert manifest["neighbours"]["units"] == [f"layer4:{unit}"] + [r["neuron"] for r in best]
    assert manifest["additive"]["target"] == f"layer4:{TARGET}"
    # every panel meant to show a mask shows one: the unit whose top images are shown, on each of them
    for name in ("neighbours", "additive"):
        info = manifest[name]
        assert info["mask_rule"] == "dissection" and info["mask_size"] == [LABEL, LABEL]
        assert all(n > 0 for n in info["mask_pixels"][info["image_unit"]]), name
    # kl.json was computed on the way and is reused when up to date.
    assert klmod.read_kl_json(run) is not None


def test_images_unavailable_fall_back_to_maps(tmp_path, caplog):
    import shutil

    run, acts, *_, folder = _make_run(tmp_path)
    shutil.rmtree(folder)
    with caplog.at_level(logging.WARNING, logger="neurosem"):
        fig = figmod.neighbours_figure(run, "layer4:11", n_images=2)
    assert fig.neurosem_info["note"].startswith("images unavailable")
    assert any("images unavailable" in r.getMessage() for r in caplog.records)
    panels = figmod.mask_panels(qmod.run_dir(run), [NeuronId("layer4", 11)], NeuronId("layer4", 11), 2)
    assert panels.images is None and panels.maps.shape == panels.masks.shape == (1, 2, LABEL, LABEL)
    assert "Images unavailable" in figmod.mask_caption(panels)
    png = save_figure(fig, tmp_path / "fallback", ("png",), dpi=40)[0]
    assert png_variance(png) > 100


def test_without_a_label_size_the_masks_are_half_the_maximum(tmp_path, caplog):
    """A dissect.h5 that does not record its label size, no images: half-max masks on 112 px maps."""
    import shutil

    run, acts, *_, folder = _make_run(tmp_path, label_size=None)
    shutil.rmtree(folder)
    unit = NeuronId("layer4", 11)
    with caplog.at_level(logging.WARNING, logger="neurosem"):
        panels = figmod.mask_panels(qmod.run_dir(run), [unit], unit, 2)
    assert panels.rule == "half max" and panels.maps.shape == (1, 2, 112, 112)
    raw = acts[panels.rows, 11]
    assert panels.thresholds == [0.5 * float(raw.max())]
    assert np.array_equal(panels.masks[0], reference_masks(raw, [0.5 * float(raw.max())] * 2, (112, 112)))
    assert "half its largest value" in figmod.mask_caption(panels)
    assert any("half its largest value" in r.getMessage() for r in caplog.records)


def test_figures_without_activations_or_dissection(tmp_path, caplog):
    run, *_ = _make_run(tmp_path, with_images=False, with_dissection=False, with_acts=False)
    with caplog.at_level(logging.WARNING, logger="neurosem"):
        paths = figmod.make_figures(run, formats="png", dpi=40)
    assert sorted(p.name for p in paths) == ["semantic_map.png", "similarity_heatmap.png"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "neurosem record" in messages and "neurosem dissect" in messages
    # Without a dissection the default unit is the one with the most similar neighbours.
    assert figmod.default_unit(run) == NeuronId("layer4", TARGET)


def test_query_figure_follows_the_suffix(planted, tmp_path):
    run, *_ = planted
    out = figmod.query_figure(run, f"layer4:{A}", add=[f"layer4:{B}"], path=tmp_path / "q.png", dpi=40)
    assert out == [tmp_path / "q.png"] and png_variance(out[0]) > 100
    out = figmod.query_figure(run, "layer4:11", path=tmp_path / "nb.svg", dpi=40)
    assert out == [tmp_path / "nb.svg"] and "<text" in out[0].read_text()


def test_bad_figure_requests(planted):
    from neurosem.errors import NeurosemError

    run, *_ = planted
    with pytest.raises(NeurosemError, match="unknown figure format 'gif'"):
        figmod.make_figures(run, formats="png,gif")
    with pytest.raises(NeurosemError, match="no embedding"):
        figmod.semantic_map_figure(run, "layer9")
    with pytest.raises(NeurosemError, match="out of range"):
        figmod.make_figures(run, unit="layer4:99", formats="png")


def test_figures_on_a_pipeline_run(synthetic_broden, tmp_path):
    """record -> dissect -> embed on the synthetic Broden set: the masks lie over the Broden images,
    are the ones the dissection report draws, and show wherever a panel is meant to show one."""
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect import load_dissection
    from neurosem.dissect.run import top_masks
    from neurosem.store import ActivationStore

    run = build_pipeline_run(tmp_path, synthetic_broden)
    rd = qmod.run_dir(run)
    unit = figmod.default_unit(run)
    dis = load_dissection(run)
    assert unit == NeuronId("layer4", reference_default_unit(run, "layer4"))
    panels = figmod.mask_panels(rd, [unit], unit, n_images=3)
    assert panels.note is None and panels.masks.shape[-2:] == (32, 32)     # the label size, not the 64 px image
    ds = BrodenDataset(synthetic_broden, with_labels=False)
    for i, r in enumerate(panels.rows):
        assert ds[r]["id"] == panels.ids[i]
        assert np.allclose(panels.images[i], ds[r]["image"].numpy().transpose(1, 2, 0), atol=1e-6)
    # the masks of the report (its tiles: the dissection's top images) are the figure's masks
    top_i, _ = dis.top_images("layer4")
    report_masks = top_masks(dis, "layer4", (32, 32))[unit.index]
    assert panels.rows == [int(i) for i in top_i[unit.index][:3]]      # the report's top images
    own = figmod.mask_panels(rd, [unit], unit, rows=[int(i) for i in top_i[unit.index]])
    for k in range(top_i.shape[1]):
        assert np.array_equal(own.masks[0, k], report_masks[k])
    fig = figmod.neighbours_figure(run, unit, n_images=3)
    info = fig.neurosem_info
    assert info["images"] == panels.ids and info["note"] is None
    assert all(n > 0 for n in info["mask_pixels"][0])
    assert png_variance(save_figure(fig, tmp_path / "nb", ("png",), dpi=40)[0]) > 100
    a, b, c = figmod.default_pair(run, "layer4")
    fig = figmod.additive_figure(run, a, add=[b], n_images=3)
    assert fig.neurosem_info["target"] == str(c) and all(n > 0 for n in fig.neurosem_info["mask_pixels"][-1])


def test_mask_figures_skipped_when_the_layer_was_not_recorded(tmp_path, caplog):
    run, acts, *_ = _make_run(tmp_path, with_acts=False)
    write_activations(run, {"layer3": acts[:, :6]}, [f"img{i:02d}.png" for i in range(N_IMAGES)])
    with caplog.at_level(logging.WARNING, logger="neurosem"):
        paths = figmod.make_figures(run, formats="png", dpi=40)
    assert sorted(p.stem for p in paths) == ["dissect_summary", "kl_curves", "semantic_map", "similarity_heatmap"]
    assert any("no activations of layer4" in r.getMessage() for r in caplog.records)


def test_top_rows_orders_equal_peaks_by_the_mean():
    peak = np.array([1.0, 2.0, 2.0, 2.0, 0.5])
    mean = np.array([0.9, 0.1, 0.3, 0.3, 0.0])
    assert figmod.top_rows(peak, 4, tie=mean) == [2, 3, 1, 0]
    assert figmod.top_rows(peak, 4) == [1, 2, 3, 0]


def test_the_display_upsampling_equals_torch_interpolate():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(5)
    for shape, size in (((2, 3, 7, 7), (112, 112)), ((1, 5, 4), (9, 13)), ((3, 1, 1), (4, 4))):
        x = rng.standard_normal(shape).astype(np.float32)
        t = torch.from_numpy(x).reshape(-1, 1, *shape[-2:])
        ref = F.interpolate(t, size=size, mode="bilinear", align_corners=False).reshape(*shape[:-2], *size)
        np.testing.assert_allclose(figmod.upsample(x, size), ref.numpy(), rtol=0, atol=2e-6)
