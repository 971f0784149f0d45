"""Global interpretation from the concept vectors (Gu & Tresp 2019): what a layer knows.

Per layer, in ``concepts/global.json`` (and figures under ``figures/``):

- ``similarity``: the concept–concept cosine matrix of the vectors ``W [K, K]``, with the order of
  an average-linkage clustering on ``1 − cos`` (the heat map is drawn in that order); pixel
  concepts' vectors act on ``a(x)``, image concepts' on the pooled raw maps: the cosine compares
  their directions over the same units;
- ``top_units``: the units with the largest weights in each concept vector;
- ``classes`` (when the layer feeds a linear classifier through global average pooling): the
  cosine of each class weight vector ``V_k`` with each concept vector, and each class's top concepts;
- ``semantic`` (when the run has ``embedding.h5`` for the layer), the link to the paper's neuron
  embedding in both directions: (concept -> embedding) for each concept the mean pairwise cosine
  of the semantic vectors of its top units against the same mean over random unit sets of the
  same size (seeded; ``p`` = the share of random sets at least as close); (embedding -> concept)
  the Pearson correlation over unit pairs between the semantic cosine and the cosine of the
  units' concept-weight profiles ``W[:, u]``.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

TOP_UNITS = 5
RANDOM_SETS = 1000


def cosine_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``[K, K]`` cosine similarity of the rows of ``x [K, C]`` (a zero row: 0 with every row).

    Example:
        >>> cosine_rows(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])).round(3).tolist()
        [[1.0, 0.707, 0.0], [0.707, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    u = np.where(n > eps, x / np.maximum(n, eps), 0.0)
    return u @ u.T


def cluster_order(sim: np.ndarray) -> list[int]:
    """The leaf order of an average-linkage clustering on ``1 − sim`` (identity for fewer than 3)."""
    k = sim.shape[0]
    if k < 3:
        return list(range(k))
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    d = np.clip(1.0 - sim, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return [int(i) for i in leaves_list(linkage(squareform((d + d.T) / 2, checks=False), method="average"))]


def mean_pair_cosine(S: np.ndarray, units: Sequence[int]) -> float:
    """The mean cosine over the distinct pairs of ``units`` of the rows of ``S [C, d]``."""
    idx = np.asarray(units)
    c = cosine_rows(S[idx])
    m = idx.size
    return float((c.sum() - np.trace(c)) / (m * (m - 1))) if m > 1 else float("nan")


def semantic_link(W: np.ndarray, S: np.ndarray, names: Sequence[str], m: int = TOP_UNITS,
                  n_random: int = RANDOM_SETS, seed: int = 0) -> dict[str, Any]:
    """Both directions of the concept-vector / semantic-vector link (see the module docstring).

    Args:
        W: ``[K, C]`` concept vectors; S: ``[C, d]`` semantic vectors of the same layer.
    """
    c = S.shape[0]
    m = min(m, c)
    rng = np.random.default_rng(seed)
    random_sets = [rng.choice(c, size=m, replace=False) for _ in range(n_random)]
    baseline = np.array([mean_pair_cosine(S, s) for s in random_sets])
    per = []
    for k, name in enumerate(names):
        top = np.argsort(-W[k], kind="stable")[:m]
        obs = mean_pair_cosine(S, top)
        per.append({"concept": name, "units": top.tolist(), "top_cos": obs,
                    "p": float((np.sum(baseline >= obs) + 1) / (n_random + 1))})
    iu = np.triu_indices(c, 1)
    sem = cosine_rows(S)[iu]
    prof = cosine_rows(W.T)[iu]
    corr = float(np.corrcoef(sem, prof)[0, 1]) if sem.size > 1 and sem.std() > 0 and prof.std() > 0 else float("nan")
    tops = np.array([p["top_cos"] for p in per])
    return {"units_per_concept": m, "random_mean_cos": float(baseline.mean()),
            "random_std_cos": float(baseline.std()), "mean_top_cos": float(np.nanmean(tops)) if tops.size else None,
            "concepts_closer_than_random": int(np.sum(tops > baseline.mean())),
            "profile_semantic_pearson": corr, "per_concept": per}


def layer_views(cv: Any, layer: str, head: Any = None, semantic: np.ndarray | None = None) -> dict[str, Any]:
    """The global views of one layer as a JSON-ready dict (see the module docstring)."""
    r = cv.layer(layer)
    names = cv.concepts.names
    sim = cosine_rows(r.W)
    order = cluster_order(sim)
    out: dict[str, Any] = {
        "concepts": names, "categories": cv.concepts.categories,
        "similarity": np.round(sim, 6).tolist(), "order": order,
        "top_units": {n: [[int(u), float(r.W[k, u])] for u in np.argsort(-r.W[k], kind="stable")[:TOP_UNITS]]
                      for k, n in enumerate(names)},
    }
    if head is not None:
        proj = cosine_rows(np.vstack([head.weight, r.W]))[: head.weight.shape[0], head.weight.shape[0]:]
        out["classes"] = {"head": head.name, "cosine": np.round(proj, 6).tolist(),
                          "top_concepts": [[[names[j], float(proj[k, j])] for j in np.argsort(-proj[k])[:TOP_UNITS]]
                                           for k in range(proj.shape[0])]}
    if semantic is not None:
        out["semantic"] = semantic_link(r.W, semantic, names)
    return out


def _figure_similarity(views: dict[str, Any], layer: str, path: Any) -> list[Any]:
    from neurosem.analysis._plotstyle import new_figure, plot_style, save_figure

    order = views["order"]
    sim = np.asarray(views["similarity"])[np.ix_(order, order)]
    names = [views["concepts"][i] for i in order]
    k = len(names)
    side = min(12.0, 1.5 + 0.14 * k)
    with plot_style():
        fig, ax = new_figure(figsize=(side + 1.0, side))
        im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
        if k <= 80:
            ax.set_xticks(range(k), names, rotation=90, fontsize=6)
            ax.set_yticks(range(k), names, fontsize=6)
        ax.set_title(f"{layer}: concept-vector cosine (clustered)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        return save_figure(fig, path, ("pdf", "png"), dpi=200, close=True)


def _figure_semantic(sem: dict[str, Any], layer: str, path: Any) -> list[Any]:
    from neurosem.analysis._plotstyle import new_figure, plot_style, save_figure

    per = sorted(sem["per_concept"], key=lambda p: -p["top_cos"])[:40]
    with plot_style():
        fig, ax = new_figure(figsize=(max(3.0, 0.18 * len(per) + 1.5), 2.8))
        ax.bar(range(len(per)), [p["top_cos"] for p in per], color="#0072b2")
        ax.axhline(sem["random_mean_cos"], color="#d55e00", lw=1, label="random units")
        ax.set_xticks(range(len(per)), [p["concept"] for p in per], rotation=90, fontsize=6)
        ax.set_ylabel(f"mean semantic cos of top {sem['units_per_concept']} units")
        ax.set_title(f"{layer}: profile/semantic Pearson r = {sem['profile_semantic_pearson']:.3f}")
        ax.legend(frameon=False, fontsize=7)
        return save_figure(fig, path, ("pdf", "png"), dpi=200, close=True)


def _figure_vector_vs_unit(cv: Any, path: Any) -> list[Any]:
    """One panel per layer: each concept's vector score against its best single unit's (y = x drawn)."""
    from neurosem.analysis._plotstyle import category_palette, new_figure, plot_style, save_figure

    cats = list(dict.fromkeys(cv.concepts.categories))
    pal = category_palette(cats)
    n = len(cv.layers)
    with plot_style():
        fig, axes = new_figure(1, n, figsize=(2.3 * n + 0.8, 2.5), squeeze=False)
        for ax, layer in zip(axes[0], cv.layers):
            r = cv.layer(layer)
            for c in cats:
                sel = np.array([x == c for x in cv.concepts.categories])
                ax.scatter(r.unit_score[sel], r.score[sel], s=10, color=pal[c], label=c, edgecolor="none")
            ax.plot([0, 1], [0, 1], color=".6", lw=0.8)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(layer)
            ax.set_xlabel("best single unit")
        for ax in axes[0][1:]:
            ax.set_yticklabels([])
        axes[0][0].set_ylabel("concept vector\n(IoU; scene/texture: AP)")
        axes[0][-1].legend(frameon=False, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        return save_figure(fig, path, ("pdf", "png"), dpi=200, close=True)


def write_views(rd: Any, cv: Any, model: Any = None, figures: bool = True) -> dict[str, Any]:
    """Write ``concepts/global.json`` (and the figures) for every layer of ``cv``; returns the paths."""
    from neurosem.concepts.head import linear_head, run_model

    lm, why = run_model(cv, model)
    notes: dict[str, str] = {}
    emb = None
    if rd.embedding.exists():
        from neurosem.embed import load_embedding

        emb = load_embedding(rd.embedding)
    data: dict[str, Any] = {}
    figs: list[str] = []
    size = (3, *cv.args["image_size"])
    for layer in cv.layers:
        head = None
        if lm is not None:
            head, why_head = linear_head(lm, layer, size)
            if head is None:
                notes[f"{layer}.classes"] = why_head
        else:
            notes[f"{layer}.classes"] = str(why)
        sem = emb.vectors(layer) if emb is not None and layer in emb.layers else None
        if sem is None:
            notes[f"{layer}.semantic"] = "no embedding of this layer: run `neurosem embed` first"
        views = layer_views(cv, layer, head, sem)
        data[layer] = views
        if figures:
            figs += [str(p) for p in _figure_similarity(views, layer, rd.figures / f"concepts_{layer}_similarity")]
            if "semantic" in views:
                figs += [str(p) for p in _figure_semantic(views["semantic"], layer,
                                                          rd.figures / f"concepts_{layer}_semantic")]
    if figures:
        figs += [str(p) for p in _figure_vector_vs_unit(cv, rd.figures / "concepts_vector_vs_unit")]
    path = rd.path / "concepts" / "global.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"layers": data, "notes": notes}, indent=1))
    out: dict[str, Any] = {"global": str(path)}
    if figs:
        out["figures"] = figs
    return out
