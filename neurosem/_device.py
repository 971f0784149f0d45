"""Device selection shared by every stage (``--device auto``).

:func:`resolve_device` is resolved once per process and spec (``torch.cuda.is_available()`` and
the device count are asked once); :func:`gpu_driver_visible` tells, without importing torch, whether
a GPU can be there at all, so stages that run on numpy on the CPU (``kl``) skip torch's import.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING

from neurosem.errors import NeurosemError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Files a GPU driver creates on Linux: NVIDIA (/dev/nvidiactl, /proc/driver/nvidia), ROCm
#: (/dev/kfd, torch's "cuda" device on AMD) and WSL2 (/dev/dxg).
_GPU_DRIVER_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def gpu_driver_visible(platform: str | None = None, exists=os.path.exists) -> bool:
    """False only when there is certainly no CUDA/ROCm GPU (Linux without a GPU driver); no torch import.

    On other systems the answer is True (a GPU may be there): ask :func:`resolve_device`.

    Example:
        >>> gpu_driver_visible("linux", exists=lambda path: False)
        False
    """
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux"):
        return True
    return any(exists(path) for path in _GPU_DRIVER_FILES)


def resolve_device(spec: "str | torch.device | None" = "auto") -> "torch.device":
    """Turn ``auto``/``cpu``/``cuda``/``cuda:1``/``mps`` into a usable ``torch.device``.

    ``auto`` picks CUDA when present, then MPS, else the CPU; under ``torchrun`` (``WORLD_SIZE`` > 1)
    ``auto`` and ``cuda`` pick the GPU ``LOCAL_RANK``. Cached per spec: torch is asked once per process.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if spec is None or isinstance(spec, str):
        return _resolve((spec or "auto").strip().lower())
    import torch

    if isinstance(spec, torch.device):
        return spec
    return _resolve(str(spec).strip().lower())


@functools.lru_cache(maxsize=None)
def _resolve(spec: str) -> "torch.device":
    """:func:`resolve_device` of a normalised spec string (errors are not cached: they raise again)."""
    import torch

    if spec in ("auto", "cuda") and torch.cuda.is_available():
        from neurosem.distributed import world_from_env

        world = world_from_env()
        if world.size > 1:  # under torchrun: this process's own GPU (LOCAL_RANK)
            return torch.device("cuda", world.local_rank % torch.cuda.device_count())
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
