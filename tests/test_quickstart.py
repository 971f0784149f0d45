"""The quickstart runs every stage, and what it reports is real.

One quickstart with the default sizes (128 images, 10 epochs; what `neurosem quickstart` runs) per
module; a random-weights model of the same architecture is recorded and dissected on the same data
for comparison. The README's quoted findings and counts must be this run's.
"""
import json

import numpy as np
import pytest

from neurosem.quickstart import TINY_CNN, QuickstartConfig, best_detector, quickstart, train_scene_classifier


@pytest.fixture(scope="module")
def qs(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    cfg = QuickstartConfig(out=str(out), device="cpu", progress=False)       # the defaults
    summary = quickstart(config=cfg)
    return out, cfg, summary


@pytest.fixture(scope="module")
def random_run(qs, tmp_path_factory):
    from neurosem.dissect import dissect
    from neurosem.record import record

    out, cfg, _ = qs
    root = tmp_path_factory.mktemp("qs_random")
    weights = root / "random.pth"
    stats = train_scene_classifier(out / "broden", weights, cfg, pretrained=False)
    assert stats["epochs"] == 0
    run = root / "run"
    record(TINY_CNN, str(out / "broden"), run=run, weights=str(weights), device="cpu", progress=False,
           num_workers=0)
    dissect(run=run, broden=str(out / "broden"), device="cpu", progress=False)
    return run


def test_every_output_is_written(qs):
    out, _, summary = qs
    for name in ("activations.h5", "dissect.h5", "embedding.h5", "kl.json", "quickstart.json",
                 "dissect/index.html", "dissect/layer4.csv", "tiny_cnn.pth"):
        assert (out / name).is_file(), name
    for fig in ("neighbours", "additive", "kl_curves", "semantic_map", "similarity_heatmap", "dissect_summary"):
        for ext in ("pdf", "png", "svg"):
            assert (out / "figures" / f"{fig}.{ext}").is_file(), (fig, ext)
    assert json.loads((out / "quickstart.json").read_text())["findings"] == summary["findings"]


def test_trained_units_beat_random_weights(qs, random_run):
    from neurosem.dissect import load_dissection

    out, _, summary = qs
    assert summary["train"]["train_acc"] > 0.6  # 4 scenes: chance is 0.25
    trained, rand = load_dissection(out), load_dissection(random_run)
    for layer in ("layer2", "layer3", "layer4"):
        best_t, best_r = trained.iou(layer).max(1), rand.iou(layer).max(1)
        assert best_t.mean() > 2 * best_r.mean(), layer
        assert (best_t >= 0.04).sum() >= max(5, 3 * (best_r >= 0.04).sum()), layer


def test_embedding_beats_its_random_baseline(qs):
    out, _, summary = qs
    kl = json.loads((out / "kl.json").read_text())
    assert kl["final"]["embedding"] < kl["final"]["random"] - 2 * kl["final"]["random_std"]
    assert kl["final"]["upper_bound"] <= kl["final"]["embedding"]
    found = {f["title"]: f for f in summary["findings"]}
    assert found["kl"]["data"]["embedding"] == pytest.approx(kl["final"]["embedding"])


def test_findings_are_the_runs_numbers(qs):
    from neurosem.analysis.query import query
    from neurosem.dissect import load_dissection

    out, _, summary = qs
    found = {f["title"]: f for f in summary["findings"]}
    dis = load_dissection(out)
    layer, unit, label, category, iou = best_detector(dis)
    assert found["detector"]["data"] == {"neuron": f"{layer}:{unit}", "label": label, "category": category,
                                         "iou": pytest.approx(iou)}
    assert iou == pytest.approx(max(float(dis.iou(l).max()) for l in dis.layers))
    assert f"IoU {iou:.3f}" in found["detector"]["text"]
    nbrs = query(out, f"{layer}:{unit}", k=3)
    assert [n["neuron"] for n in found["neighbours"]["data"]["neighbours"]] == [n["neuron"] for n in nbrs]
    add = found["additive"]["data"]
    assert query(out, add["a"], add=[add["b"]], k=1)[0]["neuron"] == add["nearest"]["neuron"]


def test_best_detector_ties_go_to_the_earlier_layer():
    class Fake:
        layers = ["a", "b"]

        def iou(self, layer):
            return np.array([[0.1, 0.5], [0.5, 0.2]]) if layer == "a" else np.array([[0.5, 0.0]])

        def unit_label(self, layer, unit):
            return ("lbl", "cat", 0.5)

    assert best_detector(Fake())[:2] == ("a", 0)


@pytest.mark.browser
@pytest.mark.skipif(__import__("neurosem._browser", fromlist=["find_chromium"]).find_chromium() is None,
                    reason="needs Chromium (apt-get install chromium)")
def test_report_opens_offline_in_a_real_browser(qs, tmp_path):
    from neurosem._browser import check_html

    out, _, _ = qs
    pages = [out / "dissect" / "index.html", out / "dissect" / "layer4.html"]
    html = pages[1].read_text()
    assert "http://" not in html and "https://" not in html      # self-contained: nothing fetched
    for page in pages:
        seen = check_html(page, screenshot=tmp_path / f"{page.stem}.png")
        assert seen.console_errors == [], seen.console_errors
        assert seen.images_total > 0 and seen.images_loaded == seen.images_total, seen
        assert seen.screenshot.stat().st_size > 10_000
    # the layer page shows every unit with its top images (4 per unit)
    from neurosem.dissect import load_dissection

    n_units = load_dissection(out).iou("layer4").shape[0]
    assert check_html(pages[1]).images_total == 4 * n_units


def _readme() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_the_readme_quotes_what_the_quickstart_prints(qs):
    """The README's findings, counts table and query table are this run's output, to the digit."""
    from neurosem.analysis.commands import query_report
    from neurosem.dissect import load_dissection

    out, _, summary = qs
    text = _readme()
    block = text.split("Findings you can check:\n", 1)[1].split("```", 1)[0]
    quoted = [line.strip().split(". ", 1)[1] for line in block.strip().splitlines()
              if line.strip()[:1].isdigit()]
    assert quoted == [f["text"] for f in summary["findings"]]
    dis = load_dissection(out)
    header = "| layer | units | interpretable | " + " | ".join(dis.categories) + " |"
    assert header in text, header
    for layer in dis.layers:
        counts = dis.counts(layer)
        row = (f"| {layer} | {dis.n_units(layer)} | {sum(counts.values())} | "
               + " | ".join(str(counts[c]) for c in dis.categories) + " |")
        assert row in text, row
    unit = summary["findings"][0]["data"]["neuron"]
    table = query_report(out, unit, k=3).replace(str(out), "runs/quickstart")
    assert table in text, table
