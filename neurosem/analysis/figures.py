"""The paper's figures for a run (``neurosem figures``, ``neurosem query --figure``).

- ``neighbours``: a unit and its three most similar units (paper Fig. 2): the activation area of
  each unit as a light mask over the same images, the images where the query unit activates most;
- ``additive``: two units, the unit nearest to the sum of their vectors, and their masks (Fig. 3);
- ``kl_curves``: the KL curves of :mod:`neurosem.analysis.kl` (Fig. 4), one panel per layer;
- ``semantic_map``: a 2-D map of a layer's semantic vectors (PCA; t-SNE from 50 units), coloured by
  dissection category, the most interpretable units labelled;
- ``similarity_heatmap``: the cosine matrix of a layer's vectors, ordered by hierarchical clustering.

Masks: each unit's map is upsampled bilinearly (``align_corners=False``, as the dissection) to the
image size; the mask is where it exceeds the unit's dissection threshold (without a dissection:
half the unit's largest value over the images shown). The images come from the dataset recorded in
the run (``activations.h5`` provenance, opened with ``neurosem.data.open_image_dataset``); when they
cannot be read the maps are drawn alone and a note says so.

Every figure builder returns a matplotlib ``Figure`` (nothing saved), so its numbers can be checked;
:func:`make_figures` saves them with :func:`neurosem.analysis._plotstyle.save_figure` and lists what
it drew in ``figures/figures.json``.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from neurosem.analysis._plotstyle import (DEFAULT_DPI, DEFAULT_FORMATS, category_palette, check_formats,
                                          hide_ticks, new_figure, plot_style, save_figure)
from neurosem.errors import NeurosemError
from neurosem.ids import NeuronId

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from neurosem.run import RunDir

log = logging.getLogger("neurosem")

MASK_COLOR = (1.0, 0.93, 0.55)     # a light yellow fill ...
MASK_EDGE = (0.72, 0.53, 0.04)     # ... with a dark-gold outline, visible on light and dark images
MASK_ALPHA = 0.6
NONE_CATEGORY = "not interpretable"


# ------------------------------------------------------------------------------ activation maps
@dataclass
class Panels:
    """What a mask figure shows: per unit and image the upsampled map and its mask.

    ``maps: [U, I, H, W]`` float32, ``masks: [U, I, H, W]`` bool, ``images: [I, H, W, 3]`` in [0, 1]
    or ``None`` (maps drawn alone), ``rows``: the store rows of the images, ``ids``: their ids.
    """

    units: list[NeuronId]
    rows: list[int]
    ids: list[str]
    maps: np.ndarray
    masks: np.ndarray
    images: np.ndarray | None
    note: str | None = None
    thresholds: list[float] = field(default_factory=list)


def _open_store(rd: "RunDir") -> Any:
    from neurosem.store import ActivationStore

    if not rd.activations.exists():
        raise NeurosemError(
            f"the mask figures need the activations and {rd.path} has none (activations.h5 is missing): "
            f"run `neurosem record MODEL --data PATH --run {rd.path}` first")
    return ActivationStore.open(rd.activations)


def unit_maxima(store: Any, layer: str, units: Sequence[int], batch_size: int = 256,
                with_means: bool = False) -> "np.ndarray | tuple[np.ndarray, np.ndarray]":
    """Largest activation of each unit in each image: ``[n_done, len(units)]`` float32 (streamed).

    With ``with_means``, also the mean activation (same shape), which orders images of equal maxima.
    """
    out = np.empty((store.n_done, len(units)), dtype=np.float32)
    means = np.empty((store.n_done, len(units)), dtype=np.float32)
    idx = list(units)
    for start, batch in store.iter_batches([layer], batch_size=batch_size):
        acts = batch[layer][:, idx].reshape(len(batch[layer]), len(idx), -1)
        out[start:start + len(acts)] = acts.max(axis=2)
        means[start:start + len(acts)] = acts.astype(np.float32).mean(axis=2)
    return (out, means) if with_means else out


def top_images(store: Any, layer: str, unit: int, n: int) -> list[int]:
    """Store rows of the ``n`` images where ``unit`` reaches its largest activations.

    Equal maxima (a saturated unit) are ordered by the mean activation, then by the lower row,
    as in the dissection report.
    """
    peak, mean = unit_maxima(store, layer, [unit], with_means=True)
    return top_rows(peak[:, 0], n, tie=mean[:, 0])


def top_rows(score: np.ndarray, n: int, tie: "np.ndarray | None" = None) -> list[int]:
    """Indices of the ``n`` largest scores; ties broken by the larger ``tie`` value, then the lower index."""
    score = np.asarray(score, dtype=np.float64)
    rows = np.arange(len(score))
    keys = (rows, -score) if tie is None else (rows, -np.asarray(tie, dtype=np.float64), -score)
    return [int(i) for i in np.lexsort(keys)[:n]]


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling (``align_corners=False``) of ``maps: [..., h, w]`` to ``[..., H, W]`` float32."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.ascontiguousarray(maps, dtype=np.float32))
    lead = x.shape[:-2]
    x = x.reshape(-1, 1, *x.shape[-2:])
    y = F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return y.reshape(*lead, *y.shape[-2:]).numpy()


def dataset_spec(rd: "RunDir", store: Any) -> str | None:
    """The data spec the activations were recorded from (``provenance["data"]`` of activations.h5,
    else ``run.json["record"]["data"]``), or None (e.g. a Dataset object, recorded as ``<Class>``)."""
    prov = getattr(store, "provenance", None) or {}
    record_meta = rd.read_meta().get("record", {}) if rd.meta_file.exists() else {}
    for source in (prov, record_meta if isinstance(record_meta, dict) else {}):
        value = source.get("data")
        if isinstance(value, str) and value and not value.startswith("<"):
            return value
    return None


def load_images(rd: "RunDir", store: Any, rows: Sequence[int]) -> tuple[np.ndarray | None, str | None]:
    """The images of store ``rows`` as ``[I, H, W, 3]`` in [0, 1], or ``(None, why)`` when unavailable.

    The dataset is the one recorded in the run; it must still have the recorded fingerprint and
    each image the recorded id.
    """
    spec = dataset_spec(rd, store)
    if spec is None:
        return None, "the run does not record where its images are"
    try:
        from neurosem.data import dataset_fingerprint, open_image_dataset

        recorded = (getattr(store, "provenance", None) or {}).get("data_fingerprint")
        if recorded and str(dataset_fingerprint(spec)) != str(recorded):
            return None, f"{spec} changed since the activations were recorded"
        ds = open_image_dataset(spec)
        ids = store.image_ids
        images = []
        for r in rows:
            item = ds[int(r)]
            if "id" in item and str(item["id"]) != ids[r]:
                return None, f"image {r} of {spec} is {item['id']!r}, the run recorded {ids[r]!r}"
            img = np.asarray(item["image"], dtype=np.float32)
            images.append(np.clip(np.transpose(img, (1, 2, 0)), 0.0, 1.0))
    except (NeurosemError, OSError, ImportError, IndexError, KeyError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"the images of {spec} cannot be read: {first}"
    if len({im.shape for im in images}) > 1:
        return None, "the images have different sizes"
    return np.stack(images), None


def mask_panels(rd: "RunDir", units: Sequence[NeuronId], image_unit: NeuronId, n_images: int = 4,
                store: Any = None, rows: Sequence[int] | None = None) -> Panels:
    """Maps and masks of ``units`` on the ``n_images`` images where ``image_unit`` activates most
    (``rows``: those store rows, when already known)."""
    from neurosem.analysis.query import load_run_dissection

    own = store is None
    store = _open_store(rd) if own else store
    try:
        layer = image_unit.layer
        rows = list(rows) if rows is not None else top_images(store, layer, image_unit.index, n_images)
        ids = [store.image_ids[r] for r in rows]
        raw = np.stack([store.read(layer, r, r + 1)[0, [u.index for u in units]] for r in rows], axis=1)
        raw = raw.astype(np.float32)                                   # [U, I, h, w]
        images, why = load_images(rd, store, rows)
    finally:
        if own:
            store.close()
    if images is not None:
        size = images.shape[1:3]
    else:
        h, w = raw.shape[-2:]
        scale = max(1, math.ceil(112 / max(h, w)))
        size = (h * scale, w * scale)
    maps = upsample(raw, size)
    dissection = load_run_dissection(rd)
    if dissection is not None and layer in dissection.layers:
        thr_all = np.asarray(dissection.threshold(layer), dtype=np.float32)
        thresholds = [float(thr_all[u.index]) for u in units]
    else:
        thresholds = [0.5 * float(raw[i].max()) for i in range(len(units))]
    masks = np.stack([maps[i] > thresholds[i] for i in range(len(units))])
    note = None
    if images is None:
        note = f"images unavailable ({why}): activation maps shown alone"
        log.warning("note: %s", note)
    return Panels(list(units), rows, ids, maps, masks, images, note, thresholds)


def _draw_panel(ax: Any, panels: Panels, u: int, i: int) -> None:
    """One image with the unit's light mask, or the map alone (with the mask outline)."""
    mask = panels.masks[u, i]
    if panels.images is not None:
        ax.imshow(panels.images[i], interpolation="nearest")
        overlay = np.zeros((*mask.shape, 4), dtype=np.float32)
        overlay[..., :3] = MASK_COLOR
        overlay[..., 3] = np.where(mask, MASK_ALPHA, 0.0)
        ax.imshow(overlay, interpolation="nearest")
    else:
        vmax = float(panels.maps[u].max()) or 1.0
        ax.imshow(panels.maps[u, i], cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[MASK_EDGE if panels.images is not None
                                                                  else MASK_COLOR], linewidths=0.7)
    hide_ticks(ax)


def _unit_text(nid: NeuronId, dissection: Any) -> str:
    from neurosem.analysis.query import unit_info

    info = unit_info(dissection, nid.layer, nid.index)
    if not info:
        return str(nid)
    return f"{nid}\n{info['label']} ({info['category']}, IoU {info['iou']:.3f})"


def _mask_grid(panels: Panels, row_titles: Sequence[str], suptitle: str) -> "Figure":
    n_units, n_img = len(panels.units), len(panels.rows)
    with plot_style():
        fig, axes = new_figure(n_units, n_img, figsize=(1.55 * n_img + 0.4, 1.55 * n_units + 0.5), squeeze=False)
        for u in range(n_units):
            for i in range(n_img):
                _draw_panel(axes[u, i], panels, u, i)
            axes[u, 0].set_title(row_titles[u], loc="left", fontsize=7)
        for i in range(n_img):
            axes[-1, i].set_xlabel(_short_id(panels.ids[i]), fontsize=6)
        fig.suptitle(suptitle, fontsize=8)
        fig.subplots_adjust(wspace=0.05, hspace=0.55)
    return fig


def _short_id(image_id: str, width: int = 22) -> str:
    name = Path(image_id).name or image_id
    return name if len(name) <= width else "…" + name[-(width - 1):]


# ------------------------------------------------------------------------------ Fig. 2 and 3
def neighbours_figure(run: Any, unit: "NeuronId | str", n_neighbours: int = 3, n_images: int = 4,
                      rows: Sequence[int] | None = None) -> "Figure":
    """Paper Fig. 2: ``unit`` and its ``n_neighbours`` most similar units, masks over the same images.

    The images are those where ``unit`` activates most (``rows``: their store rows, when known).
    Row titles carry the unit ids and cosines.
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
                         "images": panels.ids, "note": panels.note}
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
                         "similarity": best[0]["similarity"], "images": panels.ids, "note": panels.note}
    return fig


# ------------------------------------------------------------------------------ Fig. 4
def kl_figure(result: dict[str, Any], layers: Sequence[str] | None = None) -> "Figure":
    """Paper Fig. 4: KL against training progress; per panel the embedding's curve, the random baseline
    (mean ± std over seeds) and the upper bound. ``result`` is :func:`neurosem.analysis.kl.kl_curves`'s.

    Lines carry the labels ``embedding``, ``random init`` and ``upper bound``; their y-data are the
    numbers of ``result`` (the baseline and bound as flat lines over the snapshot range).
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
    with plot_style():
        fig, axes = new_figure(nrows, ncols, figsize=(2.6 * ncols, 2.1 * nrows), squeeze=False)
        pal = category_palette(["object", "part", "scene"])
        colors = {"embedding": pal["object"], "random init": pal["part"], "upper bound": pal["scene"]}
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (name, lay) in zip(axes.flat, panels):
            ub = lay["upper_bound"]["kl"] if isinstance(lay["upper_bound"], dict) else lay["upper_bound"]
            rmean, rstd = lay["random"]["mean"], lay["random"]["std"]
            ax.plot(steps, lay["embedding"], marker="o", markersize=2.5, lw=1.2, color=colors["embedding"],
                    label="embedding")
            ax.fill_between(x_ends, [rmean - rstd] * 2, [rmean + rstd] * 2, color=colors["random init"],
                            alpha=0.18, lw=0)
            ax.plot(x_ends, [rmean, rmean], ls="--", lw=1.0, color=colors["random init"], label="random init")
            ax.plot(x_ends, [ub, ub], ls=":", lw=1.2, color=colors["upper bound"], label="upper bound")
            if log_x:
                ax.set_xscale("symlog", linthresh=1.0)
            ax.set_title("mean over layers" if name == "mean" else name)
            ax.set_xlabel({"step": "optimiser step"}.get(result.get("step_unit"), result.get("step_unit", "step")))
            ax.set_ylabel("KL (nats)")
        axes.flat[0].legend(frameon=False, fontsize=6)
        fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ map and heat map
def _unit_categories(dis: Any, layer: str, n_units: int) -> tuple[list[str], np.ndarray]:
    """Category per unit (``not interpretable`` below the IoU threshold) and best IoU ``[C]``."""
    from neurosem.analysis.query import unit_info

    if dis is None or layer not in dis.layers:
        return [NONE_CATEGORY] * n_units, np.zeros(n_units)
    infos = [unit_info(dis, layer, u) for u in range(n_units)]
    cats = [i["category"] if i["interpretable"] else NONE_CATEGORY for i in infos]
    return cats, np.array([i["iou"] for i in infos])


def embed_2d(S: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``S: [C, K]`` (unit-normalised): PCA, or t-SNE from 50 rows."""
    X = np.asarray(S, dtype=np.float64)
    X = X / np.maximum(np.linalg.norm(X, axis=1), 1e-12)[:, None]
    if method == "auto":
        method = "tsne" if len(X) >= 50 else "pca"
    if len(X) < 3 or X.shape[1] < 2:
        return np.column_stack([X[:, 0], X[:, 1] if X.shape[1] > 1 else np.zeros(len(X))]), "raw"
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (len(X) - 1) / 3.0))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                  metric="cosine").fit_transform(X)
        return xy, "t-SNE"
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(X), "PCA"


def semantic_map_figure(run: Any, layer: str | None = None, n_labels: int = 10, method: str = "auto") -> "Figure":
    """A 2-D map of a layer's semantic vectors coloured by dissection category; the ``n_labels`` most
    interpretable units are labelled ``index label``."""
    from neurosem.analysis.query import load_run_dissection, load_run_embedding, run_dir

    rd = run_dir(run)
    emb = load_run_embedding(rd)
    layer = _check_layer(rd, emb, layer)
    S = np.asarray(emb.vectors(layer))
    dis = load_run_dissection(rd)
    cats, ious = _unit_categories(dis, layer, len(S))
    xy, how = embed_2d(S, method)
    order_cats = sorted(set(cats) - {NONE_CATEGORY}) + ([NONE_CATEGORY] if NONE_CATEGORY in cats else [])
    pal = category_palette([c for c in order_cats if c != NONE_CATEGORY])
    pal[NONE_CATEGORY] = (0.72, 0.72, 0.72)
    with plot_style():
        fig, ax = new_figure(1, 1, figsize=(4.2, 3.6))
        for cat in order_cats:
            sel = np.array([c == cat for c in cats])
            ax.scatter(xy[sel, 0], xy[sel, 1], s=9 if cat != NONE_CATEGORY else 6, color=pal[cat],
                       label=f"{cat} ({int(sel.sum())})", lw=0, alpha=0.9, zorder=3 if cat != NONE_CATEGORY else 2)
        labelled = []
        if dis is not None and layer in dis.layers:
            ranked = np.lexsort((np.arange(len(ious)), -ious))
            for u in [int(u) for u in ranked[:n_labels] if cats[int(u)] != NONE_CATEGORY]:
                label = dis.unit_label(layer, u)[0]
                ax.annotate(f"{u} {label}", xy[u], fontsize=5, xytext=(2, 2), textcoords="offset points")
                labelled.append(u)
        ax.set_title(f"{layer}: semantic vectors ({how}, {len(S)} units)")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(frameon=False, fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.neurosem_info = {"layer": layer, "method": how, "xy": xy, "categories": cats, "labelled": labelled}
    return fig


def cluster_order(S: np.ndarray) -> tuple[np.ndarray, Any]:
    """Leaf order of average-linkage clustering on cosine distance of the rows of ``S`` (and the linkage)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    from neurosem.analysis.kl import cosine_matrix

    if len(S) < 2:
        return np.arange(len(S)), None
    D = np.clip(1.0 - cosine_matrix(S), 0.0, 2.0)
    np.fill_diagonal(D, 0.0)
    D = (D + D.T) / 2
    Z = linkage(squareform(D, checks=False), method="average", optimal_ordering=len(S) <= 512)
    return leaves_list(Z), Z


def similarity_heatmap_figure(run: Any, layer: str | None = None) -> "Figure":
    """The cosine similarity of a layer's semantic vectors, rows and columns in clustering order,
    with the dendrogram above."""
    from scipy.cluster.hierarchy import dendrogram

    from neurosem.analysis.kl import cosine_matrix
    from neurosem.analysis.query import load_run_embedding, run_dir

    rd = run_dir(run)
    emb = load_run_embedding(rd)
    layer = _check_layer(rd, emb, layer)
    S = np.asarray(emb.vectors(layer))
    order, Z = cluster_order(S)
    cos = cosine_matrix(S)[np.ix_(order, order)]
    with plot_style():
        fig = new_figure(1, 1, figsize=(4.0, 4.4))[0]
        fig.clear()
        grid = fig.add_gridspec(2, 2, height_ratios=[1, 5], width_ratios=[20, 1], hspace=0.02, wspace=0.04)
        ax_d = fig.add_subplot(grid[0, 0])
        ax = fig.add_subplot(grid[1, 0])
        cax = fig.add_subplot(grid[1, 1])
        if Z is not None:
            dendrogram(Z, ax=ax_d, no_labels=True, color_threshold=0, above_threshold_color="0.35",
                       link_color_func=lambda _k: "0.35")
        hide_ticks(ax_d)
        ax_d.set_title(f"{layer}: cosine of semantic vectors (clustered)")
        im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest", aspect="auto")
        if len(S) <= 40:
            ax.set_xticks(range(len(S)), [str(int(u)) for u in order], fontsize=5, rotation=90)
            ax.set_yticks(range(len(S)), [str(int(u)) for u in order], fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_xlabel("unit (clustering order)")
        fig.colorbar(im, cax=cax)
    fig.neurosem_info = {"layer": layer, "order": order, "matrix": cos}
    return fig


# ------------------------------------------------------------------------------ defaults
def _check_layer(rd: "RunDir", emb: Any, layer: str | None) -> str:
    if layer is None:
        return emb.layers[-1]
    if layer not in emb.layers:
        raise NeurosemError(f"layer {layer!r} has no embedding in {rd.path} (embedded: {', '.join(emb.layers)})")
    return layer


def default_unit(run: Any, layer: str | None = None) -> NeuronId:
    """The unit shown by default: the most interpretable unit of ``layer`` (default: the last embedded
    layer); without a dissection, the unit whose three nearest units are the most similar."""
    from neurosem.analysis.query import cosine_to_rows, load_run_dissection, load_run_embedding, run_dir

    rd = run_dir(run)
    emb = load_run_embedding(rd)
    layer = _check_layer(rd, emb, layer)
    S = np.asarray(emb.vectors(layer), dtype=np.float64)
    dis = load_run_dissection(rd)
    if dis is not None and layer in dis.layers:
        _, ious = _unit_categories(dis, layer, len(S))
        return NeuronId(layer, int(np.lexsort((np.arange(len(ious)), -ious))[0]))
    scores = []
    for i in range(len(S)):
        sims = np.delete(cosine_to_rows(S[i], S), i)
        scores.append(np.sort(sims)[-3:].mean() if sims.size else 0.0)
    return NeuronId(layer, int(np.argmax(scores)))


def default_pair(run: Any, layer: str | None = None, pool: int = 48) -> tuple[NeuronId, NeuronId, NeuronId]:
    """Two units ``a, b`` and the unit ``c`` nearest to ``s_a + s_b`` for the additive figure.

    Among the ``pool`` most interpretable units (all units without a dissection, capped at ``pool``
    by index) the pair is chosen whose sum's nearest unit gains most over either operand alone:
    ``cos(s_a + s_b, s_c) − max(cos(s_a, s_c), cos(s_b, s_c))``; ties by the lower indices.
    """
    from neurosem.analysis.kl import cosine_matrix
    from neurosem.analysis.query import load_run_dissection, load_run_embedding, nearest_units, run_dir

    rd = run_dir(run)
    emb = load_run_embedding(rd)
    layer = _check_layer(rd, emb, layer)
    S = np.asarray(emb.vectors(layer), dtype=np.float64)
    if len(S) < 3:
        raise NeurosemError(f"layer {layer} has {len(S)} units: the additive figure needs at least 3")
    dis = load_run_dissection(rd)
    if dis is not None and layer in dis.layers:
        _, ious = _unit_categories(dis, layer, len(S))
        cand = [int(u) for u in np.lexsort((np.arange(len(ious)), -ious))[:pool]]
    else:
        cand = list(range(min(pool, len(S))))
    cand.sort()
    cos = cosine_matrix(S)
    best: tuple[float, int, int, int] | None = None
    for ia, a in enumerate(cand):
        for b in cand[ia + 1:]:
            try:
                (c, sim), = nearest_units(S, a, add=(b,), k=1)
            except NeurosemError:          # s_a + s_b = 0: no direction to compare
                continue
            gain = sim - max(cos[a, c], cos[b, c])
            if best is None or gain > best[0] + 1e-12:
                best = (gain, a, b, c)
    if best is None:
        raise NeurosemError(f"no pair of units of {layer} has a non-zero sum: the additive figure needs one")
    return NeuronId(layer, best[1]), NeuronId(layer, best[2]), NeuronId(layer, best[3])


# ------------------------------------------------------------------------------ entry points
def make_figures(run: Any = None, formats: "Sequence[str] | str" = DEFAULT_FORMATS, dpi: int = DEFAULT_DPI,
                 layer: str | None = None, unit: "NeuronId | str | None" = None, n_images: int = 4) -> list[Path]:
    """Write the figures of a run into ``RUN/figures`` and return the written files.

    Draws ``neighbours`` and ``additive`` (need activations.h5), ``kl_curves`` (needs dissect.h5;
    reuses kl.json when it is up to date, computes it otherwise), ``semantic_map`` and
    ``similarity_heatmap`` of ``layer`` (default: the last embedded layer) around ``unit`` (default:
    :func:`default_unit`). A figure whose inputs are missing is skipped with a note on stderr.
    ``figures/figures.json`` lists what each figure shows.

    Example:
        >>> make_figures("runs/resnet18", formats=("pdf", "png"))   # doctest: +SKIP
        [PosixPath('runs/resnet18/figures/neighbours.pdf'), ...]
    """
    from neurosem.analysis.kl import kl_curves, read_kl_json
    from neurosem.analysis.query import _as_id, check_query_units, load_run_embedding, run_dir

    formats = check_formats(formats)
    rd = run_dir(run)
    emb = load_run_embedding(rd)
    if unit is not None:
        nid = _as_id(unit)
        check_query_units(rd, emb, [nid])
        layer = nid.layer
    layer = _check_layer(rd, emb, layer)
    nid = _as_id(unit) if unit is not None else default_unit(rd, layer)
    out_dir = rd.figures
    written: list[Path] = []
    manifest: dict[str, Any] = {}

    def save(name: str, fig: "Figure", info: dict[str, Any]) -> None:
        paths = save_figure(fig, out_dir / name, formats, dpi=dpi, close=True)
        written.extend(paths)
        manifest[name] = {"files": [p.name for p in paths], **info}

    stored: list[str] = []
    if rd.activations.exists():
        with _open_store(rd) as store:
            stored = list(store.layers)
    if layer in stored:
        a, b, c = default_pair(rd, layer)
        with _open_store(rd) as store:          # one pass over the layer finds both sets of images
            score, mean = unit_maxima(store, layer, [nid.index, c.index], with_means=True)
        fig = neighbours_figure(rd, nid, n_images=n_images, rows=top_rows(score[:, 0], n_images, tie=mean[:, 0]))
        save("neighbours", fig, _jsonable(fig.neurosem_info))
        fig = additive_figure(rd, a, add=[b], n_images=n_images, rows=top_rows(score[:, 1], n_images, tie=mean[:, 1]))
        save("additive", fig, _jsonable(fig.neurosem_info))
    else:
        why = "no activations.h5" if not rd.activations.exists() else f"no activations of {layer} in activations.h5"
        log.warning("note: %s in %s: the neighbours and additive figures are skipped "
                    "(run `neurosem record ... --layers %s` to draw them)", why, rd.path, layer)
    if rd.dissection.exists():
        try:
            result = read_kl_json(rd) or kl_curves(rd)
        except NeurosemError as exc:
            log.warning("note: the KL figure is skipped: %s", exc)
        else:
            save("kl_curves", kl_figure(result), {"from": "kl.json"})
    else:
        log.warning("note: no dissect.h5 in %s: the KL figure is skipped (run `neurosem dissect` to draw it)", rd.path)
    fig = semantic_map_figure(rd, layer)
    save("semantic_map", fig, {"layer": layer, "method": fig.neurosem_info["method"],
                               "labelled": fig.neurosem_info["labelled"]})
    fig = similarity_heatmap_figure(rd, layer)
    save("similarity_heatmap", fig, {"layer": layer, "order": [int(u) for u in fig.neurosem_info["order"]]})
    (out_dir / "figures.json").write_text(json.dumps(manifest, indent=2))
    return written


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
