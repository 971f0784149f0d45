"""A synthetic Broden-format dataset with exact ground truth, written in seconds.

The set has all six Broden categories: ``color``, ``object``, ``part``, ``material`` (pixel level)
and ``scene``, ``texture`` (image level). Every image is drawn on a grid of ``seg_size × seg_size``
label cells; each cell is a block of ``image_size // seg_size`` identical pixels, so a unit computed
at label resolution can equal a label mask exactly.

What an image shows (all drawn at label resolution, then replicated per block):

- background: the image's *texture*, black (0, 0, 0) marks on white (255, 255, 255):
  ``striped`` (horizontal stripes 2 cells thick), ``dotted`` (one cell every 4), ``chequered``
  (2 × 2-cell squares);
- a floor (the bottom quarter) made of a *material* (``wood``, ``tile`` or ``carpet``, each with
  its own RGB that is not a colour label), except in forests;
- up to four *objects*, one per quadrant of the area above the floor, each a class-specific shape
  and colour: ``ball`` (red disc), ``box`` (blue rectangle), ``tree`` (green triangle), ``house``
  (yellow; parts ``roof`` brown, ``door`` purple, ``window`` pink, and a ``knob`` (white) on the
  door in a second part plane), ``car`` (orange, material ``metal``; parts ``window`` pink, made
  of ``glass``, and two grey ``wheel``\\ s), ``wheel`` (a grey disc on its own);
- the *scene* follows from the objects (:func:`scene_of`): a car makes a ``street``, else a house a
  ``village``, else a tree a ``forest``, else a ``playroom``;
- the *color* plane labels every cell whose RGB is exactly a colour label's RGB (:data:`COLORS`).

``wheel`` is in two categories (object and part; listed in both ``c_object.csv`` and
``c_part.csv``); its primary category is the one with the larger coverage. ``stone`` is a
material that never occurs (frequency 0), as unused labels do in real data. The frequency and
coverage columns hold the true counts: frequency = number of images with the label, coverage = sum
over images of the fraction of the label map the label covers (1 per image-level label).

Example:
    >>> info = write_synthetic_broden("/tmp/synth", n_images=8, image_size=32, seg_size=16)
    >>> info.labels["car"], info.colors["red"]
    (16, (255, 0, 0))
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from neurosem.errors import NeurosemError

CATEGORIES: tuple[str, ...] = ("color", "object", "part", "material", "scene", "texture")
PIXEL_CATEGORIES: tuple[str, ...] = ("color", "object", "part", "material")
IMAGE_CATEGORIES: tuple[str, ...] = ("scene", "texture")
# Column order of index.csv, deliberately not category.csv's order (as in real Broden sets).
INDEX_COLUMNS: tuple[str, ...] = ("color", "object", "material", "part", "scene", "texture")

COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "blue": (0, 0, 255), "brown": (150, 75, 0), "grey": (128, 128, 128),
    "green": (0, 160, 0), "orange": (255, 140, 0), "pink": (255, 105, 180),
    "purple": (128, 0, 128), "red": (255, 0, 0), "white": (255, 255, 255),
    "yellow": (255, 255, 0),
}
OBJECTS: tuple[str, ...] = ("ball", "box", "tree", "house", "car", "wheel")
PARTS: tuple[str, ...] = ("roof", "door", "window", "knob", "wheel")
MATERIALS: tuple[str, ...] = ("wood", "tile", "carpet", "metal", "glass", "stone")
SCENES: tuple[str, ...] = ("street", "village", "forest", "playroom")
TEXTURES: tuple[str, ...] = ("striped", "dotted", "chequered")
CATEGORY_LABELS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS), "object": OBJECTS, "part": PARTS, "material": MATERIALS,
    "scene": SCENES, "texture": TEXTURES,
}
FLOOR_MATERIALS: tuple[str, ...] = ("wood", "tile", "carpet")
# Floor colours: not colour labels, so the color plane is 0 on the floor.
MATERIAL_RGB: dict[str, tuple[int, int, int]] = {
    "wood": (181, 136, 99), "tile": (200, 200, 215), "carpet": (140, 30, 60),
}
OBJECT_RGB: dict[str, str] = {  # object / part -> colour label of its pixels
    "ball": "red", "box": "blue", "tree": "green", "house": "yellow", "car": "orange",
    "wheel": "grey", "roof": "brown", "door": "purple", "window": "pink", "knob": "white",
}
TWO_CATEGORY_LABEL = "wheel"
UNUSED_LABELS: tuple[str, ...] = ("stone",)

# Which objects a scene may hold besides the one that defines it.
_SCENE_EXTRAS: dict[str, tuple[str, ...]] = {
    "street": ("house", "tree", "ball", "box"),
    "village": ("tree", "ball", "box"),
    "forest": ("ball",),
    "playroom": ("ball", "box", "wheel"),
}


def scene_of(objects: Sequence[str]) -> str:
    """The scene an image shows, given its objects: car → street, house → village, tree →
    forest, otherwise playroom.

    Example:
        >>> scene_of(["tree", "car"])
        'street'
    """
    for obj, scene in (("car", "street"), ("house", "village"), ("tree", "forest")):
        if obj in objects:
            return scene
    return "playroom"


def texture_marks(texture: str, seg_size: int) -> np.ndarray:
    """Where the background is black: ``bool [seg_size, seg_size]`` (white elsewhere)."""
    r, c = np.mgrid[0:seg_size, 0:seg_size]
    if texture == "striped":
        return (r // 2) % 2 == 1
    if texture == "dotted":
        return (r % 4 == 1) & (c % 4 == 1)
    if texture == "chequered":
        return ((r // 2) + (c // 2)) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}")


@dataclass(frozen=True)
class SyntheticObject:
    """One drawn object: its class and bounding box in label cells (top, left, height, width)."""

    name: str
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class SyntheticImage:
    """The drawing parameters of one image (everything needed to redraw it exactly)."""

    index: int
    id: str              # image path relative to images/, as in index.csv
    split: str
    scene: str
    texture: str
    floor: str | None    # floor material, None for forests
    objects: tuple[SyntheticObject, ...]


@dataclass
class Drawing:
    """One image at label resolution: ``rgb: uint8 [s, s, 3]`` and the label planes
    (``int64 [s, s]`` global label numbers, 0 = none) per pixel category."""

    rgb: np.ndarray
    planes: dict[str, list[np.ndarray]]


@dataclass
class SyntheticInfo:
    """Exact ground truth of a written synthetic set.

    Attributes:
        root: the dataset directory.
        labels: global label number by name (``labels["car"]``).
        label_names: names by global number; ``label_names[0] == "-"``.
        label_categories: the categories that list each label (``["object", "part"]`` for wheel).
        colors: the RGB of each colour label.
        images: drawing parameters per image, in index.csv order.
        frequency, coverage: ``[category][label name]`` true counts (images with the label;
            sum over images of the covered fraction of the label map).
        primary: the primary category of each label (largest coverage; ties go to the later
            category in ``categories``, as in NetDissect-Lite).
    """

    root: Path
    n_images: int
    image_size: int
    seg_size: int
    seed: int
    categories: list[str]
    pixel_categories: list[str]
    image_categories: list[str]
    labels: dict[str, int]
    label_names: list[str]
    label_categories: dict[str, list[str]]
    colors: dict[str, tuple[int, int, int]]
    material_rgb: dict[str, tuple[int, int, int]]
    images: list[SyntheticImage]
    frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    coverage: dict[str, dict[str, float]] = field(default_factory=dict)
    primary: dict[str, str] = field(default_factory=dict)
    two_category_label: str = TWO_CATEGORY_LABEL
    unused_labels: tuple[str, ...] = UNUSED_LABELS

    @property
    def block(self) -> int:
        """Pixels per label cell along each side (``image_size // seg_size``)."""
        return self.image_size // self.seg_size

    @property
    def image_ids(self) -> list[str]:
        return [im.id for im in self.images]

    def draw(self, i: int) -> Drawing:
        """Redraw image ``i`` at label resolution."""
        return draw_image(self.images[i], self.seg_size, self.labels)

    def masks(self, i: int) -> dict[str, list[np.ndarray]]:
        """Label planes of image ``i`` per pixel category: ``int64 [seg_size, seg_size]`` each,
        in the order of the category's entries in index.csv (only non-empty planes)."""
        return self.draw(i).planes

    def image_labels(self, i: int) -> dict[str, list[int]]:
        """Image-level label numbers of image ``i``: ``{"scene": [n], "texture": [n]}``."""
        im = self.images[i]
        return {"scene": [self.labels[im.scene]], "texture": [self.labels[im.texture]]}

    def render(self, i: int) -> np.ndarray:
        """The stored image ``i``: ``uint8 [image_size, image_size, 3]``."""
        rgb = self.draw(i).rgb
        b = self.block
        return np.repeat(np.repeat(rgb, b, axis=0), b, axis=1)

    def label_mask(self, i: int, name: str) -> np.ndarray:
        """``bool [seg_size, seg_size]``: where label ``name`` is in image ``i`` (any plane; all
        cells for an image-level label)."""
        number = self.labels[name]
        s = self.seg_size
        if number in sum(self.image_labels(i).values(), []):
            return np.ones((s, s), dtype=bool)
        out = np.zeros((s, s), dtype=bool)
        for planes in self.masks(i).values():
            for p in planes:
                out |= p == number
        return out


def _number_labels() -> tuple[dict[str, int], dict[str, list[str]]]:
    """Global label numbers (1.. in category order, a name shared by categories numbered once)."""
    labels: dict[str, int] = {}
    cats: dict[str, list[str]] = {}
    for cat in CATEGORIES:
        for name in CATEGORY_LABELS[cat]:
            if name not in labels:
                labels[name] = len(labels) + 1
            cats.setdefault(name, []).append(cat)
    return labels, cats


def _disc(h: int, w: int) -> np.ndarray:
    """``bool [h, w]``: the cells whose centre lies in the ellipse inscribed in an h × w box."""
    r, c = np.mgrid[0:h, 0:w]
    return ((r + 0.5 - h / 2) / (h / 2)) ** 2 + ((c + 0.5 - w / 2) / (w / 2)) ** 2 <= 1.0


def _triangle(h: int, w: int) -> np.ndarray:
    """``bool [h, w]``: a triangle with its apex on top, as wide as the box at the bottom."""
    r, c = np.mgrid[0:h, 0:w]
    return np.abs(c + 0.5 - w / 2) <= (r + 1) / h * (w / 2)


def draw_image(im: SyntheticImage, s: int, labels: dict[str, int]) -> Drawing:
    """Draw one image at label resolution (see the module docstring for the rules)."""
    rgb = np.empty((s, s, 3), dtype=np.uint8)
    rgb[:] = COLORS["white"]
    rgb[texture_marks(im.texture, s)] = COLORS["black"]
    obj = np.zeros((s, s), dtype=np.int64)
    part1 = np.zeros((s, s), dtype=np.int64)
    part2 = np.zeros((s, s), dtype=np.int64)
    mat = np.zeros((s, s), dtype=np.int64)
    if im.floor is not None:
        f = s // 4
        rgb[s - f:] = MATERIAL_RGB[im.floor]
        mat[s - f:] = labels[im.floor]

    def paint(name: str, y0: int, x0: int, mask: np.ndarray, *planes: np.ndarray,
              label: str | None = None) -> None:
        h, w = mask.shape
        region = (slice(y0, y0 + h), slice(x0, x0 + w))
        rgb[region][mask] = COLORS[OBJECT_RGB[name]]
        for plane in planes:
            plane[region][mask] = labels[label or name]

    for o in im.objects:
        y0, x0, h, w = o.top, o.left, o.height, o.width
        if o.name in ("ball", "wheel"):
            paint(o.name, y0, x0, _disc(h, w), obj)
        elif o.name == "box":
            paint("box", y0, x0, np.ones((h, w), bool), obj)
        elif o.name == "tree":
            paint("tree", y0, x0, _triangle(h, w), obj)
        elif o.name == "house":
            paint("house", y0, x0, np.ones((h, w), bool), obj)
            rh = max(1, h // 3)
            bh = h - rh
            paint("roof", y0, x0, np.ones((rh, w), bool), part1)
            dw = max(1, w // 4)
            dh = max(2, (2 * bh) // 3)
            dy, dx = y0 + h - dh, x0 + w - 1 - dw
            paint("door", dy, dx, np.ones((dh, dw), bool), part1)
            ww = max(1, w // 4)
            wh = max(1, bh // 3)
            paint("window", y0 + rh + (1 if bh >= 4 else 0), x0 + 1, np.ones((wh, ww), bool),
                  part1)
            k = max(1, min(dw, dh) // 3)
            paint("knob", dy + dh // 2, dx + dw - k, np.ones((k, k), bool), part2)
        elif o.name == "car":
            ws = max(1, min(h, w) // 4)
            th = max(1, (h - ws) // 2)
            cx0, cx1 = x0 + w // 4, x0 + w - w // 4
            paint("car", y0, cx0, np.ones((th, cx1 - cx0), bool), obj)
            paint("car", y0 + th, x0, np.ones((h - ws - th, w), bool), obj)
            mat[y0 + th:y0 + h - ws, x0:x0 + w] = labels["metal"]
            mat[y0:y0 + th, cx0:cx1] = labels["metal"]
            wy0, wy1 = (y0 + 1, y0 + th - 1) if th >= 3 else (y0, y0 + th)
            wx0, wx1 = (cx0 + 1, cx1 - 1) if cx1 - cx0 >= 3 else (cx0, cx1)
            paint("window", wy0, wx0, np.ones((wy1 - wy0, wx1 - wx0), bool), part1)
            mat[wy0:wy1, wx0:wx1] = labels["glass"]
            for wx in (x0 + 1, x0 + w - 1 - ws):
                paint("wheel", y0 + h - ws, wx, np.ones((ws, ws), bool), part1)
                obj[y0 + h - ws:y0 + h, wx:wx + ws] = labels["car"]
        else:  # pragma: no cover - the generator only makes the classes above
            raise ValueError(f"unknown object {o.name!r}")

    color = np.zeros((s, s), dtype=np.int64)
    for name, value in COLORS.items():
        color[np.all(rgb == np.array(value, dtype=np.uint8), axis=-1)] = labels[name]
    planes: dict[str, list[np.ndarray]] = {"color": [color]}
    planes["object"] = [obj] if obj.any() else []
    planes["part"] = [p for p in (part1, part2) if p.any()]
    planes["material"] = [mat] if mat.any() else []
    return Drawing(rgb=rgb, planes=planes)


def _sample_image(rng: np.random.Generator, index: int, s: int) -> SyntheticImage:
    """Draw the parameters of one image."""
    scene = SCENES[int(rng.integers(len(SCENES)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    extras = _SCENE_EXTRAS[scene]
    if scene == "street":
        names = ["car"]
    elif scene == "village":
        names = ["house"]
    elif scene == "forest":
        names = ["tree"] * int(rng.integers(2, 4))
    else:
        names = []
    n_extra = int(rng.integers(1 if not names else 0, min(len(extras), 4 - len(names)) + 1))
    names += [str(x) for x in rng.choice(extras, size=n_extra, replace=False)]
    assert scene_of(names) == scene
    floor = None if scene == "forest" else FLOOR_MATERIALS[int(rng.integers(3))]
    slot_h, slot_w = (s - s // 4) // 2, s // 2
    slots = rng.permutation(4)[:len(names)]
    objects = []
    for name, slot in zip(names, slots):
        sy, sx = (int(slot) // 2) * slot_h, (int(slot) % 2) * slot_w
        if name in ("ball", "wheel"):
            m = min(slot_h, slot_w)
            lo = max(2, m // 3) if name == "wheel" else max(3, math.ceil(0.6 * m))
            hi = max(lo, m // 2 + 1) if name == "wheel" else m
            h = w = int(rng.integers(lo, hi + 1))
        else:
            h = int(rng.integers(max(4, math.ceil(0.6 * slot_h)), slot_h + 1))
            w = int(rng.integers(max(4, math.ceil(0.6 * slot_w)), slot_w + 1))
        top = sy + int(rng.integers(0, slot_h - h + 1))
        left = sx + int(rng.integers(0, slot_w - w + 1))
        objects.append(SyntheticObject(name, top, left, h, w))
    return SyntheticImage(
        index=index, id=f"synthetic/img_{index:05d}.png", split="val" if index % 4 == 3 else "train",
        scene=scene, texture=texture, floor=floor, objects=tuple(objects))


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, compress_level=1)


def _encode_labels(plane: np.ndarray) -> np.ndarray:
    """Global label numbers ``[h, w]`` -> Broden's RGB encoding (R + 256·G) ``uint8 [h, w, 3]``."""
    out = np.zeros(plane.shape + (3,), dtype=np.uint8)
    out[..., 0] = plane % 256
    out[..., 1] = plane // 256
    return out


def _fmt(x: float) -> str:
    return f"{x:.6f}"


def write_synthetic_broden(root: str | Path, n_images: int = 48, image_size: int = 64,
                           seg_size: int = 32, seed: int = 0) -> SyntheticInfo:
    """Write a Broden-format dataset with exact ground truth to ``root``.

    Deterministic by ``seed``: the same arguments write the same bytes. Existing files of the same
    names are overwritten.

    Args:
        root: the directory to write (created).
        n_images: number of images; every 4th image is in the ``val`` split, the rest ``train``.
        image_size: side of the square images in pixels.
        seg_size: side of the label maps; must divide ``image_size`` and be at least 16.
        seed: the random seed.

    Returns:
        SyntheticInfo: label numbers, drawing rules, per-image parameters and true statistics.

    Example:
        >>> info = write_synthetic_broden("/tmp/synth", n_images=8, image_size=32, seg_size=16)
        >>> info.masks(0)["color"][0].shape
        (16, 16)
    """
    if seg_size < 16 or image_size % seg_size != 0:
        raise NeurosemError(
            f"synthetic Broden needs seg_size >= 16 dividing image_size; got image_size="
            f"{image_size}, seg_size={seg_size} (try image_size=64, seg_size=32)")
    if n_images < 1:
        raise NeurosemError(f"synthetic Broden needs n_images >= 1, got {n_images}")
    root = Path(root)
    img_dir = root / "images" / "synthetic"
    img_dir.mkdir(parents=True, exist_ok=True)
    labels, label_cats = _number_labels()
    names = ["-"] + sorted(labels, key=labels.get)
    rng = np.random.default_rng(seed)
    s, b = seg_size, image_size // seg_size
    images = [_sample_image(rng, i, s) for i in range(n_images)]

    freq = {c: {n: 0 for n in CATEGORY_LABELS[c]} for c in CATEGORIES}
    cov = {c: {n: 0.0 for n in CATEGORY_LABELS[c]} for c in CATEGORIES}
    cat_freq = {c: 0 for c in CATEGORIES}
    any_freq = {n: 0 for n in labels}
    rows = []
    for im in images:
        d = draw_image(im, s, labels)
        _save_png(root / "images" / im.id, np.repeat(np.repeat(d.rgb, b, axis=0), b, axis=1))
        stem = im.id[:-len(".png")]
        entries: dict[str, list[str]] = {}
        present: set[str] = set()
        for cat in PIXEL_CATEGORIES:
            planes = d.planes[cat]
            files = []
            for k, plane in enumerate(planes):
                fn = f"{stem}_{cat}.png" if len(planes) == 1 and cat != "part" else \
                    f"{stem}_{cat}_{k + 1}.png"
                _save_png(root / "images" / fn, _encode_labels(plane))
                files.append(fn)
            entries[cat] = files
            counts = np.bincount(np.concatenate([p.ravel() for p in planes]), minlength=len(names)) \
                if planes else np.zeros(len(names), dtype=np.int64)
            hit = False
            for n, c in enumerate(counts[1:], start=1):
                if c:
                    freq[cat][names[n]] += 1
                    cov[cat][names[n]] += c / (s * s)
                    present.add(names[n])
                    hit = True
            cat_freq[cat] += hit
        for cat, name in (("scene", im.scene), ("texture", im.texture)):
            entries[cat] = [str(labels[name])]
            freq[cat][name] += 1
            cov[cat][name] += 1.0
            present.add(name)
            cat_freq[cat] += 1
        for n in present:
            any_freq[n] += 1
        rows.append([im.id, im.split, image_size, image_size, s, s]
                    + [";".join(entries[c]) for c in INDEX_COLUMNS])

    with open(root / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image", "split", "ih", "iw", "sh", "sw", *INDEX_COLUMNS])
        w.writerows(rows)
    with open(root / "category.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["name", "first", "last", "count", "frequency"])
        for cat in CATEGORIES:
            nums = [labels[n] for n in CATEGORY_LABELS[cat]]
            w.writerow([cat, min(nums), max(nums), len(nums), cat_freq[cat]])
    with open(root / "label.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for name in names[1:]:
            cats = sorted(label_cats[name], key=lambda c: -freq[c][name])
            catfield = ";".join(f"{c}({freq[c][name]})" for c in cats)
            total_cov = sum(cov[c][name] for c in label_cats[name])
            w.writerow([labels[name], name, catfield, any_freq[name], _fmt(total_cov), ""])
    for cat in CATEGORIES:
        with open(root / f"c_{cat}.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["code", "number", "name", "frequency", "coverage"])
            for code, name in enumerate(CATEGORY_LABELS[cat], start=1):
                w.writerow([code, labels[name], name, freq[cat][name], _fmt(cov[cat][name])])

    primary = {}
    for name in names[1:]:
        # largest coverage; ties go to the later category (NetDissect-Lite's max over (cov, index))
        best = max((round(cov[c][name], 6), CATEGORIES.index(c)) for c in label_cats[name])
        primary[name] = CATEGORIES[best[1]]
    return SyntheticInfo(
        root=root, n_images=n_images, image_size=image_size, seg_size=seg_size, seed=seed,
        categories=list(CATEGORIES), pixel_categories=list(PIXEL_CATEGORIES),
        image_categories=list(IMAGE_CATEGORIES), labels=dict(labels), label_names=names,
        label_categories={k: list(v) for k, v in label_cats.items()}, colors=dict(COLORS),
        material_rgb=dict(MATERIAL_RGB), images=images, frequency=freq, coverage=cov,
        primary=primary)


def synth(out: str | Path, n_images: int = 384, image_size: int = 64, seg_size: int = 32, seed: int = 0,
          force: bool = False) -> str:
    """``neurosem synth OUT``: write the synthetic set into an empty (or new) folder; returns what to print.

    The defaults are the quickstart's. A folder that already holds files is refused unless
    ``force`` (the set's files are then overwritten; other files stay).

    Example:
        >>> print(synth("data/synthetic", n_images=8))  # doctest: +SKIP
        synthetic Broden set: data/synthetic (8 images of 64x64, label maps 32x32, 34 labels in 6 categories, seed 0)
        next: neurosem dissect MODEL --broden data/synthetic
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise NeurosemError(f"{root} is a file: give a folder for the synthetic set")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise NeurosemError(f"{root} is not empty: choose a new folder, or pass --force to overwrite the "
                            "synthetic set's files in it")
    info = write_synthetic_broden(root, n_images=n_images, image_size=image_size, seg_size=seg_size, seed=seed)
    return (f"synthetic Broden set: {root} ({info.n_images} images of {image_size}x{image_size}, label maps "
            f"{seg_size}x{seg_size}, {len(info.labels)} labels in {len(info.categories)} categories, seed {seed})\n"
            f"next: neurosem dissect MODEL --broden {root}")
