"""The CIFAR model zoo of the CRD benchmark (Tian et al., ICLR 2020), written for this project.

Architectures follow RepDistiller's CIFAR models (so the parameter counts and the teacher/student
pairs of the paper's Table 1 are the same), and the module names follow RepDistiller's too, so a
RepDistiller checkpoint (``ckpt_epoch_240.pth``, whose ``"model"`` entry is a state dict) loads
into these models unchanged:

==============  ===========================  ==========================================
family          stages (channels)            stage-end modules (``ALIGNED_LAYERS``)
==============  ===========================  ==========================================
resnetN         16 / 32 / 64, stem 16        ``layer1``, ``layer2``, ``layer3``
resnet8x4/32x4  64 / 128 / 256, stem 32      ``layer1``, ``layer2``, ``layer3``
wrn_16_k/40_k   16k / 32k / 64k, stem 16     ``block1``, ``block2``, ``block3``
vgg8/11/13/16/19  64 / 128 / 256 / 512 / 512 ``block0`` ... ``block4``
ResNet50        256 / 512 / 1024 / 2048      ``layer1`` ... ``layer4``
MobileNetV2     12 / 16 / 48 / 160           ``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6``
ShuffleV1       240 / 480 / 960              ``layer1``, ``layer2``, ``layer3``
ShuffleV2       116 / 232 / 464              ``layer1``, ``layer2``, ``layer3``
==============  ===========================  ==========================================

(ResNet50, MobileNetV2 and the ShuffleNets are in :mod:`neurosem.distill.zoo_more`.)

Every stage end is a named module whose output is the stage's feature map (after the ReLU for
the ResNets and VGGs; WRN is pre-activation, so its block outputs are the residual sums, as in
RepDistiller). ``neurosem layers resnet8x4`` lists them; the recorder hooks them; SKD aligns them.

``FEATURE_LAYERS`` is RepDistiller's list of intermediate features (``is_feat=True`` minus the
pooled vector), which the CRD-protocol baselines index into (AT uses ``[1:]``, FitNet ``[2]``, SP
``[-1]``); ``CLASSIFIER`` names the final linear layer, whose input is the pooled feature used by
RKD, PKT, CC and CRD; :func:`preact_layers` names the pre-activation maps AB distils.

Example:
    >>> model = ZOO["resnet8x4"](num_classes=100)
    >>> ALIGNED_LAYERS["resnet8x4"]
    ['layer1', 'layer2', 'layer3']
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from neurosem.distill import zoo_more as _more


# ------------------------------------------------------------------------------------------------
# ResNet (He et al. 2016, CIFAR variant: 6n+2 layers of 3x3 basic blocks)

class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``x: [B, in, H, W] -> [B, planes, H/stride, W/stride]``. The shortcut is a 1x1 conv + BN
    (``downsample``) when the shape changes, else the identity.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        self.preact = nn.Identity()   # names the pre-activation sum (AB distils it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.preact(out + shortcut))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32x32 inputs: stem conv3x3 -> three stages of ``(depth-2)/6`` basic
    blocks (strides 1, 2, 2) -> global average pool -> ``fc``.

    ``widths = (stem, stage1, stage2, stage3)``. ``x: [B, 3, H, W] -> logits [B, num_classes]``.
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(stem, w1, n, stride=1)
        self.layer2 = self._stage(w1, w2, n, stride=2)
        self.layer3 = self._stage(w2, w3, n, stride=2)
        # adaptive pooling = AvgPool2d(8) at 32x32, and also works for smaller inputs
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(inplanes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016, pre-activation, dropout 0)

class WideBasicBlock(nn.Module):
    """Pre-activation block: ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``.

    When the shape changes, the shortcut is a 1x1 conv applied to ``relu(bn1(x))`` (as in the
    original WRN code); otherwise the identity on ``x``. ``x: [B, in, H, W] -> [B, out, H/s, W/s]``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        # camelCase to match the state-dict keys of the reference WRN checkpoints
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return out + shortcut


class NetworkBlock(nn.Module):
    """One WRN stage: ``n`` pre-activation blocks in ``self.layer``; the first one strides."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``k``: conv3x3(16) -> three stages of ``(depth-4)/6`` blocks with widths
    ``16k, 32k, 64k`` (strides 1, 2, 2) -> BN-ReLU -> global average pool -> ``fc``.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------------------------------------
# VGG with batch norm (Simonyan & Zisserman 2015; CIFAR variant without the FC stack)

class CifarVGG(nn.Module):
    """Five stages ``block0..block4`` of conv3x3-BN-ReLU (64, 128, 256, 512, 512 channels), max
    pooling between the first four, global average pooling, one linear ``classifier``.

    At 32x32 the stages run at 32, 16, 8, 4, 4 pixels (no pooling between ``block3`` and
    ``block4``, as in the CRD code; ``pool3`` pools only 64x64 inputs).
    """

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100) -> None:
        super().__init__()
        in_ch = 3
        for i, widths in enumerate(cfg):
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                in_ch = w
            setattr(self, f"block{i}", nn.Sequential(*layers))
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if h == 64:
            x = self.pool3(x)
        x = self.block4(x)
        return self.classifier(torch.flatten(self.pool4(x), 1))


_VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _resnet(depth: int, widths: Sequence[int], num_classes: int = 100) -> nn.Module:
    return CifarResNet(depth, widths, num_classes=num_classes)


def _wrn(depth: int, k: int, num_classes: int = 100) -> nn.Module:
    return WideResNet(depth, k, num_classes=num_classes)


def _vgg(name: str, num_classes: int = 100) -> nn.Module:
    return CifarVGG(_VGG_CFG[name], num_classes=num_classes)


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

#: name -> factory(num_classes=100) -> nn.Module (random initialisation as in the CRD code).
ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet8": partial(_resnet, 8, _SMALL),
    "resnet14": partial(_resnet, 14, _SMALL),
    "resnet20": partial(_resnet, 20, _SMALL),
    "resnet32": partial(_resnet, 32, _SMALL),
    "resnet44": partial(_resnet, 44, _SMALL),
    "resnet56": partial(_resnet, 56, _SMALL),
    "resnet110": partial(_resnet, 110, _SMALL),
    "resnet8x4": partial(_resnet, 8, _X4),
    "resnet32x4": partial(_resnet, 32, _X4),
    "wrn_16_1": partial(_wrn, 16, 1),
    "wrn_16_2": partial(_wrn, 16, 2),
    "wrn_40_1": partial(_wrn, 40, 1),
    "wrn_40_2": partial(_wrn, 40, 2),
    "wrn_16_4": partial(_wrn, 16, 4),    # IEPKT's student (Lee & Song, AAAI 2021)
    "wrn_40_4": partial(_wrn, 40, 4),    # IEPKT's teacher
    "vgg8": partial(_vgg, "vgg8"),
    "vgg11": partial(_vgg, "vgg11"),
    "vgg13": partial(_vgg, "vgg13"),
    "vgg16": partial(_vgg, "vgg16"),
    "vgg19": partial(_vgg, "vgg19"),
    "ResNet50": lambda num_classes=100: _more.CifarResNet50(num_classes=num_classes),
    "MobileNetV2": lambda num_classes=100: _more.MobileNetV2(num_classes=num_classes),
    "ShuffleV1": lambda num_classes=100: _more.ShuffleNetV1(num_classes=num_classes),
    "ShuffleV2": lambda num_classes=100: _more.ShuffleNetV2(num_classes=num_classes),
}

_RESNET_STAGES = ["layer1", "layer2", "layer3"]
_WRN_STAGES = ["block1", "block2", "block3"]
_VGG_STAGES = ["block0", "block1", "block2", "block3", "block4"]
_MOBILE_STAGES = ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]   # RepDistiller's f1..f4


def _family(name: str) -> str:
    if name in ("ResNet50", "MobileNetV2", "ShuffleV1", "ShuffleV2"):
        return name
    return "resnet" if name.startswith("resnet") else "wrn" if name.startswith("wrn") else "vgg"


_STAGES = {"resnet": _RESNET_STAGES, "wrn": _WRN_STAGES, "vgg": _VGG_STAGES,
           "ResNet50": _RESNET_STAGES + ["layer4"], "MobileNetV2": _MOBILE_STAGES,
           "ShuffleV1": _RESNET_STAGES, "ShuffleV2": _RESNET_STAGES}
_STEM = {"resnet": ["relu"], "wrn": ["conv1"], "vgg": [], "ResNet50": ["relu"], "MobileNetV2": ["conv1"],
         "ShuffleV1": ["relu"], "ShuffleV2": ["relu"]}

#: name -> stage-end module names (the layers SKD aligns; the default layers of ``neurosem.models``).
ALIGNED_LAYERS: dict[str, list[str]] = {name: list(_STAGES[_family(name)]) for name in ZOO}

#: name -> RepDistiller's intermediate features in order (the stem's output, then the stages).
FEATURE_LAYERS: dict[str, list[str]] = {name: _STEM[_family(name)] + _STAGES[_family(name)] for name in ZOO}

#: name -> the modules RepDistiller's ``get_feat_modules`` returns (what the initialisation stage
#: of AB and FSP trains; WRN's final BN, MobileNetV2's and ShuffleV2's last 1x1 conv are not in it).
FEAT_MODULES: dict[str, list[str]] = {
    name: {"resnet": ["conv1", "bn1", "layer1", "layer2", "layer3"], "wrn": ["conv1"] + _WRN_STAGES,
           "vgg": list(_VGG_STAGES), "ResNet50": ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"],
           "MobileNetV2": ["conv1", "blocks"]}.get(_family(name), ["conv1", "bn1", "layer1", "layer2", "layer3"])
    for name in ZOO}

#: name -> the final linear layer (its input is the pooled penultimate feature).
CLASSIFIER: dict[str, str] = {
    name: {"vgg": "classifier", "MobileNetV2": "classifier.0", "resnet": "fc", "wrn": "fc"}.get(_family(name), "linear")
    for name in ZOO}


def preact_layers(name: str) -> list[str]:
    """Tap keys of the pre-activation maps of ``FEATURE_LAYERS[name][1:]`` (RepDistiller's
    ``preact=True`` features, which AB distils): each stage's last ``preact`` module (ResNets,
    ShuffleNets), the input of each block's last ReLU (VGG), the BN that follows each stage (WRN,
    as RepDistiller); MobileNetV2 has none (its features as they are).

    Example:
        >>> preact_layers("resnet8")
        ['layer1.0.preact', 'layer2.0.preact', 'layer3.0.preact']
    """
    fam = _family(name)
    stages = FEATURE_LAYERS[name][1:]
    if fam == "wrn":
        return ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]
    if fam == "MobileNetV2":
        return list(stages)
    model = build(name, num_classes=10)
    out = []
    for stage in stages:
        mod = model.get_submodule(stage)
        if fam == "vgg":
            out.append(f"{stage}.{len(mod) - 1}:input")
        else:
            pre = [n for n, _ in mod.named_modules() if n.endswith("preact")]
            out.append(f"{stage}.{pre[-1]}")
    return out

#: Input size of every zoo model.
INPUT_SIZE = (3, 32, 32)


def build(name: str, num_classes: int = 100) -> nn.Module:
    """Construct zoo model ``name`` with random weights; unknown names are a ``NeurosemError``.

    Example:
        >>> build("resnet20").fc.out_features
        100
    """
    if name not in ZOO:
        from neurosem.errors import NeurosemError
        from neurosem.ids import closest_names

        near = closest_names(name, list(ZOO))
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise NeurosemError(f"unknown CIFAR zoo model {name!r}{hint}; choose one of {', '.join(ZOO)}")
    return ZOO[name](num_classes=num_classes)
