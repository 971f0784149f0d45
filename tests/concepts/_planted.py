"""A planted model for the concept tests: two units that each hold half of the ``red`` concept."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neurosem.data.synthetic import COLORS

N_CLASSES = 4


class HalfUnits(nn.Module):
    """``x: [B, 3, 64, 64]`` in [0, 1] -> ``[B, 5, 32, 32]`` at the label resolution:

    0. red on the even label columns; 1. red on the odd columns (each holds about half of every
       red ball, so each unit alone has IoU about 0.5 with ``red``, their union 1); 2. ``street``:
    1 everywhere on images with an orange (car) cell; 3. a constant 0.5; 4. the green channel.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("red", torch.tensor(COLORS["red"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("orange", torch.tensor(COLORS["orange"], dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = F.avg_pool2d(x, 2) * 255
        red = ((rgb - self.red).abs() < 0.5).all(1).float()
        even = torch.zeros_like(red)
        even[..., ::2] = 1.0
        orange = ((rgb - self.orange).abs() < 0.5).all(1).float()
        street = orange.flatten(1).amax(1)[:, None, None].expand_as(red)
        return torch.stack([red * even, red * (1 - even), street, torch.full_like(red, 0.5), rgb[:, 1] / 255], 1)


class HalfModel(nn.Module):
    """``fine`` (the units above), then global average pooling and a seeded linear head ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.fine = HalfUnits()
        self.pool = nn.AdaptiveAvgPool2d(1)
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(5, N_CLASSES)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(N_CLASSES, 5, generator=g))
            self.fc.bias.copy_(torch.randn(N_CLASSES, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.fine(x)).flatten(1))


def half_model() -> HalfModel:
    """The factory ``tests/concepts/_planted.py:half_model`` (loadable by spec)."""
    return HalfModel().eval()
