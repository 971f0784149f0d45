"""Activation masks for the figures: the dissection's own masks over the images a unit likes most.

The mask of a unit on an image is the dissection's (:func:`dissection_masks`: bit for bit the
masks of the dissection's CPU kernel, which the tally and the HTML report use): the unit's stored map ``[h, w]`` upsampled bilinearly
(``align_corners=False``) to the dissection's label size ``[sh, sw]`` (``label_size`` in
dissect.h5's ``args``) and compared with the unit's dissection threshold, ``upsampled >
threshold`` (strict). A figure draws that mask at any size by nearest-neighbour resizing only
(:func:`display_mask`), so what it shows is the mask the IoU counted.

Without a dissection of the layer the same function draws the masks at the image size with the
threshold half the unit's largest value over the images shown (a note on the figure says so).

Example:
    >>> import numpy as np
    >>> display_mask(np.array([[True, False]]), (2, 4)).astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0]]
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from neurosem.errors import NeurosemError
from neurosem.ids import NeuronId

if TYPE_CHECKING:  # pragma: no cover
    from neurosem.run import RunDir

log = logging.getLogger("neurosem")

#: The smallest side, in pixels, of a map drawn without images and without a dissection.
MAP_DISPLAY_PX = 112


@dataclass
class Panels:
    """What a mask figure shows: per unit and image the upsampled map and the dissection's mask.

    ``maps: [U, I, sh, sw]`` float32 (bilinear, for display), ``masks: [U, I, sh, sw]`` bool (the
    dissection's masks at its label size ``(sh, sw)``), ``images: [I, H, W, 3]`` in [0, 1] or
    ``None`` (maps drawn alone), ``rows``: the store rows of the images, ``ids``: their ids,
    ``thresholds``: the threshold of each unit, ``rule``: ``"dissection"`` or ``"half max"``.
    """

    units: list[NeuronId]
    rows: list[int]
    ids: list[str]
    maps: np.ndarray
    masks: np.ndarray
    images: np.ndarray | None
    note: str | None = None
    thresholds: list[float] = field(default_factory=list)
    rule: str = "dissection"


def open_store(rd: "RunDir") -> Any:
    """The run's activation store; a missing one is one line naming ``neurosem record``."""
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


def top_rows(score: np.ndarray, n: int, tie: "np.ndarray | None" = None) -> list[int]:
    """Indices of the ``n`` largest scores; ties broken by the larger ``tie`` value, then the lower index."""
    score = np.asarray(score, dtype=np.float64)
    rows = np.arange(len(score))
    keys = (rows, -score) if tie is None else (rows, -np.asarray(tie, dtype=np.float64), -score)
    return [int(i) for i in np.lexsort(keys)[:n]]


def top_images(store: Any, layer: str, unit: int, n: int) -> list[int]:
    """Store rows of the ``n`` images where ``unit`` reaches its largest activations.

    Equal maxima (a saturated unit) are ordered by the mean activation, then by the lower row,
    as in the dissection report.
    """
    peak, mean = unit_maxima(store, layer, [unit], with_means=True)
    return top_rows(peak[:, 0], n, tie=mean[:, 0])


def axis_geometry(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (``align_corners=False``) geometry of one axis: ``(lo [n_out] int64, lam [n_out]
    float64)``, output ``o`` between source pixels ``lo[o]`` and ``min(lo[o] + 1, n_in - 1)`` at
    weight ``lam[o]``; the values of :func:`neurosem.dissect._kernels.axis_tables` (computed the same
    way here so that drawing a figure does not import numba, 0.3 s; a test holds them equal)."""
    o = np.arange(n_out, dtype=np.float64)
    src = np.maximum((o + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return lo, src - lo.astype(np.float64)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64: row ``o`` holds the bilinear (``align_corners=False``) weights of
    output ``o`` (:func:`axis_geometry`)."""
    lo, lam = axis_geometry(n_in, n_out)
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - lam)
    np.add.at(m, (rows, np.minimum(lo + 1, n_in - 1)), lam)
    return m


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling (``align_corners=False``, as torch's ``interpolate``) of
    ``maps: [..., h, w]`` to ``[..., H, W]`` float32, for drawing (separable: two small matrix
    products, no torch import).

    Example:
        >>> upsample(np.array([[0.0, 1.0]]), (1, 4)).tolist()
        [[0.0, 0.25, 0.75, 1.0]]
    """
    x = np.asarray(maps, dtype=np.float64)
    h, w = x.shape[-2:]
    ry, rx = _interp_matrix(h, int(size[0])), _interp_matrix(w, int(size[1]))
    return np.einsum("yh,...hw,xw->...yx", ry, x, rx, optimize=True).astype(np.float32)


def display_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resizing of ``mask: [sh, sw]`` to ``[H, W]`` (output pixel ``y`` takes source
    row ``floor((y + 0.5) · sh / H)``): for drawing only; the mask itself is not recomputed."""
    mask = np.asarray(mask, dtype=bool)
    sh, sw = mask.shape
    big_h, big_w = (int(s) for s in size)
    rows = np.minimum(((np.arange(big_h) + 0.5) * sh / big_h).astype(np.int64), sh - 1)
    cols = np.minimum(((np.arange(big_w) + 0.5) * sw / big_w).astype(np.int64), sw - 1)
    return mask[np.ix_(rows, cols)]


def dissection_masks(raw: np.ndarray, thresholds: np.ndarray, size: tuple[int, int],
                     max_elements: int = 2 ** 22) -> np.ndarray:
    """The dissection's masks of ``raw: [U, I, h, w]`` (thresholds ``[U]``, float64) at ``size``:
    ``bool [U, I, sh, sw]``, bit for bit those of the dissection's CPU kernel
    (:func:`neurosem.dissect._kernels.map_masks`; a test compares them), in numpy.

    As the kernel: the maps in float64 (float16 values exactly); an output pixel is set when
    :func:`neurosem.dissect.tally.bilinear_value` of its four source pixels, in the same order of
    operations, exceeds the threshold and its cell (the source pixels around it) has a corner above
    the threshold; at the label size itself, the pixels above the threshold. A few hundred maps of
    a figure cost milliseconds here, where loading the compiled kernel costs 1.3 s per process.
    ``max_elements``: the largest float64 intermediate (maps are processed in chunks).
    """
    raw = np.asarray(raw)
    u_n, i_n, h, w = raw.shape
    sh, sw = (int(v) for v in size)
    thr = np.repeat(np.asarray(thresholds, dtype=np.float64), i_n)
    x_all = raw.reshape(u_n * i_n, h, w)
    out = np.zeros((u_n * i_n, sh, sw), dtype=bool)
    lo_y, lam_y = axis_geometry(h, sh)
    lo_x, lam_x = axis_geometry(w, sw)
    hi_y, hi_x = np.minimum(lo_y + 1, h - 1), np.minimum(lo_x + 1, w - 1)
    up_y, up_x = np.minimum(np.arange(h) + 1, h - 1), np.minimum(np.arange(w) + 1, w - 1)
    ly, lx = lam_y[None, :, None], lam_x[None, None, :]
    step = max(1, max_elements // max(1, sh * sw))
    for start in range(0, len(x_all), step):
        x = x_all[start:start + step].astype(np.float64)
        t = thr[start:start + step, None, None]
        hot = x > t                                             # NaN is never above
        if (h, w) == (sh, sw):
            out[start:start + step] = hot
            continue
        cell = hot | hot[:, up_y] | hot[:, :, up_x] | hot[:, up_y][:, :, up_x]
        top, bottom = x[:, lo_y], x[:, hi_y]
        a, b, c, d = top[:, :, lo_x], top[:, :, hi_x], bottom[:, :, lo_x], bottom[:, :, hi_x]
        with np.errstate(invalid="ignore"):                   # inf - inf: NaN, never above
            value = (a + ly * (c - a)) + lx * ((b - a) + ly * ((d - c) - (b - a)))
        out[start:start + step] = (value > t) & cell[:, lo_y][:, :, lo_x]
    return out.reshape(u_n, i_n, sh, sw)


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
        direct = hasattr(ds, "load_image") and getattr(ds, "transform", None) is None
        for r in rows:
            if direct:       # the PIL image as pil_to_tensor reads it, without importing torch
                item = {"id": ds.image_ids[int(r)]} if hasattr(ds, "image_ids") else {}
                pil = ds.load_image(int(r))
                arr = np.asarray(pil.convert("RGB") if pil.mode != "RGB" else pil, dtype=np.uint8)
                img = np.transpose(arr.astype(np.float32) / np.float32(255.0), (2, 0, 1))
            else:
                item = ds[int(r)]
                img = np.asarray(item["image"], dtype=np.float32)
            if "id" in item and str(item["id"]) != ids[r]:
                return None, f"image {r} of {spec} is {item['id']!r}, the run recorded {ids[r]!r}"
            images.append(np.clip(np.transpose(img, (1, 2, 0)), 0.0, 1.0))
    except (NeurosemError, OSError, ImportError, IndexError, KeyError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"the images of {spec} cannot be read: {first}"
    if len({im.shape for im in images}) > 1:
        return None, "the images have different sizes"
    return np.stack(images), None


def label_size(dissection: Any) -> tuple[int, int] | None:
    """The dissection's label (segmentation) size ``(sh, sw)``, or None when dissect.h5 does not record it."""
    size = (getattr(dissection, "args", None) or {}).get("label_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(int(s) > 0 for s in size):
        return int(size[0]), int(size[1])
    return None


def read_maps(store: Any, layer: str, units: Sequence[int], rows: Sequence[int]) -> np.ndarray:
    """The stored maps of ``units`` on store ``rows``: ``[U, I, h, w]`` float32 (float16 stored values exactly)."""
    idx = [int(u) for u in units]
    return np.stack([store.read(layer, r, r + 1)[0, idx] for r in rows], axis=1).astype(np.float32)


def mask_panels(rd: "RunDir", units: Sequence[NeuronId], image_unit: NeuronId, n_images: int = 4,
                store: Any = None, rows: Sequence[int] | None = None) -> Panels:
    """Maps and the dissection's masks of ``units`` on the ``n_images`` images where ``image_unit``
    activates most (``rows``: those store rows, when already known). The images are the
    dissection's top images of ``image_unit`` (the report's: ranked by mask size) when it holds
    ``n_images`` of them, else those of its largest activations."""
    from neurosem.analysis.query import load_run_dissection

    dissection = load_run_dissection(rd)
    own = store is None
    store = open_store(rd) if own else store
    try:
        layer = image_unit.layer
        if rows is None and dissection is not None and layer in dissection.layers:
            top_i, _ = dissection.top_images(layer)
            chosen = [int(i) for i in top_i[image_unit.index] if 0 <= i < store.n_done] \
                if image_unit.index < top_i.shape[0] else []
            if len(chosen) >= n_images:
                rows = chosen[:n_images]
        rows = list(rows) if rows is not None else top_images(store, layer, image_unit.index, n_images)
        ids = [store.image_ids[r] for r in rows]
        raw = read_maps(store, layer, [u.index for u in units], rows)          # [U, I, h, w]
        images, why = load_images(rd, store, rows)
    finally:
        if own:
            store.close()
    notes = []
    size = label_size(dissection) if dissection is not None and layer in dissection.layers else None
    if size is not None:
        thr_all = np.asarray(dissection.threshold(layer, exact=True), dtype=np.float64)
        thresholds = thr_all[[u.index for u in units]]
        rule = "dissection"
    else:
        if images is not None:
            size = tuple(images.shape[1:3])
        else:
            h, w = raw.shape[-2:]
            scale = max(1, math.ceil(MAP_DISPLAY_PX / max(h, w)))
            size = (h * scale, w * scale)
        thresholds = np.array([0.5 * float(raw[i].max()) for i in range(len(units))], dtype=np.float64)
        rule = "half max"
        notes.append("no dissection of this layer with its label size: masks where a map exceeds half its "
                     "largest value over these images")
    masks = dissection_masks(raw, thresholds, size)
    maps = upsample(raw, size)
    if images is None:
        notes.append(f"images unavailable ({why}): activation maps shown alone")
    for note in notes:
        log.warning("note: %s", note)
    return Panels(list(units), rows, ids, maps, masks, images, "; ".join(notes) or None,
                  [float(t) for t in thresholds], rule)
