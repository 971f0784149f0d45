"""distill's checkpoints: every RNG's state, atomic writes, and reading back without running code.

``checkpoint.pt`` holds tensors and plain containers only (model, optimiser, scheduler, epoch,
history, RNG states) and is read with ``weights_only=True``, so a planted file cannot run code.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from neurosem.errors import NeurosemError


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, numbers and tuples (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically, in plain containers only (the scheduler's milestone Counter as a dict)."""
    sched = state.get("scheduler")
    if isinstance(sched, dict) and "milestones" in sched:
        state = {**state, "scheduler": {**sched, "milestones": dict(sched["milestones"])}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


_CHECKPOINT_FIX = "delete it to start the run afresh, or pass another --run"


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, read with ``weights_only=True`` (a planted file cannot run code)."""
    from neurosem._torchfile import load_tensors

    state = load_tensors(path, "checkpoint", _CHECKPOINT_FIX)
    missing = [k for k in ("config", "epoch", "model", "optimizer", "scheduler", "history", "rng")
               if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state["config"], dict):
        raise NeurosemError(f"checkpoint {path} is not a neurosem distill checkpoint (no "
                            f"{', '.join(missing) or 'config'}); {_CHECKPOINT_FIX}")
    return state


def _resume(path: Path, state: Mapping[str, Any], dist: Any, optimizer: torch.optim.Optimizer,
            scheduler: Any) -> tuple[dict[str, list[float]], int, float | None]:
    """Load the checkpoint's model, loss, optimiser, scheduler and RNG states (one line if it does not
    fit); returns ``(history, epochs done, teacher_acc)``."""
    from collections import Counter

    try:
        dist.student.load_state_dict(state["model"])
        if dist.criterion is not None:
            dist.criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.milestones = Counter(scheduler.milestones)
        _set_rng_state(state["rng"])
        history, epoch, teacher_acc = dict(state["history"]), int(state["epoch"]), state.get("teacher_acc")
    except Exception as exc:  # noqa: BLE001 - any mismatch means the file is damaged or foreign
        text = " ".join(str(exc).split())
        text = text if len(text) <= 160 else text[:157] + "..."
        raise NeurosemError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: {text}); "
                            f"{_CHECKPOINT_FIX}") from None
    return history, epoch, None if teacher_acc is None else float(teacher_acc)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
