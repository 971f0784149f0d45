"""Layer adapters: planted token grids, channels-last maps, selectors, provenance and bad input."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurosem.adapters import (AdapterError, ChannelsFirst, ChannelsLast, LayerRef, TokenGrid, choose_adapter,
                               parse_layer, prefix_tokens, trace_maps)
from neurosem.errors import NeurosemError, RunMismatchError
from neurosem.models import LoadedModel, default_layers, family_default_layers, layer_table, list_layers
from neurosem.record import Recorder, record
from neurosem.store import ActivationStore

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from _planted import RandomImages, TinyCNN, TupleOut  # noqa: E402
from _transformers import ChannelsLastCNN, tiny_convnext, tiny_swin, tiny_vit  # noqa: E402

FACTORIES = TESTS / "_transformers.py"


class PlantedViT(nn.Module):
    """Tokens ``[B, 3 + h*w, 3]``: a class token, 2 register tokens (value -5), then the 8x8 patch means, row-major.

    So the unit maps of ``blocks`` must be exactly ``avg_pool2d(x, 8)``: ``[B, 3, H/8, W/8]``.
    """

    num_prefix_tokens = 3

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Identity()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = F.avg_pool2d(x, 8).flatten(2).transpose(1, 2)            # [B, h*w, 3]
        extra = torch.full((x.shape[0], 3, 3), -5.0)
        tokens = self.blocks(torch.cat([extra, grid], dim=1))
        return self.head(tokens[:, 0])


class TokenParams(nn.Module):
    """No ``num_prefix_tokens``: a ``cls_token`` [1, 1, 4] and ``register_tokens`` [1, 4, 4] -> 5 extra tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.inner = nn.Module()
        self.inner.register_tokens = nn.Parameter(torch.zeros(1, 4, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 21, 4))


# ---------------------------------------------------------------- names
def test_parse_layer():
    assert parse_layer("layer4") == LayerRef("layer4", ())
    assert parse_layer("encoder.layers.encoder_layer_0.self_attention[0]") == LayerRef(
        "encoder.layers.encoder_layer_0.self_attention", (0,))
    assert parse_layer("head['out'][-1]") == LayerRef("head", ("out", -1))
    for bad in ("layer4[", "layer4]", "[0]", "a[0]b", "a[x:y]"):
        with pytest.raises(NeurosemError, match="malformed"):
            parse_layer(bad)


# ---------------------------------------------------------------- planted maps
@pytest.mark.parametrize("size", [(32, 32), (16, 32)])
def test_planted_token_grid_comes_back_at_the_right_pixels(size):
    model = PlantedViT().eval()
    assert prefix_tokens(model) == 3
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with Recorder(model, ["blocks"]) as rec:
        rec.forward(x)
    maps = rec.outputs["blocks"]
    h, w = size[0] // 8, size[1] // 8
    assert maps.shape == (2, 3, h, w)
    for b in range(2):          # pixel (r, c) of channel d is the mean of patch (r, c) of image channel d
        for d in range(3):
            for r in range(h):
                for c in range(w):
                    patch = x[b, d, 8 * r:8 * r + 8, 8 * c:8 * c + 8].mean()
                    assert torch.isclose(maps[b, d, r, c], patch, atol=1e-6)
    assert torch.equal(maps, F.avg_pool2d(x, 8))
    assert rec.maps.describe() == {"blocks": {"kind": "tokens", "extra_tokens": 3, "grid": [h, w],
                                              "output_shape": [3 + h * w, 3], "map_shape": [3, h, w]}}


def test_token_grid_by_hand():
    """Token ``extra + r * w + c``, feature ``d`` -> map ``[d, r, c]``: values 100 r + 10 c + d."""
    t = torch.full((1, 1 + 6, 4), -1.0)
    for r in range(2):
        for c in range(3):
            for d in range(4):
                t[0, 1 + r * 3 + c, d] = 100 * r + 10 * c + d
    a = choose_adapter("blocks.0", t, input_hw=(16, 24), extra_tokens=1)
    assert a.layout == TokenGrid((7, 4), 1, (2, 3)) and a.map_shape == (4, 2, 3)
    maps = a.to_maps(t)
    assert maps.shape == (1, 4, 2, 3) and maps.is_contiguous()
    assert maps[0, 3, 1, 2] == 123 and maps[0, 0, 0, 1] == 10 and maps[0, 2, 1, 0] == 102
    assert (maps >= 0).all()                       # the class token is gone


def test_channels_last_by_hand_and_layout_rules():
    t = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).view(2, 4, 4, 6)    # [B, H, W, C]
    a = choose_adapter("features.1", t, input_hw=(16, 16))
    assert a.layout == ChannelsLast((4, 4, 6)) and a.map_shape == (6, 4, 4)
    maps = a.to_maps(t)
    for b, c, i, j in [(0, 0, 0, 0), (1, 5, 3, 2), (0, 2, 1, 3)]:
        assert maps[b, c, i, j] == t[b, i, j, c]
    assert choose_adapter("x", torch.zeros(1, 6, 4, 4), input_hw=(16, 16)).layout == ChannelsFirst((6, 4, 4))
    # ambiguous (C equal to the spatial size), neither, or no input size: channels-first
    assert choose_adapter("x", torch.zeros(1, 4, 4, 4), input_hw=(16, 16)).layout.kind == "channels_first"
    assert choose_adapter("x", torch.zeros(1, 3, 40, 50), input_hw=(16, 16)).layout.kind == "channels_first"
    assert choose_adapter("x", torch.zeros(1, 4, 4, 6)).layout.kind == "channels_first"
    # a non-square input: [B, 2, 4, 12] follows a 16 x 32 input channels-last
    assert choose_adapter("x", torch.zeros(1, 2, 4, 12), input_hw=(16, 32)).layout.kind == "channels_last"


def test_prefix_tokens_detection():
    assert prefix_tokens(tiny_vit()) == 1                  # torchvision: class_token [1, 1, D]
    assert prefix_tokens(TokenParams()) == 5               # cls_token + register_tokens, not pos_embed
    assert prefix_tokens(tiny_swin()) == 0 and prefix_tokens(tiny_convnext()) == 0


def test_patch_embedding_before_the_class_token_gives_the_grid():
    """A [B, 16, D] output of a model with 1 class token (before it is prepended): no token dropped."""
    a = choose_adapter("patch_embed", torch.zeros(1, 16, 8), input_hw=(32, 32), extra_tokens=1)
    assert a.layout == TokenGrid((16, 8), 0, (4, 4))
    with pytest.raises(AdapterError, match=r"16 tokens are not 1 extra .*given by --tokens"):
        choose_adapter("patch_embed", torch.zeros(1, 16, 8), input_hw=(32, 32), extra_tokens=1, tokens_given=True)


# ---------------------------------------------------------------- torchvision tiny instances
def test_tiny_vit_swin_convnext_maps_equal_their_raw_outputs():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    vit_ref = lambda o: o[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)  # noqa: E731
    cases = [(tiny_vit(), "encoder.layers.encoder_layer_1", vit_ref),
             (tiny_swin(), "features.3", lambda o: o.permute(0, 3, 1, 2)),
             (tiny_swin(), "features.1", lambda o: o.permute(0, 3, 1, 2)),
             (tiny_convnext(), "features.3", lambda o: o),
             (tiny_convnext(), "features.1.0.block.2", lambda o: o.permute(0, 3, 1, 2))]
    for model, layer, ref in cases:
        raw = {}
        module = dict(model.named_modules())[layer]
        handle = module.register_forward_hook(lambda m, i, o: raw.setdefault("o", o.clone()))
        with Recorder(model, [layer]) as rec:
            rec.forward(x)
        handle.remove()
        assert torch.equal(rec.outputs[layer], ref(raw["o"])), layer
    shapes = {n: a.map_shape for n, a in trace_maps(tiny_swin(), (3, 32, 32)).items() if not isinstance(a, str)}
    assert shapes["features.1"] == (12, 8, 8) and shapes["features.3"] == (24, 4, 4) and shapes["avgpool"] == (24, 1, 1)


def test_selectors_on_tuple_outputs():
    model = tiny_vit()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    attn = "encoder.layers.encoder_layer_0.self_attention"
    with Recorder(model, [f"{attn}[0]", attn]) as rec:                # MultiheadAttention -> (out, None)
        rec.forward(x)
    assert rec.outputs[f"{attn}[0]"].shape == (1, 16, 4, 4)
    assert torch.equal(rec.outputs[f"{attn}[0]"], rec.outputs[attn])
    assert rec.maps.describe()[f"{attn}[0]"]["select"] == "[0]"
    assert rec.maps.describe()[attn]["select"].startswith("first tensor of a tuple of 2")


# ---------------------------------------------------------------- bad input: one line each
def test_bad_outputs_give_one_line_naming_layer_and_shape():
    with pytest.raises(AdapterError) as err:
        choose_adapter("blocks.1", torch.zeros(2, 18, 16), input_hw=(32, 32), extra_tokens=1)
    msg = str(err.value)
    assert msg == ("layer 'blocks.1' gives tokens [B, 18, 16]: 18 tokens are not 1 extra (class/register) token(s) "
                   "(detected from the model) + a patch grid for a 32x32 input; pass --tokens N with the number "
                   "of extra tokens, or choose another layer")
    model = tiny_vit()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(AdapterError, match=r"^layer 'heads' gives 2-D outputs \[B, 10\], not unit maps: choose a "
                                           r"layer with \[B, C, H, W\], \[B, H, W, C\] or \[B, T, D\] outputs"):
        with Recorder(model, ["heads"]) as rec:
            rec.forward(x)
    attn = "encoder.layers.encoder_layer_0.self_attention"
    with pytest.raises(AdapterError, match=rf"^layer '{attn}\[2\]': index 2 is out of range for its output, a tuple "
                                           rf"of 2 \(\[B, 17, 16\], NoneType\); use {attn}\[0\]..{attn}\[1\]$"):
        with Recorder(model, [f"{attn}[2]"]) as rec:
            rec.forward(x)
    with pytest.raises(AdapterError, match=r"^layer 'pair\[1\]' returned no tensor \(str\)"):
        with Recorder(TupleOut(), ["pair[1]"]) as rec:
            rec.forward(torch.rand(1, 3, 4, 4))
    with pytest.raises(AdapterError,
                       match=r"^layer 'conv1\[0\]': \[0\] cannot select from a tensor \[B, 4, 4, 4\]; drop"):
        with Recorder(TinyCNN(), ["conv1[0]"]) as rec:
            rec.forward(torch.rand(1, 3, 4, 4))
    with pytest.raises(AdapterError, match=r"^layer 'd\[c\]': its output, a dict with keys a, b, has no key 'c'$"):
        choose_adapter("d[c]", {"a": torch.zeros(1, 2, 2, 2), "b": torch.zeros(1)})
    assert "\n" not in msg
    with pytest.raises(NeurosemError, match=r"unknown layer 'encoder.layer\[0\]'"):
        Recorder(model, ["encoder.layer[0]"])


# ---------------------------------------------------------------- defaults, table
def test_family_default_layers():
    assert family_default_layers(tiny_vit()) == ["encoder.layers.encoder_layer_1"]       # fewer than 3: the last
    twelve = [f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11)]
    assert family_default_layers(tiny_vit(num_layers=12)) == twelve
    assert family_default_layers(tiny_vit(num_layers=7)) == [f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 6)]
    assert default_layers(tiny_swin(), (3, 32, 32)) == ["features.1", "features.3"]
    assert default_layers(tiny_convnext(), (3, 32, 32)) == ["features.1", "features.3"]
    assert family_default_layers(nn.Sequential(nn.Conv2d(3, 3, 1))) is None


def test_layer_table_shows_the_map_shape():
    text = layer_table(f"{FACTORIES}:tiny_vit", 32, weights="none")
    lines = text.splitlines()
    width = max(len(name) for name, _ in list_layers(tiny_vit(), (3, 32, 32)))
    row = f"* {'encoder.layers.encoder_layer_1':<{width}}  17 x 16  -> 16 x 4 x 4 (tokens: 1 extra + 4x4 grid)"
    assert row in lines
    assert any(line.split()[:2] == ["conv_proj", "16"] and "->" not in line for line in lines)
    assert any(line.split()[0] == "heads" and line.endswith("10  -> no maps (1-D)") for line in lines)
    data = json.loads(layer_table(f"{FACTORIES}:tiny_swin", 32, weights="none", as_json=True))
    assert data["maps"]["features.1"] == {"map_shape": [12, 8, 8],
                                          "adapter": {"kind": "channels_last", "permute": [0, 3, 1, 2],
                                                      "output_shape": [8, 8, 12], "map_shape": [12, 8, 8]}}
    assert data["maps"]["head"] == {"map_shape": None, "adapter": "1-D"}
    assert {"name": "features.3", "shape": [4, 4, 24], "default": True} in data["layers"]


# ---------------------------------------------------------------- record: provenance, same IoU
def test_record_keeps_the_adapters_in_the_provenance(tmp_path):
    lm = LoadedModel(tiny_vit(), "tiny_vit", "seed0", default_layers=["encoder.layers.encoder_layer_1"])
    ds = RandomImages(n=5, size=32)
    path = record(lm, ds, run=tmp_path / "run", batch_size=2, progress=False, dtype="float32")
    with ActivationStore.open(path) as st:
        prov = st.provenance
        acts = st.read("encoder.layers.encoder_layer_1")
    want = {"kind": "tokens", "extra_tokens": 1, "grid": [4, 4], "output_shape": [17, 16], "map_shape": [16, 4, 4]}
    assert prov["adapters"] == {"encoder.layers.encoder_layer_1": want} and prov["tokens"] is None
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["record"]["adapters"]["encoder.layers.encoder_layer_1"] == want
    x = torch.stack([ds[i]["image"] for i in range(5)])
    x = (x - torch.tensor(lm.mean).view(1, 3, 1, 1)) / torch.tensor(lm.std).view(1, 3, 1, 1)
    raw = {}
    lm.model.encoder.layers.encoder_layer_1.register_forward_hook(lambda m, i, o: raw.setdefault("o", o))
    with torch.no_grad():
        lm.model(x)
    ref = raw["o"][:, 1:].reshape(5, 4, 4, 16).permute(0, 3, 1, 2).numpy()
    assert acts.shape == (5, 16, 4, 4) and np.allclose(acts, ref, atol=1e-5)
    # --tokens is part of the run's identity; a wrong count is one line
    with pytest.raises(RunMismatchError, match=r"tokens: None vs 1"):
        record(lm, ds, run=tmp_path / "run", tokens=1, progress=False, dtype="float32")
    with pytest.raises(AdapterError, match=r"17 tokens are not 0 extra .*given by --tokens"):
        record(lm, ds, run=tmp_path / "other", tokens=0, progress=False)


def test_same_iou_for_channels_first_and_channels_last(tmp_path, tiny_broden):
    from neurosem.dissect import dissect

    lm = LoadedModel(ChannelsLastCNN(), "cl_cnn", "seed3", default_layers=["cf", "nhwc"])
    dis = dissect(run=tmp_path / "run", broden=tiny_broden, model=lm, device="cpu", batch_size=4, progress=False)
    with ActivationStore.open(tmp_path / "run" / "activations.h5") as st:
        assert st.provenance["adapters"]["nhwc"]["kind"] == "channels_last"
        assert st.provenance["adapters"]["cf"]["kind"] == "channels_first"
        assert np.array_equal(st.read("cf"), st.read("nhwc"))
    assert dis.iou("cf").shape == (6, len(dis.label_names)) and dis.iou("cf").max() > 0
    assert np.array_equal(dis.iou("cf"), dis.iou("nhwc"))
    assert np.array_equal(dis.threshold("cf", exact=True), dis.threshold("nhwc", exact=True))
