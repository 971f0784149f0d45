"""The map figures of a layer's semantic vectors (``neurosem figures``).

- ``semantic_map``: a 2-D map of the vectors (PCA; t-SNE from 50 units) coloured by the category
  of each unit's best dissection label; a readable subset of the interpretable units is labelled,
  the highest IoU first, without overlap (:func:`place_labels`);
- ``similarity_heatmap``: the cosine matrix of the vectors, rows and columns in the leaf order of
  average-linkage clustering (scipy), the dendrogram above, a labelled colour bar.

Example:
    >>> fig = semantic_map_figure("runs/resnet18", "layer4")      # doctest: +SKIP
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from neurosem.analysis._plotstyle import category_palette, hide_ticks, new_figure, plot_style
from neurosem.analysis.defaults import NONE_CATEGORY, check_layer, unit_categories

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from matplotlib.figure import Figure


#: Bumped when the map's t-SNE changes, so that cached coordinates of the old one are not reused.
TSNE_VERSION = 1


def embed_2d(S: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``S: [C, K]`` (unit-normalised): PCA, or t-SNE from 50 rows.

    t-SNE is :func:`neurosem.analysis._tsne.tsne` (exact, scikit-learn's schedule, cosine distances,
    perplexity ``min(30, (C - 1) / 3)``, PCA start; deterministic, so ``seed`` plays no part); PCA
    is :func:`~neurosem.analysis._tsne.pca_2d`.
    """
    from neurosem.analysis._tsne import cosine_distances, pca_2d, tsne

    X = np.asarray(S, dtype=np.float64)
    X = X / np.maximum(np.linalg.norm(X, axis=1), 1e-12)[:, None]
    if method == "auto":
        method = "tsne" if len(X) >= 50 else "pca"
    if len(X) < 3 or X.shape[1] < 2:
        return np.column_stack([X[:, 0], X[:, 1] if X.shape[1] > 1 else np.zeros(len(X))]), "raw"
    if method == "tsne":
        from threadpoolctl import threadpool_limits

        # one BLAS thread: the products of a few hundred points gain nothing from more, and on a
        # busy machine the threads wait on each other (2 s -> 10 s for 512 units, measured)
        with threadpool_limits(limits=1, user_api="blas"):
            xy, _ = tsne(cosine_distances(X), pca_2d(X), perplexity=float(min(30.0, (len(X) - 1) / 3.0)))
        return xy, "t-SNE"
    return pca_2d(X), "PCA"


def map_key(S: np.ndarray, method: str) -> str:
    """The content hash that cached map coordinates of ``S: [C, K]`` are stored under (sha256 hex of
    the map's version, the method and the vectors as float64)."""
    import hashlib

    X = np.ascontiguousarray(S, dtype=np.float64)
    h = hashlib.sha256(f"neurosem-map-v{TSNE_VERSION}:{method}:{X.shape}".encode())
    h.update(X.tobytes())
    return h.hexdigest()


def cached_embed_2d(S: np.ndarray, method: str = "auto", cache: "Path | None" = None) -> tuple[np.ndarray, str]:
    """:func:`embed_2d`, reading and writing the coordinates in the file ``cache`` (``.npz``; None:
    no cache) under :func:`map_key`: a second map of the same vectors costs no t-SNE, and a changed
    embedding (or method, or map version) is computed afresh and replaces the entry."""
    if cache is None:
        return embed_2d(S, method)
    key = map_key(S, method)
    try:
        with np.load(cache, allow_pickle=False) as data:
            if str(data["key"]) == key:
                return np.array(data["xy"], dtype=np.float64), str(data["how"])
    except (OSError, KeyError, ValueError):
        pass                                    # no cache yet, or unreadable: compute afresh
    xy, how = embed_2d(S, method)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, key=np.array(key), xy=xy, how=np.array(how))
        tmp.replace(cache)
    except OSError:
        pass                                    # a read-only run still gets its figure
    return xy, how


def map_is_cached(S: np.ndarray, method: str, cache: "Path") -> bool:
    """Whether ``cache`` holds the coordinates of ``S: [C, K]`` by ``method`` (:func:`map_key`)."""
    try:
        with np.load(cache, allow_pickle=False) as data:
            return str(data["key"]) == map_key(S, method)
    except (OSError, KeyError, ValueError):
        return False


def map_cache_path(rd: Any, layer: str) -> "Path":
    """Where the map coordinates of ``layer`` are cached: ``RUN/figures/.cache/map-<layer>.npz``."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in layer)
    return rd.figures / ".cache" / f"map-{safe}.npz"


#: Where a map label may go relative to its point (offset points, alignment), in order of preference.
_LABEL_SPOTS = ((3, 2, "left", "bottom"), (-3, 2, "right", "bottom"), (3, -2, "left", "top"),
                (-3, -2, "right", "top"), (4, 0, "left", "center"), (-4, 0, "right", "center"))


def _overlaps(box: Any, others: Sequence[Any]) -> bool:
    return any(box.x0 < o.x1 and o.x0 < box.x1 and box.y0 < o.y1 and o.y0 < box.y1 for o in others)


def place_labels(ax: Any, xy: np.ndarray, texts: dict[int, str], fontsize: float = 5.5,
                 max_labels: int = 10, point_px: float = 2.5) -> list[int]:
    """Label points of ``ax`` without overlap: greedy, in the order of ``texts`` (point index -> text).

    Each label tries the spots of ``_LABEL_SPOTS`` around its point and takes the first whose box, in
    display coordinates, lies inside the axes and overlaps neither a placed label nor another
    labelled candidate's marker (a ``point_px`` box); a label that fits nowhere is left out. The axes
    limits must be final. Returns the labelled point indices, in placing order.
    """
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(np.asarray(xy, dtype=np.float64))
    markers = {u: Bbox.from_extents(pts[u, 0] - point_px, pts[u, 1] - point_px,
                                    pts[u, 0] + point_px, pts[u, 1] + point_px) for u in texts}
    placed: list[Any] = []
    done: list[int] = []
    for u, text in texts.items():
        if len(done) >= max_labels:
            break
        obstacles = placed + [m for v, m in markers.items() if v != u]
        for dx, dy, ha, va in _LABEL_SPOTS:
            ann = ax.annotate(text, xy[u], xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              ha=ha, va=va, zorder=4)
            box = ann.get_window_extent(renderer).expanded(1.04, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not _overlaps(box, obstacles):
                placed.append(box)
                done.append(u)
                break
            ann.remove()
    return done


def semantic_map_figure(run: Any, layer: str | None = None, n_labels: int = 10, method: str = "auto",
                        cache: bool = True) -> "Figure":
    """A 2-D map of a layer's semantic vectors coloured by dissection category; up to ``n_labels``
    interpretable units are labelled ``index label``, the highest IoU first, as many as fit without
    overlapping (:func:`place_labels`). ``cache``: reuse (and keep) the coordinates in
    :func:`map_cache_path` when the vectors are the same (:func:`cached_embed_2d`)."""
    from neurosem.analysis.query import load_run_dissection, load_run_embedding, run_dir

    rd = run_dir(run)
    emb = load_run_embedding(rd)
    layer = check_layer(rd, emb, layer)
    S = np.asarray(emb.vectors(layer))
    dis = load_run_dissection(rd)
    cats, ious = unit_categories(dis, layer, len(S))
    xy, how = cached_embed_2d(S, method, map_cache_path(rd, layer) if cache else None)
    order_cats = sorted(set(cats) - {NONE_CATEGORY}) + ([NONE_CATEGORY] if NONE_CATEGORY in cats else [])
    pal = category_palette([c for c in order_cats if c != NONE_CATEGORY])
    pal[NONE_CATEGORY] = (0.72, 0.72, 0.72)
    axis = {"PCA": "PC", "t-SNE": "t-SNE", "raw": "vector component"}[how]
    with plot_style():
        fig, ax = new_figure(1, 1, figsize=(4.2, 3.6))
        for cat in order_cats:
            sel = np.array([c == cat for c in cats])
            ax.scatter(xy[sel, 0], xy[sel, 1], s=12 if cat != NONE_CATEGORY else 6, color=pal[cat],
                       label=f"{cat} ({int(sel.sum())})", lw=0, alpha=0.9, zorder=3 if cat != NONE_CATEGORY else 2)
        ax.set_title(f"{layer}: semantic vectors ({how}, {len(S)} units)")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{axis} 1")
        ax.set_ylabel(f"{axis} 2")
        ax.legend(frameon=False, fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5),
                  title="best label's category", title_fontsize=6)
        ax.margins(0.06)
        ax.autoscale_view()
        labelled: list[int] = []
        if dis is not None and layer in dis.layers:
            ranked = [int(u) for u in np.lexsort((np.arange(len(ious)), -ious)) if cats[int(u)] != NONE_CATEGORY]
            texts = {u: f"{u} {dis.unit_label(layer, u)[0]}" for u in ranked}
            labelled = place_labels(ax, xy, texts, max_labels=n_labels)
            if labelled:                       # ring the labelled points: each label names one of them
                ax.scatter(xy[labelled, 0], xy[labelled, 1], s=30, facecolors="none", edgecolors="0.1",
                           linewidths=0.6, zorder=4)
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
    layer = check_layer(rd, emb, layer)
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
        ax.set_ylabel("unit (clustering order)")
        fig.colorbar(im, cax=cax, label="cosine similarity")
    fig.neurosem_info = {"layer": layer, "order": order, "matrix": cos}
    return fig
