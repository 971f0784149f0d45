"""Plain-torch image transforms, so the core works without torchvision.

Every transform is a small picklable object with a deterministic ``repr`` (the recorder stores
``repr(transform)`` in the provenance, so two runs with the same transform compare equal).
A pipeline takes a PIL image and returns ``FloatTensor[3, H, W]``:

    Compose([Resize(256), CenterCrop(224), pil_to_tensor, Normalize(IMAGENET_MEAN, IMAGENET_STD)])
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def pil_to_tensor(img: Any) -> Any:
    """Convert a PIL image (any mode) to ``FloatTensor[3, H, W]`` with values in [0, 1].

    Example:
        >>> from PIL import Image
        >>> pil_to_tensor(Image.new("RGB", (4, 2), (255, 0, 0))).shape
        torch.Size([3, 2, 4])
    """
    import torch

    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)


class Normalize:
    """Subtract ``mean`` and divide by ``std`` per channel: ``x: [3, H, W]`` or ``[B, 3, H, W]``.

    Example:
        >>> import torch
        >>> Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(torch.ones(3, 1, 1)).flatten().tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std):
            raise ValueError("Normalize: mean and std need the same length")
        if any(s == 0 for s in self.std):
            raise ValueError("Normalize: std must not contain 0")

    def __call__(self, x: Any) -> Any:
        import torch

        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"Normalize(mean={list(self.mean)}, std={list(self.std)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Normalize) and (self.mean, self.std) == (other.mean, other.std)


class Resize:
    """Resize a PIL image: an int resizes the shorter side (keeping the aspect ratio), a pair
    ``(h, w)`` resizes exactly. Bilinear, as torchvision's default.

    Example:
        >>> from PIL import Image
        >>> Resize(8)(Image.new("RGB", (32, 16))).size
        (16, 8)
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = int(size) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        w, h = img.size
        if isinstance(self.size, int):
            if min(w, h) == self.size:
                return img
            if w <= h:
                new = (self.size, max(1, round(h * self.size / w)))
            else:
                new = (max(1, round(w * self.size / h)), self.size)
        else:
            new = (self.size[1], self.size[0])
        return img.resize(new, Image.BILINEAR)

    def __repr__(self) -> str:
        return f"Resize({self.size!r})"


class CenterCrop:
    """Crop the centre ``size`` (int or ``(h, w)``) of a PIL image.

    Example:
        >>> from PIL import Image
        >>> CenterCrop(4)(Image.new("RGB", (10, 6))).size
        (4, 4)
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = (int(size), int(size)) if isinstance(size, (int, np.integer)) \
            else tuple(int(s) for s in size)

    def __call__(self, img: Any) -> Any:
        w, h = img.size
        ch, cw = self.size
        left = int(round((w - cw) / 2.0))
        top = int(round((h - ch) / 2.0))
        return img.crop((left, top, left + cw, top + ch))

    def __repr__(self) -> str:
        return f"CenterCrop({list(self.size)!r})"


class Compose:
    """Apply transforms in order.

    Example:
        >>> from PIL import Image
        >>> t = Compose([pil_to_tensor, Normalize()])
        >>> t(Image.new("RGB", (2, 2))).shape
        torch.Size([3, 2, 2])
    """

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(_name(t) for t in self.transforms) + "])"


def _name(t: Callable[[Any], Any]) -> str:
    """A deterministic description of a transform (functions by name, objects by repr)."""
    import types

    if isinstance(t, (types.FunctionType, types.BuiltinFunctionType)):
        return t.__name__
    return repr(t)


def item_image(img: Any, transform: "Callable[[Any], Any] | None") -> Any:
    """The ``image`` entry of a dataset item: ``transform(img)``, or :func:`pil_to_tensor` without one."""
    return pil_to_tensor(img) if transform is None else transform(img)


def item_index(i: int, n: int) -> int:
    """A dataset index in ``-n .. n-1`` as ``0 .. n-1``; IndexError outside."""
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} images")
    return int(i) % n


def read_image(path: Any, what: str, missing: str, hint: str = "", draft: tuple[int, int] | None = None) -> Any:
    """Decode the image file ``path`` fully (no file handle outlives the call) into a PIL image.

    ``draft``: a JPEG may be decoded directly at a reduced scale of at least this size (PIL's
    ``draft``; thumbnails). A missing file is ``DataError("{path}: {missing}")``, an undecodable one
    ``DataError("{path}: cannot decode {what} (...){hint}")``.
    """
    from PIL import Image, UnidentifiedImageError

    from neurosem.errors import DataError

    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img.load()
    except FileNotFoundError:
        raise DataError(f"{path}: {missing}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot decode {what} ({type(e).__name__}: {e}){hint}") from None
    return img
