"""Device selection shared by every stage (``--device auto``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from neurosem.errors import NeurosemError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def resolve_device(spec: "str | torch.device | None" = "auto") -> "torch.device":
    """Turn ``auto``/``cpu``/``cuda``/``cuda:1``/``mps`` into a usable ``torch.device``.

    ``auto`` picks CUDA when present, then MPS, else the CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise NeurosemError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NeurosemError(
            f"--device {spec} asked for CUDA but torch {torch.__version__} sees no GPU; "
            "use --device auto or cpu (run `neurosem doctor` to check the install)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise NeurosemError(
            f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible; use cuda:0..")
    return device
