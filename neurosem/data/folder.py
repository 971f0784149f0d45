"""A plain folder of images (searched recursively) as a torch dataset."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from neurosem.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                                     ".tiff", ".ppm", ".pgm")
_HINT = "pass a folder of images, a Broden directory (with index.csv) or cifar100:ROOT"


def list_images(root: str | Path) -> list[str]:
    """Image files under ``root`` (recursively; hidden files and folders skipped), as sorted
    posix paths relative to ``root``.

    Example:
        >>> list_images("photos")  # doctest: +SKIP
        ['a.jpg', 'sub/b.png']
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; {_HINT}")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; {_HINT}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append((rel / f).as_posix())
    return sorted(found)


def folder_fingerprint(root: str | Path) -> str:
    """A hash of the relative paths and sizes of the images under ``root`` (contents not read)."""
    root = Path(root).expanduser()
    h = hashlib.sha256()
    for rel in list_images(root):
        h.update(rel.encode() + b"\0" + str((root / rel).stat().st_size).encode() + b"\n")
    return h.hexdigest()[:16]


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively, sorted by relative path).

    Args:
        root: the folder.
        transform: called on the PIL RGB image; must return ``FloatTensor[3, H, W]``
            (default :func:`~neurosem.data.transforms.pil_to_tensor`). Images of different sizes
            need a resizing transform to be batched.

    Items: ``{"image": FloatTensor[3, H, W], "index": int, "id": str}`` with ``id`` the path
    relative to ``root``.

    Example:
        >>> ds = ImageFolderDataset("photos")  # doctest: +SKIP
        >>> ds[0]["id"]  # doctest: +SKIP
        'a.jpg'
    """

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        self.image_ids: list[str] = list_images(self.root)
        if not self.image_ids:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}; "
                            f"{_HINT}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def fingerprint(self) -> str:
        """See :func:`folder_fingerprint`."""
        return folder_fingerprint(self.root)

    def load_image(self, i: int) -> Any:
        """The PIL RGB image of item ``i``."""
        from neurosem.data.transforms import read_image

        img = read_image(self.root / self.image_ids[i], "image", "image disappeared since the folder was listed",
                         "; remove it or replace it")
        return img.convert("RGB") if img.mode != "RGB" else img

    def __getitem__(self, i: int) -> dict[str, Any]:
        from neurosem.data.transforms import item_image, item_index

        i = item_index(i, len(self))
        image = item_image(self.load_image(i), self.transform)
        return {"image": image, "index": i, "id": self.image_ids[i]}

    def __repr__(self) -> str:
        return f"ImageFolderDataset({str(self.root)!r}, {len(self)} images)"
