"""NetDissect tallies and IoU, batched on the device (CPU, CUDA or MPS).

Rules (NetDissect-Lite's ``tally_job``, see DESIGN.md "Dissection"), per image:

- each unit's map ``[h, w]`` is upsampled bilinearly to the label size ``[sh, sw]`` with
  ``align_corners=False`` (the geometry of ``F.interpolate`` and PIL's BILINEAR; values in float64);
  ``mask = upsampled > threshold`` (strict). A map whose raw maximum does not exceed the threshold
  has an empty mask (NetDissect-Lite skips it; it also makes constant units exactly 0);
- ``gt[l]`` += the number of (plane, pixel) entries carrying ``l`` over all pixel-level planes,
  plus ``sh·sw`` for each image-level label (scene, texture) ``l`` of the image. A pixel carrying
  ``l`` on two planes counts twice (NetDissect-Lite concatenates the planes and bincounts them);
- ``both[u, l]`` += the same count restricted to the pixels of ``mask_u``, plus ``|mask_u|`` for
  each image-level label ``l``;
- ``act[u, c]`` += ``|mask_u|`` when ``c`` is hit: an activated (plane, pixel) entry carries a
  label whose primary category is ``c``, or the image has an image-level label of category ``c``
  (and the mask is not empty).

Label 0 means "no label" and is never counted. ``IoU[u, l] = both / (act[u, primary(l)] + gt[l] -
both + 1e-10)`` over the labels that occur (``gt > 0``); the others are left out of the result.

The fast path does work in proportion to what is active, never per (image, unit, pixel):

1. per batch it keeps the (image, unit) maps whose maximum exceeds the threshold (with q = 0.005
   a small fraction);
2. an output pixel is a convex combination of the four source pixels around it, so it can only
   exceed the threshold in a *cell* (the pixels between two source rows and two source columns)
   one of whose corners does; in such a cell each output row is monotone in the column, so its
   activated pixels form one run whose end is found by bisection with the exact value
   (:func:`activated_runs`);
3. the label planes are cut into *segments* (maximal runs of one label along a row); a run of
   activated pixels meets one segment per plane in most cases, and the tallies take
   ``overlap(run, segment)`` entries of the segment's label at once (``index_add``), for ``both``
   (keyed by unit and label) and for the categories hit (keyed by map and category).

Nothing loops over images or units in Python; chunks keep intermediates under ``max_elements``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from neurosem.errors import DataError, NeurosemError

IOU_EPS = 1e-10


def threshold_for_dtype(thresholds: Any, dtype: Any) -> Any:
    """``thresholds`` (float64) rounded down to ``dtype``, so that ``x > t_rounded`` equals
    ``x > t`` for every ``x`` of that dtype (a plain cast could round up and flip ties)."""
    import torch

    t64 = torch.as_tensor(thresholds, dtype=torch.float64).cpu()
    if dtype == torch.float64:
        return t64
    t = t64.to(dtype)
    up = t.double() > t64
    return torch.where(up, torch.nextafter(t, torch.full_like(t, -float("inf"))), t)


def compute_dtype(device: Any) -> Any:
    """float64 (exact comparisons with the float64 thresholds), float32 where there is none (MPS)."""
    import torch

    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@dataclass
class _Axis:
    """Bilinear (``align_corners=False``) geometry of one axis, ``n_in -> n_out``: output ``o``
    lies between source ``lo[o]`` and ``min(lo[o] + 1, n_in - 1)`` at weight ``lam[o]``; the
    outputs with ``lo == i`` are ``first[i] .. first[i] + count[i] - 1`` (consecutive)."""

    lam: Any       # [n_out]
    first: Any     # [n_in]
    count: Any     # [n_in]


def _axis(n_in: int, n_out: int, device: Any, dtype: Any) -> _Axis:
    import torch

    o = torch.arange(n_out, dtype=torch.float64)
    src = ((o + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=n_in - 1)
    lam = src - lo.double()
    count = torch.bincount(lo, minlength=n_in)
    first = torch.cumsum(count, 0) - count
    return _Axis(lam.to(device=device, dtype=dtype), first.to(device), count.to(device))


def _expand(count: Any) -> tuple[Any, Any]:
    """``(owner [sum], rank [sum])``: ``owner`` repeats ``i`` ``count[i]`` times, ``rank`` counts
    0.. within each owner. (``index_select``/``repeat_interleave`` throughout: on the CPU they are
    an order of magnitude faster than advanced indexing.)"""
    import torch

    total = int(count.sum())
    owner = torch.repeat_interleave(torch.arange(count.shape[0], device=count.device), count,
                                    output_size=total)
    rank = torch.arange(total, device=count.device) - torch.repeat_interleave(
        torch.cumsum(count, 0) - count, count, output_size=total)
    return owner, rank


def bilinear_value(a: Any, b: Any, c: Any, d: Any, ly: Any, lx: Any) -> Any:
    """The upsampled value between source pixels ``a`` (top left), ``b`` (top right), ``c`` (bottom
    left), ``d`` (bottom right) at weights ``ly`` (down) and ``lx`` (right), in the exact order of
    operations the tally uses: ``A + lx·B`` with ``A = a + ly(c - a)`` and
    ``B = (b - a) + ly((d - c) - (b - a))`` (bilinear; monotone in ``lx`` for a fixed row, also
    after rounding, which lets the tally search each row's mask boundary instead of testing every
    pixel). Works on numpy arrays and tensors alike.
    """
    return (a + ly * (c - a)) + lx * ((b - a) + ly * ((d - c) - (b - a)))


def activated_runs(maps: Any, thresholds: Any, size: tuple[int, int],
                   max_elements: int = 2 ** 22, _axes: dict | None = None) -> tuple[Any, Any, Any, Any]:
    """Where the upsampled maps exceed their thresholds, as runs of pixels along the rows.

    The upsampled value of an output pixel is :func:`bilinear_value` of its four source pixels
    (``align_corners=False`` geometry, the same as ``F.interpolate``), computed in the thresholds'
    dtype (float64 except on MPS).

    Args:
        maps: ``[n, h, w]`` activation maps (any float dtype).
        thresholds: ``[n]`` the threshold of each map, in the compute dtype (float64 thresholds
            are exact; for float32 use :func:`threshold_for_dtype`).
        size: the label size ``(sh, sw)``.
        max_elements: the largest intermediate tensor.

    Returns:
        ``(map [R], row [R], col [R], length [R])``: the activated pixels are ``(row, col + k)``
        for ``0 <= k < length`` of each run (runs do not overlap; neighbouring runs of one row
        are not merged). Maps whose maximum does not exceed the threshold have none.

    Only *cells* (the pixels between two source rows and two source columns) with a corner above
    the threshold can hold activated pixels (a bilinear value is a convex combination of its
    corners). In such a cell, each output row's value is monotone in the column, so its activated
    pixels are a run at one end; the run's boundary is found by a binary search that evaluates
    :func:`bilinear_value` exactly, so the result is the same as testing every pixel.

    Example:
        >>> import torch
        >>> m, r, c, n = activated_runs(torch.tensor([[[0., 1.]]]), torch.tensor([0.5]), (1, 4))
        >>> c.tolist(), n.tolist()          # values 0, 0.25 | 0.75, 1: one run per cell
        ([2, 3], [1, 1])
    """
    import torch

    n, h, w = maps.shape
    sh, sw = size
    dtype = thresholds.dtype
    x = maps.to(dtype)
    t = thresholds.to(device=x.device)
    if (h, w) == (sh, sw):
        mask = x > t[:, None, None]
        pad = torch.zeros(n, h, 1, dtype=torch.bool, device=x.device)
        begin = mask & ~torch.cat([pad, mask[:, :, :-1]], 2)
        end = mask & ~torch.cat([mask[:, :, 1:], pad], 2)
        m, r, c = begin.nonzero().unbind(1)
        last = end.nonzero()[:, 2]                      # the same runs, in the same order
        return m, r, c, last - c + 1
    axes = _axes if _axes is not None else {}
    key = (h, w, sh, sw, str(x.device), dtype)
    if key not in axes:
        axes[key] = (_axis(h, sh, x.device, dtype), _axis(w, sw, x.device, dtype))
    ar, ac = axes[key]
    # Corners of cell (i, j): rows i, min(i+1, h-1) and columns j, min(j+1, w-1).
    rows = torch.maximum(x, torch.cat([x[:, 1:], x[:, -1:]], 1))
    cellmax = torch.maximum(rows, torch.cat([rows[:, :, 1:], rows[:, :, -1:]], 2))
    # candidate cells: a corner above the threshold and at least one output pixel
    has_pixels = (ar.count > 0)[:, None] & (ac.count > 0)[None, :]
    cand = ((cellmax > t[:, None, None]) & has_pixels).nonzero()              # [N, 3] (map, i, j)
    rr, rc = int(ar.count.max()), int(ac.count.max())
    chunk = max(1, max_elements // (8 * rr))
    steps = max(1, rc.bit_length())
    out_m, out_r, out_c, out_n = [], [], [], []
    flat = x.reshape(-1)
    for c0 in range(0, cand.shape[0], chunk):
        p, i, j = cand[c0:c0 + chunk].unbind(1)
        i1, j1 = (i + 1).clamp(max=h - 1), (j + 1).clamp(max=w - 1)
        a, b, c, d = (flat.index_select(0, p * (h * w) + r * w + col)        # [N] cell corners
                      for r, col in ((i, j), (i, j1), (i1, j), (i1, j1)))
        ca, ba, dc = c - a, b - a, d - c
        # one entry per (cell, output row of the cell)
        nrow = ar.count.index_select(0, i)
        n_rows = int(nrow.sum())
        if n_rows == 0:
            continue
        _, rank = _expand(nrow)

        def per_row(v: Any) -> Any:
            return torch.repeat_interleave(v, nrow, output_size=n_rows)

        orow = per_row(ar.first.index_select(0, i)) + rank
        ly = ar.lam.index_select(0, orow)
        A = per_row(a) + ly * per_row(ca)                                     # value = A + lx * B
        ba_r = per_row(ba)
        B = ba_r + ly * (per_row(dc) - ba_r)
        f, ncol = per_row(ac.first.index_select(0, j)), per_row(ac.count.index_select(0, j))
        tq = per_row(t.index_select(0, p))
        dec = B < 0                                                           # the run is on the left
        v0 = A + ac.lam.index_select(0, f) * B
        v1 = A + ac.lam.index_select(0, (f + ncol - 1).clamp(min=0)) * B
        low, high = torch.where(dec, v1, v0), torch.where(dec, v0, v1)
        full = (low > tq) & (ncol > 0)
        is_mixed = (high > tq) & ~full
        mixed = is_mixed.nonzero()[:, 0]
        # mixed rows: the first column k with (value > t) != dec, by bisection (monotone in k)
        k = torch.zeros_like(f)
        if mixed.numel():
            mA, mB, mf, mt, mdec = (v.index_select(0, mixed) for v in (A, B, f, tq, dec))
            lo = torch.zeros_like(mf)
            hi = ncol.index_select(0, mixed)
            for _ in range(steps):
                live = lo < hi
                mid = (lo + hi) >> 1
                lx = ac.lam.index_select(0, (mf + mid).clamp(max=sw - 1))
                pred = (mA + lx * mB > mt) != mdec
                hi = torch.where(live & pred, mid, hi)
                lo = torch.where(live & ~pred, mid + 1, lo)
            k.index_copy_(0, mixed, lo)
        start = torch.where(full | dec, torch.zeros_like(k), k)
        stop = torch.where(full, ncol, torch.where(dec, k, ncol))
        length = torch.where(full | is_mixed, stop - start, torch.zeros_like(start))
        total = int(length.sum())
        if total == 0:
            continue
        keep = (length > 0).nonzero()[:, 0]
        out_m.append(per_row(p).index_select(0, keep))
        out_r.append(orow.index_select(0, keep))
        out_c.append((f + start).index_select(0, keep))
        out_n.append(length.index_select(0, keep))
    if not out_m:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty, empty, empty
    return torch.cat(out_m), torch.cat(out_r), torch.cat(out_c), torch.cat(out_n)


def activated_pixels(maps: Any, thresholds: Any, size: tuple[int, int],
                     max_elements: int = 2 ** 22) -> tuple[Any, Any]:
    """:func:`activated_runs` as pixels: ``(map_index [m], pixel_index [m])`` with
    ``pixel_index = row * sw + col``.

    Example:
        >>> import torch
        >>> m, p = activated_pixels(torch.tensor([[[0., 1.]]]), torch.tensor([0.5]), (1, 4))
        >>> p.tolist()                      # values 0, 0.25, 0.75, 1 at columns 0..3
        [2, 3]
    """
    import torch

    m, r, c, n = activated_runs(maps, thresholds, size, max_elements)
    total = int(n.sum())
    start = r * size[1] + c - (torch.cumsum(n, 0) - n)
    pix = torch.repeat_interleave(start, n, output_size=total) + torch.arange(total, device=n.device)
    return torch.repeat_interleave(m, n, output_size=total), pix


def unit_masks(acts: Any, thresholds: Any, size: tuple[int, int]) -> Any:
    """The dissection masks ``bool [B, C, sh, sw]`` of ``acts: [B, C, h, w]`` (thresholds ``[C]``,
    float64), exactly as the tally counts them.

    Example:
        >>> import torch
        >>> unit_masks(torch.tensor([[[[0., 1.]]]]), torch.tensor([0.5]), (1, 4)).int().tolist()
        [[[[0, 0, 1, 1]]]]
    """
    import torch

    b, c, h, w = acts.shape
    sh, sw = size
    dtype = compute_dtype(acts.device)
    thr = threshold_for_dtype(thresholds, dtype).to(acts.device)
    m, p = activated_pixels(acts.reshape(b * c, h, w), thr.repeat(b), size)
    mask = torch.zeros(b * c, sh * sw, dtype=torch.bool, device=acts.device)
    mask[m, p] = True
    return mask.view(b, c, sh, sw)


@dataclass
class TallyResult:
    """Final tallies of one layer.

    Attributes:
        labels: ``[L]`` the label numbers that occur (``gt > 0``), ascending; the IoU columns.
        iou: ``[C, L]`` float64.
        gt: ``[L]`` label counts; ``both``: ``[C, L]``; ``act``: ``[C, K]`` per category;
        unit_pixels: ``[C]`` |mask| summed over images; n_images: images tallied.
        label_category: ``[L]`` primary category index of each column.
    """

    labels: np.ndarray
    iou: np.ndarray
    gt: np.ndarray
    both: np.ndarray
    act: np.ndarray
    unit_pixels: np.ndarray
    label_category: np.ndarray
    n_images: int


def best_labels(iou: np.ndarray, label_category: np.ndarray, n_categories: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best column per unit, overall and per category (ties: the first column, as ``argmax``).

    Args:
        iou: ``[C, L]``; label_category: ``[L]`` category index per column; n_categories: ``K``.

    Returns:
        ``best [C]`` column index (-1 when there are no columns), ``best_iou [C]``,
        ``cat_best [C, K]`` column index (-1 when the category has no column), ``cat_iou [C, K]``.

    Example:
        >>> import numpy as np
        >>> b, bi, cb, ci = best_labels(np.array([[0.1, 0.3, 0.2]]), np.array([0, 1, 0]), 2)
        >>> b.tolist(), cb.tolist()
        ([1], [[2, 1]])
    """
    iou = np.asarray(iou, dtype=np.float64)
    c, l = iou.shape
    label_category = np.asarray(label_category)
    if l == 0:
        best = np.full(c, -1, dtype=np.int64)
        best_iou = np.zeros(c)
    else:
        best = iou.argmax(1)
        best_iou = iou[np.arange(c), best]
    cat_best = np.full((c, n_categories), -1, dtype=np.int64)
    cat_iou = np.zeros((c, n_categories))
    for k in range(n_categories):
        cols = np.flatnonzero(label_category == k)
        if cols.size:
            arg = iou[:, cols].argmax(1)
            cat_best[:, k] = cols[arg]
            cat_iou[:, k] = iou[np.arange(c), cols[arg]]
    return best, best_iou, cat_best, cat_iou


class Tally:
    """Streaming NetDissect tallies for one layer.

    Args:
        thresholds: ``[C]`` per-unit thresholds (float64, from :class:`TopQuantile`).
        primary_category: ``[n_labels]`` primary category index of every label number (-1 for
            label 0 and numbers that have no category).
        n_categories: ``K``.
        device: where the work happens (default: the CPU).
        max_elements: the largest intermediate tensor (elements); ``None``: 2**22 on the CPU,
            2**26 on an accelerator.

    Example:
        >>> import torch
        >>> t = Tally(torch.tensor([0.5]), primary_category=[-1, 0], n_categories=1)
        >>> acts = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])          # [B=1, C=1, 2, 2]
        >>> seg = torch.tensor([[[[1, 1], [0, 0]]]])                   # [B=1, P=1, 2, 2]
        >>> t.add(acts, seg)
        >>> r = t.result(); r.labels.tolist(), r.iou.round(6).tolist()
        ([1], [[0.5]])
    """

    def __init__(self, thresholds: Any, primary_category: Any, n_categories: int,
                 device: Any = None, max_elements: int | None = None) -> None:
        import torch

        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float64).cpu()
        if self.thresholds.dim() != 1:
            raise NeurosemError(f"thresholds must be [C], got {tuple(self.thresholds.shape)}")
        if bool(torch.isnan(self.thresholds).any()):
            raise NeurosemError("a unit has a NaN threshold: check the model's activations")
        self.n_units = self.thresholds.shape[0]
        self.primary = torch.as_tensor(np.asarray(primary_category), dtype=torch.long).cpu()
        self.n_labels = self.primary.shape[0]
        self.n_categories = int(n_categories)
        if self.n_labels and int(self.primary.max()) >= self.n_categories:
            raise NeurosemError("primary_category holds an index >= n_categories")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if max_elements is None:
            max_elements = 2 ** 22 if self.device.type == "cpu" else 2 ** 26
        self.max_elements = int(max_elements)
        self._dtype = compute_dtype(self.device)
        self._thr = threshold_for_dtype(self.thresholds, self._dtype).to(self.device)
        self._primary_dev = self.primary.to(self.device)
        # label number -> category index; K for label 0 and labels without a category
        self._category_of = torch.where(self.primary < 0, self.n_categories, self.primary).to(self.device)
        self._axes: dict = {}
        self.reset()

    def reset(self) -> None:
        """Zero the tallies."""
        import torch

        z = dict(dtype=torch.long, device=self.device)
        self.gt = torch.zeros(self.n_labels, **z)
        self.both = torch.zeros(self.n_units, self.n_labels, **z)
        self.act = torch.zeros(self.n_units, self.n_categories, **z)
        self.unit_pixels = torch.zeros(self.n_units, **z)
        self.n_images = 0

    # -- streaming -------------------------------------------------------------------------------
    def add(self, acts: Any, seg: Any, image_labels: Any = None) -> None:
        """Tally a batch.

        Args:
            acts: ``[B, C, h, w]`` activations (any float dtype; array or tensor).
            seg: ``[B, P, sh, sw]`` integer label planes (global label numbers, 0 = none).
            image_labels: ``[B, M]`` image-level label numbers (0 = padding), or ``None``.
        """
        import torch

        acts = torch.as_tensor(acts)
        seg = torch.as_tensor(seg)
        if acts.dim() != 4 or acts.shape[1] != self.n_units:
            raise NeurosemError(
                f"Tally expects activations [B, {self.n_units}, h, w], got {tuple(acts.shape)}")
        if seg.dim() == 3:
            seg = seg[:, None]
        if seg.dim() != 4 or seg.shape[0] != acts.shape[0]:
            raise NeurosemError(
                f"Tally expects label planes [B={acts.shape[0]}, P, sh, sw], got {tuple(seg.shape)}")
        b = acts.shape[0]
        if image_labels is None:
            image_labels = torch.zeros(b, 0, dtype=torch.long)
        image_labels = torch.as_tensor(image_labels)
        if image_labels.dim() == 1:
            image_labels = image_labels[:, None]
        if image_labels.dim() != 2 or image_labels.shape[0] != b:
            raise NeurosemError(
                f"Tally expects image labels [B={b}, M], got {tuple(image_labels.shape)}")
        if b == 0:
            return
        seg = seg.to(self.device, torch.long, non_blocking=True)
        image_labels = image_labels.to(self.device, torch.long, non_blocking=True)
        gt = self._count_labels(seg)
        gt += self._count_labels(image_labels) * (seg.shape[-2] * seg.shape[-1])
        acts = acts.to(self.device, non_blocking=True)
        if acts.dtype not in (torch.float32, torch.float64):
            acts = acts.float()
        self._add(acts, seg, image_labels)
        self.gt += gt
        self.n_images += b

    def _count_labels(self, labels: Any) -> Any:
        """``bincount`` of a label tensor, ``[n_labels]``; unknown numbers and labels without a
        category are a :class:`DataError` (raised before anything is tallied)."""
        import torch

        if labels.numel() == 0:
            return torch.zeros(self.n_labels, dtype=torch.long, device=self.device)
        try:
            counts = torch.bincount(labels.reshape(-1), minlength=self.n_labels)
        except RuntimeError:
            raise DataError(f"a label map holds the negative label number {int(labels.min())}: "
                            "the label PNGs are malformed") from None
        if counts.shape[0] > self.n_labels:
            hi = int(counts.shape[0] - 1)
            raise DataError(
                f"label number {hi} appears in the label maps but label.csv defines numbers up to "
                f"{self.n_labels - 1}: add it to label.csv or fix the label PNGs")
        undefined = (counts > 0) & (self._primary_dev < 0)
        undefined[0] = False
        if bool(undefined.any()):
            number = int(undefined.nonzero()[0])
            raise DataError(
                f"label number {number} appears in the label maps but has no category (label.csv "
                "or the selected c_<category>.csv files do not list it): list it there or fix the "
                "label PNGs")
        return counts

    def _add(self, acts: Any, seg: Any, image_labels: Any) -> None:
        import torch

        b, c, h, w = acts.shape
        planes, sh, sw = seg.shape[1:]
        s, nl, k = sh * sw, self.n_labels, self.n_categories
        # Label segments: maximal runs of one label along a row of one plane. An activated run of
        # pixels then meets only a few segments per plane, whatever its length.
        lab = seg.reshape(-1)                                                   # (image, plane, row, col)
        rows = lab.view(-1, sw)
        new = torch.ones_like(rows, dtype=torch.bool)
        new[:, 1:] = rows[:, 1:] != rows[:, :-1]
        new = new.view(-1)
        seg_of = torch.cumsum(new, 0) - 1                                       # segment of each entry
        starts = new.nonzero()[:, 0]
        seg_label = lab.index_select(0, starts)
        seg_col = starts % sw
        seg_len = torch.diff(starts, append=starts.new_tensor([lab.numel()]))   # a row starts a segment
        plane_rows = torch.arange(planes, device=self.device) * (sh * sw)       # offset of each plane

        # NetDissect-Lite's rule: a map whose maximum does not exceed the threshold has no mask.
        pairs = (acts.amax(dim=(2, 3)).to(self._dtype) > self._thr).nonzero()   # [n, 2] (image, unit)
        maps_all = acts.reshape(b * c, h, w)
        # maps per chunk: bounded by their size and by their activated pixels (a fraction of s)
        chunk = max(1, self.max_elements // max(1, h * w * 4, s // 8))
        for p0 in range(0, pairs.shape[0], chunk):
            bi, ui = pairs[p0:p0 + chunk].unbind(1)
            n = bi.shape[0]
            rm, rr, rc, rn = activated_runs(maps_all.index_select(0, bi * c + ui),
                                            self._thr.index_select(0, ui), (sh, sw),
                                            self.max_elements, self._axes)
            size = torch.zeros(n, dtype=torch.long, device=self.device).index_add_(0, rm, rn)
            self.unit_pixels.index_add_(0, ui, size)
            hit = torch.zeros(n * (k + 1), dtype=torch.long, device=self.device)
            step = max(1, self.max_elements // (4 * planes))
            for q0 in range(0, rm.shape[0], step):
                m, r, c0, ln = (v[q0:q0 + step] for v in (rm, rr, rc, rn))
                # the first entry of each (run, plane) in the flattened label planes
                first = ((bi.index_select(0, m) * (planes * s) + r * sw + c0)[:, None] + plane_rows).reshape(-1)
                s0 = seg_of.index_select(0, first)
                s1 = seg_of.index_select(0, first + ln.repeat_interleave(planes) - 1)
                owner = m.repeat_interleave(planes)
                length = ln.repeat_interleave(planes)
                # most (run, plane) pairs lie in one segment: its label, over the whole run
                one = s0 == s1
                label = seg_label.index_select(0, s0)
                keep = (one & (label > 0)).nonzero()[:, 0]
                self._count(ui, owner.index_select(0, keep), label.index_select(0, keep),
                            length.index_select(0, keep), hit, nl, k)
                # the others meet several segments: one entry per (run, plane, segment)
                multi = (~one).nonzero()[:, 0]
                if multi.numel():
                    s0, nseg = s0.index_select(0, multi), (s1 - s0 + 1).index_select(0, multi)
                    lo_col = (c0.repeat_interleave(planes)).index_select(0, multi)
                    hi_col = lo_col + length.index_select(0, multi)
                    total = int(nseg.sum())
                    _, rank = _expand(nseg)

                    def rep(v: Any) -> Any:
                        return torch.repeat_interleave(v, nseg, output_size=total)

                    sid = rep(s0) + rank
                    a_col = seg_col.index_select(0, sid)
                    overlap = (torch.minimum(a_col + seg_len.index_select(0, sid), rep(hi_col))
                               - torch.maximum(a_col, rep(lo_col)))
                    self._count(ui, rep(owner.index_select(0, multi)), seg_label.index_select(0, sid),
                                overlap, hit, nl, k)
            hit = hit.view(n, k + 1)[:, :k] > 0
            if image_labels.numel():
                il = image_labels.index_select(0, bi)                            # [n, M]
                self.both.view(-1).index_add_(0, (ui[:, None] * nl + il).reshape(-1),
                                              size[:, None].expand(il.shape).reshape(-1))
                img_hit = torch.zeros(n, k + 1, dtype=torch.bool, device=self.device)
                img_hit.scatter_(1, self._category_of.index_select(0, il.reshape(-1)).view(il.shape), True)
                hit |= img_hit[:, :k] & (size > 0)[:, None]
            self.act.index_add_(0, ui, hit.long() * size[:, None])

    def _count(self, ui: Any, owner: Any, label: Any, count: Any, hit: Any, nl: int, k: int) -> None:
        """``count`` activated entries of ``label`` for map ``owner``: into ``both`` (by the map's
        unit) and into the map's category hits (label 0 lands in column 0 / category K)."""
        self.both.view(-1).index_add_(0, ui.index_select(0, owner) * nl + label, count)
        hit.index_add_(0, owner * (k + 1) + self._category_of.index_select(0, label), count)

    # -- results ---------------------------------------------------------------------------------
    def result(self) -> TallyResult:
        """IoU over the labels that occur; see the module docstring for the rules."""
        gt = self.gt.cpu().numpy()
        both = self.both.cpu().numpy()
        act = self.act.cpu().numpy()
        primary = self.primary.numpy()
        cols = np.flatnonzero(gt > 0)
        cols = cols[cols > 0]                                   # label 0: no label
        cats = primary[cols]
        both_c = both[:, cols].astype(np.float64)
        act_l = act[:, cats].astype(np.float64) if cols.size else np.zeros((self.n_units, 0))
        iou = both_c / (act_l + gt[cols][None, :].astype(np.float64) - both_c + IOU_EPS)
        return TallyResult(labels=cols.astype(np.int64), iou=iou, gt=gt[cols], both=both[:, cols],
                           act=act, unit_pixels=self.unit_pixels.cpu().numpy(),
                           label_category=cats.astype(np.int64), n_images=self.n_images)

    def state_dict(self) -> dict[str, Any]:
        """The tallies and what they were made with (CPU tensors)."""
        return {"thresholds": self.thresholds.clone(), "primary": self.primary.clone(),
                "n_categories": self.n_categories, "gt": self.gt.cpu(), "both": self.both.cpu(),
                "act": self.act.cpu(), "unit_pixels": self.unit_pixels.cpu(),
                "n_images": self.n_images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (made with the same thresholds and labels)."""
        import torch

        if not (torch.equal(state["thresholds"], self.thresholds)
                and torch.equal(state["primary"], self.primary)
                and int(state["n_categories"]) == self.n_categories):
            raise NeurosemError("Tally state was made with other thresholds or labels: start over")
        self.gt = state["gt"].to(self.device)
        self.both = state["both"].to(self.device)
        self.act = state["act"].to(self.device)
        self.unit_pixels = state["unit_pixels"].to(self.device)
        self.n_images = int(state["n_images"])
