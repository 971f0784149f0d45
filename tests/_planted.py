"""Tiny deterministic models and datasets that tests (and subprocesses started by tests) reuse.

- :class:`TinyCNN`: conv1 -> bn1 -> relu(inplace) -> layer1 -> layer2 -> pool -> fc, fixed weights
  by seed (no global RNG touched); ``tiny_cnn()`` is a no-argument factory for ``file.py:factory``.
- :class:`SharedReLU`: one ReLU module called twice in a forward pass.
- :class:`TupleOut`: a module whose output is a tuple ``(tensor, extra)``.
- :class:`RandomImages`: ``{"image": FloatTensor[3, S, S] in [0, 1], "index", "id"}`` per item,
  the same for the same (seed, index) whatever the order of access; optional delay per item and
  an optional index at which it raises KeyboardInterrupt; ``fingerprint()``.
"""
from __future__ import annotations

import time

import torch
from torch import nn


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return module


class TinyCNN(nn.Module):
    """``x: [B, 3, S, S]`` -> logits ``[B, num_classes]``; layer1: ``[B, 6, S/2, S/2]``, layer2: ``[B, 8, S/4, S/4]``."""

    def __init__(self, num_classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)
        _seeded(self, seed)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.pool(x).flatten(1))


def tiny_cnn() -> TinyCNN:
    """No-argument factory (for ``--model tests/_planted.py:tiny_cnn``)."""
    return TinyCNN()


def not_a_module() -> str:
    """A factory that returns something else than an ``nn.Module``."""
    return "not a model"


class SharedReLU(nn.Module):
    """``act`` runs twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        _seeded(self, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))))


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.conv(x), "extra"


class TupleOut(nn.Module):
    """``pair`` returns ``(conv(x), "extra")``."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = _Pair()
        _seeded(self, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.pair(x)
        return y.sum()


class RandomImages(torch.utils.data.Dataset):
    """Deterministic random images: item ``i`` depends only on ``(seed, i)``.

    Args:
        delay: seconds slept per item (a slow dataset for kill/interrupt tests).
        interrupt_at: index whose access raises ``KeyboardInterrupt`` (simulated Ctrl-C).
    """

    def __init__(self, n: int = 10, size: int = 16, seed: int = 0, delay: float = 0.0,
                 interrupt_at: int | None = None) -> None:
        self.n, self.size, self.seed = n, size, seed
        self.delay, self.interrupt_at = delay, interrupt_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i < 0 or i >= self.n:
            raise IndexError(i)
        if self.interrupt_at is not None and i == self.interrupt_at:
            raise KeyboardInterrupt
        if self.delay:
            time.sleep(self.delay)
        gen = torch.Generator().manual_seed(self.seed * 100003 + i)
        return {"image": torch.rand(3, self.size, self.size, generator=gen), "index": i, "id": f"img{i:04d}.png"}

    def fingerprint(self) -> str:
        return f"random-images-{self.n}-{self.size}-{self.seed}"

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start..stop`` stacked: ``[B, 3, S, S]``."""
        return torch.stack([self[i]["image"] for i in range(start, stop)])
