"""The two streaming passes of a dissection over ``activations.h5``, on the CPU or a torch device.

1. thresholds: the exact per-unit ``1 - q`` quantile
   (:class:`~neurosem.dissect._f16quantile.F16Quantile` for float16 stores on the CPU, else
   :class:`~neurosem.dissect.quantile.TopQuantile`);
2. tallies against the Broden labels (from the label cache, :mod:`neurosem.data.label_cache`),
   and each unit's top images with their raw maps (:class:`~neurosem.dissect.topmaps.TopMaps`).

Engines: ``cpu`` runs the compiled kernels of :mod:`neurosem.dissect._kernels` (numba); ``torch``
runs :class:`~neurosem.dissect.tally.Tally` on a torch device (CUDA, MPS, or the CPU where numba is
missing). Both give the same numbers (tests/dissect/test_kernels.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from neurosem.errors import NeurosemError


@dataclass
class LayerPass:
    """What the passes computed for one layer: ``threshold [C]`` (float64), the tallies
    (:class:`~neurosem.dissect.tally.TallyResult`) and the top images
    (:class:`~neurosem.dissect.topmaps.TopResult`)."""

    threshold: np.ndarray
    result: Any
    top: Any


class LabelSource:
    """The labels of a batch of images, from the label cache or (``cache=None``) the PNGs.

    Args:
        ds: the :class:`~neurosem.data.broden.BrodenDataset` (its categories are the ones tallied).
        cache: a :class:`~neurosem.data.label_cache.LabelCache`, or ``None``.
    """

    def __init__(self, ds: Any, cache: Any = None) -> None:
        self.ds, self.cache = ds, cache
        self.size = tuple(ds.seg_size)

    def counts(self, start: int, stop: int, seg: np.ndarray, image_labels: np.ndarray,
               primary: np.ndarray) -> np.ndarray:
        """:func:`label_counts` of the batch :meth:`batch` gave (from the cache's runs when there is one)."""
        pixels = None
        if self.cache is not None:
            pixels = self.cache.pixel_counts(start, stop, self.ds.pixel_categories, primary.shape[0])
        return label_counts(seg, image_labels, primary, pixels)

    def batch(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(seg [B, P, sh * sw], n_planes [B], image_labels [B, M])`` of images ``start..stop``."""
        ds = self.ds
        il = np.stack([ds.load_image_labels(i) for i in range(start, stop)]) if stop > start else \
            np.zeros((0, ds.max_image_labels), dtype=np.int64)
        if self.cache is not None:
            seg, n_planes = self.cache.batch(start, stop, ds.pixel_categories)
            return seg, n_planes, il
        planes = [ds.load_planes(i) for i in range(start, stop)]
        n_planes = np.array([len(p) for p in planes], dtype=np.int64)
        s = self.size[0] * self.size[1]
        seg = np.zeros((stop - start, max(1, int(n_planes.max(initial=0))), s), dtype=np.int64)
        for b, ps in enumerate(planes):
            for k, (_, plane) in enumerate(ps):
                seg[b, k] = plane.reshape(-1)
        return seg, n_planes, il


def label_counts(seg: np.ndarray, image_labels: np.ndarray, primary: np.ndarray,
                 pixels: np.ndarray | None = None) -> np.ndarray:
    """``gt`` of a batch, ``[n_labels]``: label entries over all planes plus ``sh·sw`` per
    image-level label (label 0 counted too, left out later); checked as :meth:`Tally.labels` checks
    them (:func:`~neurosem.dissect.tally.check_label_counts`). ``pixels``: the counts over the
    planes when already known (:meth:`LabelCache.pixel_counts`), else a ``bincount`` of ``seg``."""
    from neurosem.dissect.tally import check_label_counts

    n_labels = primary.shape[0]
    counts = np.bincount(seg.reshape(-1), minlength=n_labels) if pixels is None else pixels
    if image_labels.size:
        counts = counts + np.bincount(image_labels.reshape(-1), minlength=n_labels) * seg.shape[-1]
    check_label_counts(counts, primary)
    return counts.astype(np.int64)


def auto_threads() -> int:
    """CPU threads for the dissection: the cores not busy with other work (the CPU count minus
    the 1-minute load average, rounded), at least 1. Set ``--threads`` to override."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:                       # not on this platform
        load = 0.0
    return max(1, min(n, int(n - load + 0.5)))


def run_passes(store: Any, names: Sequence[str], labels: LabelSource, quantile: float, engine: str,
               device: Any, batch_size: int, top_k: int, progress: bool,
               timings: dict[str, float] | None = None, threads: int = 1, comm: Any = None) -> dict[str, LayerPass]:
    """Both passes over ``names`` of ``store``; see the module docstring.

    Args:
        store: an open :class:`~neurosem.store.ActivationStore` (complete).
        names: the layers.
        labels: where the labels come from.
        quantile: the upper tail fraction q.
        engine: ``"cpu"`` (compiled kernels) or ``"torch"``.
        device: the torch device of the ``torch`` engine (ignored by ``cpu``).
        batch_size: images per batch.
        top_k: top images kept per unit.
        progress: progress bars.
        timings: filled with the seconds of each pass (``thresholds``, ``tally``) when given.
        threads: CPU threads of the ``cpu`` engine's kernels (:class:`~neurosem.dissect._kernels.Workers`).
        comm: under torchrun, the :class:`~neurosem.distributed.Comm`: each rank reads its share
            of the batches and the statistics are merged exactly (:mod:`neurosem.dissect._dist`).
    """
    from neurosem.dissect.topmaps import TopMaps

    n = store.n_done
    lo, hi = (0, n) if comm is None else comm.shard(n, batch_size)   # this rank's images
    shapes = {name: store.shape(name) for name in names}
    plan = _Plan(names=list(names), n=n, lo=lo, hi=hi, batch_size=batch_size,
                 n_batches=-(-(hi - lo) // batch_size), shapes=shapes,
                 primary=np.asarray(labels.ds.primary_category, dtype=np.int64),
                 k_cat=len(labels.ds.categories), progress=progress, comm=comm)
    tops = {name: TopMaps(shapes[name][1], top_k, shapes[name][2:], np.dtype(store.dtype)) for name in names}
    timings = {} if timings is None else timings
    if engine == "cpu":
        from neurosem.dissect._kernels import Workers

        with Workers(threads) as workers:
            thresholds, results = _passes_cpu(store, plan, labels, quantile, timings, workers, tops)
    else:
        thresholds, results = _passes_torch(store, plan, labels, quantile, device, timings, tops)
    top = {name: tops[name].result() for name in names}
    if comm is not None:
        from neurosem.dissect._dist import merge_tops

        top = {name: merge_tops(comm.gather(top[name]), top_k) for name in names}
    return {name: LayerPass(threshold=thresholds[name], result=results[name], top=top[name]) for name in names}


@dataclass
class _Plan:
    """What both passes of either engine share: the layers and their shapes, this rank's images
    ``lo..hi`` of ``n`` (all of them without torchrun), the batches, the label categories."""

    names: list[str]
    n: int
    lo: int
    hi: int
    batch_size: int
    n_batches: int
    shapes: dict[str, tuple[int, ...]]
    primary: np.ndarray
    k_cat: int
    progress: bool
    comm: Any


def _batches(store: Any, names: Sequence[str], batch_size: int, lo: int, hi: int) -> Any:
    """``store.iter_batches`` over images ``lo..hi`` (a rank's share; the whole store: no range,
    which :class:`~neurosem.dissect.stream.ModelStream` also offers)."""
    if (lo, hi) == (0, store.n_done):
        return store.iter_batches(names, batch_size)
    return store.iter_batches(names, batch_size, start=lo, stop=hi)


def _passes_cpu(store: Any, plan: _Plan, labels: LabelSource, quantile: float, timings: dict[str, float],
                workers: Any, tops: dict) -> tuple[dict, dict]:
    """Both passes with the compiled kernels: ``(thresholds, tally results)`` per layer."""
    import time

    from neurosem._progress import progress as bar
    from neurosem.dissect import _kernels as K
    from neurosem.dissect.tally import tally_result

    names, n, lo, hi, batch_size, n_batches = plan.names, plan.n, plan.lo, plan.hi, plan.batch_size, plan.n_batches
    shapes, primary, k_cat, progress, comm = plan.shapes, plan.primary, plan.k_cat, plan.progress, plan.comm
    t0 = time.perf_counter()
    thresholds = _thresholds_cpu(store, names, shapes, quantile, n, batch_size, n_batches, progress, workers,
                                 comm, (lo, hi))
    timings["thresholds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gt = np.zeros(primary.shape[0], dtype=np.int64)
    cat_of = np.where(primary < 0, k_cat, primary)
    geo = {name: K.Geometry(shapes[name][2], shapes[name][3], *labels.size) for name in names}
    both = {name: np.zeros((shapes[name][1], primary.shape[0]), dtype=np.int64) for name in names}
    act = {name: np.zeros((shapes[name][1], k_cat), dtype=np.int64) for name in names}
    pix = {name: np.zeros(shapes[name][1], dtype=np.int64) for name in names}
    for start, batch in bar(_batches(store, list(names), batch_size, lo, hi), total=n_batches, desc="dissect: IoU",
                            enabled=progress, unit="batch"):
        b = next(iter(batch.values())).shape[0]
        seg, n_planes, il = labels.batch(start, start + b)
        gt += labels.counts(start, start + b, seg, il, primary)
        for name in names:
            sizes, maxes = K.tally_batch(batch[name], thresholds[name], seg, n_planes, il, cat_of, k_cat,
                                         geo[name], both[name], act[name], pix[name], workers=workers)
            tops[name].add(start, sizes, maxes, batch[name])
    if comm is not None:  # integer counts: summed exactly
        gt = comm.sum(gt)
        for name in names:
            both[name], act[name], pix[name] = comm.sum(both[name]), comm.sum(act[name]), comm.sum(pix[name])
    results = {name: tally_result(gt, both[name], act[name], pix[name], primary, n) for name in names}
    timings["tally"] = time.perf_counter() - t0
    return thresholds, results


def _passes_torch(store: Any, plan: _Plan, labels: LabelSource, quantile: float, device: Any,
                  timings: dict[str, float], tops: dict) -> tuple[dict, dict]:
    """Both passes with torch on ``device``: ``(thresholds, tally results)`` per layer."""
    import time

    import torch

    from neurosem._progress import progress as bar
    from neurosem.dissect.tally import Tally

    names, n, lo, hi, batch_size, n_batches = plan.names, plan.n, plan.lo, plan.hi, plan.batch_size, plan.n_batches
    shapes, primary, k_cat, progress, comm = plan.shapes, plan.primary, plan.k_cat, plan.progress, plan.comm
    t0 = time.perf_counter()
    thresholds = _thresholds_torch(store, names, shapes, quantile, n, batch_size, n_batches, device, progress,
                                   comm, (lo, hi))
    timings["thresholds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tallies = {name: Tally(thresholds[name], primary, k_cat, device=device) for name in names}
    sh, sw = labels.size
    with torch.inference_mode():
        for start, batch in bar(_batches(store, list(names), batch_size, lo, hi), total=n_batches,
                                desc="dissect: IoU", enabled=progress, unit="batch"):
            b = next(iter(batch.values())).shape[0]
            seg, _, il = labels.batch(start, start + b)
            seg_t = torch.from_numpy(seg.astype(np.int64)).view(b, -1, sh, sw)
            lb = tallies[names[0]].labels(seg_t.to(device), torch.from_numpy(il).to(device))
            for name in names:
                t = tallies[name]
                t.add(torch.from_numpy(batch[name]).to(device), lb)
                c = shapes[name][1]
                tops[name].add(start, t.last_sizes.view(b, c).cpu().numpy(),
                               t.last_maxes.double().cpu().numpy(), batch[name])
    if comm is not None:
        from neurosem.dissect._dist import merge_tally

        for name in names:
            merge_tally(comm, tallies[name])
    results = {name: tallies[name].result() for name in names}
    timings["tally"] = time.perf_counter() - t0
    return thresholds, results


def _thresholds_cpu(store: Any, names: Sequence[str], shapes: dict, quantile: float, n: int,
                    batch_size: int, n_batches: int, progress: bool, workers: Any = None, comm: Any = None,
                    span: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    from neurosem._progress import progress as bar
    from neurosem.dissect._f16quantile import F16Quantile

    f16 = [name for name in names if np.dtype(store.dtype) == np.float16]
    other = [name for name in names if name not in f16]
    if other:          # float32 stores: the streaming top-k on torch's CPU
        out = _thresholds_torch(store, other, shapes, quantile, n, batch_size, n_batches, "cpu", progress,
                                comm, span)
    else:
        out = {}
    if f16:
        fq = {name: F16Quantile(shapes[name][1], quantile, total=n * shapes[name][2] * shapes[name][3],
                                workers=workers)
              for name in f16}
        lo, hi = span or (0, n)
        for _, batch in bar(_batches(store, f16, batch_size, lo, hi), total=n_batches,
                            desc="dissect: thresholds", enabled=progress, unit="batch"):
            for name in f16:
                fq[name].add(batch[name])
        if comm is not None:  # the histograms of float16 keys, summed
            from neurosem.dissect._dist import merge_f16

            for name in f16:
                merge_f16(comm, fq[name])
        out.update({name: fq[name].result() for name in f16})
    _check_nan(out)
    return out


def _thresholds_torch(store: Any, names: Sequence[str], shapes: dict, quantile: float, n: int,
                      batch_size: int, n_batches: int, device: Any, progress: bool, comm: Any = None,
                      span: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    import torch

    from neurosem._progress import progress as bar
    from neurosem.dissect.quantile import TopQuantile

    tq = {name: TopQuantile(shapes[name][1], quantile, total=n * shapes[name][2] * shapes[name][3],
                            device=device) for name in names}
    lo, hi = span or (0, n)
    with torch.inference_mode():
        for _, batch in bar(_batches(store, list(names), batch_size, lo, hi), total=n_batches,
                            desc="dissect: thresholds", enabled=progress, unit="batch"):
            for name in names:
                tq[name].add(torch.from_numpy(batch[name]).to(device, non_blocking=True))
    if comm is not None:  # the ranks' kept largest values, merged
        from neurosem.dissect._dist import merge_top_quantile

        out = {name: merge_top_quantile(comm, tq[name]) for name in names}
    else:
        out = {name: tq[name].result().double().cpu().numpy() for name in names}
    _check_nan(out)
    return out


def _check_nan(thresholds: dict[str, np.ndarray]) -> None:
    for name, thr in thresholds.items():
        bad = np.flatnonzero(np.isnan(thr))
        if bad.size:
            raise NeurosemError(
                f"layer {name!r}: unit {int(bad[0])} has NaN activations ({bad.size} unit"
                f"{'s' if bad.size > 1 else ''} in all); the model itself produced NaN (check its weights "
                "and inputs), or float16 overflowed (record with --dtype float32)")
