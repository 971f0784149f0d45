"""What the figures show when the user does not say: the layer, the query unit, the additive pair.

- the layer: the last embedded one;
- the query unit (:func:`default_unit`): an interpretable unit (best IoU >= the dissection's IoU
  threshold) whose masks are non-empty on each of its top images, so the neighbours figure never
  opens on a blank row, preferring one whose neighbours' masks show on those images too;
  without a dissection, the unit whose three nearest units are the most similar;
- the additive pair (:func:`default_pair`): two interpretable units whose sum's nearest unit gains
  most over either operand alone.

Example:
    >>> default_unit("runs/resnet18")             # doctest: +SKIP
    NeuronId(layer='layer4', index=312)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from neurosem.analysis.masks import dissection_masks, label_size, open_store, read_maps, top_rows, unit_maxima
from neurosem.errors import NeurosemError
from neurosem.ids import NeuronId

if TYPE_CHECKING:  # pragma: no cover
    from neurosem.run import RunDir

NONE_CATEGORY = "not interpretable"
#: How many interpretable units (highest IoU first) :func:`default_unit` tries.
MAX_CANDIDATES = 64
#: Of those whose masks show on their own top images, how many :func:`default_unit` compares.
MAX_SCORED = 12


def check_layer(rd: "RunDir", emb: Any, layer: str | None) -> str:
    """``layer``, or the last embedded layer; one error naming the embedded layers otherwise."""
    if layer is None:
        return emb.layers[-1]
    if layer not in emb.layers:
        raise NeurosemError(f"layer {layer!r} has no embedding in {rd.path} (embedded: {', '.join(emb.layers)})")
    return layer


def unit_categories(dis: Any, layer: str, n_units: int) -> tuple[list[str], np.ndarray]:
    """Category per unit (``not interpretable`` below the IoU threshold) and best IoU ``[C]``."""
    from neurosem.analysis.query import unit_info

    if dis is None or layer not in dis.layers:
        return [NONE_CATEGORY] * n_units, np.zeros(n_units)
    infos = [unit_info(dis, layer, u) for u in range(n_units)]
    cats = [i["category"] if i["interpretable"] else NONE_CATEGORY for i in infos]
    return cats, np.array([i["iou"] for i in infos])


def ranked_units(dis: Any, layer: str, n_units: int) -> tuple[list[int], list[int]]:
    """``(interpretable, all)`` unit indices of ``layer``, each by decreasing best IoU (ties: lower index)."""
    cats, ious = unit_categories(dis, layer, n_units)
    ranked = [int(u) for u in np.lexsort((np.arange(n_units), -ious))]
    return [u for u in ranked if cats[u] != NONE_CATEGORY], ranked


def choose_unit(rd: "RunDir", layer: str, S: np.ndarray, n_images: int = 4, n_neighbours: int = 3,
                store: Any = None) -> tuple[NeuronId, list[int] | None]:
    """The default query unit of ``layer`` with a dissection, and the store rows of its top images.

    Candidates: the interpretable units (all units when none is), highest IoU first, at most
    :data:`MAX_CANDIDATES`; one pass over the layer's activations finds their top images. A
    candidate qualifies when its dissection mask is non-empty on each of its ``n_images`` top
    images; of the first :data:`MAX_SCORED` that qualify, the one whose ``n_neighbours`` nearest
    units (``S: [C, K]``, the layer's vectors) show a mask on the most of those images wins (ties:
    the higher IoU), so that the neighbours figure shows masks where the data has them. Without
    activations of the layer (or a label size in dissect.h5) the highest IoU wins, rows None.
    """
    from neurosem.analysis.query import load_run_dissection, nearest_units

    dis = load_run_dissection(rd)
    interpretable, ranked = ranked_units(dis, layer, len(S))
    cand = (interpretable or ranked)[:MAX_CANDIDATES]
    size = label_size(dis)
    own = store is None
    if own:
        if not rd.activations.exists():
            return NeuronId(layer, cand[0]), None
        store = open_store(rd)
    try:
        if size is None or layer not in store.layers:
            return NeuronId(layer, cand[0]), None
        peak, mean = unit_maxima(store, layer, cand, with_means=True)
        thr = np.asarray(dis.threshold(layer, exact=True), dtype=np.float64)
        best: tuple[int, int, list[int]] | None = None           # (score, unit, rows)
        n_scored = 0
        for k, u in enumerate(cand):
            rows = top_rows(peak[:, k], n_images, tie=mean[:, k])
            if not all(float(peak[r, k]) > thr[u] for r in rows):     # a map under its threshold: no mask
                continue
            units = [u] + [j for j, _ in nearest_units(S, u, k=n_neighbours)]
            shown = dissection_masks(read_maps(store, layer, units, rows), thr[units], size)
            shown = shown.reshape(len(units), len(rows), -1).any(axis=2)           # [U, I]
            if not shown[0].all():
                continue
            score = int(shown[1:].sum())
            if best is None or score > best[0]:
                best = (score, u, rows)
            n_scored += 1
            if n_scored >= MAX_SCORED or score == shown[1:].size:
                break
    finally:
        if own:
            store.close()
    if best is None:
        return NeuronId(layer, cand[0]), None
    return NeuronId(layer, best[1]), best[2]


def default_unit(run: Any, layer: str | None = None, n_images: int = 4) -> NeuronId:
    """The unit shown by default in ``layer`` (default: the last embedded layer).

    With a dissection: :func:`choose_unit` (an interpretable unit whose masks show on its top
    images, highest IoU first); without one, the unit whose three nearest units are the most similar.
    """
    from neurosem.analysis.query import cosine_to_rows, load_run_dissection, load_run_embedding, run_dir

    rd = run_dir(run)
    emb = load_run_embedding(rd)
    layer = check_layer(rd, emb, layer)
    S = np.asarray(emb.vectors(layer), dtype=np.float64)
    dis = load_run_dissection(rd)
    if dis is not None and layer in dis.layers:
        return choose_unit(rd, layer, S, n_images)[0]
    scores = []
    for i in range(len(S)):
        sims = np.delete(cosine_to_rows(S[i], S), i)
        scores.append(np.sort(sims)[-3:].mean() if sims.size else 0.0)
    return NeuronId(layer, int(np.argmax(scores)))


def default_pair(run: Any, layer: str | None = None, pool: int = 48) -> tuple[NeuronId, NeuronId, NeuronId]:
    """Two units ``a, b`` and the unit ``c`` nearest to ``s_a + s_b`` for the additive figure.

    Among the ``pool`` most interpretable units (only interpretable ones when at least two are;
    all units without a dissection, capped at ``pool`` by index) the pair is chosen whose sum's
    nearest unit gains most over either operand alone:
    ``cos(s_a + s_b, s_c) − max(cos(s_a, s_c), cos(s_b, s_c))``; ties by the lower indices.
    """
    from neurosem.analysis.kl import cosine_matrix
    from neurosem.analysis.query import load_run_dissection, load_run_embedding, nearest_units, run_dir

    rd = run_dir(run)
    emb = load_run_embedding(rd)
    layer = check_layer(rd, emb, layer)
    S = np.asarray(emb.vectors(layer), dtype=np.float64)
    if len(S) < 3:
        raise NeurosemError(f"layer {layer} has {len(S)} units: the additive figure needs at least 3")
    dis = load_run_dissection(rd)
    if dis is not None and layer in dis.layers:
        interpretable, ranked = ranked_units(dis, layer, len(S))
        cand = (interpretable if len(interpretable) >= 2 else ranked)[:pool]
    else:
        cand = list(range(min(pool, len(S))))
    cand = sorted(cand)
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
