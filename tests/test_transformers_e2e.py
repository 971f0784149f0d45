"""ViT, Swin and ConvNeXt end to end: record, dissect, embed, query, figures (tiny instances; real ones `slow`).

The tiny instances (tests/_transformers.py) are torchvision's own classes at 32x32; the real
``vit_b_16``, ``swin_t``, ``convnext_tiny`` (random weights) and timm models (when timm is
installed) run the same pipeline under ``-m slow``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neurosem.analysis.figures import make_figures
from neurosem.analysis.query import query
from neurosem.cli import main
from neurosem.dissect import dissect
from neurosem.embed import embed, load_embedding
from neurosem.store import ActivationStore

FACTORIES = Path(__file__).parent / "_transformers.py"


def _pipeline(model: str, broden: Path, run: Path, want: dict[str, tuple[tuple[int, int, int], str]],
              weights: str = "default") -> None:
    """Every stage on ``model``'s default layers; ``want``: layer -> (map shape, adapter kind)."""
    dis = dissect(run=run, broden=broden, model=model, weights=weights, device="cpu", batch_size=8, progress=False)
    with ActivationStore.open(run / "activations.h5") as st:
        assert st.layers == list(want)
        for layer, (shape, kind) in want.items():
            assert st.shape(layer) == (st.n_images, *shape), layer
            assert st.provenance["adapters"][layer]["kind"] == kind
            assert st.provenance["adapters"][layer]["map_shape"] == list(shape)
            assert dis.iou(layer).shape == (shape[0], len(dis.label_names))
            assert np.isfinite(dis.iou(layer)).all() and (dis.iou(layer) >= 0).all()
    meta = json.loads((run / "run.json").read_text())
    assert set(meta["record"]["adapters"]) == set(want)
    embed(run=run, dim=4, device="cpu", progress=False)
    emb = load_embedding(run)
    last = list(want)[-1]
    assert emb.layers == list(want) and emb.vectors(last).shape == (want[last][0][0], 4)
    rows = query(run, f"{last}:0", k=3)
    assert [r["rank"] for r in rows] == [1, 2, 3] and all(r["index"] != 0 for r in rows)
    assert all("label" in r or "iou" in r for r in rows)
    written = {p.name for p in make_figures(run, formats="png", dpi=30, n_images=2)}
    assert {"neighbours.png", "semantic_map.png", "similarity_heatmap.png"} <= written


def test_tiny_vit_end_to_end(tmp_path, tiny_broden):
    _pipeline(f"{FACTORIES}:tiny_vit", tiny_broden, tmp_path / "vit",
              {"encoder.layers.encoder_layer_1": ((16, 4, 4), "tokens")})


def test_tiny_swin_end_to_end(tmp_path, tiny_broden):
    _pipeline(f"{FACTORIES}:tiny_swin", tiny_broden, tmp_path / "swin",
              {"features.1": ((12, 8, 8), "channels_last"), "features.3": ((24, 4, 4), "channels_last")})
    # embed straight from the model (no activations.h5): the same adapters through the Recorder
    embed(f"{FACTORIES}:tiny_swin", data=str(tiny_broden), run=tmp_path / "direct", dim=4, device="cpu",
          no_store=True, progress=False)
    direct, stored = load_embedding(tmp_path / "direct"), load_embedding(tmp_path / "swin")
    assert not (tmp_path / "direct" / "activations.h5").exists()
    assert direct.layers == stored.layers == ["features.1", "features.3"]
    assert direct.vectors("features.1").shape == (12, 4) and direct.vectors("features.3").shape == (24, 4)


def test_tiny_convnext_end_to_end(tmp_path, tiny_broden):
    _pipeline(f"{FACTORIES}:tiny_convnext", tiny_broden, tmp_path / "convnext",
              {"features.1": ((12, 8, 8), "channels_first"), "features.3": ((24, 4, 4), "channels_first")})


def test_cli_record_tokens_and_layers(tmp_path, tiny_broden, capsys):
    run = tmp_path / "cli"
    attn = "encoder.layers.encoder_layer_0.self_attention[0]"
    main_args = ["record", f"{FACTORIES}:tiny_vit", "--data", str(tiny_broden), "--run", str(run), "--layers",
                 f"{attn},encoder.layers.encoder_layer_1", "--tokens", "1", "--workers", "0", "--quiet"]
    main(main_args)                                    # returns on success
    with ActivationStore.open(run / "activations.h5") as st:
        assert st.provenance["tokens"] == 1
        assert st.provenance["adapters"][attn] == {"kind": "tokens", "extra_tokens": 1, "grid": [4, 4],
                                                   "output_shape": [17, 16], "map_shape": [16, 4, 4],
                                                   "select": "[0]"}
        assert st.shape(attn) == (12, 16, 4, 4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:
        main(["record", f"{FACTORIES}:tiny_vit", "--data", str(tiny_broden), "--run", str(tmp_path / "bad"),
              "--layers", "heads", "--workers", "0", "--quiet"])
    assert bad.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: layer 'heads' gives 2-D outputs [B, 10], not unit maps") and "\n" not in err


# ---------------------------------------------------------------- the real models (slow)
@pytest.fixture(scope="module")
def broden_224(tmp_path_factory) -> Path:
    from neurosem.data.synthetic import write_synthetic_broden

    root = tmp_path_factory.mktemp("broden") / "b224"
    write_synthetic_broden(root, n_images=4, image_size=224, seg_size=112, seed=2)
    return root


@pytest.mark.slow
def test_vit_b_16_end_to_end(tmp_path, broden_224):
    layers = [f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11)]
    _pipeline("vit_b_16", broden_224, tmp_path / "vit_b_16", {n: ((768, 14, 14), "tokens") for n in layers},
              weights="none")


@pytest.mark.slow
@pytest.mark.parametrize("name,want", [
    ("swin_t", {"features.1": ((96, 16, 16), "channels_last"), "features.3": ((192, 8, 8), "channels_last"),
                "features.5": ((384, 4, 4), "channels_last"), "features.7": ((768, 2, 2), "channels_last")}),
    ("convnext_tiny", {"features.1": ((96, 16, 16), "channels_first"), "features.3": ((192, 8, 8), "channels_first"),
                       "features.5": ((384, 4, 4), "channels_first"), "features.7": ((768, 2, 2), "channels_first")}),
])
def test_swin_t_and_convnext_tiny_end_to_end(tmp_path, synthetic_broden, name, want):
    _pipeline(name, synthetic_broden, tmp_path / name, want, weights="none")


@pytest.mark.slow
@pytest.mark.parametrize("name,want", [
    ("vit_tiny_patch16_224", {f"blocks.{i}": ((192, 14, 14), "tokens") for i in (2, 5, 8, 11)}),
    ("convnext_atto", {"stages.0": ((40, 56, 56), "channels_first"), "stages.1": ((80, 28, 28), "channels_first"),
                       "stages.2": ((160, 14, 14), "channels_first"), "stages.3": ((320, 7, 7), "channels_first")}),
    ("swin_tiny_patch4_window7_224", {"layers.0": ((96, 56, 56), "channels_last"),
                                      "layers.1": ((192, 28, 28), "channels_last"),
                                      "layers.2": ((384, 14, 14), "channels_last"),
                                      "layers.3": ((768, 7, 7), "channels_last")}),
])
def test_timm_end_to_end(tmp_path, broden_224, name, want):
    pytest.importorskip("timm")
    _pipeline(f"timm:{name}", broden_224, tmp_path / name, want, weights="none")


def test_timm_specs(monkeypatch):
    """timm:NAME uses timm's own factory; without timm it is one line saying how to install it."""
    import sys

    from neurosem.errors import NeurosemError
    from neurosem.models import load_model

    if "timm" not in sys.modules:
        try:
            import timm  # noqa: F401
        except ImportError:
            monkeypatch.setitem(sys.modules, "timm", None)
    if sys.modules.get("timm") is None:
        with pytest.raises(NeurosemError, match=r"^timm:vit_tiny_patch16_224 needs timm, which is not installed: "
                                                r"pip install 'neurosem\[timm\]'"):
            load_model("timm:vit_tiny_patch16_224", weights="none")
        return
    from neurosem.adapters import prefix_tokens

    lm = load_model("timm:vit_tiny_patch16_224", weights="none", warn=False)
    assert lm.spec == "timm:vit_tiny_patch16_224" and lm.weights == "none" and lm.input_size == (3, 224, 224)
    assert lm.default_layers == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"] and prefix_tokens(lm.model) == 1
    with pytest.raises(NeurosemError,
                       match=r"^unknown timm model 'vit_tiny_patch16_22' \(closest: vit_tiny_patch16_224"):
        load_model("timm:vit_tiny_patch16_22", weights="none")
