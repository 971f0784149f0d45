"""The pieces of distill's loop: the CIFAR data, per-epoch seeding, evaluation and the
initialisation stage's epoch (one process, or one rank of a torchrun launch)."""
from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neurosem.distill._ddp import GradientSync, Spread
from neurosem.errors import NeurosemError


def _datasets(data: str) -> tuple[Any, Any, str]:
    from neurosem.data.cifar import (cifar_dataset, cifar_test_transform, cifar_train_transform,
                                     parse_cifar_spec)

    name, root, train = parse_cifar_spec(data)
    if not train:
        raise NeurosemError(f"--data {data}: give the training set ({name}:ROOT); the test split is "
                            "used for evaluation automatically")
    train_ds = cifar_dataset(root, name, train=True, transform=cifar_train_transform())
    test_ds = cifar_dataset(root, name, train=False, transform=cifar_test_transform())
    return train_ds, test_ds, name


def _collate(items: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images [B, 3, H, W], labels [B], dataset indices [B])`` (CRD's memory bank needs the indices)."""
    return (torch.stack([it["image"] for it in items]),
            torch.tensor([it["label"] for it in items], dtype=torch.long),
            torch.tensor([it["index"] for it in items], dtype=torch.long))


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2 ** 31)


def _seed_all(s: int) -> torch.Generator:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def evaluate(model: nn.Module, loader: Any, device: torch.device, comm: Any = None) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` over ``loader`` (under torchrun,
    ``comm``: each rank's loader holds its share of the images and the counts are summed)."""
    was_training = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    with torch.inference_mode():
        for x, y, *_ in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    model.train(was_training)
    if comm is not None:
        correct, total = (int(v) for v in comm.sum(np.array([correct, total])))
        loss = float(comm.sum(np.array([loss]))[0])
    return 100.0 * correct / max(total, 1), loss / max(total, 1)


def _init_epoch(dist: Any, loader: Any, optimizer: torch.optim.Optimizer, dev: torch.device, bar: Any,
                progress: bool, desc: str, comm: Any = None) -> tuple[float, float]:
    """One epoch of the initialisation stage: ``(mean loss per image, seconds)``. Under torchrun
    (``comm``) each rank steps on its slice and the loss is the global batch's (every rank has it)."""
    dist.train()
    total = torch.zeros((), dtype=torch.float32 if dev.type == "mps" else torch.float64, device=dev)
    seen, t0 = 0, time.perf_counter()
    sync = None
    if comm is not None:
        sync = GradientSync(comm, [p for g in optimizer.param_groups for p in g["params"]], dist.student.parameters())
    batches = iter(loader)
    for x, y, index in bar(batches, total=len(loader), desc=desc, enabled=progress, unit="batch"):
        n = int(y.shape[0])
        spread, x, y, index = Spread.split(comm, x, y, index)
        x, y, index = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), index.to(dev, non_blocking=True)
        loss = dist.init_step(x, y, index, spread)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync is not None:
            sync()
        optimizer.step()
        total += loss.detach().to(total.dtype) * n
        seen += n
    return float(total) / max(seen, 1), time.perf_counter() - t0
