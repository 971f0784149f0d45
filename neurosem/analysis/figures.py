"""The paper's figures for a run (``neurosem figures``, ``neurosem query --figure``).

- ``neighbours``: a unit and its three most similar units (paper Fig. 2): the activation area of
  each unit as a light mask over the same images, the images where the query unit activates most;
- ``additive``: two units, the unit nearest to the sum of their vectors, and their masks (Fig. 3);
- ``kl_curves``: the KL curves of :mod:`neurosem.analysis.kl` (Fig. 4), one panel per layer;
- ``semantic_map``: a 2-D map of a layer's semantic vectors (PCA; t-SNE from 50 units), coloured by
  dissection category, a readable subset of the most interpretable units labelled (:mod:`.maps`);
- ``similarity_heatmap``: the cosine matrix of a layer's vectors, ordered by hierarchical
  clustering (:mod:`.maps`).

Masks are the dissection's own (:mod:`neurosem.analysis.masks`): computed at the dissection's label
size with its thresholds by the function the tally uses, and only resized (nearest) for display.
The images come from the dataset recorded in the run; when they cannot be read the maps are drawn
alone and a note says so.

This module depends on :mod:`.kl`, :mod:`.query`, :mod:`.masks`, :mod:`.maps` and :mod:`.defaults`
(the default units), never the reverse; the commands that write a figure on the way (``neurosem
kl``, ``neurosem query --figure``) are in :mod:`.commands`. Every figure builder returns a matplotlib ``Figure`` (nothing saved), so its numbers
can be checked; :func:`make_figures` saves them with :func:`neurosem.analysis._plotstyle.save_figure`
and lists what it drew in ``figures/figures.json``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from neurosem.analysis._plotstyle import (DEFAULT_DPI, DEFAULT_FORMATS, category_palette, check_formats,
                                          hide_ticks, new_figure, plot_style, save_figure)
from neurosem.analysis.defaults import check_layer, choose_unit, default_pair, default_unit
from neurosem.analysis.maps import semantic_map_figure, similarity_heatmap_figure
from neurosem.analysis.masks import (Panels, display_mask, mask_panels, open_store, top_images, top_rows,
                                     unit_maxima, upsample)
from neurosem.errors import NeurosemError
from neurosem.ids import NeuronId

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["Panels", "additive_figure", "default_pair", "default_unit", "kl_figure", "make_figures",
           "mask_panels", "neighbours_figure", "query_figure", "semantic_map_figure",
           "similarity_heatmap_figure", "top_images", "top_rows", "unit_maxima", "upsample"]

log = logging.getLogger("neurosem")

MASK_COLOR = (1.0, 1.0, 1.0)       # a light (white) fill ...
MASK_EDGE = (0.05, 0.05, 0.05)     # ... with a dark outline over a white halo: visible on any image
MASK_ALPHA = 0.55
#: Text of a panel whose mask is empty (the unit does not exceed its threshold on that image).
EMPTY_MASK_TEXT = "below threshold"


# ------------------------------------------------------------------------------ mask panels
def _draw_panel(ax: Any, panels: Panels, u: int, i: int) -> None:
    """One image with the unit's light mask (the dissection's mask, resized by nearest neighbour to
    the image), or the map alone with the mask's outline; an empty mask is written on the panel."""
    mask = panels.masks[u, i]
    if panels.images is not None:
        shown = display_mask(mask, panels.images.shape[1:3])
        # the light fill blended into the image here (one opaque image per panel, not an image
        # and a transparent overlay: half the resampling and encoding in every format)
        image = np.asarray(panels.images[i], dtype=np.float32)
        alpha = np.where(shown, np.float32(MASK_ALPHA), np.float32(0.0))[..., None]
        ax.imshow(image * (1 - alpha) + np.asarray(MASK_COLOR, dtype=np.float32) * alpha, interpolation="nearest")
        edge = MASK_EDGE
    else:
        shown = mask
        vmax = float(panels.maps[u].max()) or 1.0
        ax.imshow(panels.maps[u, i], cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        edge = MASK_COLOR
    if shown.any() and not shown.all():
        halo = (1.0, 1.0, 1.0) if edge == MASK_EDGE else (0.0, 0.0, 0.0)
        ax.contour(shown.astype(np.float32), levels=[0.5], colors=[halo], linewidths=1.6)
        ax.contour(shown.astype(np.float32), levels=[0.5], colors=[edge], linewidths=0.7)
    if not mask.any():
        ax.text(0.5, 0.04, EMPTY_MASK_TEXT, transform=ax.transAxes, ha="center", va="bottom", fontsize=5,
                color="0.1", bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})
    hide_ticks(ax)


def _unit_text(nid: NeuronId, dissection: Any) -> str:
    from neurosem.analysis.query import unit_info

    info = unit_info(dissection, nid.layer, nid.index)
    if not info:
        return str(nid)
    kind = "" if info["interpretable"] else ", not interpretable"
    return f"{nid}\n{info['label']} ({info['category']}, IoU {info['iou']:.3f}{kind})"


def mask_caption(panels: Panels) -> str:
    """What the light masks are, for the foot of a mask figure."""
    if panels.rule == "dissection":
        sh, sw = panels.masks.shape[-2:]
        text = (f"Light mask: the dissection's mask, where the unit's map upsampled to the {sh}×{sw} "
                f"label grid exceeds the unit's dissection threshold; \"{EMPTY_MASK_TEXT}\": the mask is empty.")
    else:
        text = "Light mask: where the unit's map exceeds half its largest value over these images."
    if panels.images is None:
        text += "\nImages unavailable (the reason is in figures.json): the activation maps are shown, the mask outlined."
    return text


def _mask_grid(panels: Panels, row_titles: Sequence[str], suptitle: str, panel_in: float = 1.3) -> "Figure":
    """Units in rows, images in columns; panels ``panel_in`` inches wide, row titles above each row."""
    n_units, n_img = len(panels.units), len(panels.rows)
    shape = panels.images.shape[1:3] if panels.images is not None else panels.masks.shape[-2:]
    pw, ph = panel_in, panel_in * shape[0] / shape[1]
    lines = [t.count("\n") + 1 for t in row_titles]
    # inches: the row titles (7 pt lines); the suptitle and the first row's title; the ids and the caption
    gap, top, bottom = 0.12 * max(lines[1:] or [1]) + 0.1, 0.3 + 0.12 * lines[0], 0.6
    width = (n_img + 0.05 * (n_img - 1)) * pw / 0.96
    height = n_units * ph + (n_units - 1) * gap + top + bottom
    with plot_style():
        fig, axes = new_figure(n_units, n_img, figsize=(width, height), squeeze=False)
        for u in range(n_units):
            for i in range(n_img):
                _draw_panel(axes[u, i], panels, u, i)
            axes[u, 0].set_title(row_titles[u], loc="left", fontsize=7)
        for i in range(n_img):
            axes[-1, i].set_xlabel(_short_id(panels.ids[i]), fontsize=6)
        fig.suptitle(suptitle, fontsize=8, y=1 - 0.05 / height, va="top")
        fig.subplots_adjust(left=0.02, right=0.98, wspace=0.05, hspace=gap / ph, bottom=bottom / height,
                            top=1 - top / height)
        fig.text(0.02, 0.01, mask_caption(panels), fontsize=5.5, ha="left", va="bottom", wrap=True)
    return fig


def _mask_info(panels: Panels) -> dict[str, Any]:
    """What the mask panels show, for figures.json: mask pixels ``[U][I]``, thresholds, the rule."""
    return {"mask_pixels": panels.masks.reshape(*panels.masks.shape[:2], -1).sum(axis=2).tolist(),
            "mask_size": list(panels.masks.shape[-2:]), "mask_rule": panels.rule,
            "thresholds": panels.thresholds}


def _short_id(image_id: str, width: int = 22) -> str:
    name = Path(image_id).name or image_id
    return name if len(name) <= width else "…" + name[-(width - 1):]


# ------------------------------------------------------------------------------ Fig. 2 and 3
def neighbours_figure(run: Any, unit: "NeuronId | str", n_neighbours: int = 3, n_images: int = 4,
                      rows: Sequence[int] | None = None) -> "Figure":
    """Paper Fig. 2: ``unit`` and its ``n_neighbours`` most similar units, masks over the same images.

    The images are those where ``unit`` activates most (``rows``: their store rows, when known).
    Row titles carry the unit ids and cosines. ``fig.neurosem_info["image_unit"]`` is the row of the
    unit whose top images are shown (its masks are never empty there unless the unit never exceeds
    its threshold).
    """
    from neurosem.analysis.query import _as_id, load_run_dissection, query, run_dir

    rd = run_dir(run)
    nid = _as_id(unit)
    results = query(rd, nid, k=n_neighbours)
    units = [nid] + [NeuronId(r["layer"], r["index"]) for r in results]
    panels = mask_panels(rd, units, nid, n_images, rows=rows)
    dis = load_run_dissection(rd)
    titles = [_unit_text(nid, dis) + "\n(query)"]
    titles += [_unit_text(NeuronId(r["layer"], r["index"]), dis) + f"\ncos {r['similarity']:.3f}" for r in results]
    fig = _mask_grid(panels, titles, f"{nid} and its {len(results)} most similar units (semantic-vector cosine)")
    fig.neurosem_info = {"units": [str(u) for u in units], "similarities": [r["similarity"] for r in results],
                         "images": panels.ids, "note": panels.note, "image_unit": 0, **_mask_info(panels)}
    return fig


def additive_figure(run: Any, neuron: "NeuronId | str", add: Sequence["NeuronId | str"] = (),
                    sub: Sequence["NeuronId | str"] = (), n_images: int = 4,
                    rows: Sequence[int] | None = None) -> "Figure":
    """Paper Fig. 3: the operands, the unit nearest to ``neuron + Σ add − Σ sub``, and their masks.

    The images are those where the nearest (target) unit activates most (``rows``: their store
    rows, when known).
    """
    from neurosem.analysis.query import load_run_dissection, parse_query, query, run_dir

    rd = run_dir(run)
    q, adds, subs = parse_query(neuron, add, sub)
    best = query(rd, q, adds, subs, k=1)
    if not best:
        raise NeurosemError(f"layer {q.layer} has no unit besides the operands: nothing to show")
    target = NeuronId(best[0]["layer"], best[0]["index"])
    units = [q, *adds, *subs, target]
    panels = mask_panels(rd, units, target, n_images, rows=rows)
    dis = load_run_dissection(rd)
    titles = [_unit_text(q, dis)] + ["+ " + _unit_text(a, dis) for a in adds] + ["− " + _unit_text(b, dis) for b in subs]
    titles.append("→ " + _unit_text(target, dis) + f"\ncos {best[0]['similarity']:.3f}")
    expr = " + ".join([str(q), *map(str, adds)]) + "".join(f" − {b}" for b in subs)
    fig = _mask_grid(panels, titles, f"{expr} → nearest unit {target}")
    fig.neurosem_info = {"units": [str(u) for u in units], "target": str(target),
                         "similarity": best[0]["similarity"], "images": panels.ids, "note": panels.note,
                         "image_unit": len(units) - 1, **_mask_info(panels)}
    return fig


# ------------------------------------------------------------------------------ Fig. 4
def _upper_bound(lay: dict[str, Any]) -> float:
    return float(lay["upper_bound"]["kl"] if isinstance(lay["upper_bound"], dict) else lay["upper_bound"])


def kl_note(result: dict[str, Any], panels: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The key to the KL figure's lines; says why an upper bound at 0 is one."""
    n_random = (result.get("settings") or {}).get("n_random")
    seeds = f" over {n_random} seeds" if n_random else ""
    text = (f"Lower is better. random init: the KL of random vectors (mean ± std{seeds}). "
            "upper bound: the KL of vectors of the same size optimised directly on this KL "
            "(the best an embedding was found to reach)")
    if all(_upper_bound(lay) < 5e-5 for _, lay in panels):
        text += ("; it is 0 here: vectors of this size can reproduce the IoU similarities exactly, "
                 "so its line lies at KL = 0")
    return text + "."


def kl_figure(result: dict[str, Any], layers: Sequence[str] | None = None) -> "Figure":
    """Paper Fig. 4: KL against training progress; per panel the embedding's curve, the random baseline
    (mean ± std over seeds) and the upper bound. ``result`` is :func:`neurosem.analysis.kl.kl_curves`'s.

    Lines carry the labels ``embedding``, ``random init`` and ``upper bound``; their y-data are the
    numbers of ``result`` (the baseline and bound as flat lines over the snapshot range). The grid has
    no empty axes: the legend and the key (:func:`kl_note`) fill a free grid slot, or sit below.
    """
    from neurosem.analysis.kl import curves_for_plot

    panels = curves_for_plot(result, layers)
    steps = np.asarray(result["steps"], dtype=np.float64)
    x_ends = [float(steps.min()), float(steps.max())] if len(steps) else [0.0, 1.0]
    if x_ends[0] == x_ends[1]:
        x_ends[1] = x_ends[0] + 1.0
    positive = steps[steps > 0]
    log_x = positive.size > 1 and positive.max() / positive.min() >= 50
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    free = nrows * ncols - len(panels)
    with plot_style():
        height = 2.1 * nrows + (0 if free else 0.9)
        fig, axes = new_figure(nrows, ncols, figsize=(2.6 * ncols, height), squeeze=False)
        pal = category_palette(["object", "part", "scene"])
        colors = {"embedding": pal["object"], "random init": pal["part"], "upper bound": pal["scene"]}
        for ax, (name, lay) in zip(axes.flat, panels):
            ub = _upper_bound(lay)
            rmean, rstd = lay["random"]["mean"], lay["random"]["std"]
            ax.plot(steps, lay["embedding"], marker="o", markersize=2.5, lw=1.2, color=colors["embedding"],
                    label="embedding")
            ax.fill_between(x_ends, [rmean - rstd] * 2, [rmean + rstd] * 2, color=colors["random init"],
                            alpha=0.18, lw=0)
            ax.plot(x_ends, [rmean, rmean], ls="--", lw=1.0, color=colors["random init"], label="random init")
            ax.plot(x_ends, [ub, ub], ls=":", lw=1.4, color=colors["upper bound"], label="upper bound",
                    clip_on=False)
            if log_x:
                ax.set_xscale("symlog", linthresh=1.0)
            low, high = ax.get_ylim()
            ax.set_ylim(bottom=min(0.0, ub) - 0.05 * (high - min(0.0, ub)))   # a bound at 0 stays visible
            ax.set_title("mean over layers" if name == "mean" else name)
            ax.set_xlabel({"step": "optimiser step"}.get(result.get("step_unit"), result.get("step_unit", "step")))
            ax.set_ylabel("KL (nats)")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        note = kl_note(result, panels)
        if free:
            fig.tight_layout()
            slot = axes.flat[len(panels)].get_position()
            for ax in list(axes.flat[len(panels):]):
                fig.delaxes(ax)
            x0 = slot.x0 - 0.4 * (slot.x0 - axes.flat[len(panels) - 1].get_position().x1)
            legend = fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(x0, slot.y1), frameon=False,
                                fontsize=7)
            box = legend.get_window_extent(fig.canvas.get_renderer()).transformed(fig.transFigure.inverted())
            fig.text(x0 + 0.01, box.y0 - 0.02, note, fontsize=6, ha="left", va="top", wrap=True)
        else:
            fig.tight_layout(rect=(0, 0.9 / height, 1, 1))
            fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.45 / height), ncol=3,
                       frameon=False, fontsize=7)
            fig.text(0.02, 0.02, note, fontsize=6, ha="left", va="bottom", wrap=True)
    fig.neurosem_info = {"panels": [name for name, _ in panels], "note": note}
    return fig


# ------------------------------------------------------------------------------ entry points
#: Relative cost of each figure (measured on a ResNet18 run), so that the longest start first.
_COSTS = {"neighbours": 3.0, "kl_curves": 2.3, "additive": 2.0, "semantic_map": 1.7, "similarity_heatmap": 1.1,
          "dissect_summary": 0.4}


def make_figures(run: Any = None, formats: "Sequence[str] | str" = DEFAULT_FORMATS, dpi: int = DEFAULT_DPI,
                 layer: str | None = None, unit: "NeuronId | str | None" = None, n_images: int = 4,
                 workers: int | None = None) -> list[Path]:
    """Write the figures of a run into ``RUN/figures`` and return the written files.

    Draws ``neighbours`` and ``additive`` (need activations.h5), ``kl_curves`` (needs dissect.h5;
    reuses kl.json when it is up to date, computes it otherwise), ``semantic_map`` and
    ``similarity_heatmap`` of ``layer`` (default: the last embedded layer) around ``unit`` (default:
    :func:`~neurosem.analysis.defaults.default_unit`; the additive pair:
    :func:`~neurosem.analysis.defaults.default_pair`). A figure whose inputs are missing is skipped with a note on stderr.
    ``figures/figures.json`` lists what each figure shows. The figures are drawn side by side in
    ``workers`` processes (default: up to 2, :func:`~neurosem.analysis._parallel.default_workers`);
    the files do not depend on it.

    Example:
        >>> make_figures("runs/resnet18", formats=("pdf", "png"))   # doctest: +SKIP
        [PosixPath('runs/resnet18/figures/neighbours.pdf'), ...]
    """
    from neurosem.analysis._parallel import run_tasks
    from neurosem.analysis.query import _as_id, check_query_units, load_run_embedding, run_dir

    formats = check_formats(formats)
    rd = run_dir(run)
    emb = load_run_embedding(rd)
    if unit is not None:
        nid = _as_id(unit)
        check_query_units(rd, emb, [nid])
        layer = nid.layer
    layer = check_layer(rd, emb, layer)
    out_dir = rd.figures

    def save(name: str, fig: "Figure", info: dict[str, Any]) -> tuple[str, list[Path], dict[str, Any]]:
        paths = save_figure(fig, out_dir / name, formats, dpi=dpi, close=True)
        return name, paths, {"files": [p.name for p in paths], **info}

    stored: list[str] = []
    if rd.activations.exists():
        with open_store(rd) as store:
            stored = list(store.layers)
    names: list[str] = []
    if layer in stored:
        names += ["neighbours", "additive"]
    else:
        why = "no activations.h5" if not rd.activations.exists() else f"no activations of {layer} in activations.h5"
        log.warning("note: %s in %s: the neighbours and additive figures are skipped "
                    "(run `neurosem record ... --layers %s` to draw them)", why, rd.path, layer)
    if rd.dissection.exists():
        names += ["dissect_summary", "kl_curves"]
    else:
        log.warning("note: no dissect.h5 in %s: the KL figure is skipped (run `neurosem dissect` to draw it)", rd.path)
    names += ["semantic_map", "similarity_heatmap"]
    draw = {"neighbours": lambda: _neighbours_task(rd, emb, layer, unit, n_images, save),
            "additive": lambda: _additive_task(rd, layer, n_images, save),
            "dissect_summary": lambda: _summary_task(rd, save),
            "kl_curves": lambda: _kl_task(rd, save),
            "semantic_map": lambda: _map_task(rd, layer, save),
            "similarity_heatmap": lambda: _heatmap_task(rd, layer, save)}
    prefetch = _prefetch_map(rd, emb, layer, workers, len(names))
    if prefetch is not None:
        draw["semantic_map"] = lambda: (prefetch.wait(600), _map_task(rd, layer, save))[1]
    _preload(formats)
    try:
        done = run_tasks([draw[n] for n in names], workers=workers,
                         costs=[-1.0 if n == "semantic_map" and prefetch else _COSTS[n] for n in names])
    finally:
        if prefetch is not None:
            prefetch.join()
    written: list[Path] = []
    manifest: dict[str, Any] = {}
    for item in done:
        if item is not None:
            name, paths, info = item
            written.extend(paths)
            manifest[name] = info
    (out_dir / "figures.json").write_text(json.dumps(manifest, indent=2))
    return written


_Saved = tuple[str, list[Path], dict[str, Any]]

#: The matplotlib backend (and what it loads when writing) of each format.
_BACKENDS = {"pdf": ("matplotlib.backends.backend_pdf", "fontTools.subset"), "svg": ("matplotlib.backends.backend_svg",),
             "png": ("PIL.PngImagePlugin",), "eps": ("matplotlib.backends.backend_ps",), "jpg": ("PIL.JpegImagePlugin",)}


def _prefetch_map(rd: Any, emb: Any, layer: str, workers: int | None, n_tasks: int) -> Any:
    """With several workers and no cached map of ``layer``, its t-SNE started now in a background
    process (:class:`~neurosem.analysis._parallel.Background`) that writes the cache: it runs while
    this process loads the writers, on the core that would idle; the map task waits for it last."""
    from neurosem.analysis._parallel import Background, can_fork, default_workers
    from neurosem.analysis.maps import cached_embed_2d, map_cache_path, map_is_cached

    n = default_workers(n_tasks) if workers is None else int(workers)
    S = np.asarray(emb.vectors(layer))
    cache = map_cache_path(rd, layer)
    if n <= 1 or not can_fork() or len(S) < 50 or map_is_cached(S, "auto", cache):
        return None
    return Background(lambda: cached_embed_2d(S, "auto", cache))


def _preload(formats: Sequence[str]) -> None:
    """Import the writers of ``formats`` here, once, before the workers fork (each would import
    them again: about 1 s of CPU per worker for PDF and SVG, measured)."""
    import importlib

    for fmt in formats:
        for module in _BACKENDS.get(fmt, ()):
            importlib.import_module(module)


def _neighbours_task(rd: Any, emb: Any, layer: str, unit: "NeuronId | str | None", n_images: int,
                     save: Any) -> _Saved:
    """The neighbours figure of ``unit`` (default: :func:`choose_unit`'s) over its top images."""
    from neurosem.analysis.query import _as_id, load_run_dissection

    with open_store(rd) as store:
        dissected = rd.dissection.exists() and layer in (load_run_dissection(rd).layers)
        if unit is not None:
            nid, rows = _as_id(unit), None
        elif dissected:
            nid, rows = choose_unit(rd, layer, np.asarray(emb.vectors(layer), dtype=np.float64), n_images,
                                    store=store)
        else:
            nid, rows = default_unit(rd, layer), None
        if rows is None:
            score, mean = unit_maxima(store, layer, [nid.index], with_means=True)
            rows = top_rows(score[:, 0], n_images, tie=mean[:, 0])
    fig = neighbours_figure(rd, nid, n_images=n_images, rows=rows)
    return save("neighbours", fig, _jsonable(fig.neurosem_info))


def _additive_task(rd: Any, layer: str, n_images: int, save: Any) -> _Saved:
    """The additive figure of :func:`default_pair` over the top images of the pair's nearest unit."""
    a, b, c = default_pair(rd, layer)
    with open_store(rd) as store:
        score, mean = unit_maxima(store, layer, [c.index], with_means=True)
    fig = additive_figure(rd, a, add=[b], n_images=n_images, rows=top_rows(score[:, 0], n_images, tie=mean[:, 0]))
    return save("additive", fig, _jsonable(fig.neurosem_info))


def _summary_task(rd: Any, save: Any) -> _Saved:
    from neurosem.analysis.query import load_run_dissection
    from neurosem.dissect.report import summary_figure

    return save("dissect_summary", summary_figure(load_run_dissection(rd)), {"from": "dissect.h5"})


def _kl_task(rd: Any, save: Any) -> "_Saved | None":
    from neurosem.analysis.kl import kl_curves, read_kl_json

    try:
        result = read_kl_json(rd) or kl_curves(rd)
    except NeurosemError as exc:
        log.warning("note: the KL figure is skipped: %s", exc)
        return None
    return save("kl_curves", kl_figure(result), {"from": "kl.json"})


def _map_task(rd: Any, layer: str, save: Any) -> _Saved:
    fig = semantic_map_figure(rd, layer)
    return save("semantic_map", fig, {"layer": layer, "method": fig.neurosem_info["method"],
                                      "labelled": fig.neurosem_info["labelled"]})


def _heatmap_task(rd: Any, layer: str, save: Any) -> _Saved:
    fig = similarity_heatmap_figure(rd, layer)
    return save("similarity_heatmap", fig, {"layer": layer, "order": [int(u) for u in fig.neurosem_info["order"]]})


def query_figure(run: Any, neuron: "NeuronId | str", add: Sequence["NeuronId | str"] = (),
                 sub: Sequence["NeuronId | str"] = (), path: "str | Path" = "query.pdf", dpi: int = DEFAULT_DPI,
                 n_images: int = 4) -> list[Path]:
    """``neurosem query --figure PATH``: the neighbours figure of ``neuron`` (Fig. 2), or with
    ``add``/``sub`` the additive figure (Fig. 3). The format follows PATH's suffix (none: PDF, PNG
    and SVG). Returns the written files."""
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    formats = check_formats(suffix) if suffix else DEFAULT_FORMATS
    if add or sub:
        fig = additive_figure(run, neuron, add, sub, n_images=n_images)
    else:
        fig = neighbours_figure(run, neuron, n_images=n_images)
    return save_figure(fig, path.with_suffix("") if suffix else path, formats, dpi=dpi, close=True)


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in info.items()}
