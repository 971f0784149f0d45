"""Reading files written by ``torch.save`` without running code.

:func:`load_tensors` is ``torch.load(path, weights_only=True)``: it builds tensors, plain
containers, numbers and strings only, so a planted weights file or checkpoint cannot execute code.
Every failure becomes one :class:`~neurosem.errors.NeurosemError` line that names the file, says
what is wrong with it (a text file, a truncated or damaged file, objects other than tensors) and
ends with the caller's ``fix``.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from neurosem.errors import NeurosemError

_ZIP = b"PK\x03\x04"     # torch.save's default (zip) format
_PICKLE = b"\x80"        # torch.save's legacy format and plain pickles start with PROTO


def _first_line(exc: BaseException, limit: int = 120) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:limit]}" if line else type(exc).__name__


def _not_torch(head: bytes) -> str | None:
    """Why a file starting with ``head`` cannot be a ``torch.save`` file, or None if it may be one."""
    if not head:
        return "is empty"
    if head.startswith(_ZIP) or head.startswith(_PICKLE):
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a character cut at the end of the head is still text
        text = head[:exc.start].decode("utf-8") if exc.start >= len(head) - 3 else ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return "is a text file, not one written by torch.save"
    return f"is not a file written by torch.save (it starts with {head[:8]!r})"


def load_tensors(path: str | Path, what: str, fix: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, failures as one line.

    Args:
        path: the file.
        what: how messages name it (``"weights file"``, ``"checkpoint"``).
        fix: what the user should do, appended to every message.

    Example:
        >>> load_tensors("w.pth", "weights file", "pass another --weights")  # doctest: +SKIP
        {'fc.weight': tensor(...), ...}
    """
    import torch

    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise NeurosemError(f"cannot read {what} {p} ({exc.strerror or exc}); {fix}") from None
    reason = _not_torch(head)
    if reason is not None:
        raise NeurosemError(f"{what} {p} {reason}; {fix}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch >= 2.4 says "GLOBAL posix.system", older releases "Unsupported class posix.system"
        found = re.search(r"(?:GLOBAL|Unsupported class) ([A-Za-z_][\w.]*)", str(exc))
        if "weights only" in str(exc).lower() and found:
            raise NeurosemError(f"{what} {p} holds objects other than tensors ({found.group(1)}), so it was not "
                                f"loaded (unpickling them could run code); {fix}") from None
        raise NeurosemError(f"{what} {p} is truncated or damaged ({_first_line(exc)}); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - any other failure means a damaged file
        raise NeurosemError(f"{what} {p} is truncated or damaged ({_first_line(exc)}); {fix}") from None
