"""Datasets: Broden (``broden``), a synthetic Broden-format set (``synthetic``), plain image
folders (``folder``), CIFAR (``cifar``) and plain-torch transforms (``transforms``).

:func:`open_image_dataset` turns a ``--data`` spec into a dataset of
``{"image": FloatTensor[3, H, W], "index": int, "id": str}``; :func:`dataset_fingerprint` gives a
short hash that changes when the dataset does. Submodules are imported lazily (no torch here).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable

from neurosem.errors import DataError

__all__ = ["open_image_dataset", "dataset_fingerprint", "parse_spec"]

_CIFAR_RE = re.compile(r"^(cifar100|cifar10)(-test)?:(.+)$", re.IGNORECASE)
_CIFAR_FOLDER = {"cifar100": "cifar-100-python", "cifar10": "cifar-10-batches-py"}
_WHAT = ("pass a Broden directory (with index.csv), a folder of images, or cifar100:ROOT / "
         "cifar100-test:ROOT / cifar10:ROOT")


def parse_spec(spec: str | Path) -> tuple[str, Any]:
    """Classify a ``--data`` spec without reading images.

    Returns ``("cifar", (name, root, train))``, ``("broden", Path)`` or ``("folder", Path)``.

    Example:
        >>> parse_spec("cifar100-test:data")
        ('cifar', ('cifar100', PosixPath('data'), False))
    """
    text = str(spec)
    m = _CIFAR_RE.match(text) if not isinstance(spec, Path) else None
    if m:
        return "cifar", (m.group(1).lower(), Path(m.group(3)).expanduser(), m.group(2) is None)
    path = Path(text).expanduser()
    if not text.strip():
        raise DataError(f"empty dataset spec; {_WHAT}")
    if not path.exists():
        raise DataError(f"dataset {text!r} does not exist; {_WHAT}")
    if not path.is_dir():
        raise DataError(f"dataset {text!r} is a file, not a folder; {_WHAT}")
    if _find_broden(path) is not None:
        return "broden", path
    return "folder", path


def _find_broden(path: Path) -> Path | None:
    """``path`` or its single child holding index.csv (e.g. ``dataset/`` -> ``broden1_224``)."""
    if (path / "index.csv").is_file():
        return path
    children = [p for p in path.iterdir() if p.is_dir() and (p / "index.csv").is_file()]
    return path if children else None


def open_image_dataset(spec: str | Path, transform: Callable[[Any], Any] | None = None) -> Any:
    """Open ``spec`` as a dataset of ``{"image": FloatTensor[3, H, W], "index": int, "id": str}``.

    ``spec``: a Broden directory (detected by its index.csv; all images, no labels read), a parent
    folder holding one ``broden1_<size>`` directory, ``cifar100:ROOT`` / ``cifar10:ROOT`` (train
    split; ``cifar100-test:ROOT`` / ``cifar10-test:ROOT`` for test), or a folder of images.
    ``transform`` is called on the PIL image (default: ``pil_to_tensor``).

    Example:
        >>> ds = open_image_dataset("dataset/broden1_224")  # doctest: +SKIP
        >>> ds[0]["image"].shape  # doctest: +SKIP
        torch.Size([3, 224, 224])
    """
    kind, arg = parse_spec(spec)
    if kind == "cifar":
        from neurosem.data.cifar import cifar_dataset

        name, root, train = arg
        return cifar_dataset(root, name, train, transform)
    if kind == "broden":
        from neurosem.data.broden import BrodenDataset

        return BrodenDataset(arg, transform=transform, with_labels=False)
    from neurosem.data.folder import ImageFolderDataset

    return ImageFolderDataset(arg, transform=transform)


def dataset_fingerprint(spec: str | Path) -> str:
    """A short hash of the dataset ``spec`` names (16 hex digits), independent of where it lives.

    Broden: the csv metadata (see :func:`neurosem.data.broden.broden_fingerprint`); folder: the
    relative paths and sizes of its images; CIFAR: the set, the split and the names and sizes of
    its files. Image contents are not read, so this takes milliseconds.

    Example:
        >>> dataset_fingerprint("dataset/broden1_224")  # doctest: +SKIP
        '3f1c2a9e0b7d4c11'
    """
    kind, arg = parse_spec(spec)
    if kind == "broden":
        from neurosem.data.broden import broden_fingerprint

        return broden_fingerprint(arg)
    if kind == "folder":
        from neurosem.data.folder import folder_fingerprint

        return folder_fingerprint(arg)
    name, root, train = arg
    h = hashlib.sha256(f"{name}:{'train' if train else 'test'}\n".encode())
    base = root / _CIFAR_FOLDER[name]
    if base.is_dir():
        for p in sorted(base.iterdir()):
            if p.is_file():
                h.update(f"{p.name}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]
