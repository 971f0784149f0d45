"""The model the two-process tests record: small, seeded, deterministic (``_model.py:make``).

With ``DIE_AFTER_BATCHES=k`` in the environment, rank ``DIE_RANK`` (default 1) kills its own
process (``os._exit``) at its forward pass of a batch (more than one image) number ``k + 1``: a
rank killed mid-recording.
"""
from __future__ import annotations

import os

import torch
from torch import nn


class Small(nn.Module):
    """conv(3->6) relu conv(6->8, stride 2) relu: maps ``[B, 6, H, W]`` and ``[B, 8, H/2, W/2]``."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0] > 1       # not the one-image probes of loading and recording
        die = os.environ.get("DIE_AFTER_BATCHES")
        if die and os.environ.get("RANK") == os.environ.get("DIE_RANK", "1") and self.calls > int(die):
            os._exit(9)
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))


def make() -> nn.Module:
    return Small()
