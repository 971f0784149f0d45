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
   activated pixels form one run at one end of the row, whose boundary is estimated from the
   weights and checked with the exact value (every column counted where the check fails), and
   runs that continue into the next cell are merged (:func:`activated_runs`);
3. the label planes become one key per entry, label plus the number of label changes so far along
   the row (:func:`label_keys`, prepared once per batch for every layer: :meth:`Tally.labels`);
   a run of activated pixels whose first and last keys are equal on a plane carries one label
   there, and the tallies take ``length`` entries of it at once (``index_add``) for ``both``
   (keyed by unit and label) and for the categories hit (keyed by map and category); the other
   (run, plane) pairs are counted pixel by pixel.

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
    """Bilinear (``align_corners=False``) geometry of one axis, ``n_in -> n_out``, cut into *pieces*:
    runs of consecutive outputs that lie between the same two source pixels (``src`` and
    ``min(src + 1, n_in - 1)``), with the clamped border outputs (weight 0) apart, and at most
    ``m = ceil(n_out / n_in)`` outputs each. Piece ``v`` holds outputs ``first[v] ..
    first[v] + count[v] - 1`` at weights ``lam[v, :count[v]]`` (NaN past ``count[v]``: a value
    computed there compares false); the weights of a piece grow by about ``step = n_in / n_out``
    per output. Source pixel ``i`` owns the ``n_pieces[i]`` pieces from ``piece0[i]`` on."""

    first: Any      # [V]
    count: Any      # [V]
    lam: Any        # [V, m]
    lam_t: Any      # [m, V] (lam transposed, contiguous)
    lam_first: Any  # [V] lam[v, 0]
    lam_last: Any   # [V] lam[v, count - 1]
    n_pieces: Any   # [n_in]
    piece0: Any     # [n_in]
    m: int
    step: float


def _axis(n_in: int, n_out: int, device: Any, dtype: Any) -> _Axis:
    import torch

    o = torch.arange(n_out, dtype=torch.float64)
    raw = (o + 0.5) * (n_in / n_out) - 0.5
    src = raw.clamp(min=0.0)
    lo = src.floor().long().clamp(max=n_in - 1)
    lam = src - lo.double()
    m = max(1, -(-n_out // n_in))
    pieces: list[list[int]] = []                  # [src, first, count]
    clamped = (raw < 0).tolist()
    for k, i in enumerate(lo.tolist()):
        last = pieces[-1] if pieces else None
        if last is not None and last[0] == i and clamped[last[1]] == clamped[k] and last[2] < m:
            last[2] += 1
        else:
            pieces.append([i, k, 1])
    p = torch.tensor(pieces, dtype=torch.long).reshape(-1, 3)
    ks = torch.arange(m)
    valid = ks[None, :] < p[:, 2:3]
    table = torch.where(valid, lam[(p[:, 1:2] + ks[None, :]).clamp(max=n_out - 1)],
                        torch.full((), float("nan"), dtype=torch.float64))
    n_pieces = torch.bincount(p[:, 0], minlength=n_in)
    piece0 = torch.cumsum(n_pieces, 0) - n_pieces
    fl = dict(device=device, dtype=dtype)
    return _Axis(first=p[:, 1].to(device), count=p[:, 2].to(device), lam=table.to(**fl),
                 lam_t=table.t().contiguous().to(**fl),
                 lam_first=table[:, 0].to(**fl),
                 lam_last=table[torch.arange(p.shape[0]), p[:, 2] - 1].to(**fl),
                 n_pieces=n_pieces.to(device), piece0=piece0.to(device), m=m, step=n_in / n_out)


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
    after rounding, which lets the tally find each row's mask boundary from a few values instead
    of testing every pixel). Works on numpy arrays and tensors alike.
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
        are mostly, not always, merged). Maps whose maximum does not exceed the threshold have
        none.

    Only *cells* (the pixels between two source rows and two source columns) with a corner above
    the threshold can hold activated pixels (a bilinear value is a convex combination of its
    corners). In such a cell, each output row's value is monotone in the column, so its activated
    pixels are a run at one end: the row is entirely in or out when both of its end values are,
    and otherwise its activated pixels are counted by evaluating :func:`bilinear_value` exactly at
    each of its columns, so the result is the same as testing every pixel. All of it is a few
    tensor operations over all the candidate cells and rows of all the maps at once.

    Example:
        >>> import torch
        >>> m, r, c, n = activated_runs(torch.tensor([[[0., 1.]]]), torch.tensor([0.5]), (1, 4))
        >>> c.tolist(), n.tolist()          # values 0, 0.25, 0.75, 1: columns 2 and 3
        ([2], [2])
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
    mr = ar.m
    # Candidate cells: a corner above the threshold (corners of cell (i, j): rows i, min(i+1, h-1)
    # and columns j, min(j+1, w-1)) and at least one output pixel.
    above = x > t[:, None, None]
    rows = above.clone()
    rows[:, :-1] |= above[:, 1:]
    cells = rows.clone()
    cells[:, :, :-1] |= rows[:, :, 1:]
    cells &= (ar.n_pieces > 0)[:, None] & (ac.n_pieces > 0)[None, :]
    cand = cells.nonzero()                                                     # [N, 3] (map, i, j)
    chunk = max(1, max_elements // (4 * mr))
    out_m, out_r, out_c, out_n = [], [], [], []
    flat = x.reshape(-1)
    lam_c = ac.lam.reshape(-1)
    for c0 in range(0, cand.shape[0], chunk):
        p, i, j = cand[c0:c0 + chunk].unbind(1)
        # the pieces of each cell (one piece per cell but at the borders)
        npc = ar.n_pieces.index_select(0, i) * ac.n_pieces.index_select(0, j)
        if int(npc.max()) > 1:
            owner, rank = _expand(npc)
            p, i, j = p.index_select(0, owner), i.index_select(0, owner), j.index_select(0, owner)
            ncj = ac.n_pieces.index_select(0, j)
            vi = ar.piece0.index_select(0, i) + torch.div(rank, ncj, rounding_mode="floor")
            vj = ac.piece0.index_select(0, j) + rank % ncj
        else:
            vi, vj = ar.piece0.index_select(0, i), ac.piece0.index_select(0, j)
        i1, j1 = (i + 1).clamp(max=h - 1), (j + 1).clamp(max=w - 1)
        a, b, c, d = (flat.index_select(0, p * (h * w) + r * w + col)        # [N] cell corners
                      for r, col in ((i, j), (i, j1), (i1, j), (i1, j1)))
        ba = b - a
        # one entry per (output row of the piece, piece): value = A + lx * B, monotone in lx.
        # (Rows first: the elementwise work then runs along long contiguous rows.)
        ly = ar.lam_t.index_select(1, vi)                                     # [mr, N]; NaN: no row
        A = a + ly * (c - a)
        B = ba + ly * ((d - c) - ba)
        tq = t.index_select(0, p)
        g0 = (A + ac.lam_first.index_select(0, vj) * B) > tq                 # first column on
        g1 = (A + ac.lam_last.index_select(0, vj) * B) > tq                  # last column on
        keep = (g0 | g1).view(-1).nonzero()[:, 0]
        if keep.numel() == 0:
            continue
        n_cells = p.shape[0]
        cell = keep % n_cells
        g0, g1 = g0.view(-1).index_select(0, keep), g1.view(-1).index_select(0, keep)
        A, B = A.view(-1).index_select(0, keep), B.view(-1).index_select(0, keep)
        tk = t.index_select(0, p.index_select(0, cell))
        vjk = vj.index_select(0, cell)
        ncol = ac.count.index_select(0, vjk)
        # a mixed row (one end on, the other off) switches once: at b, the first column whose
        # state differs from the first column's. Estimate b from the weights' step, check the
        # two columns around it exactly, and count every column of the rows where that fails.
        kf = ((tk - A) / B
              - ac.lam_first.index_select(0, vjk)) / ac.step
        kf = torch.where(g0, kf.ceil(), kf.floor() + 1)
        bnd = torch.minimum(kf.clamp(min=1.0), (ncol - 1).to(kf.dtype)).long()
        base = vjk * ac.m
        before = (A + lam_c.index_select(0, base + (bnd - 1).clamp(min=0)) * B > tk) != g0
        after = (A + lam_c.index_select(0, base + torch.minimum(bnd, ncol - 1)) * B > tk) != g0
        mixed = g0 != g1
        bad = (mixed & (before | ~after)).nonzero()[:, 0]
        if bad.numel():
            vals = (A.index_select(0, bad)[:, None]
                    + ac.lam.index_select(0, vjk.index_select(0, bad)) * B.index_select(0, bad)[:, None])
            on = (vals > tk.index_select(0, bad)[:, None]).sum(1)
            g0b = g0.index_select(0, bad)
            bnd.index_copy_(0, bad, torch.where(g0b, on, ncol.index_select(0, bad) - on))
        # full rows: all ncol columns; mixed: [0, b) when the first column is on, else [b, ncol)
        ln = torch.where(mixed, torch.where(g0, bnd, ncol - bnd), ncol)
        start = torch.where(g0, torch.zeros_like(ln), ncol - ln)
        # Merge the runs that continue in the next piece of the row (its first column is on):
        # they are consecutive entries. Fewer, longer runs make the label lookups cheaper.
        adj = torch.zeros(n_cells, dtype=torch.bool, device=x.device)
        adj[:-1] = (p[1:] == p[:-1]) & (vi[1:] == vi[:-1]) & (vj[1:] == vj[:-1] + 1)
        touch = g1[:-1] & g0[1:] & (keep[1:] == keep[:-1] + 1) & adj.index_select(0, cell[:-1])
        heads = torch.cat([torch.ones(1, dtype=torch.bool, device=x.device), ~touch]).nonzero()[:, 0]
        if heads.shape[0] < keep.shape[0]:
            csum = torch.cumsum(ln, 0)
            ends = torch.cat([heads[1:] - 1, heads.new_tensor([keep.shape[0] - 1])])
            ln = csum.index_select(0, ends) - csum.index_select(0, heads) + ln.index_select(0, heads)
            keep, cell, vjk = keep.index_select(0, heads), cell.index_select(0, heads), vjk.index_select(0, heads)
            start = start.index_select(0, heads)
        out_m.append(p.index_select(0, cell))
        out_r.append(ar.first.index_select(0, vi.index_select(0, cell))
                     + torch.div(keep, n_cells, rounding_mode="floor"))
        out_c.append(ac.first.index_select(0, vjk) + start)
        out_n.append(ln)
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


def label_keys(seg: Any, n_labels: int | None = None) -> Any:
    """The label planes ``seg: [B, P, sh, sw]`` as one key per entry, flattened like ``seg``:
    ``changes << 16 | label`` (int32; int64 for labels >= 2**16 or rows of 2**15 pixels or
    more), where ``changes`` counts the label changes along the row up to the entry. The entries
    ``e .. e + n - 1`` of one row then carry one label iff their first and last keys are equal,
    and ``key & 0xFFFF`` is the label (``key & 0xFFFFFFFF`` with int64 keys). ``n_labels``: an
    upper bound of the label numbers when known (saves a pass over ``seg``).

    Example:
        >>> import torch
        >>> label_keys(torch.tensor([[[[3, 3, 5]]]])).tolist()
        [3, 3, 65541]
    """
    import torch

    sw = seg.shape[-1]
    rows = seg.reshape(-1, sw)
    if n_labels is None:
        n_labels = int(rows.max()) + 1 if rows.numel() else 0
    small = sw < 2 ** 15 and n_labels <= 2 ** 16
    dtype, scale = (torch.int32, 2 ** 16) if small else (torch.int64, 2 ** 32)
    flat = rows.reshape(-1)
    # label changes between neighbours in the flattened planes; the first entry of a row compares
    # with the previous row's last, which shifts the whole row's count and changes no equality
    change = torch.empty(flat.shape, dtype=torch.bool, device=seg.device)
    if flat.numel():
        change[0] = False
        torch.ne(flat[1:], flat[:-1], out=change[1:])
    counts = torch.cumsum(change.view(rows.shape), 1, dtype=dtype)
    return torch.add(rows.to(dtype), counts, alpha=scale).view(-1)


@dataclass
class LabelBatch:
    """A batch of Broden labels, checked and prepared once for every layer (:meth:`Tally.labels`).

    Attributes:
        seg: ``[B, P, sh, sw]`` label planes (long); image_labels: ``[B, M]`` (long);
        gt: ``[n_labels]`` the batch's label counts; keys: :func:`label_keys` of ``seg``;
        primary: the primary categories the labels were checked against.
    """

    seg: Any
    image_labels: Any
    gt: Any
    keys: Any
    primary: Any


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


def check_label_counts(counts: np.ndarray, primary: np.ndarray) -> None:
    """Refuse label counts ``[>= n_labels]`` (a bincount) that hold a number past label.csv's or
    a label without a category (label 0, "no label", is never refused): one :class:`DataError`.

    Example:
        >>> check_label_counts(np.array([5, 2]), np.array([-1, 0]))          # fine
    """
    n_labels = primary.shape[0]
    if counts.shape[0] > n_labels:
        raise DataError(
            f"label number {counts.shape[0] - 1} appears in the label maps but label.csv defines numbers up "
            f"to {n_labels - 1}: add it to label.csv or fix the label PNGs")
    undefined = (counts > 0) & (primary[:counts.shape[0]] < 0)
    undefined[0] = False
    if undefined.any():
        raise DataError(
            f"label number {int(np.flatnonzero(undefined)[0])} appears in the label maps but has no category "
            "(label.csv or the selected c_<category>.csv files do not list it): list it there or fix the "
            "label PNGs")


def tally_result(gt: np.ndarray, both: np.ndarray, act: np.ndarray, unit_pixels: np.ndarray,
                 primary: np.ndarray, n_images: int) -> TallyResult:
    """IoU from the tallies, over the labels that occur (``gt > 0``, label 0 left out).

    Args:
        gt: ``[n_labels]``; both: ``[C, n_labels]``; act: ``[C, K]``; unit_pixels: ``[C]``;
        primary: ``[n_labels]`` primary category of each label (-1: none); n_images: images tallied.

    Example:
        >>> import numpy as np
        >>> r = tally_result(np.array([0, 4]), np.array([[0, 2]]), np.array([[3]]), np.array([3]),
        ...                  np.array([-1, 0]), 1)
        >>> r.labels.tolist(), round(float(r.iou[0, 0]), 6)          # 2 / (3 + 4 - 2)
        ([1], 0.4)
    """
    cols = np.flatnonzero(gt > 0)
    cols = cols[cols > 0]                                   # label 0: no label
    cats = primary[cols]
    both_c = both[:, cols].astype(np.float64)
    act_l = act[:, cats].astype(np.float64) if cols.size else np.zeros((both.shape[0], 0))
    iou = both_c / (act_l + gt[cols][None, :].astype(np.float64) - both_c + IOU_EPS)
    return TallyResult(labels=cols.astype(np.int64), iou=iou, gt=gt[cols], both=both[:, cols],
                       act=act, unit_pixels=unit_pixels, label_category=cats.astype(np.int64),
                       n_images=int(n_images))


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
    def labels(self, seg: Any, image_labels: Any = None) -> "LabelBatch":
        """A batch of labels checked and prepared once, for :meth:`add` of this tally and of any
        other tally made with the same labels (every layer of a dissection).

        Args:
            seg: ``[B, P, sh, sw]`` integer label planes (global label numbers, 0 = none).
            image_labels: ``[B, M]`` image-level label numbers (0 = padding), or ``None``.

        Example:
            >>> import torch
            >>> t = Tally(torch.tensor([0.5]), primary_category=[-1, 0], n_categories=1)
            >>> batch = t.labels(torch.tensor([[[[1, 1], [0, 0]]]]))
            >>> t.add(torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), batch)
            >>> batch.gt[1:].tolist(), t.result().iou.round(6).tolist()     # gt[0]: no label
            ([2], [[0.5]])
        """
        import torch

        seg = torch.as_tensor(seg)
        if seg.dim() == 3:
            seg = seg[:, None]
        if seg.dim() != 4:
            raise NeurosemError(f"Tally expects label planes [B, P, sh, sw], got {tuple(seg.shape)}")
        b = seg.shape[0]
        if image_labels is None:
            image_labels = torch.zeros(b, 0, dtype=torch.long)
        image_labels = torch.as_tensor(image_labels)
        if image_labels.dim() == 1:
            image_labels = image_labels[:, None]
        if image_labels.dim() != 2 or image_labels.shape[0] != b:
            raise NeurosemError(
                f"Tally expects image labels [B={b}, M], got {tuple(image_labels.shape)}")
        seg = seg.to(self.device, torch.long, non_blocking=True)
        image_labels = image_labels.to(self.device, torch.long, non_blocking=True)
        gt = self._count_labels(seg)
        gt += self._count_labels(image_labels) * (seg.shape[-2] * seg.shape[-1])
        return LabelBatch(seg=seg, image_labels=image_labels, gt=gt,
                          keys=label_keys(seg, self.n_labels), primary=self.primary)

    def add(self, acts: Any, seg: Any, image_labels: Any = None) -> None:
        """Tally a batch.

        Args:
            acts: ``[B, C, h, w]`` activations (any float dtype; array or tensor).
            seg: ``[B, P, sh, sw]`` integer label planes (global label numbers, 0 = none), or a
                :class:`LabelBatch` from :meth:`labels` (then ``image_labels`` is in it).
            image_labels: ``[B, M]`` image-level label numbers (0 = padding), or ``None``.
        """
        import torch

        acts = torch.as_tensor(acts)
        if acts.dim() != 4 or acts.shape[1] != self.n_units:
            raise NeurosemError(
                f"Tally expects activations [B, {self.n_units}, h, w], got {tuple(acts.shape)}")
        b = acts.shape[0]
        if isinstance(seg, LabelBatch):
            if seg.primary is not self.primary and not torch.equal(seg.primary, self.primary):
                raise NeurosemError("the LabelBatch was prepared for other labels: prepare it with "
                                    "this tally's labels()")
            if image_labels is not None:
                raise NeurosemError("pass the image labels to labels(), not with a LabelBatch")
            batch = seg
        else:
            seg = torch.as_tensor(seg)
            if seg.dim() == 3:
                seg = seg[:, None]
            if seg.dim() != 4 or seg.shape[0] != b:
                raise NeurosemError(
                    f"Tally expects label planes [B={b}, P, sh, sw], got {tuple(seg.shape)}")
            if b == 0:
                return
            batch = self.labels(seg, image_labels)
        if batch.seg.shape[0] != b:
            raise NeurosemError(f"Tally expects label planes [B={b}, P, sh, sw], got "
                                f"{tuple(batch.seg.shape)}")
        if b == 0:
            return
        acts = acts.to(self.device, non_blocking=True)
        if acts.dtype not in (torch.float32, torch.float64):
            acts = acts.float()
        self._add(acts, batch)
        self.gt += batch.gt.to(self.device)
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
        check_label_counts(counts.cpu().numpy(), self.primary.numpy())
        return counts

    def _add(self, acts: Any, batch: "LabelBatch") -> None:
        import torch

        seg, image_labels = batch.seg.to(self.device), batch.image_labels.to(self.device)
        keys = batch.keys.to(self.device)
        b, c, h, w = acts.shape
        planes, sh, sw = seg.shape[1:]
        s, nl, k = sh * sw, self.n_labels, self.n_categories
        mask = 0xFFFF if keys.dtype == torch.int32 else 0xFFFFFFFF
        plane_off = torch.arange(planes, device=self.device) * s                # offset of each plane
        both = self.both.view(-1)
        # NetDissect-Lite's rule: a map whose maximum does not exceed the threshold has no mask.
        maxes = acts.amax(dim=(2, 3))
        pairs = (maxes.to(self._dtype) > self._thr).nonzero()                   # [n, 2] (image, unit)
        self.last_maxes = maxes
        self.last_sizes = torch.zeros(b * c, dtype=torch.long, device=self.device)
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
            self.last_sizes.index_copy_(0, bi * c + ui, size)
            hit = torch.zeros(n * (k + 1), dtype=torch.bool, device=self.device)
            step = max(1, self.max_elements // (4 * max(1, planes)))  # no pixel planes: image-level only
            for q0 in range(0, rm.shape[0], step):
                m, r, c0, ln = (v[q0:q0 + step] for v in (rm, rr, rc, rn))
                # each (run, plane): its first and last entry in the flattened label planes
                first = ((bi.index_select(0, m) * (planes * s) + r * sw + c0)[:, None]
                         + plane_off).view(-1)                                  # [R * P]
                last = first + (ln - 1).repeat_interleave(planes)
                key = keys.index_select(0, first)
                one = key == keys.index_select(0, last)                        # one label: at once
                label = (key & mask).long()
                owner = m.repeat_interleave(planes)
                count = ln.repeat_interleave(planes)
                both.index_add_(0, ui.index_select(0, owner) * nl + label, count * one)
                cat = torch.where(one, self._category_of.index_select(0, label), k)
                hit.index_fill_(0, owner * (k + 1) + cat, True)
                # the others, pixel by pixel
                multi = (~one).nonzero()[:, 0]
                if multi.numel():
                    cnt = count.index_select(0, multi)
                    total = int(cnt.sum())
                    offset = first.index_select(0, multi) - (torch.cumsum(cnt, 0) - cnt)
                    pix = (torch.repeat_interleave(offset, cnt, output_size=total)
                           + torch.arange(total, device=self.device))
                    plab = keys.index_select(0, pix) & mask
                    own = owner.index_select(0, multi)
                    both.index_add_(0, torch.repeat_interleave(ui.index_select(0, own) * nl, cnt,
                                                               output_size=total) + plab,
                                    torch.ones(1, dtype=torch.long, device=self.device).expand(total))
                    hit.index_fill_(0, torch.repeat_interleave(own * (k + 1), cnt, output_size=total)
                                    + self._category_of.index_select(0, plab), True)
            hit = hit.view(n, k + 1)[:, :k]
            if image_labels.numel():
                il = image_labels.index_select(0, bi)                            # [n, M]
                both.index_add_(0, (ui[:, None] * nl + il).reshape(-1),
                                size[:, None].expand(il.shape).reshape(-1))
                img_hit = torch.zeros(n, k + 1, dtype=torch.bool, device=self.device)
                img_hit.scatter_(1, self._category_of.index_select(0, il.reshape(-1)).view(il.shape), True)
                hit = hit | (img_hit[:, :k] & (size > 0)[:, None])
            self.act.index_add_(0, ui, hit.long() * size[:, None])

    # -- results ---------------------------------------------------------------------------------
    def result(self) -> TallyResult:
        """IoU over the labels that occur; see the module docstring for the rules."""
        return tally_result(self.gt.cpu().numpy(), self.both.cpu().numpy(), self.act.cpu().numpy(),
                            self.unit_pixels.cpu().numpy(), self.primary.numpy(), self.n_images)

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
