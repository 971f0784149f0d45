"""Tiny instances of torchvision's ViT, Swin and ConvNeXt (their own classes), for 32x32 images.

Factories with no arguments (for ``--model tests/_transformers.py:tiny_vit``), seeded, eval mode:

- :func:`tiny_vit`: ``VisionTransformer(image_size=32, patch_size=8, num_layers=2, ...)``; blocks
  give ``[B, 17, 16]`` = 1 class token + a 4x4 grid of 16-d tokens;
- :func:`tiny_swin`: two stages, ``[B, 8, 8, 12]`` and ``[B, 4, 4, 24]`` (channels-last);
- :func:`tiny_convnext`: two stages, ``[B, 12, 8, 8]`` and ``[B, 24, 4, 4]`` (channels-first
  stage outputs, channels-last inside each block).

The widths (12, 24) differ from the spatial sizes, so the layout of every 4-D output is unambiguous.
"""
from __future__ import annotations

import torch
from torch import nn


def _build(make) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make()
    return model.eval()


def tiny_vit(num_layers: int = 2) -> nn.Module:
    """A 2-block ViT for 32x32 images: 16 patches of 8x8, hidden size 16, 10 classes."""
    from torchvision.models import VisionTransformer

    return _build(lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=num_layers, num_heads=2,
                                            hidden_dim=16, mlp_dim=32, num_classes=10))


def tiny_swin() -> nn.Module:
    """A 2-stage Swin for 32x32 images: patches of 4x4, widths 12 and 24, windows of 2x2."""
    from torchvision.models import SwinTransformer

    return _build(lambda: SwinTransformer(patch_size=[4, 4], embed_dim=12, depths=[1, 1], num_heads=[1, 2],
                                          window_size=[2, 2], num_classes=10))


def tiny_convnext() -> nn.Module:
    """A 2-stage ConvNeXt for 32x32 images: widths 12 and 24, one block per stage."""
    from torchvision.models import ConvNeXt
    from torchvision.models.convnext import CNBlockConfig

    return _build(lambda: ConvNeXt([CNBlockConfig(12, 24, 1), CNBlockConfig(24, None, 1)], num_classes=10))


class ChannelsLastCNN(nn.Module):
    """A CNN: ``nhwc`` gives ``conv``'s maps channels-last ``[B, H, W, 6]``, ``cf`` as they are ``[B, 6, H, W]``."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.cf = nn.Identity()
        self.nhwc = _Permute()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cf(self.conv(x))
        return self.nhwc(y).mean()


class _Permute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)
