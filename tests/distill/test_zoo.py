"""The CIFAR zoo: parameter counts, stage widths of the six Table 1 pairs, named stage ends."""
from __future__ import annotations

import pytest
import torch

from neurosem.distill import zoo
from neurosem.errors import NeurosemError



PAIRS = [("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
         ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")]

WIDTHS = {"resnet20": [16, 32, 64], "resnet32": [16, 32, 64], "resnet56": [16, 32, 64],
          "resnet110": [16, 32, 64], "resnet8x4": [64, 128, 256], "resnet32x4": [64, 128, 256],
          "wrn_16_2": [32, 64, 128], "wrn_40_2": [32, 64, 128],
          "vgg8": [64, 128, 256, 512, 512], "vgg13": [64, 128, 256, 512, 512]}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bn(c: int) -> int:
    return 2 * c


def _resnet_count(depth: int, widths: list[int], classes: int = 100) -> int:
    n = (depth - 2) // 6
    stem, *stages = widths
    total = 3 * stem * 9 + _bn(stem)
    cin = stem
    for i, w in enumerate(stages):
        for b in range(n):
            stride = 2 if (i > 0 and b == 0) else 1
            total += cin * w * 9 + _bn(w) + w * w * 9 + _bn(w)
            if stride != 1 or cin != w:
                total += cin * w + _bn(w)
            cin = w
    return total + cin * classes + classes


def _wrn_count(depth: int, k: int, classes: int = 100) -> int:
    n = (depth - 4) // 6
    total = 3 * 16 * 9
    cin = 16
    for w in (16 * k, 32 * k, 64 * k):
        for b in range(n):
            total += _bn(cin) + cin * w * 9 + _bn(w) + w * w * 9
            if cin != w:
                total += cin * w
            cin = w
    return total + _bn(cin) + cin * classes + classes


def _vgg_count(cfg: list[list[int]], classes: int = 100) -> int:
    total, cin = 0, 3
    for stage in cfg:
        for w in stage:
            total += cin * w * 9 + w + _bn(w)   # conv with bias + BN
            cin = w
    return total + cin * classes + classes


def test_parameter_counts_are_exact():
    for depth in (8, 14, 20, 32, 44, 56, 110):
        assert _n_params(zoo.build(f"resnet{depth}")) == _resnet_count(depth, [16, 16, 32, 64])
    assert _n_params(zoo.build("resnet8x4")) == _resnet_count(8, [32, 64, 128, 256])
    assert _n_params(zoo.build("resnet32x4")) == _resnet_count(32, [32, 64, 128, 256])
    assert _n_params(zoo.build("wrn_16_2")) == _wrn_count(16, 2)
    assert _n_params(zoo.build("wrn_40_2")) == _wrn_count(40, 2)
    assert _n_params(zoo.build("wrn_16_4")) == _wrn_count(16, 4) == 2_772_020
    assert _n_params(zoo.build("wrn_40_4")) == _wrn_count(40, 4) == 8_972_340
    assert _n_params(zoo.build("vgg8")) == _vgg_count([[64], [128], [256], [512], [512]])
    assert _n_params(zoo.build("vgg13")) == _vgg_count([[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]])


@pytest.mark.parametrize("name,millions", [("resnet20", 0.28), ("resnet32x4", 7.43), ("wrn_40_2", 2.26),
                                           ("vgg13", 9.46), ("resnet8x4", 1.23), ("wrn_16_2", 0.70),
                                           ("vgg8", 3.96), ("resnet56", 0.86), ("resnet110", 1.73),
                                           ("wrn_16_4", 2.77), ("wrn_40_4", 8.97)])   # IEPKT's pair
def test_parameter_counts_match_the_crd_models(name, millions):
    """The sizes the CRD benchmark reports for its CIFAR-100 models (100 classes), within 5%."""
    assert _n_params(zoo.build(name, num_classes=100)) / 1e6 == pytest.approx(millions, rel=0.05)


def _stage_outputs(model: torch.nn.Module, layers: list[str]) -> tuple[dict[str, tuple[int, ...]], torch.Tensor]:
    modules = dict(model.named_modules())
    out: dict[str, tuple[int, ...]] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, tuple(o.shape)))
               for n in layers]
    try:
        model.eval()
        with torch.no_grad():
            logits = model(torch.randn(2, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    return out, logits


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_table1_pairs_have_equal_stage_widths(teacher, student):
    shapes = {}
    for name in (teacher, student):
        layers = zoo.ALIGNED_LAYERS[name]
        out, logits = _stage_outputs(zoo.build(name), layers)
        assert logits.shape == (2, 100)
        assert [out[l][1] for l in layers] == WIDTHS[name]
        shapes[name] = [out[l] for l in layers]
    assert shapes[teacher] == shapes[student]   # same channels and the same spatial sizes


def test_stage_ends_are_named_modules_and_feature_lists_are_consistent():
    for name in zoo.ZOO:
        model = zoo.build(name, num_classes=10)
        names = dict(model.named_modules())
        for layer in zoo.ALIGNED_LAYERS[name] + zoo.FEATURE_LAYERS[name] + [zoo.CLASSIFIER[name]]:
            assert layer in names, (name, layer)
        assert isinstance(names[zoo.CLASSIFIER[name]], torch.nn.Linear)
        assert names[zoo.CLASSIFIER[name]].out_features == 10
        assert set(zoo.ALIGNED_LAYERS[name]) <= set(zoo.FEATURE_LAYERS[name])


def test_resnet_stage_outputs_are_post_relu_and_reference_keys():
    model = zoo.build("resnet8")
    out, _ = {}, None
    h = model.layer2.register_forward_hook(lambda m, i, o: out.__setitem__("x", o))
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    h.remove()
    assert float(out["x"].min()) >= 0.0
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.weight", "fc.weight"} <= keys
    assert {"block1.layer.0.convShortcut.weight", "block3.layer.1.bn2.weight", "bn1.weight", "fc.bias"} \
        <= set(zoo.build("wrn_16_2").state_dict())
    assert {"block0.0.weight", "block0.1.running_var", "block4.1.weight", "classifier.weight"} \
        <= set(zoo.build("vgg8").state_dict())
    assert {"block0.3.weight", "block0.4.weight"} <= set(zoo.build("vgg13").state_dict())


def test_unknown_model_names_the_closest():
    with pytest.raises(NeurosemError, match="resnet8x4"):
        zoo.build("resnet8x5")


# the nine models added for CRD's cross-architecture table and wrn_40_2 -> wrn_40_1 ---------------

#: Exact parameter counts at 100 classes (each equal to the RepDistiller model's, whose state dict
#: has the same keys and shapes; the issue's rounded sizes in the comments).
NEW_COUNTS = {
    "wrn_16_1": 180_916,      # 0.18 M
    "wrn_40_1": 569_780,      # 0.57 M
    "ResNet50": 23_705_252,   # 23.71 M
    "MobileNetV2": 812_836,   # 0.81 M
    "ShuffleV1": 949_258,     # 0.95 M
    "ShuffleV2": 1_355_528,   # 1.36 M
    "vgg11": 9_277_284,       # 9.28 M
    "vgg16": 14_774_436,      # 14.77 M
    "vgg19": 20_086_692,      # 20.09 M
}

CROSS_PAIRS = [("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
               ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"),
               ("wrn_40_2", "wrn_40_1")]


@pytest.mark.parametrize("name", sorted(NEW_COUNTS))
def test_new_models_have_crds_parameter_counts(name):
    model = zoo.build(name)
    assert _n_params(model) == NEW_COUNTS[name]
    assert round(NEW_COUNTS[name] / 1e6, 2) == {"wrn_16_1": 0.18, "wrn_40_1": 0.57, "ResNet50": 23.71,
                                                "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.36,
                                                "vgg11": 9.28, "vgg16": 14.77, "vgg19": 20.09}[name]


def test_new_counts_follow_the_formulas():
    assert _n_params(zoo.build("wrn_16_1")) == _wrn_count(16, 1)
    assert _n_params(zoo.build("wrn_40_1")) == _wrn_count(40, 1)
    assert _n_params(zoo.build("vgg11")) == _vgg_count([[64], [128], [256, 256], [512, 512], [512, 512]])
    assert _n_params(zoo.build("vgg16")) == _vgg_count([[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3])
    assert _n_params(zoo.build("vgg19")) == _vgg_count([[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4])


def test_new_models_use_repdistillers_module_names():
    keys = {n: set(zoo.build(n, num_classes=10).state_dict()) for n in ("ResNet50", "MobileNetV2", "ShuffleV1", "ShuffleV2")}
    assert {"conv1.weight", "layer4.2.bn3.running_var", "layer1.0.shortcut.0.weight", "linear.bias"} <= keys["ResNet50"]
    assert {"conv1.0.weight", "blocks.6.0.conv.7.running_mean", "conv2.1.weight", "classifier.0.weight"} <= keys["MobileNetV2"]
    assert {"bn1.weight", "layer2.7.conv3.weight", "linear.weight"} <= keys["ShuffleV1"]
    assert {"layer3.0.conv5.weight", "layer3.3.bn3.bias", "conv2.weight", "bn2.weight", "linear.weight"} <= keys["ShuffleV2"]


@pytest.mark.parametrize("teacher,student", CROSS_PAIRS)
def test_cross_architecture_pairs_run_and_expose_features(teacher, student):
    for name in (teacher, student):
        layers = zoo.FEATURE_LAYERS[name] + zoo.preact_layers(name)
        outs = [k for k in layers if not k.endswith(":input")]
        shapes, logits = _stage_outputs(zoo.build(name), outs)
        assert logits.shape == (2, 100)
        assert len(zoo.preact_layers(name)) == len(zoo.FEATURE_LAYERS[name]) - 1
        sizes = [shapes[k][2] for k in zoo.FEATURE_LAYERS[name]]
        assert sizes == sorted(sizes, reverse=True)   # stages never grow


def test_feature_maps_of_the_new_models():
    expect = {"MobileNetV2": [(16, 16), (12, 16), (16, 8), (48, 4), (160, 2)],
              "ShuffleV1": [(24, 32), (240, 16), (480, 8), (960, 4)],
              "ShuffleV2": [(24, 32), (116, 16), (232, 8), (464, 4)],
              "ResNet50": [(64, 32), (256, 32), (512, 16), (1024, 8), (2048, 4)]}
    for name, want in expect.items():
        shapes, _ = _stage_outputs(zoo.build(name), zoo.FEATURE_LAYERS[name])
        assert [(shapes[k][1], shapes[k][2]) for k in zoo.FEATURE_LAYERS[name]] == want


def test_shufflev2_preact_is_the_concat_before_the_relu():
    model = zoo.build("ShuffleV2", num_classes=10).eval()
    block = model.layer1[3]
    got = {}
    h = block.preact.register_forward_hook(lambda m, i, o: got.__setitem__("pre", o))
    h2 = block.shuffle.register_forward_pre_hook(lambda m, i: got.__setitem__("post", i[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    h.remove(), h2.remove()
    c = got["pre"].shape[1] // 2
    assert torch.equal(got["post"][:, c:], torch.relu(got["pre"][:, c:]))
    assert torch.equal(got["post"][:, :c], got["pre"][:, :c])
    assert (got["pre"][:, c:] < 0).any()


def test_feat_modules_are_repdistillers_get_feat_modules():
    """What the initialisation stage of AB and FSP trains: everything but the classifier, except
    WRN's final BN and the last 1x1 conv of MobileNetV2 and ShuffleV2 (as RepDistiller)."""
    from neurosem.distill.methods.base import feature_modules

    for name in zoo.ZOO:
        model = zoo.build(name, num_classes=10)
        chosen = {id(p) for p in feature_modules(model, zoo.FEAT_MODULES[name])}
        left = sorted(k.rsplit(".", 1)[0] for k, p in model.named_parameters() if id(p) not in chosen)
        expect = {"wrn": ["bn1", "bn1", "fc", "fc"], "MobileNetV2": ["classifier.0", "classifier.0", "conv2.0",
                  "conv2.1", "conv2.1"], "ShuffleV2": ["bn2", "bn2", "conv2", "linear", "linear"]}
        fam = zoo._family(name)
        assert left == expect.get(fam, sorted([zoo.CLASSIFIER[name]] * 2)), name
