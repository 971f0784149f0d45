"""Dissection outputs: ``dissect.h5`` (write and load), the per-layer CSV, ``summary.json``, the
self-contained HTML report and the summary figure.

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

import base64
import csv
import html
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

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
    import h5py

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


# ------------------------------------------------------------------------------------ figure
def summary_figure(dis: Dissection) -> Any:
    """The figure: interpretable units per category (bars) per layer; only the categories that
    have interpretable units get bars and legend entries (each in its own colour,
    :func:`~neurosem.analysis._plotstyle.category_palette`)."""
    from matplotlib.ticker import MaxNLocator

    from neurosem.analysis._plotstyle import category_palette, new_figure

    all_cats = list(dis.categories)
    counts = np.array([[dis.counts(layer)[c] for c in all_cats] for layer in dis.layers], dtype=float)
    shown = [k for k in range(len(all_cats)) if counts[:, k].any()]
    pal = category_palette(all_cats)
    fig, ax = new_figure(figsize=(max(3.2, 0.9 * len(dis.layers) + 1.6), 2.4))
    width = 0.8 / max(1, len(shown))
    x = np.arange(len(dis.layers))
    for j, k in enumerate(shown):
        ax.bar(x - 0.4 + width * (j + 0.5), counts[:, k], width, color=pal[all_cats[k]], label=all_cats[k])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(x)
    ax.set_xticklabels(dis.layers, rotation=30 if len(dis.layers) > 4 else 0)
    ax.set_xlabel("layer")
    ax.set_ylabel("interpretable units")
    ax.set_title(f"units with IoU \u2265 {dis.iou_threshold:g}, by category of their best label")
    if shown:
        ax.legend(frameon=False, fontsize="small", ncol=1, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    else:
        ax.text(0.5, 0.5, "no interpretable units", transform=ax.transAxes, ha="center", va="center")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


def write_summary_figure(path_without_suffix: Path, dis: Dissection,
                         formats: Sequence[str] = ("pdf", "png", "svg")) -> list[Path]:
    """:func:`summary_figure` as ``figures/dissect_summary.*``."""
    from neurosem.analysis._plotstyle import plot_style, save_figure

    with plot_style():
        return save_figure(summary_figure(dis), path_without_suffix, tuple(formats), close=True)


def _nice_step(top: float) -> int:
    """An integer tick step giving at most about 6 ticks up to ``top``."""
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if top / step <= 6:
            return step
    return int(10 ** np.ceil(np.log10(max(1.0, top / 6))))


def summary_svg(dis: Dissection) -> str:
    """The summary figure as a standalone SVG written directly (no plotting library: the dissection
    stays fast): interpretable units per category (bars) per layer, only the categories that have
    interpretable units, in :data:`~neurosem.analysis._plotstyle.CATEGORY_COLORS`. ``neurosem
    figures`` draws the same figure with matplotlib as PDF, PNG and SVG (:func:`summary_figure`).

    Example:
        >>> summary_svg(load_dissection("runs/resnet18"))[:4]     # doctest: +SKIP
        '<svg'
    """
    from neurosem.analysis._plotstyle import CATEGORY_COLORS

    cats = list(dis.categories)
    counts = np.array([[dis.counts(layer)[c] for c in cats] for layer in dis.layers], dtype=np.int64)
    shown = [k for k in range(len(cats)) if counts[:, k].any()]
    extra = iter(["#7f7f7f", "#bcbd22", "#17becf", "#8c564b", "#e377c2", "#9467bd"] * 10)
    colour = {c: CATEGORY_COLORS.get(c) or next(extra) for c in cats}
    n_layers = max(1, len(dis.layers))
    left, top_pad, plot_h, group_w = 52, 34, 170, max(60, 14 * max(1, len(shown)) + 24)
    plot_w = group_w * n_layers
    legend_x = left + plot_w + 16
    width, height = legend_x + 110, top_pad + plot_h + 48
    ymax = max(1, int(counts.max(initial=0)))
    step = _nice_step(ymax)
    ytop = int(np.ceil(ymax / step) * step)
    y = lambda v: top_pad + plot_h - plot_h * v / ytop  # noqa: E731
    esc = html.escape
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
           "font-family='DejaVu Sans, Helvetica, Arial, sans-serif' font-size='11'>",
           f"<rect width='{width}' height='{height}' fill='white'/>",
           f"<text x='{left + plot_w / 2:.1f}' y='16' text-anchor='middle' font-size='12'>units with IoU "
           f"\u2265 {dis.iou_threshold:g}, by category of their best label</text>"]
    for v in range(0, ytop + 1, step):
        out.append(f"<line x1='{left - 4}' x2='{left}' y1='{y(v):.1f}' y2='{y(v):.1f}' stroke='#333'/>"
                   f"<text x='{left - 7}' y='{y(v) + 4:.1f}' text-anchor='end'>{v}</text>")
    out.append(f"<line x1='{left}' x2='{left}' y1='{top_pad}' y2='{top_pad + plot_h}' stroke='#333'/>"
               f"<line x1='{left}' x2='{left + plot_w}' y1='{top_pad + plot_h}' y2='{top_pad + plot_h}' stroke='#333'/>")
    bar_w = (group_w - 20) / max(1, len(shown))
    for i, layer in enumerate(dis.layers):
        x0 = left + i * group_w + 10
        for j, k in enumerate(shown):
            v = int(counts[i, k])
            out.append(f"<rect x='{x0 + j * bar_w:.1f}' y='{y(v):.1f}' width='{bar_w - 1:.1f}' "
                       f"height='{top_pad + plot_h - y(v):.1f}' fill='{colour[cats[k]]}'>"
                       f"<title>{esc(layer)}: {v} {esc(cats[k])} units</title></rect>")
        out.append(f"<text x='{left + (i + 0.5) * group_w:.1f}' y='{top_pad + plot_h + 15}' "
                   f"text-anchor='middle'>{esc(layer)}</text>")
    out.append(f"<text x='{left + plot_w / 2:.1f}' y='{height - 8}' text-anchor='middle'>layer</text>"
               f"<text transform='translate(14 {top_pad + plot_h / 2:.1f}) rotate(-90)' text-anchor='middle'>"
               "interpretable units</text>")
    if not shown:
        out.append(f"<text x='{left + plot_w / 2:.1f}' y='{top_pad + plot_h / 2:.1f}' text-anchor='middle'>"
                   "no interpretable units</text>")
    for j, k in enumerate(shown):
        yy = top_pad + 6 + 16 * j
        out.append(f"<rect x='{legend_x}' y='{yy}' width='10' height='10' fill='{colour[cats[k]]}'/>"
                   f"<text x='{legend_x + 15}' y='{yy + 9}'>{esc(cats[k])}</text>")
    out.append("</svg>")
    return "".join(out)


def write_summary_svg(path: Path, dis: Dissection) -> Path:
    """:func:`summary_svg` written to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(summary_svg(dis), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ HTML
def png_data_uri(arr: np.ndarray, palette_colors: int | None = None) -> str:
    """``uint8 [H, W, 3|4]`` -> ``data:image/png;base64,...`` (RGB optionally quantised)."""
    from PIL import Image

    img = Image.fromarray(arr)
    if palette_colors and img.mode == "RGB":
        img = img.quantize(colors=palette_colors)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


#: mask overlay palette: 0 = clear (inside the mask), 1 = dark veil (outside), 2 = edge (yellow)
_OVERLAY_PALETTE = [0, 0, 0, 0, 0, 0, 255, 214, 0]
_OVERLAY_ALPHA = bytes([0, 170, 255])


def mask_overlay(mask: np.ndarray) -> np.ndarray:
    """``bool [..., h, w]`` -> ``uint8 [..., h, w]`` overlay indices: 0 inside the mask, 1 outside
    (a dark veil), 2 on the mask's edge (yellow)."""
    m = np.asarray(mask, dtype=bool)
    out = np.where(m, 0, 1).astype(np.uint8)
    pad = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    edge = m & ~(pad[..., :-2, 1:-1] & pad[..., 2:, 1:-1] & pad[..., 1:-1, :-2] & pad[..., 1:-1, 2:])
    out[edge] = 2
    return out


def _overlay_uris(masks: Sequence[np.ndarray]) -> list[str]:
    """:func:`overlay_data_uri` of many masks of one size (the overlays computed at once)."""
    if not len(masks):
        return []
    over = mask_overlay(np.stack(masks))
    return ["data:image/png;base64," + base64.b64encode(palette_png(o, _OVERLAY_PALETTE, _OVERLAY_ALPHA)).decode("ascii")
            for o in over]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def palette_png(indices: np.ndarray, palette: Sequence[int], alpha: bytes, bits: int = 2) -> bytes:
    """A palette PNG (``bits`` per pixel, with transparency) of ``indices: uint8 [h, w]``, written
    directly (no PIL: a few tens of microseconds for a mask).

    Example:
        >>> from PIL import Image; import io
        >>> png = palette_png(np.array([[0, 1, 2]], np.uint8), _OVERLAY_PALETTE, _OVERLAY_ALPHA)
        >>> np.asarray(Image.open(io.BytesIO(png))).tolist()
        [[0, 1, 2]]
    """
    idx = np.asarray(indices, dtype=np.uint8)
    h, w = idx.shape
    per = 8 // bits
    padded = np.zeros((h, -(-w // per) * per), dtype=np.uint8)
    padded[:, :w] = idx
    groups = padded.reshape(h, -1, per)
    packed = np.zeros(groups.shape[:2], dtype=np.uint8)
    for k in range(per):
        packed |= groups[:, :, k] << (8 - bits * (k + 1))
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), packed], 1).tobytes()   # filter 0 per row
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([bits, 3, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"PLTE", bytes(palette))
            + _chunk(b"tRNS", alpha) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def overlay_data_uri(mask: np.ndarray) -> str:
    """The mask overlay as a palette PNG with transparency (a few hundred bytes)."""
    png = palette_png(mask_overlay(mask), _OVERLAY_PALETTE, _OVERLAY_ALPHA)
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def jpeg_bytes(arr: np.ndarray, quality: int = 88) -> bytes:
    """``uint8 [H, W, 3]`` as JPEG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def jpeg_data_uri(image: "np.ndarray | bytes", quality: int = 88) -> str:
    """``uint8 [H, W, 3]`` (or JPEG bytes) -> ``data:image/jpeg;base64,...`` (the report's thumbnails)."""
    data = image if isinstance(image, (bytes, bytearray)) else jpeg_bytes(image, quality)
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
table.counts{border-collapse:collapse;margin:.5em 0}table.counts td,table.counts th{border:1px solid #ccc;padding:2px 8px;text-align:right}
table.counts th{background:#f3f3f3}
.unit{display:inline-block;vertical-align:top;margin:6px;padding:6px;border:1px solid #ddd;border-radius:4px;width:max-content}
.unit.dim{opacity:.55}
.unit .cap{font-size:12px;margin-bottom:4px}
.tile{display:inline-block;position:relative;margin-right:2px;background-size:100% 100%;image-rendering:auto}
.tile img{position:absolute;left:0;top:0;width:100%;height:100%;image-rendering:pixelated}
.iou{font-variant-numeric:tabular-nums}
.note{color:#666;font-size:12px}
"""


def _counts_table(rows: Iterable[tuple[str, dict[str, int], int, int]], categories: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in categories)
    out = [f"<table class='counts'><tr><th style='text-align:left'>layer</th>{head}<th>interpretable</th><th>units</th></tr>"]
    for name, counts, n, total in rows:
        cells = "".join(f"<td>{counts.get(c, 0)}</td>" for c in categories)
        out.append(f"<tr><td style='text-align:left'>{name}</td>{cells}<td>{n}</td><td>{total}</td></tr>")
    out.append("</table>")
    return "".join(out)


@dataclass
class UnitTiles:
    """What the HTML shows for one unit: its top images (keys into the image table) and masks."""

    images: list[int] = field(default_factory=list)     # dataset positions
    masks: list[np.ndarray] = field(default_factory=list)  # bool [sh, sw] each


def write_layer_html(path: Path, dis: Dissection, layer: str, thumbs: dict[int, np.ndarray],
                     tiles: Sequence[UnitTiles], image_ids: Sequence[str], thumb_px: int) -> Path:
    """One self-contained page for a layer: units sorted by IoU, each with its label, IoU and top
    images (thresholded mask over each), and the interpretable units per category."""
    best, best_iou = dis.best(layer)
    keep = dis.interpretable(layer)
    counts = dis.counts(layer)
    styles = [f".i{i}{{background-image:url({jpeg_data_uri(t)})}}" for i, t in sorted(thumbs.items())]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>neurosem dissection: {html.escape(layer)}</title>",
        f"<style>{_CSS}{''.join(styles)}</style></head><body>",
        "<p><a href='index.html'>&larr; all layers</a></p>",
        f"<h1>Layer {html.escape(layer)}</h1>",
        f"<p>{int(keep.sum())} of {len(best)} units are interpretable (best IoU &ge; {dis.iou_threshold:g}); "
        f"quantile {dis.args.get('quantile', '?')}, run {html.escape(str(dis.path.parent))}.</p>",
        _counts_table([(html.escape(layer), counts, int(keep.sum()), len(best))], dis.categories),
        "<p class='note'>Each unit: its best label, category and IoU, then the images where its mask is "
        "largest (the mask: the unit's map upsampled to the label size and thresholded, exactly as the "
        "IoU counts it); outside the mask the image is darkened, the mask edge is yellow.</p>",
    ]
    order = np.argsort(-best_iou, kind="stable")
    uris = iter(_overlay_uris([m for u in order for m in tiles[u].masks]))
    for u in order:
        label, cat, iou = dis.unit_label(layer, int(u))
        cls = "unit" if keep[u] else "unit dim"
        parts.append(f"<div class='{cls}' id='u{u}'><div class='cap'><b>unit {u}</b> &middot; "
                     f"{html.escape(label)} ({html.escape(cat)}) &middot; IoU <span class='iou'>{iou:.3f}</span></div>")
        t = tiles[u]
        for img in t.images:
            title = html.escape(image_ids[img]) if 0 <= img < len(image_ids) else str(img)
            parts.append(f"<span class='tile i{img}' title='{title}' style='width:{thumb_px}px;height:{thumb_px}px'>"
                         f"<img alt='' src='{next(uris)}'></span>")
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def layer_html_name(layer: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in layer)
    return f"{safe}.html"


def write_index_html(path: Path, dis: Dissection, layer_pages: dict[str, str],
                     figure_svg: Path | None = None) -> Path:
    """The entry page: counts per category per layer, the summary figure, links to the layers."""
    rows = []
    for layer in dis.layers:
        keep = dis.interpretable(layer)
        link = f"<a href='{html.escape(layer_pages[layer])}'>{html.escape(layer)}</a>" if layer in layer_pages \
            else html.escape(layer)
        rows.append((link, dis.counts(layer), int(keep.sum()), dis.n_units(layer)))
    fig = ""
    if figure_svg is not None and Path(figure_svg).is_file():
        data = base64.b64encode(Path(figure_svg).read_bytes()).decode("ascii")
        fig = (f"<p><img alt='interpretable units per category' style='max-width:100%' "
               f"src='data:image/svg+xml;base64,{data}'></p>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>neurosem dissection</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Network dissection</h1>",
        f"<p>Interpretable units (best IoU &ge; {dis.iou_threshold:g}) per category of their best label. "
        f"Quantile {dis.args.get('quantile', '?')}, {len(dis.label_names)} labels, "
        f"Broden {html.escape(str(dis.args.get('broden', '')))}.</p>",
        _counts_table(rows, dis.categories),
        fig,
        "</body></html>",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path
