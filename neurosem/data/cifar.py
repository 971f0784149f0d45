"""CIFAR-10/100 from a local folder (never downloaded), and the CRD training augmentation.

``cifar_dataset(root, "cifar100")`` reads ``ROOT/cifar-100-python/{train,test,meta}`` (the folder
inside ``cifar-100-python.tar.gz``); ``"cifar10"`` reads ``ROOT/cifar-10-batches-py/``.

Reader: torchvision's ``CIFAR100(root, download=False)`` when torchvision imports and the files
pass its MD5 check (the official release). Files in the same pickle format that do not match the
official checksums (a re-packed or generated set, e.g. the tests' or ``benchmarks/
distill_digits.py``'s) and installs where torchvision is broken are read by the restricted pickle
reader here, which yields the same arrays: it builds only dicts, lists, strings, numbers and numpy
arrays, and refuses any other object a pickle names (so a planted file cannot run code).
``ds.reader`` says which one ran and ``ds.verified`` whether the official checksums matched; the
distillation results record both.

Transforms receive a PIL image (as every neurosem dataset's) and return ``FloatTensor[3, H, W]``;
without one the image is ``pil_to_tensor`` only (values in [0, 1]). The augmentation is plain
torch, so it works without torchvision.
"""
from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from neurosem.data.transforms import Compose, Normalize, pil_to_tensor
from neurosem.errors import DataError

#: CIFAR-100 channel mean and std (the values of the CRD code).
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4867, 0.4408)
CIFAR100_STD: tuple[float, float, float] = (0.2675, 0.2565, 0.2761)

# name -> (folder, train files, test files, meta file, label key, class-name key, classes)
_LAYOUT: dict[str, tuple[str, list[str], list[str], str, str, str, int]] = {
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names", 100),
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names", 10),
}
_URL = {"cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"}


class _Refused(pickle.UnpicklingError):
    """A pickle names an object a CIFAR file never holds."""


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes (protocol 2): latin-1 only."""
    if encoding not in ("latin1", "latin-1") or errors != "strict" or not isinstance(text, str):
        raise _Refused(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as Python 3 pickles ``b""`` (protocol 2); anything else is refused."""
    if args:
        raise _Refused("bytes() with arguments")
    return b""


class _CifarUnpickler(pickle.Unpickler):
    """Builds what the CIFAR python files hold (dicts, lists, str/bytes, numbers, numpy arrays) and
    refuses every other global, so unpickling a planted file cannot run code.

    Accepted globals: numpy's array reconstruction (``numpy.core.multiarray._reconstruct``, as the
    official files written by Python 2 / numpy 1 name it, or ``numpy._core.multiarray._reconstruct``
    from numpy 2), ``numpy.ndarray``, ``numpy.dtype``, and ``_codecs.encode`` (latin-1) /
    ``bytes()`` with which Python 3 writes bytes at protocol 2.
    """

    def find_class(self, module: str, name: str) -> Any:
        reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # the running numpy's _reconstruct
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_encode,
            ("__builtin__", "bytes"): _empty_bytes,
            ("builtins", "bytes"): _empty_bytes,
        }
        if (module, name) not in allowed:
            raise _Refused(f"{module}.{name}")
        return allowed[(module, name)]


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise DataError(f"{path} is not a CIFAR file: its pickle calls {exc}, which CIFAR files never do "
                        "(refused, nothing was run); delete it and re-extract the archive") from None
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is the same user error
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc}); "
                        "re-extract the archive") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR pickle (expected a dict); re-extract the archive")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def read_cifar_split(root: str | Path, name: str = "cifar100", train: bool = True
                     ) -> tuple[np.ndarray, list[int], list[str]]:
    """Read one split with the restricted pickle reader (no torchvision, no checksum):
    ``(images uint8 [N, 32, 32, 3], labels, classes)``.

    Example:
        >>> images, labels, classes = read_cifar_split("data", "cifar100", train=False)  # doctest: +SKIP
    """
    folder, train_files, test_files, meta, label_key, names_key, _ = _layout(name)
    base = _check_root(root, name)
    chunks, labels = [], []
    for fname in train_files if train else test_files:
        entry = _load_pickle(base / fname)
        if "data" not in entry or label_key not in entry:
            raise DataError(f"{base / fname} lacks 'data' or '{label_key}'; re-extract the archive")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(entry[label_key]) != len(data):
            raise DataError(f"{base / fname}: expected data [N, 3072] and N labels, got {data.shape}")
        chunks.append(data)
        labels.extend(int(v) for v in entry[label_key])
    images = np.concatenate(chunks).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    classes = [str(c) for c in _load_pickle(base / meta).get(names_key, [])]
    return np.ascontiguousarray(images), labels, classes


def _layout(name: str) -> tuple[str, list[str], list[str], str, str, str, int]:
    if name not in _LAYOUT:
        raise DataError(f"unknown CIFAR set {name!r}: use cifar100 or cifar10")
    return _LAYOUT[name]


def _check_root(root: str | Path, name: str) -> Path:
    folder, train_files, test_files, meta, *_ = _layout(name)
    base = Path(root).expanduser() / folder
    needed = [*train_files, *test_files, meta]
    missing = [f for f in needed if not (base / f).is_file()]
    if not base.is_dir():
        raise DataError(f"{name.upper()} not found: put the extracted {folder}/ folder (from "
                        f"{_URL[name]}) inside {Path(root)} so that {base} exists")
    if missing:
        raise DataError(f"{base} lacks {', '.join(missing)}: re-extract {_URL[name]} there")
    return base


class CifarDataset:
    """CIFAR images as dicts ``{"image": FloatTensor[3, 32, 32], "index": int, "id": str,
    "label": int}`` (a ``torch.utils.data.Dataset``).

    ``id`` is ``"train/00012"`` or ``"test/00012"`` (the position in the split). Attributes:
    ``classes`` (names), ``num_classes``, ``labels`` (list of int), ``reader`` (``"torchvision"``
    or ``"pickle"``), ``verified`` (the official MD5 checksums matched).
    """

    def __init__(self, root: str | Path, name: str = "cifar100", train: bool = True,
                 transform: Callable[[Any], Any] | None = None) -> None:
        self.root = Path(root)
        self.name = name
        self.train = train
        self.transform = transform
        self.split = "train" if train else "test"
        self.num_classes = _layout(name)[6]
        _check_root(root, name)
        data = _read_torchvision(self.root, name, train)
        if data is not None:
            self.data, self.labels, self.classes = data
            self.reader, self.verified = "torchvision", True
        else:
            self.data, self.labels, self.classes = read_cifar_split(self.root, name, train)
            self.reader, self.verified = "pickle", False
        bad = [v for v in self.labels if not 0 <= v < self.num_classes]
        if bad:
            raise DataError(f"{self.root}: label {bad[0]} outside 0..{self.num_classes - 1} in the "
                            f"{self.split} split of {name}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        img = Image.fromarray(self.data[index])
        image = self.transform(img) if self.transform is not None else pil_to_tensor(img)
        return {"image": image, "index": int(index), "id": f"{self.split}/{index:05d}",
                "label": int(self.labels[index])}

    def __repr__(self) -> str:
        return (f"CifarDataset({str(self.root)!r}, name={self.name!r}, train={self.train}, "
                f"n={len(self)}, reader={self.reader!r})")


def _read_torchvision(root: Path, name: str, train: bool
                      ) -> tuple[np.ndarray, list[int], list[str]] | None:
    """The split through torchvision, or None when torchvision is unusable or the checksums differ."""
    try:
        from torchvision import datasets
    except Exception:  # noqa: BLE001 - a broken torchvision install must not stop CIFAR reading
        return None
    cls = datasets.CIFAR100 if name == "cifar100" else datasets.CIFAR10
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:  # "not found or corrupted": the files exist (checked) but differ
        return None
    return np.ascontiguousarray(ds.data), [int(t) for t in ds.targets], list(ds.classes)


def cifar_dataset(root: str | Path, name: str = "cifar100", train: bool = True,
                  transform: Callable[[Any], Any] | None = None) -> CifarDataset:
    """CIFAR-100 (or ``name="cifar10"``) from ``root`` (the folder holding ``cifar-100-python/``).

    Never downloads; a missing folder is one ``DataError`` line saying where to put it.

    Example:
        >>> ds = cifar_dataset("data/cifar", train=False, transform=cifar_test_transform())  # doctest: +SKIP
        >>> ds[0]["image"].shape  # doctest: +SKIP
        torch.Size([3, 32, 32])
    """
    return CifarDataset(root, name=name, train=train, transform=transform)


def parse_cifar_spec(spec: str) -> tuple[str, Path, bool]:
    """``"cifar100:ROOT"`` -> ``("cifar100", Path(ROOT), True)``; ``cifar100-test:ROOT`` gives the
    test split. Anything else is a ``DataError``.

    Example:
        >>> parse_cifar_spec("cifar10:data")
        ('cifar10', PosixPath('data'), True)
    """
    head, sep, root = str(spec).partition(":")
    head = head.lower()
    train = not head.endswith("-test")
    name = head[:-5] if head.endswith("-test") else head
    if not sep or name not in _LAYOUT or not root:
        raise DataError(f"expected --data cifar100:ROOT or cifar10:ROOT (the folder holding "
                        f"cifar-100-python/ or cifar-10-batches-py/), got {spec!r}")
    return name, Path(root), train


# ------------------------------------------------------------------------------------------------
# augmentation (plain torch; tensors [3, H, W])

class RandomCrop:
    """Zero-pad by ``padding`` on every side, then crop a random ``size`` x ``size`` window.

    ``x: [3, H, W] -> [3, size, size]``; the offsets come from torch's global RNG (seeded per
    DataLoader worker).

    Example:
        >>> import torch
        >>> RandomCrop(32, padding=4)(torch.ones(3, 32, 32)).shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, size: int, padding: int = 4) -> None:
        self.size = int(size)
        self.padding = int(padding)

    def __call__(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        p = self.padding
        if p:
            x = F.pad(x, (p, p, p, p))
        h, w = x.shape[-2:]
        top = int(torch.randint(0, h - self.size + 1, (1,)))
        left = int(torch.randint(0, w - self.size + 1, (1,)))
        return x[..., top:top + self.size, left:left + self.size]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``: ``x: [3, H, W] -> [3, H, W]``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, x: Any) -> Any:
        import torch

        return x.flip(-1) if float(torch.rand(())) < self.p else x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def cifar_train_transform(mean: Sequence[float] = CIFAR100_MEAN,
                          std: Sequence[float] = CIFAR100_STD) -> Compose:
    """The CRD/standard CIFAR augmentation: random crop 32 with zero padding 4, horizontal flip,
    normalisation (PIL image in, ``FloatTensor[3, 32, 32]`` out).

    Example:
        >>> from PIL import Image
        >>> cifar_train_transform()(Image.new("RGB", (32, 32))).shape
        torch.Size([3, 32, 32])
    """
    return Compose([pil_to_tensor, RandomCrop(32, padding=4), RandomHorizontalFlip(0.5),
                    Normalize(mean, std)])


def cifar_test_transform(mean: Sequence[float] = CIFAR100_MEAN,
                         std: Sequence[float] = CIFAR100_STD) -> Compose:
    """Evaluation transform: ``pil_to_tensor`` and normalisation only."""
    return Compose([pil_to_tensor, Normalize(mean, std)])


def write_cifar(root: str | Path, train: tuple[np.ndarray, Sequence[int]],
                test: tuple[np.ndarray, Sequence[int]], name: str = "cifar100",
                classes: Sequence[str] | None = None) -> Path:
    """Write images in the CIFAR pickle format (for tests and offline experiments).

    ``train``/``test``: ``(uint8 [N, 32, 32, 3], labels)``. Returns the folder written
    (``root/cifar-100-python``). The files do not carry the official checksums, so they are read
    by the pickle reader.

    Example:
        >>> x = np.zeros((2, 32, 32, 3), np.uint8)
        >>> write_cifar("/tmp/fake", (x, [0, 1]), (x, [1, 0])).name  # doctest: +SKIP
        'cifar-100-python'
    """
    folder, train_files, test_files, meta, label_key, names_key, n_classes = _layout(name)
    base = Path(root) / folder
    base.mkdir(parents=True, exist_ok=True)
    classes = list(classes) if classes is not None else [f"class{i}" for i in range(n_classes)]

    def dump(path: Path, obj: dict[str, Any]) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=2)
        os.replace(tmp, path)

    def entry(images: np.ndarray, labels: Sequence[int]) -> dict[str, Any]:
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"images must be uint8 [N, 32, 32, 3], got {images.shape}")
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        out = {"data": data, label_key: [int(v) for v in labels],
               "filenames": [f"img_{i:05d}.png" for i in range(len(images))]}
        if name == "cifar100":
            out["coarse_labels"] = [0] * len(images)
        return out

    for files, (images, labels) in ((train_files, train), (test_files, test)):
        parts = np.array_split(np.arange(len(images)), len(files))
        for fname, idx in zip(files, parts):
            dump(base / fname, entry(np.asarray(images)[idx], [labels[i] for i in idx]))
    dump(base / meta, {names_key: classes, **({"coarse_label_names": ["all"]} if name == "cifar100" else {})})
    return base
