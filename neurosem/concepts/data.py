"""What concept-vector training reads: the concepts, the train/val split, and streamed batches.

Nothing here holds the dataset: :func:`split_batches` streams the store and the label cache in
batches of one split, and :func:`label_statistics` makes one pass over the labels (no activations)
to find the concepts that occur in both splits and their pixel fractions.
"""
from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from neurosem.errors import NeurosemError

#: fraction of the images held out for validation when a Broden set has only one split
HOLDOUT = 0.25


@dataclass
class Concepts:
    """The concepts of one training: Broden label numbers with their names and categories.

    Attributes:
        numbers ``[K]`` label numbers, names, categories (primary category of each),
        pixel ``bool [K]`` (pixel-level: object, part, material, color; else image-level).
    """

    numbers: np.ndarray
    names: list[str]
    categories: list[str]
    pixel: np.ndarray

    def __len__(self) -> int:
        return int(self.numbers.shape[0])

    def subset(self, keep: np.ndarray) -> "Concepts":
        """The concepts where ``keep [K]`` is true, in the same order."""
        idx = np.flatnonzero(keep)
        return Concepts(self.numbers[idx], [self.names[i] for i in idx], [self.categories[i] for i in idx],
                        self.pixel[idx])

    def lookup(self, n_labels: int, pixel: bool) -> np.ndarray:
        """``[n_labels]`` int64: the index among the pixel (or image) concepts of each label number, -1 else."""
        lut = np.full(n_labels, -1, dtype=np.int64)
        sel = np.flatnonzero(self.pixel == pixel)
        lut[self.numbers[sel]] = np.arange(sel.size)
        return lut


def candidate_concepts(ds: Any, names: Sequence[str] | None = None) -> Concepts:
    """Every label of ``ds``'s categories with a primary category, or the ``names`` asked for.

    Raises:
        NeurosemError: a name that is no label of the selected categories (the closest are listed).
    """
    primary = np.asarray(ds.primary_category)
    numbers = [n for n in range(1, ds.n_labels) if primary[n] >= 0]
    by_name = {ds.label_names[n]: n for n in numbers}
    if names:
        unknown = [c for c in names if c not in by_name]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(by_name), n=5, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(sorted(by_name)[:5])}"
            raise NeurosemError(f"no concept {unknown[0]!r} in {ds.root} (categories "
                                f"{', '.join(ds.categories)}); {hint}")
        numbers = [by_name[c] for c in dict.fromkeys(names)]
    cats = [ds.categories[primary[n]] for n in numbers]
    return Concepts(np.asarray(numbers, dtype=np.int64), [ds.label_names[n] for n in numbers], cats,
                    np.asarray([c not in ds.image_categories for c in cats], dtype=bool))


def image_splits(ds: Any) -> list[str]:
    """The ``split`` column of index.csv, one entry per image of ``ds`` (opened with ``split=None``)."""
    with open(ds.root / "index.csv", newline="", encoding="utf-8-sig") as fh:
        rows = [(r.get("split") or "").strip() for r in csv.DictReader(fh)]
    if len(rows) != len(ds):
        raise NeurosemError(f"{ds.root / 'index.csv'} lists {len(rows)} rows, the dataset {len(ds)}: "
                            "open the Broden set without a split")
    return rows


def split_masks(splits: Sequence[str], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """``(train bool [n], val bool [n], how)`` for the first ``n`` images.

    Broden's ``train`` and ``val`` splits when both occur among them; otherwise a seeded hold-out
    of :data:`HOLDOUT` of the images (``how`` says which).

    Example:
        >>> tr, va, how = split_masks(["train", "val", "train", "train"], 4)
        >>> tr.tolist(), va.tolist(), how
        ([True, False, True, True], [False, True, False, False], 'index.csv split')
    """
    s = np.asarray(list(splits)[:n], dtype=object)
    train, val = s == "train", s == "val"
    if train.any() and val.any():
        return train, val, "index.csv split"
    if n < 2:
        raise NeurosemError(f"{n} image: concept vectors need at least 2 images (one to train, one to validate)")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(HOLDOUT * n)))
    val = np.zeros(n, dtype=bool)
    val[order[:n_val]] = True
    return ~val, val, f"seeded hold-out ({n_val} of {n} images, seed {seed}): index.csv has one split"


def spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """The maximal runs ``[(start, stop)]`` where ``mask`` is true.

    Example:
        >>> spans(np.array([1, 1, 0, 1], dtype=bool))
        [(0, 2), (3, 4)]
    """
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]]).astype(np.int8)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def split_batches(store: Any, layers: Sequence[str] | None, labels: Any, mask: np.ndarray,
                  batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Stream the images where ``mask`` is true: ``(rows [B], {layer: acts [B, C, h, w]},
    seg [B, P, sh * sw], image_labels [B, M])``.

    ``layers=None`` reads no activations (labels only). Contiguous runs of the split are read
    directly; a split interleaved in short runs is read batch by batch and filtered.
    """
    runs = spans(mask)
    short = len(runs) > max(1, int(mask.sum()) // max(1, batch_size // 2))
    if short:
        runs = [(0, int(mask.shape[0]))]
    for a, b in runs:
        for start in range(a, b, batch_size):
            stop = min(b, start + batch_size)
            keep = np.flatnonzero(mask[start:stop])
            if keep.size == 0:
                continue
            acts = {}
            if layers:
                acts = {name: store.read(name, start, stop) for name in layers}
            seg, _, il = labels.batch(start, stop)
            if keep.size < stop - start:
                acts = {k: v[keep] for k, v in acts.items()}
                seg, il = seg[keep], il[keep]
            yield start + keep, acts, seg, il


def covered_counts(seg: np.ndarray, n_labels: int) -> np.ndarray:
    """``[B, n_labels]`` pixels of each image that carry each label in any plane (a label in two
    planes at one pixel counts once), from ``seg [B, P, S]``."""
    b = seg.shape[0]
    s = np.sort(seg.astype(np.int64), axis=1)
    if s.shape[1] > 1:
        dup = s[:, 1:] == s[:, :-1]
        s[:, 1:][dup] = 0
    keys = s + (np.arange(b, dtype=np.int64) * n_labels)[:, None, None]
    return np.bincount(keys.reshape(-1), minlength=b * n_labels).reshape(b, n_labels)


def label_statistics(labels: Any, concepts: Concepts, masks: dict[str, np.ndarray], n_labels: int,
                     batch_size: int) -> dict[str, np.ndarray]:
    """One pass over the labels: per split, ``{split: [K] int64}`` pixels covered by each pixel
    concept (image-level concepts: images that carry it), and ``{split + "_images": int}``."""
    out: dict[str, Any] = {}
    pix_lut = np.full(n_labels, False)
    pix_lut[concepts.numbers[concepts.pixel]] = True
    for split, mask in masks.items():
        total = np.zeros(n_labels, dtype=np.int64)
        for _, _, seg, il in split_batches(None, None, labels, mask, batch_size):
            total += covered_counts(seg, n_labels).sum(0)
            present = np.zeros((il.shape[0], n_labels), dtype=bool)
            present[np.arange(il.shape[0])[:, None], il] = True
            present[:, 0] = False
            total += np.where(pix_lut, 0, present.sum(0))
        out[split] = total[concepts.numbers]
        out[split + "_images"] = int(mask.sum())
    return out
