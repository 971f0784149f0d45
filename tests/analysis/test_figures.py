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
from neurosem.ids import NeuronId

from . import build_pipeline_run, png_variance, write_activations, write_dissection, write_embedding

N_IMAGES, SIZE, H, C = 10, 32, 4, 12
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


def _make_run(root, with_images=True, with_dissection=True, with_acts=True):
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
                         thresholds={"layer4": thresholds, "layer3": thresholds[:6]})
    return run, acts, S, iou, thresholds, pixels, folder


@pytest.fixture()
def planted(tmp_path):
    return _make_run(tmp_path)


def _titles(fig):
    return [ax.get_title(loc="left") for ax in fig.axes]


def test_mask_panels_come_from_the_store(planted):
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
    # Maps: PIL's bilinear upsampling (the dissection's convention) of the stored maps.
    for ui, u in enumerate(units):
        for ii, r in enumerate(panels.rows):
            ref = np.asarray(Image.fromarray(acts[r, u.index], mode="F").resize((SIZE, SIZE), Image.BILINEAR))
            assert np.allclose(panels.maps[ui, ii], ref, atol=1e-5)
            assert np.array_equal(panels.masks[ui, ii], panels.maps[ui, ii] > np.float32(thr[u.index]))
    assert panels.thresholds == pytest.approx([float(np.float32(thr[u.index])) for u in units])


def test_neighbours_figure_shows_the_query_results(planted, tmp_path):
    run, *_ = planted
    results = qmod.query(run, "layer4:11", k=3)
    fig = figmod.neighbours_figure(run, "layer4:11", n_images=3)
    titles = [t for t in _titles(fig) if t]
    assert len(titles) == 4 and titles[0].startswith("layer4:11\n")
    for title, r in zip(titles[1:], results):
        assert title.startswith(r["neuron"] + "\n") and f"cos {r['similarity']:.3f}" in title
        assert f"{r['label']} ({r['category']}, IoU {r['iou']:.3f})" in title
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


def test_kl_figure_plots_kl_json(planted, tmp_path):
    run, *_ = planted
    klmod.kl_curves(run, n_random=3)
    result = json.loads((run / "kl.json").read_text())
    fig = figmod.kl_figure(result)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["layer3", "layer4", "mean over layers"]
    for ax, key in zip(panels, ["layer3", "layer4", None]):
        lay = result["mean"] if key is None else result["layers"][key]
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert set(lines) == {"embedding", "random init", "upper bound"}
        assert np.array_equal(lines["embedding"].get_xdata(), result["steps"])
        assert np.array_equal(lines["embedding"].get_ydata(), lay["embedding"])
        assert set(lines["random init"].get_ydata()) == {lay["random"]["mean"]}
        ub = lay["upper_bound"]["kl"] if key else lay["upper_bound"]
        assert set(lines["upper bound"].get_ydata()) == {ub}
        assert ax.get_xlabel() == "epoch"
    one = figmod.kl_figure(result, layers=["layer3"])
    assert [ax.get_title() for ax in one.axes if ax.get_visible()] == ["layer3"]
    png = save_figure(fig, tmp_path / "kl", ("png",), dpi=40)[0]
    assert png_variance(png) > 100


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


def test_semantic_map_labels_the_most_interpretable_units(planted):
    run, _, S, iou, *_ = planted
    fig = figmod.semantic_map_figure(run, "layer4", n_labels=3)
    info = fig.neurosem_info
    assert info["method"] == "PCA"
    assert info["labelled"] == [11, 10, 9]
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["11 dog", "10 sky", "9 stripes"]
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    assert np.allclose(np.sort(offsets, axis=0), np.sort(info["xy"], axis=0))
    # Category colours: interpretable units (IoU >= 0.04: units 2..11) by category, the rest grey.
    assert info["categories"][:2] == ["not interpretable"] * 2
    assert info["categories"][2:] == [["object", "object", "part", "color", "texture"][u % 5] for u in range(2, C)]


def test_semantic_map_uses_tsne_for_many_units(tmp_path):
    rng = np.random.default_rng(0)
    write_embedding(tmp_path / "r", {"l": rng.standard_normal((60, 6))})
    fig = figmod.semantic_map_figure(tmp_path / "r")
    assert fig.neurosem_info["method"] == "t-SNE" and fig.neurosem_info["xy"].shape == (60, 2)


def test_make_figures_writes_every_figure(planted, caplog):
    run, *_ = planted
    paths = figmod.make_figures(run, formats=("pdf", "png", "svg"), dpi=40, n_images=3)
    names = ["neighbours", "additive", "kl_curves", "semantic_map", "similarity_heatmap"]
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
    best = qmod.query(run, "layer4:11", k=3)
    assert manifest["neighbours"]["units"] == ["layer4:11"] + [r["neuron"] for r in best]
    assert manifest["additive"]["target"] == f"layer4:{TARGET}"
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
    assert panels.images is None and panels.maps.shape == (1, 2, 112, 112)
    png = save_figure(fig, tmp_path / "fallback", ("png",), dpi=40)[0]
    assert png_variance(png) > 100


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
    text = qmod.query_report(run, "layer4:11", k=2, figure=tmp_path / "nb.svg")
    assert (tmp_path / "nb.svg").exists() and "figure:" in text


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
    """record -> dissect -> embed on the synthetic Broden set: the masks lie over the Broden images."""
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect import load_dissection

    run = build_pipeline_run(tmp_path, synthetic_broden)
    rd = qmod.run_dir(run)
    unit = figmod.default_unit(run)
    dis = load_dissection(run)
    assert unit.layer == "layer4" and unit.index == int(np.argmax(dis.best("layer4")[1]))
    panels = figmod.mask_panels(rd, [unit], unit, n_images=3)
    assert panels.note is None
    ds = BrodenDataset(synthetic_broden, with_labels=False)
    for i, r in enumerate(panels.rows):
        assert ds[r]["id"] == panels.ids[i]
        assert np.allclose(panels.images[i], ds[r]["image"].numpy().transpose(1, 2, 0), atol=1e-6)
    fig = figmod.neighbours_figure(run, unit, n_images=3)
    assert fig.neurosem_info["images"] == panels.ids and fig.neurosem_info["note"] is None
    assert png_variance(save_figure(fig, tmp_path / "nb", ("png",), dpi=40)[0]) > 100


def test_mask_figures_skipped_when_the_layer_was_not_recorded(tmp_path, caplog):
    run, acts, *_ = _make_run(tmp_path, with_acts=False)
    write_activations(run, {"layer3": acts[:, :6]}, [f"img{i:02d}.png" for i in range(N_IMAGES)])
    with caplog.at_level(logging.WARNING, logger="neurosem"):
        paths = figmod.make_figures(run, formats="png", dpi=40)
    assert sorted(p.stem for p in paths) == ["kl_curves", "semantic_map", "similarity_heatmap"]
    assert any("no activations of layer4" in r.getMessage() for r in caplog.records)


def test_top_rows_orders_equal_peaks_by_the_mean():
    peak = np.array([1.0, 2.0, 2.0, 2.0, 0.5])
    mean = np.array([0.9, 0.1, 0.3, 0.3, 0.0])
    assert figmod.top_rows(peak, 4, tie=mean) == [2, 3, 1, 0]
    assert figmod.top_rows(peak, 4) == [1, 2, 3, 0]
