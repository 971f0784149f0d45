"""Neighbours and additive combinations of neurons in the semantic space (``neurosem query``).

For a unit ``layer:i`` with semantic vector ``s_i`` (a row of the layer's ``S: [C, K]``), the query
vector is ``v = s_i + Σ_add s_a − Σ_sub s_b`` (all operands in one layer) and the answer is the ``k``
units ``j`` of that layer with the largest ``cos(v, s_j)``, the operands excluded; ties are broken by
the lower unit index. With a dissection in the run, every unit comes with its best label, category
and IoU.

This module also holds the analysis' access to a run (:func:`run_dir`, :func:`load_run_embedding`,
:func:`load_run_dissection`), with the one-line errors that say which command to run first.

Example:
    >>> import numpy as np
    >>> S = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.1]])
    >>> [(j, round(c, 6)) for j, c in nearest_units(S, 0, add=(1,), k=2)]
    [(2, 1.0), (3, 0.773957)]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from neurosem.errors import NeurosemError, RunMismatchError
from neurosem.ids import NeuronId, check_neuron, parse_neuron
from neurosem.run import RunDir, resolve_run

#: Norm floor of the cosines (the embedding's).
_EPS = 1e-12


# ------------------------------------------------------------------------------------ run access
def run_dir(run: "RunDir | str | Path | None") -> RunDir:
    """The run directory to read: a ``RunDir``, a path, or ``None`` = the only run under ``runs/``."""
    return resolve_run(run, must_exist=True)


def load_run_embedding(run: "RunDir | str | Path | None") -> Any:
    """The run's :class:`neurosem.embed.Embedding`; a missing one is one line telling to run ``neurosem embed``."""
    from neurosem.embed import load_embedding

    rd = run_dir(run)
    if not rd.embedding.exists():
        raise NeurosemError(
            f"no embedding in {rd.path} (embedding.h5 is missing): run `neurosem embed MODEL --data PATH "
            f"--run {rd.path}` first")
    emb = load_embedding(rd)
    if not emb.layers:
        raise NeurosemError(f"{rd.embedding} holds no layer: rerun `neurosem embed --run {rd.path}`")
    return emb


def load_run_dissection(run: "RunDir | str | Path | None", required_for: str | None = None) -> Any:
    """The run's :class:`neurosem.dissect.Dissection`, or ``None`` when it has none
    (``required_for="kl"``: a one-line error naming ``neurosem dissect`` instead)."""
    from neurosem.dissect import load_dissection

    rd = run_dir(run)
    if not rd.dissection.exists():
        if required_for is None:
            return None
        raise NeurosemError(
            f"`neurosem {required_for}` needs a dissection and {rd.path} has none (dissect.h5 is missing): "
            f"run `neurosem dissect --broden PATH --run {rd.path}` first")
    return load_dissection(rd)


# ------------------------------------------------------------------------------------ the query
def cosine_to_rows(v: np.ndarray, S: np.ndarray) -> np.ndarray:
    """``cos(v, s_j)`` for every row of ``S: [C, K]`` -> ``[C]`` (float64; zero rows give 0)."""
    S = np.asarray(S, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    sn = S / np.maximum(np.linalg.norm(S, axis=1), _EPS)[:, None]
    return sn @ (v / max(float(np.linalg.norm(v)), _EPS))


def combined_vector(S: np.ndarray, index: int, add: Sequence[int] = (), sub: Sequence[int] = ()) -> np.ndarray:
    """``v = s_index + Σ_add s_a − Σ_sub s_b`` (float64 ``[K]``)."""
    S = np.asarray(S, dtype=np.float64)
    v = S[index].copy()
    for a in add:
        v += S[a]
    for b in sub:
        v -= S[b]
    return v


def nearest_units(S: np.ndarray, index: int, add: Sequence[int] = (), sub: Sequence[int] = (),
                  k: int = 5) -> list[tuple[int, float]]:
    """The ``k`` rows of ``S: [C, K]`` most cosine-similar to the combined vector, operands excluded.

    Returns ``[(unit, cosine)]`` sorted by decreasing cosine, then increasing unit index.
    """
    if k < 1:
        raise NeurosemError(f"-k must be at least 1, got {k}")
    v = combined_vector(S, index, add, sub)
    if not np.any(v):
        raise NeurosemError("the combined vector is zero (the --add/--sub terms cancel): nothing to compare")
    sims = cosine_to_rows(v, S)
    operands = {int(index), *map(int, add), *map(int, sub)}
    candidates = np.array([j for j in range(len(sims)) if j not in operands], dtype=np.int64)
    if candidates.size == 0:
        return []
    order = np.lexsort((candidates, -sims[candidates]))
    return [(int(candidates[o]), float(sims[candidates[o]])) for o in order[:k]]


def _as_id(value: "NeuronId | str") -> NeuronId:
    return value if isinstance(value, NeuronId) else parse_neuron(value)


def parse_query(neuron: "NeuronId | str", add: Iterable["NeuronId | str"] = (),
                sub: Iterable["NeuronId | str"] = ()) -> tuple[NeuronId, list[NeuronId], list[NeuronId]]:
    """Parse the operands and check they share one layer."""
    q = _as_id(neuron)
    adds = [_as_id(a) for a in add]
    subs = [_as_id(b) for b in sub]
    other = next((n for n in adds + subs if n.layer != q.layer), None)
    if other is not None:
        raise NeurosemError(
            f"{other} is in layer {other.layer!r}, {q} in {q.layer!r}: --add/--sub units must be in the query's layer")
    return q, adds, subs


def check_query_units(rd: RunDir, emb: Any, units: Sequence[NeuronId]) -> None:
    """One-line errors for a layer without an embedding or an index out of range."""
    n_units = {name: int(emb.vectors(name).shape[0]) for name in emb.layers}
    for nid in units:
        if nid.layer not in n_units:
            from neurosem.ids import closest_names

            close = closest_names(nid.layer, n_units)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise NeurosemError(
                f"layer {nid.layer!r} of {nid} has no embedding in {rd.path}{hint}; embedded layers: "
                f"{', '.join(n_units)}; to add it run `neurosem embed --run {rd.path} --layers {nid.layer}`")
        check_neuron(nid, n_units, what=f"the embedding of {rd.path}")


def unit_info(dissection: Any, layer: str, unit: int) -> dict[str, Any]:
    """``{"label", "category", "iou", "interpretable"}`` of a unit, or ``{}`` without a dissection of the layer."""
    if dissection is None or layer not in dissection.layers:
        return {}
    label, category, iou = dissection.unit_label(layer, unit)
    return {"label": label, "category": category, "iou": float(iou),
            "interpretable": bool(dissection.interpretable(layer)[unit])}


def _check_dissection_width(rd: RunDir, dissection: Any, layer: str, n_units: int) -> None:
    if dissection is None or layer not in dissection.layers:
        return
    c = int(np.asarray(dissection.iou(layer)).shape[0])
    if c != n_units:
        raise RunMismatchError(
            f"layer {layer}: the dissection of {rd.path} has {c} units, the embedding {n_units}; they come from "
            "different models: rerun `neurosem dissect` or `neurosem embed` on this run")


def query(run: "RunDir | str | Path | None", neuron: "NeuronId | str", add: Iterable["NeuronId | str"] = (),
          sub: Iterable["NeuronId | str"] = (), k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` units nearest to ``neuron (+ add − sub)`` in its layer's semantic space.

    Args:
        run: the run directory (``None``: the only run under ``runs/``).
        neuron: ``"layer:index"`` or a :class:`NeuronId`.
        add, sub: units (same layer) whose vectors are added / subtracted.
        k: how many units.

    Returns:
        ``[{"rank", "neuron", "layer", "index", "similarity"}]`` (+ ``"label", "category", "iou",
        "interpretable"`` when the run has a dissection of the layer), best first; ties by index.

    Example:
        >>> query("runs/resnet18", "layer4:312", add=["layer4:77"], k=3)   # doctest: +SKIP
        [{'rank': 1, 'neuron': 'layer4:80', 'layer': 'layer4', 'index': 80, 'similarity': 0.91, ...}, ...]
    """
    q, adds, subs = parse_query(neuron, add, sub)
    rd = run_dir(run)
    emb = load_run_embedding(rd)
    check_query_units(rd, emb, [q, *adds, *subs])
    S = np.asarray(emb.vectors(q.layer))
    dissection = load_run_dissection(rd)
    _check_dissection_width(rd, dissection, q.layer, S.shape[0])
    out = []
    for rank, (j, sim) in enumerate(nearest_units(S, q.index, [a.index for a in adds], [b.index for b in subs], k), 1):
        row: dict[str, Any] = {"rank": rank, "neuron": str(NeuronId(q.layer, j)), "layer": q.layer,
                               "index": j, "similarity": sim}
        row.update(unit_info(dissection, q.layer, j))
        out.append(row)
    return out


def expression(neuron: "NeuronId | str", add: Iterable[Any] = (), sub: Iterable[Any] = ()) -> str:
    """``"layer4:312 + layer4:77 - layer4:5"``."""
    text = str(_as_id(neuron))
    text += "".join(f" + {_as_id(a)}" for a in add)
    text += "".join(f" - {_as_id(b)}" for b in sub)
    return text


def format_table(results: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """A plain-text table of :func:`query` results (label columns only when present).

    Example:
        >>> print(format_table([{"rank": 1, "neuron": "l:2", "similarity": 0.5}]))
        rank  neuron  similarity
        ----  ------  ----------
           1  l:2         0.5000
    """
    labelled = any("label" in r for r in results)
    header = ["rank", "neuron", "similarity"] + (["label", "category", "IoU"] if labelled else [])
    rows = []
    for r in results:
        row = [str(r["rank"]), str(r["neuron"]), f"{r['similarity']:.4f}"]
        if labelled:
            row += [str(r.get("label", "-")), str(r.get("category", "-")),
                    f"{r['iou']:.4f}" if "iou" in r else "-"]
        rows.append(row)
    widths = [max(len(h), *(len(row[c]) for row in rows)) if rows else len(h) for c, h in enumerate(header)]
    right = {0, 2, 5}

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = ([title] if title else []) + [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    if not rows:
        lines.append("(no other unit in this layer)")
    return "\n".join(lines)
