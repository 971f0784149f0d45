"""explain(): concept maps of one image and the exact logit decomposition of a linear head."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from neurosem.concepts.explain import explain
from neurosem.concepts.head import LinearHead, decompose_logit
from neurosem.errors import NeurosemError

from ._planted import half_model


@pytest.fixture(scope="module")
def explained_run(planted_run, binary):
    return planted_run


def _red_image(broden):
    """A val image with red cells and its true red mask [32, 32]."""
    from neurosem.data.broden import BrodenDataset

    ds = BrodenDataset(broden)
    red = ds.label_names.index("red")
    for i in range(3, len(ds), 4):
        mask = (ds.load_seg(i) == red).any(0)
        if mask.any():
            return ds.image_file(i)[1], mask
    raise AssertionError("no val image with red")


def test_logit_decomposes_exactly(explained_run, synthetic_broden, tmp_path):
    path, red_mask = _red_image(synthetic_broden)
    img = tmp_path / "probe.png"
    shutil.copy(path, img)
    e = explain(img, run=explained_run, layer="fine", top=3)
    d = e.decomposition
    assert d is not None and d["head"] == "fc"
    assert d["total"] == pytest.approx(d["logit"], abs=1e-10)          # the parts add up exactly
    parts = np.array(list(d["parts"].values()))
    assert parts.sum() + d["residual"] + d["bias"] == pytest.approx(d["logit"], abs=1e-10)
    # the reference: the planted model run directly on the image
    from PIL import Image

    x = torch.from_numpy(np.asarray(Image.open(img).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    with torch.no_grad():
        ref = half_model()(x[None])[0].double()
    assert e.class_index == int(ref.argmax()) and e.logit == pytest.approx(float(ref[e.class_index]), abs=1e-5)
    assert d["model_logit"] == pytest.approx(d["logit"], abs=1e-5)
    red = next(c for c in e.concepts if c["concept"] == "red")
    assert red["present"] and red["value"] == pytest.approx(red_mask.mean(), abs=1e-12)   # the mask is exact
    saved = json.loads(open(e.outputs["json"]).read())
    assert saved["decomposition"]["total"] == d["total"] and saved["class"] == e.class_index
    assert [p.rsplit(".", 1)[1] for p in e.outputs["figures"]] == ["png", "pdf"]
    e2 = explain(img, run=explained_run, layer="fine", class_index=0, figures=False)
    assert e2.class_index == 0 and e2.decomposition["total"] == pytest.approx(float(ref[0]), abs=1e-5)


def test_decompose_logit_by_hand():
    head = LinearHead("fc", np.array([[1.0, -2.0, 0.5]]), np.array([0.25]))
    W = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    f = np.array([2.0, 1.0, 3.0])
    d = decompose_logit(f, W, head, 0)
    # least squares: beta = (2, 2), residual r = (0, -1, 1)
    assert d.coef.tolist() == pytest.approx([2.0, 2.0])
    assert d.parts.tolist() == pytest.approx([2.0, 2.0 * (-1.5)])
    assert d.residual == pytest.approx(2.5) and d.logit == pytest.approx(2.0 - 2.0 + 1.5 + 0.25)
    assert d.total == pytest.approx(d.logit, abs=1e-12)


def test_nearly_equal_concepts_share_their_part():
    head = LinearHead("fc", np.array([[1.0, 2.0, -1.0]]), np.array([0.0]))
    w = np.array([1.0, 1.0, 0.0])
    W = np.stack([w, w + 1e-9 * np.array([0.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0])])
    f = np.array([2.0, 2.0, 1.0])
    d = decompose_logit(f, W, head, 0)
    # f = w + w' (shared: 1 each, up to 1e-9) + e3; plain least squares would give parts of order 1e9
    assert d.coef == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    assert d.parts == pytest.approx([3.0, 3.0, -1.0], abs=1e-5) and d.total == pytest.approx(d.logit, abs=1e-12)
    assert d.logit == pytest.approx(5.0)


def test_bad_input(explained_run, synthetic_broden, tmp_path):
    path, _ = _red_image(synthetic_broden)
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(NeurosemError, match="cannot decode image"):
        explain(bad, run=explained_run, layer="fine")
    with pytest.raises(NeurosemError, match=r"--class 9 is out of range: the model has 4 classes \(0..3\)"):
        explain(path, run=explained_run, layer="fine", class_index=9)
    with pytest.raises(NeurosemError, match="layer 'layer4' has no concept vectors"):
        explain(path, run=explained_run, layer="layer4")
    with pytest.raises(NeurosemError, match="file missing"):
        explain(tmp_path / "nope.png", run=explained_run, layer="fine")


def test_cli_prints_the_split_and_one_line_errors(explained_run, synthetic_broden, tmp_path, capsys):
    from neurosem.cli import main

    path, _ = _red_image(synthetic_broden)
    main(["explain", str(path), "--run", str(explained_run), "--layer", "fine", "--top", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "(exact)" in out and "red (area " in out.split("concepts present:")[1].splitlines()[0]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"no image")
    cases = [(["explain", str(bad), "--run", str(explained_run)], "cannot decode image"),
             (["explain", str(path), "--run", str(explained_run), "--layer", "fine", "--class", "-1"],
              "--class -1 is out of range"),
             (["explain", str(path), "--run", str(explained_run), "--layer", "coarse"],
              "layer 'coarse' has no concept vectors"),
             (["concepts", "--run", str(explained_run), "--broden", str(synthetic_broden), "--concepts", "treee"],
              "no concept 'treee'")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err


def test_linear_head_only_after_global_average_pooling():
    from torch import nn

    from neurosem.concepts.head import linear_head
    from neurosem.models import LoadedModel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    lm = LoadedModel(model=net.eval(), spec="seq", weights="none", input_size=(3, 8, 8))
    head, why = linear_head(lm, "1", (3, 8, 8))                # after the ReLU: the head is linear
    assert head is not None and head.name == "4" and why == ""
    assert np.array_equal(head.weight, net[4].weight.detach().double().numpy())
    head, why = linear_head(lm, "0", (3, 8, 8))                # before the ReLU: it is not
    assert head is None and "does not feed a linear classifier" in why
