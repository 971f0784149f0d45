"""Reader for the Broden dataset layout (NetDissect's broden1_224 / broden1_227 / broden1_384).

On disk (see DESIGN.md, "Broden on disk")::

    index.csv      image,split,ih,iw,sh,sw,<one column per category>
                   entries joined by ';'; pixel categories hold label PNG names (relative to
                   images/), image-level categories (scene, texture) hold label numbers
    label.csv      number,name,category,frequency,coverage,syns   (global label numbers)
    category.csv   name,first,last,count,frequency
    c_<cat>.csv    code,number,name,frequency,coverage
    images/        the images and the label PNGs; label = R + 256·G

Rules, as NetDissect-Lite's ``loadseg.SegmentationData``:

- categories are taken in category.csv's order (a ``categories`` selection keeps that order);
- the primary category of a label is the selected category whose ``c_<cat>.csv`` gives it the
  largest ``coverage``; ties go to the later category (NetDissect-Lite takes the max over
  ``(coverage, category index)``). Labels no selected category lists get -1;
- a category is image-level when its index.csv entries are label numbers, pixel-level when they
  are PNG names. A number entry is an image-level label wherever it appears.

Files are read only inside the Broden directory: an image or label PNG entry that is absolute or
climbs out with ``..`` is refused when index.csv is read, one that reaches outside through a
symlink when it is opened (``images/`` itself may be a symlink). Label numbers may exceed the
number of label.csv rows by at most :data:`LABEL_NUMBER_SLACK` (arrays are sized by the largest).

One deliberate difference: images that have no data in the selected categories are kept (not
filtered as NetDissect-Lite does), so dataset positions stay aligned with stored activations.

csv-level problems are found in ``__init__``; image and label-PNG problems when an item is read
(PNGs are not decoded up front). Each is a one-line :class:`~neurosem.errors.DataError`.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from neurosem.errors import DataError

INDEX_FIXED_COLUMNS: tuple[str, ...] = ("image", "split", "ih", "iw", "sh", "sw")
#: label.csv numbers may exceed the number of rows by at most this much (arrays are sized by the
#: largest number; NetDissect's Broden numbers its labels densely from 1).
LABEL_NUMBER_SLACK: int = 4096
_HINT = "pass the Broden directory that holds index.csv, label.csv, category.csv and images/"


@dataclass(frozen=True)
class _Item:
    """One index.csv row, parsed: image path, label PNG names, image-level label numbers."""

    image: str
    row: int                      # line number in index.csv (header = line 1)
    planes: tuple[str, ...]
    image_labels: tuple[int, ...]
    plane_categories: tuple[int, ...] = ()   # index into the dataset's categories, per plane


def resolve_broden_root(root: str | Path, image_size: int | None = None) -> Path:
    """The Broden directory for ``root``: ``root`` itself when it holds ``index.csv``, else its
    one child directory that does (``broden1_<image_size>`` when ``image_size`` is given).

    Example:
        >>> resolve_broden_root("dataset", image_size=224)  # doctest: +SKIP
        PosixPath('dataset/broden1_224')
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Broden directory {root} does not exist; {_HINT}")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; {_HINT}")
    if (root / "index.csv").is_file():
        return root
    children = sorted(p for p in root.iterdir() if p.is_dir() and (p / "index.csv").is_file())
    if image_size is not None:
        match = [p for p in children if p.name.endswith(f"_{image_size}")]
        if len(match) == 1:
            return match[0]
    elif len(children) == 1:
        return children[0]
    if children:
        names = ", ".join(p.name for p in children)
        raise DataError(f"{root} holds several Broden sets ({names}); pass one of them"
                        + (f" (none is for image size {image_size})" if image_size else ""))
    raise DataError(f"{root / 'index.csv'}: file missing; {_HINT}")


def broden_fingerprint(root: str | Path) -> str:
    """A hash of the Broden metadata: index.csv, label.csv, category.csv and the c_<cat>.csv
    files category.csv names (images are not read). Independent of the directory's location.

    Example:
        >>> broden_fingerprint("dataset/broden1_224")  # doctest: +SKIP
        '3f1c2a...'
    """
    root = resolve_broden_root(root)
    h = hashlib.sha256()
    files = ["index.csv", "label.csv", "category.csv"]
    try:
        _, cat_rows = _read_csv(root / "category.csv", ("name",))
        files += [f"c_{r['name']}.csv" for r in cat_rows]
    except DataError:
        pass
    for name in files:
        path = root / name
        h.update(name.encode() + b"\0")
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            h.update(b"<missing>")
    return h.hexdigest()[:16]


def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Read a csv with a header; check the required columns. Rows are dicts of stripped str."""
    if not path.is_file():
        raise DataError(f"{path}: file missing; {_HINT}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: tolerate a byte-order mark
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable csv file ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: column(s) {', '.join(missing)} missing (header: "
                        f"{','.join(header) or 'empty'})")
    return header, rows


def _int(value: str, path: Path, line: int, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path} line {line}: column {column} should be an integer, got "
                        f"{value!r}") from None


def _float(value: str, path: Path, line: int, column: str) -> float:
    if value == "":
        return 0.0
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{path} line {line}: column {column} should be a number, got "
                        f"{value!r}") from None


class BrodenDataset:
    """A Broden directory as a map-style dataset (for torch's DataLoader; torch is imported only by
    ``__getitem__``).

    Args:
        root: the Broden directory (holding index.csv), or a folder holding one or several
            ``broden1_<size>`` directories (then ``image_size`` picks one).
        split: ``"train"``, ``"val"`` or None for all images.
        categories: categories to read (default: all of category.csv), kept in category.csv order.
        transform: called on the PIL RGB image; must return ``FloatTensor[3, H, W]``
            (default :func:`~neurosem.data.transforms.pil_to_tensor`).
        with_labels: also read the label planes and image-level labels.
        image_size: the expected image side (picks ``broden1_<image_size>`` under ``root``;
            a set stored at another size is a DataError).

    Items are dicts: ``image: FloatTensor[3, ih, iw]``, ``index: int`` (position in this
    dataset), ``id: str`` (the image path in index.csv) and, with labels,
    ``seg: LongTensor[max_planes, sh, sw]`` (pixel-level label planes of the selected categories
    in category order, global label numbers, 0 = none, zero-padded) and
    ``image_labels: LongTensor[max_image_labels]`` (image-level label numbers, 0-padded).

    Example:
        >>> ds = BrodenDataset("dataset/broden1_224", categories=["object", "scene"])  # doctest: +SKIP
        >>> ds[0]["seg"].shape  # doctest: +SKIP
        torch.Size([4, 112, 112])
    """

    def __init__(self, root: str | Path, split: str | None = None,
                 categories: Sequence[str] | None = None,
                 transform: Callable[[Any], Any] | None = None, with_labels: bool = True,
                 image_size: int | None = None) -> None:
        self.root = resolve_broden_root(root, image_size)
        # files may lie under the directory or under images/ (which may be a symlink to a shared disk)
        self._real_bases: tuple[str, ...] = tuple(sorted({os.path.realpath(self.root),
                                                          os.path.realpath(self.root / "images")}))
        self.split = split
        self.transform = transform
        self.with_labels = with_labels
        self._fingerprint = broden_fingerprint(self.root)
        self._read_categories(categories)
        self._read_labels()
        self._read_category_files()
        self._read_index(split)
        if image_size is not None and self.image_size != (image_size, image_size):
            ih, iw = self.image_size
            raise DataError(f"{self.root}: images are {ih}x{iw}, not {image_size}x{image_size}; "
                            f"pass the broden1_{image_size} directory or image_size={ih}")

    # ------------------------------------------------------------------ csv files
    def _read_categories(self, categories: Sequence[str] | None) -> None:
        path = self.root / "category.csv"
        _, rows = _read_csv(path, ("name",))
        all_cats = [r["name"] for r in rows if r["name"]]
        if not all_cats:
            raise DataError(f"{path}: no categories listed; {_HINT}")
        self.all_categories: list[str] = all_cats
        if categories is None:
            self.categories: list[str] = list(all_cats)
        else:
            wanted = [categories] if isinstance(categories, str) else list(categories)
            unknown = [c for c in wanted if c not in all_cats]
            if unknown:
                raise DataError(f"{path}: no category {', '.join(map(repr, unknown))}; "
                                f"choose from {', '.join(all_cats)}")
            if not wanted:
                raise DataError(f"no categories selected; choose from {', '.join(all_cats)}")
            self.categories = [c for c in all_cats if c in wanted]

    def _read_labels(self) -> None:
        path = self.root / "label.csv"
        _, rows = _read_csv(path, ("number", "name"))
        numbers: dict[int, dict[str, str]] = {}
        for line, r in enumerate(rows, start=2):
            n = _int(r["number"], path, line, "number")
            if n < 0:
                raise DataError(f"{path} line {line}: negative label number {n}")
            if n in numbers:
                raise DataError(f"{path} line {line}: label number {n} listed twice")
            numbers[n] = r
            r["_line"] = str(line)
        if not numbers:
            raise DataError(f"{path}: no labels listed; {_HINT}")
        top = max(numbers)
        limit = len(numbers) + LABEL_NUMBER_SLACK
        if top > limit:
            raise DataError(f"{path} line {numbers[top]['_line']}: label number {top} is far above the "
                            f"{len(numbers)} labels listed (at most {limit} is accepted: tables are sized "
                            f"by the largest number); number the labels from 1 without large gaps")
        n_labels = top + 1
        self.n_labels: int = n_labels
        self.label_names: list[str] = [""] * n_labels
        self.label_names[0] = "-"
        self.label_frequency: np.ndarray = np.zeros(n_labels, dtype=np.int64)
        self._known = np.zeros(n_labels, dtype=bool)
        self._known[0] = True
        for n, r in numbers.items():
            self.label_names[n] = r["name"] or ("-" if n == 0 else "")
            self._known[n] = True
            if r.get("frequency"):
                self.label_frequency[n] = _int(r["frequency"], path, int(r["_line"]), "frequency")

    def _read_category_files(self) -> None:
        k = len(self.categories)
        self.label_coverage: np.ndarray = np.zeros((self.n_labels, k), dtype=np.float64)
        self.label_in_category: np.ndarray = np.zeros((self.n_labels, k), dtype=bool)
        for j, cat in enumerate(self.categories):
            path = self.root / f"c_{cat}.csv"
            if not path.is_file():
                raise DataError(f"{path}: file missing (category.csv lists {cat!r}); restore it "
                                f"or select the other categories")
            _, rows = _read_csv(path, ("number",))
            for line, r in enumerate(rows, start=2):
                n = _int(r["number"], path, line, "number")
                if not (0 < n < self.n_labels and self._known[n]):
                    raise DataError(f"{path} line {line}: label {n} is not in label.csv")
                self.label_in_category[n, j] = True
                self.label_coverage[n, j] = _float(r.get("coverage", ""), path, line, "coverage")
        primary = np.full(self.n_labels, -1, dtype=np.int64)
        for n in np.flatnonzero(self.label_in_category.any(axis=1)):
            cov = self.label_coverage[n]
            # NetDissect-Lite: max over (coverage, category index) among listing categories
            primary[n] = max((cov[j], j) for j in np.flatnonzero(self.label_in_category[n]))[1]
        self.primary_category: np.ndarray = primary

    def _read_index(self, split: str | None) -> None:
        path = self.root / "index.csv"
        header, rows = _read_csv(path, INDEX_FIXED_COLUMNS)
        missing = [c for c in self.categories if c not in header]
        if missing:
            raise DataError(f"{path}: no column for category {', '.join(missing)} (listed in "
                            f"category.csv); select categories present in index.csv")
        if not rows:
            raise DataError(f"{path}: no images listed; {_HINT}")
        splits = sorted({r["split"] for r in rows})
        if split is not None and split not in splits:
            raise DataError(f"{path}: no images in split {split!r}; splits: {', '.join(splits)}")
        # image-level vs pixel-level, judged on all rows so the split does not change it
        n_numbers = dict.fromkeys(self.categories, 0)
        n_files = dict.fromkeys(self.categories, 0)
        items: list[_Item] = []
        sizes: dict[tuple[int, int, int, int], tuple[int, int]] = {}  # size -> (count, first line)
        for line, r in enumerate(rows, start=2):
            planes: list[str] = []
            plane_cats: list[int] = []
            labels: list[int] = []
            for cat_index, cat in enumerate(self.categories):
                for entry in r.get(cat, "").split(";"):
                    entry = entry.strip()
                    if not entry:
                        continue
                    if entry.isdigit():
                        n = int(entry)
                        if not (0 < n < self.n_labels and self._known[n]):
                            raise DataError(f"{path} line {line} ({r['image']}), column {cat}: "
                                            f"label {n} is not in label.csv")
                        labels.append(n)
                        n_numbers[cat] += 1
                    else:
                        self._check_inside(entry, path, line, r["image"], cat)
                        planes.append(entry)
                        plane_cats.append(cat_index)
                        n_files[cat] += 1
            if split is not None and r["split"] != split:
                continue
            if not r["image"]:
                raise DataError(f"{path} line {line}: empty image column")
            self._check_inside(r["image"], path, line, r["image"], "image")
            size = tuple(_int(r[c], path, line, c) for c in ("ih", "iw", "sh", "sw"))
            count, first = sizes.get(size, (0, line))
            sizes[size] = (count + 1, first)
            items.append(_Item(r["image"], line, tuple(planes), tuple(labels), tuple(plane_cats)))
        if len(sizes) > 1:
            desc = "; ".join(f"{ih}x{iw} images with {sh}x{sw} labels on {cnt} row"
                             f"{'s' if cnt != 1 else ''} from line {first}" for (ih, iw, sh, sw), (cnt, first) in sizes.items())
            raise DataError(f"{path}: images of different sizes ({desc}); a Broden set has one "
                            f"size - pass one broden1_<size> directory")
        (ih, iw, sh, sw), = sizes
        self._items: list[_Item] = items
        self.image_size: tuple[int, int] = (ih, iw)
        self.seg_size: tuple[int, int] = (sh, sw)
        self.image_categories: list[str] = [
            c for c in self.categories
            if n_numbers[c] > n_files[c] or (n_numbers[c] == n_files[c] == 0
                                             and c in ("scene", "texture"))]
        self.pixel_categories: list[str] = [c for c in self.categories
                                            if c not in self.image_categories]
        self.max_planes: int = max(len(it.planes) for it in items)
        self.max_image_labels: int = max(len(it.image_labels) for it in items)
        self.image_ids: list[str] = [it.image for it in items]

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self._items)

    def fingerprint(self) -> str:
        """:func:`broden_fingerprint` of the files as they were when the dataset was opened (split
        and category selection do not change it)."""
        return self._fingerprint

    def _check_inside(self, rel: str, index: Path, line: int, image: str, column: str) -> None:
        """Refuse an index.csv entry that is absolute or climbs out of the Broden directory."""
        norm = os.path.normpath(os.path.join("images", rel))
        if os.path.isabs(rel) or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
            raise DataError(f"{index} line {line} ({image}), column {column}: {rel!r} points outside "
                            f"the Broden directory {self.root}; entries are paths relative to its images/")

    def _open(self, rel: str, what: str, line: int, draft: tuple[int, int] | None = None) -> Any:
        from neurosem.data.transforms import read_image

        path = self.root / "images" / rel
        real = os.path.realpath(path)
        if not any(real == b or real.startswith(b.rstrip(os.sep) + os.sep) for b in self._real_bases):
            raise DataError(f"{path}: {what} resolves to {real}, outside the Broden directory {self.root} "
                            f"(listed in index.csv line {line}); keep the files inside it (no symlinks out)")
        return read_image(path, what, f"{what} missing (listed in index.csv line {line})", draft=draft)

    def load_image(self, i: int, draft: tuple[int, int] | None = None) -> Any:
        """The PIL RGB image of item ``i`` (no transform); with ``draft``, a JPEG may come at a
        reduced scale of at least that size (for thumbnails)."""
        it = self._items[i]
        img = self._open(it.image, "image", it.row, draft=draft)
        if img.mode != "RGB":
            img = img.convert("RGB")
        ih, iw = self.image_size
        if draft is None and img.size != (iw, ih):
            raise DataError(f"{self.root / 'images' / it.image}: image is {img.size[1]}x"
                            f"{img.size[0]}, index.csv line {it.row} says {ih}x{iw}")
        return img

    def load_seg(self, i: int) -> np.ndarray:
        """Label planes of item ``i``: ``int64 [max_planes, sh, sw]`` (0-padded)."""
        sh, sw = self.seg_size
        seg = np.zeros((self.max_planes, sh, sw), dtype=np.int64)
        for k, (_, plane) in enumerate(self.load_planes(i)):
            seg[k] = plane
        return seg

    def image_file(self, i: int) -> tuple[str, Path]:
        """``(id, path)`` of item ``i``'s image file."""
        it = self._items[i]
        return it.image, self.root / "images" / it.image

    def label_files(self, i: int) -> list[tuple[str, Path]]:
        """``(category, path)`` of each label PNG of item ``i``, in :meth:`load_seg`'s plane order."""
        it = self._items[i]
        return [(self.categories[c], self.root / "images" / rel)
                for rel, c in zip(it.planes, it.plane_categories)]

    def load_planes(self, i: int) -> list[tuple[str, np.ndarray]]:
        """``(category, int64 [sh, sw] plane)`` of each label PNG of item ``i`` (checked: size
        and label numbers), in :meth:`load_seg`'s order."""
        it = self._items[i]
        sh, sw = self.seg_size
        out = []
        for rel, c in zip(it.planes, it.plane_categories):
            img = self._open(rel, "label PNG", it.row)
            if img.mode not in ("RGB", "RGBA"):
                img = img.convert("RGB")
            arr = np.asarray(img)
            if arr.shape[:2] != (sh, sw):
                raise DataError(f"{self.root / 'images' / rel}: label PNG is {arr.shape[0]}x"
                                f"{arr.shape[1]}, index.csv line {it.row} says {sh}x{sw}")
            plane = arr[..., 0].astype(np.int64) + 256 * arr[..., 1].astype(np.int64)
            if plane.max() >= self.n_labels or not self._known[plane].all():
                values = np.unique(plane)
                bad = [int(v) for v in values if v >= self.n_labels or not self._known[v]]
                raise DataError(f"{self.root / 'images' / rel}: label {bad[0]} (R + 256*G) is "
                                f"not in label.csv" + (f" ({len(bad)} unknown labels)"
                                                       if len(bad) > 1 else ""))
            out.append((self.categories[c], plane))
        return out

    def load_image_labels(self, i: int) -> np.ndarray:
        """Image-level label numbers of item ``i``: ``int64 [max_image_labels]`` (0-padded)."""
        labels = np.zeros(self.max_image_labels, dtype=np.int64)
        il = self._items[i].image_labels
        labels[:len(il)] = il
        return labels

    def __getitem__(self, i: int) -> dict[str, Any]:
        from neurosem.data.transforms import item_image, item_index

        i = item_index(i, len(self))
        image = item_image(self.load_image(i), self.transform)
        out: dict[str, Any] = {"image": image, "index": i, "id": self._items[i].image}
        if self.with_labels:
            import torch

            out["seg"] = torch.from_numpy(self.load_seg(i))
            out["image_labels"] = torch.from_numpy(self.load_image_labels(i))
        return out

    def __repr__(self) -> str:
        ih, iw = self.image_size
        return (f"BrodenDataset({str(self.root)!r}, split={self.split!r}, "
                f"categories={self.categories}, {len(self)} images {ih}x{iw})")
