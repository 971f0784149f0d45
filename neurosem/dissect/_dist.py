"""Merging the ranks' partial dissection statistics under ``torchrun`` (exact, see below).

Every rank runs both passes over its contiguous share of the images; then

- float16 thresholds: the ranks' histograms of float16 keys are summed where the quantile reads
  them (:func:`merge_f16`). Each rank skips only values with at least ``top_count(N·H·W, q)``
  larger ones of its own, so every value the global quantile depends on is counted by its rank
  and the summed counts give the single-process threshold bit for bit;
- other thresholds: the ranks' kept largest values are gathered and the quantile is taken from the
  merged top values (:func:`merge_top_quantile`), again exactly;
- tallies: integer counts, summed (:meth:`~neurosem.distributed.Comm.sum`);
- top images: the ranks' top-k lists are merged under the same total order (mask size, peak,
  earlier image) that :class:`~neurosem.dissect.topmaps.TopMaps` streams with (:func:`merge_tops`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from neurosem.distributed import Comm


def merge_f16(comm: Comm, fq: Any) -> None:
    """Sum the :class:`~neurosem.dissect._f16quantile.F16Quantile` ``fq`` over the ranks, in place.

    The coarse counts (``[C, 256]``, by the key's high byte) are summed first; they tell, per unit,
    the bucket of each of the two ranked values the quantile reads. Only those buckets' fine counts
    (``[C, 2, 256]``) are summed then, not the whole ``[C, 65536]`` histogram: ``_ranked`` reads no
    other fine count. Every value the quantile depends on lies at or above each rank's floor, so
    each was counted by its rank.
    """
    from neurosem.dissect._f16quantile import lazy_zeros
    from neurosem.dissect.quantile import top_count

    fq.coarse = comm.sum(fq.coarse)
    fq.nan = comm.sum(fq.nan)
    fq.count = int(comm.sum(np.array([fq.count]))[0])
    k = top_count(fq.count, fq.q)
    ranks = (max(k - 1, 0), max(k - 2, 0))
    cum = np.cumsum(fq.coarse[:, ::-1], axis=1)                   # counts from the top bucket down
    buckets = np.stack([255 - np.where((cum > r).any(1), (cum > r).argmax(1), 255) for r in ranks], 1)
    rows = np.arange(fq.n_units)[:, None, None]
    cols = buckets[:, :, None] * 256 + np.arange(256)[None, None, :]   # [C, 2, 256]
    fine = comm.sum(fq.hist[rows, cols])
    hist = lazy_zeros(fq.hist.shape, np.int64)
    hist[rows, cols] = fine
    fq.hist = hist


def merge_top_quantile(comm: Comm, tq: Any) -> np.ndarray:
    """``[C]`` float64: the threshold of the :class:`~neurosem.dissect.quantile.TopQuantile` ``tq``
    of every rank together (their kept values merged; all ranks were told the global total)."""
    from neurosem.dissect.quantile import quantile_from_top, top_count

    kept = np.zeros((tq.n_units, 0)) if tq._buf is None else tq._buf[:, :tq._fill].double().cpu().numpy()
    parts = comm.gather((kept, tq.count))
    total = sum(count for _, count in parts)
    values = np.concatenate([v for v, _ in parts], axis=1)
    need = top_count(total, tq.q)
    if values.shape[1] < need:
        values = np.concatenate([values, np.full((tq.n_units, need - values.shape[1]), -np.inf)], axis=1)
    top = -np.sort(-values, axis=1)[:, :need]
    return quantile_from_top(top, total, tq.q)


def merge_tops(parts: Sequence[Any], k: int) -> Any:
    """One :class:`~neurosem.dissect.topmaps.TopResult` of the ranks' ``parts`` (each ``[C, k]``)."""
    from neurosem.dissect.topmaps import TopResult

    images = np.concatenate([p.images for p in parts], axis=1)
    sizes = np.concatenate([p.sizes for p in parts], axis=1)
    maxes = np.concatenate([p.maxes for p in parts], axis=1)
    maps = np.concatenate([p.maps for p in parts], axis=1)
    empty = images < 0
    order = np.lexsort((np.where(empty, np.iinfo(np.int64).max, images), -maxes, -sizes, empty),
                       axis=-1)[:, :k]
    rows = np.arange(images.shape[0])[:, None]
    return TopResult(images=images[rows, order], sizes=sizes[rows, order], maxes=maxes[rows, order],
                     maps=maps[rows, order])


def merge_tally(comm: Comm, tally: Any) -> None:
    """Sum a torch :class:`~neurosem.dissect.tally.Tally`'s counts over the ranks, in place."""
    import torch

    for name in ("gt", "both", "act", "unit_pixels"):
        t = getattr(tally, name)
        setattr(tally, name, torch.from_numpy(comm.sum(t.cpu().numpy())).to(device=t.device, dtype=t.dtype))
    tally.n_images = int(comm.sum(np.array([tally.n_images]))[0])
