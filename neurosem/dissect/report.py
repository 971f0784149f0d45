"""Dissection outputs: ``dissect.h5`` (write and load), the per-layer CSV and ``summary.json``; the
self-contained HTML report and the summary figure are :mod:`neurosem.dissect.report_html`
(re-exported here).

``dissect.h5`` (docs/internals.md): root attrs ``args`` (JSON), ``broden_fingerprint``; datasets
``labels/number [L]``, ``labels/name [L]``, ``labels/category [L]`` (primary category),
``categories [K]``; per layer ``layers/<layer>/``: ``threshold [C]`` float32, ``iou [C, L]``
float32, ``best_label [C]`` (column index), ``best_iou [C]``, ``best_category [C]``. Also stored
(additions to the contract): ``labels/gt [L]`` (label pixel counts), per layer ``threshold_exact``
(float64, the exact quantile; ``threshold`` is it rounded down to float32, which thresholds float16
and float32 activations identically), ``category_best_label [C, K]``, ``category_best_iou [C, K]``,
``top_images [C, k]`` and ``top_values [C, k]`` (dataset positions of each unit's top images and
its peak activations there), ``top_sizes [C, k]`` (the unit's mask pixels on them: the ranking) and
``top_maps [C, k, h, w]`` (the raw maps, in the store's dtype, from which the report's masks are
computed with the tally's rule).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from neurosem.errors import NeurosemError

FORMAT = "neurosem-dissection"
VERSION = 1


@dataclass
class LayerDissection:
    """The dissection of one layer, as computed (arrays over ``C`` units, ``L`` labels, ``K``
    categories)."""

    layer: str
    threshold: np.ndarray          # [C] float64, exact
    iou: np.ndarray                # [C, L] float64
    best_label: np.ndarray         # [C] column index
    best_iou: np.ndarray           # [C]
    category_best_label: np.ndarray  # [C, K] column index, -1 when a category has no column
    category_best_iou: np.ndarray    # [C, K]
    top_images: np.ndarray         # [C, k] dataset positions (-1: none)
    top_values: np.ndarray         # [C, k] peak activation of those images
    top_sizes: np.ndarray | None = None   # [C, k] mask pixels on those images
    top_maps: np.ndarray | None = None    # [C, k, h, w] raw maps of those images


# ------------------------------------------------------------------------------------ dissect.h5
def _str_dataset(group: Any, name: str, values: Sequence[str]) -> None:
    import h5py

    group.create_dataset(name, data=np.array([str(v) for v in values], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))


def write_dissection(path: Path, args: dict[str, Any], broden_fingerprint: str,
                     label_numbers: np.ndarray, label_names: Sequence[str],
                     label_categories: Sequence[str], label_gt: np.ndarray,
                     categories: Sequence[str], layers: Sequence[LayerDissection]) -> Path:
    """Write ``dissect.h5`` atomically (a temporary file renamed at the end)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    from neurosem.run import check_free_space, disk_full_error, is_disk_full

    needed = sum(np.asarray(ld.iou).size * 4 + (0 if ld.top_maps is None else np.asarray(ld.top_maps).nbytes)
                 + np.asarray(ld.threshold).size * 64 for ld in layers) + 2 ** 16
    check_free_space(path, needed, "; the activations are kept")
    try:
        _write_dissection_file(tmp, args, broden_fingerprint, label_numbers, label_names, label_categories,
                               label_gt, categories, layers)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path, needed, "; the activations are kept") from None
        raise
    os.replace(tmp, path)
    return path


def _write_dissection_file(tmp: Path, args: dict[str, Any], broden_fingerprint: str,
                           label_numbers: np.ndarray, label_names: Sequence[str],
                           label_categories: Sequence[str], label_gt: np.ndarray,
                           categories: Sequence[str], layers: Sequence[LayerDissection]) -> None:
    import h5py

    cat_index = {c: i for i, c in enumerate(categories)}
    with h5py.File(tmp, "w", rdcc_nbytes=0) as f:   # no chunk cache: a full disk fails cleanly
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["args"] = json.dumps(args, sort_keys=True)
        f.attrs["broden_fingerprint"] = str(broden_fingerprint)
        lab = f.create_group("labels")
        lab.create_dataset("number", data=np.asarray(label_numbers, dtype=np.int64))
        _str_dataset(lab, "name", label_names)
        _str_dataset(lab, "category", label_categories)
        lab.create_dataset("gt", data=np.asarray(label_gt, dtype=np.int64))
        _str_dataset(f, "categories", categories)
        group = f.create_group("layers")
        for ld in layers:
            g = group.create_group(ld.layer)
            g.create_dataset("threshold", data=float32_floor(ld.threshold))
            g.create_dataset("threshold_exact", data=np.asarray(ld.threshold, dtype=np.float64))
            g.create_dataset("iou", data=np.asarray(ld.iou, dtype=np.float32))
            g.create_dataset("best_label", data=np.asarray(ld.best_label, dtype=np.int64))
            g.create_dataset("best_iou", data=np.asarray(ld.best_iou, dtype=np.float32))
            best_cat = [label_categories[j] if j >= 0 else "" for j in ld.best_label]
            _str_dataset(g, "best_category", best_cat)
            g.create_dataset("category_best_label", data=np.asarray(ld.category_best_label, dtype=np.int64))
            g.create_dataset("category_best_iou", data=np.asarray(ld.category_best_iou, dtype=np.float32))
            g.create_dataset("top_images", data=np.asarray(ld.top_images, dtype=np.int64))
            g.create_dataset("top_values", data=np.asarray(ld.top_values, dtype=np.float32))
            if ld.top_sizes is not None:
                g.create_dataset("top_sizes", data=np.asarray(ld.top_sizes, dtype=np.int64))
            if ld.top_maps is not None:
                g.create_dataset("top_maps", data=np.asarray(ld.top_maps))
            assert all(c in cat_index for c in best_cat if c)


def float32_floor(values: Any) -> np.ndarray:
    """float64 ``values`` rounded down to float32, so that ``x > rounded`` equals ``x > value`` for
    every float32 (and float16) ``x`` (:func:`neurosem.dissect.tally.threshold_for_dtype` without torch).

    Example:
        >>> float(float32_floor([0.1])[0]) <= 0.1
        True
    """
    t64 = np.asarray(values, dtype=np.float64)
    t = t64.astype(np.float32)
    up = t.astype(np.float64) > t64
    return np.where(up, np.nextafter(t, np.float32(-np.inf)), t).astype(np.float32)


def _strs(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class Dissection:
    """A dissection read from ``dissect.h5`` (everything is loaded; the file is closed).

    Attributes:
        path, args (dict), broden_fingerprint, layers, label_numbers ``[L]``, label_names ``[L]``,
        label_categories ``[L]`` (primary category of each IoU column), categories ``[K]``,
        label_gt ``[L]``, outputs (paths written by :func:`~neurosem.dissect.dissect`, if any).

    Example:
        >>> d = load_dissection("runs/resnet18")            # doctest: +SKIP
        >>> d.unit_label("layer4", 12)                      # doctest: +SKIP
        ('dog', 'object', 0.173)
    """

    def __init__(self, path: Path) -> None:
        import h5py

        self.path = Path(path)
        self.outputs: dict[str, Any] = {}
        self.timings: dict[str, float] = {}   # seconds per stage, set by dissect()
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") not in (FORMAT, None):
                    raise KeyError("format")
                self.args: dict[str, Any] = json.loads(f.attrs.get("args", "{}"))
                self.broden_fingerprint = str(f.attrs.get("broden_fingerprint", ""))
                self.label_numbers = np.asarray(f["labels/number"][()], dtype=np.int64)
                self.label_names = _strs(f["labels/name"][()])
                self.label_categories = _strs(f["labels/category"][()])
                self.label_gt = (np.asarray(f["labels/gt"][()], dtype=np.int64)
                                 if "gt" in f["labels"] else None)
                self.categories = _strs(f["categories"][()])
                self._layers: dict[str, dict[str, np.ndarray]] = {}
                for name, g in f["layers"].items():
                    d = {k: g[k][()] for k in g.keys()}
                    d["best_category"] = np.array(_strs(d["best_category"]), dtype=object)
                    self._layers[name] = d
        except (OSError, KeyError, ValueError) as exc:
            raise NeurosemError(
                f"{self.path} is not a readable dissection ({type(exc).__name__}: {exc}); "
                "rerun `neurosem dissect --broden PATH`") from None
        order = self.args.get("layers")
        names = list(self._layers)
        self.layers: list[str] = ([n for n in order if n in self._layers] + [n for n in names if n not in order]
                                  if isinstance(order, list) else names)

    # -- access ----------------------------------------------------------------------------------
    def _layer(self, layer: str) -> dict[str, np.ndarray]:
        if layer not in self._layers:
            raise NeurosemError(
                f"layer {layer!r} is not in the dissection {self.path} (layers: {', '.join(self.layers)}); "
                f"run `neurosem dissect --layers {layer}`")
        return self._layers[layer]

    @property
    def iou_threshold(self) -> float:
        return float(self.args.get("iou_threshold", 0.04))

    def n_units(self, layer: str) -> int:
        return int(self._layer(layer)["iou"].shape[0])

    def iou(self, layer: str) -> np.ndarray:
        """``[C, L]`` float32 IoU, columns as :attr:`label_names`."""
        return self._layer(layer)["iou"]

    def threshold(self, layer: str, exact: bool = False) -> np.ndarray:
        """``[C]`` activation thresholds: float32 (rounded down, thresholds float16/float32
        activations exactly like the float64 value), or the exact float64 quantile."""
        d = self._layer(layer)
        return d["threshold_exact"] if exact and "threshold_exact" in d else d["threshold"]

    def best(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(best_label [C] column index, best_iou [C])``."""
        d = self._layer(layer)
        return d["best_label"], d["best_iou"]

    def unit_label(self, layer: str, unit: int) -> tuple[str, str, float]:
        """``(label, category, iou)`` of the unit's best label."""
        d = self._layer(layer)
        n = d["best_label"].shape[0]
        if not 0 <= int(unit) < n:
            raise NeurosemError(f"{layer}:{unit} is out of range: {layer} has {n} units (0..{n - 1})")
        j = int(d["best_label"][unit])
        if j < 0:
            return ("-", "", 0.0)
        return (self.label_names[j], self.label_categories[j], float(d["best_iou"][unit]))

    def category_best(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(column [C, K], iou [C, K])``: best label per category (-1: the category has none)."""
        d = self._layer(layer)
        if "category_best_label" not in d:          # a minimal file: derive it from the IoU
            from neurosem.dissect.tally import best_labels

            index = {c: k for k, c in enumerate(self.categories)}
            cats = np.array([index.get(c, -1) for c in self.label_categories])
            _, _, d["category_best_label"], d["category_best_iou"] = best_labels(
                d["iou"], cats, len(self.categories))
        return d["category_best_label"], d["category_best_iou"]

    def top_images(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(positions [C, k], peak activations [C, k])`` of each unit's top-activating images
        (``k = 0`` when the file does not hold them)."""
        d = self._layer(layer)
        if "top_images" not in d:
            c = d["iou"].shape[0]
            return np.zeros((c, 0), dtype=np.int64), np.zeros((c, 0), dtype=np.float32)
        return d["top_images"], d["top_values"]

    def top_maps(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(mask pixels [C, k], raw maps [C, k, h, w])`` of each unit's top images (empty arrays
        when the file does not hold them)."""
        d = self._layer(layer)
        if "top_maps" not in d:
            c = d["iou"].shape[0]
            return np.zeros((c, 0), dtype=np.int64), np.zeros((c, 0, 1, 1), dtype=np.float16)
        return d.get("top_sizes", np.zeros(d["top_maps"].shape[:2], dtype=np.int64)), d["top_maps"]

    def interpretable(self, layer: str, iou_threshold: float | None = None) -> np.ndarray:
        """``bool [C]``: best IoU >= the threshold (default: the one the dissection was run with)."""
        thr = self.iou_threshold if iou_threshold is None else float(iou_threshold)
        return self._layer(layer)["best_iou"] >= np.float32(thr)

    def counts(self, layer: str, iou_threshold: float | None = None) -> dict[str, int]:
        """Interpretable units per category (the category of each unit's best label)."""
        keep = self.interpretable(layer, iou_threshold)
        cats = self._layer(layer)["best_category"]
        return {c: int(np.sum(keep & (cats == c))) for c in self.categories}

    def __repr__(self) -> str:
        return f"Dissection({str(self.path)!r}, layers={self.layers})"

    def __str__(self) -> str:
        lines = [f"dissection: {self.path} (IoU >= {self.iou_threshold:g} is interpretable)"]
        for layer in self.layers:
            counts = self.counts(layer)
            n = sum(counts.values())
            detail = ", ".join(f"{c} {k}" for c, k in counts.items() if k)
            lines.append(f"  {layer}: {n}/{self.n_units(layer)} units interpretable"
                         + (f" ({detail})" if detail else ""))
        for name, p in self.outputs.items():
            lines.append(f"  {name}: {', '.join(map(str, p)) if isinstance(p, (list, tuple)) else p}")
        return "\n".join(lines)


DissectionResult = Dissection


def load_dissection(run_or_path: Any) -> Dissection:
    """Load a dissection from a run directory or a ``dissect.h5`` path.

    Example:
        >>> load_dissection("runs/resnet18").layers         # doctest: +SKIP
        ['layer1', 'layer2', 'layer3', 'layer4']
    """
    from neurosem.run import RunDir

    if isinstance(run_or_path, RunDir):
        path, run = run_or_path.dissection, run_or_path.path
    else:
        p = Path(run_or_path)
        path, run = (p, p.parent) if p.suffix == ".h5" or p.is_file() else (RunDir(p).dissection, p)
    if not path.is_file():
        raise NeurosemError(
            f"no dissection at {path}: run `neurosem dissect --broden PATH --run {run}` first")
    return Dissection(path)


# ------------------------------------------------------------------------------------ CSV / JSON
def write_layer_csv(path: Path, dis: Dissection, layer: str) -> Path:
    """``unit,label,category,iou`` then ``<cat>_label,<cat>_iou`` per category; one row per unit."""
    best, best_iou = dis.best(layer)
    cat_best, cat_iou = dis.category_best(layer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["unit", "label", "category", "iou"]
                   + [f"{c}_{x}" for c in dis.categories for x in ("label", "iou")])
        for u in range(best.shape[0]):
            label, cat, iou = dis.unit_label(layer, u)
            row: list[Any] = [u, label, cat, f"{iou:.6f}"]
            for k in range(len(dis.categories)):
                j = int(cat_best[u, k])
                row += [dis.label_names[j], f"{float(cat_iou[u, k]):.6f}"] if j >= 0 else ["", ""]
            w.writerow(row)
    return path


def summary_dict(dis: Dissection, n_top: int = 10) -> dict[str, Any]:
    """The content of ``summary.json``."""
    out: dict[str, Any] = {"iou_threshold": dis.iou_threshold, "args": dis.args,
                           "categories": dis.categories, "labels": len(dis.label_names), "layers": {}}
    for layer in dis.layers:
        best, best_iou = dis.best(layer)
        keep = dis.interpretable(layer)
        order = np.argsort(-best_iou, kind="stable")[:n_top]
        out["layers"][layer] = {
            "units": dis.n_units(layer),
            "interpretable": int(keep.sum()),
            "by_category": dis.counts(layer),
            "unique_labels": int(len(set(best[keep].tolist()))),
            "top_units": [dict(zip(("label", "category", "iou"), dis.unit_label(layer, int(u))), unit=int(u))
                          for u in order],
        }
    return out


def summary_json(dis: Dissection) -> str:
    """``neurosem dissect --json``: :func:`summary_dict` plus the files written."""
    return json.dumps({**summary_dict(dis), "outputs": dis.outputs}, indent=2)


def write_summary(path: Path, dis: Dissection) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary_dict(dis), indent=2))
    return path


# The HTML pages and the summary figure live in report_html (one concern per module); their names
# stay importable from here.
from neurosem.dissect.report_html import (UnitTiles, jpeg_bytes, jpeg_data_uri, layer_html_name,  # noqa: E402,F401
                                          mask_overlay, overlay_data_uri, palette_png,
                                          summary_figure, summary_svg, write_index_html, write_layer_html,
                                          write_summary_figure, write_summary_svg)
from neurosem.dissect.report_html import _OVERLAY_ALPHA, _OVERLAY_PALETTE  # noqa: E402,F401
