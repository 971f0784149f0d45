"""Reading a weights file someone else made: a state dict, or a checkpoint holding one, loaded
without running code (``weights_only``), its keys matched to the model in one line when they
do not fit.

Example:
    >>> load_weights_file(model, "resnet18_places365.pth")  # doctest: +SKIP
    'sha256:...'
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from neurosem.errors import NeurosemError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

_STATE_KEYS = ("state_dict", "model", "net", "model_state_dict")
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _few(keys: Sequence[str], n: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def extract_state_dict(obj: Any, source: str = "the checkpoint") -> "dict[str, torch.Tensor]":
    """The state dict inside a loaded checkpoint, with ``module.``/``_orig_mod.`` prefixes stripped.

    Accepts a plain state dict or a dict holding one under ``state_dict``/``model``/``net``/
    ``model_state_dict``.

    Example:
        >>> extract_state_dict({"state_dict": {"module.fc.weight": w}})  # doctest: +SKIP
        {'fc.weight': w}
    """
    import torch

    state = obj
    if isinstance(obj, dict) and not _all_tensors(obj):
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and _all_tensors(inner):
                state = inner
                break
            if isinstance(inner, torch.nn.Module):
                state = inner.state_dict()
                break
        else:
            raise NeurosemError(
                f"{source} holds no state dict (keys: {_few([str(k) for k in obj])}); save one with "
                "torch.save(model.state_dict(), path) or put it under 'state_dict'")
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict) or not state:
        raise NeurosemError(f"{source} holds no state dict ({type(obj).__name__}); "
                            "save one with torch.save(model.state_dict(), path)")
    out = {}
    for key, value in state.items():
        key = str(key)
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _all_tensors(d: dict) -> bool:
    import torch

    return all(isinstance(v, torch.Tensor) for v in d.values())


def load_weights_file(model: "nn.Module", path: "str | Path") -> str:
    """Load a ``.pth``/``.pt`` file into ``model`` (strictly); returns its description ``file:<path>#<sha>``.

    Example:
        >>> load_weights_file(model, "teacher.pth")  # doctest: +SKIP
        'file:/abs/teacher.pth#3f2a...'
    """
    from neurosem._torchfile import load_tensors

    p = Path(path).expanduser()
    if not p.is_file():
        raise NeurosemError(f"weights file {p} not found: --weights takes default, none or a .pth file")
    obj = load_tensors(p, "weights file", "pass a .pth written by torch.save(model.state_dict(), path)")
    state = extract_state_dict(obj, source=str(p))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches ({_few(wrong, 2)})")
        raise NeurosemError(f"weights file {p} does not fit the model: {'; '.join(parts)}; "
                            "check --model (and --num-classes) against the checkpoint")
    model.load_state_dict(state, strict=True)
    return f"file:{p.resolve()}#{_file_digest(p)}"
