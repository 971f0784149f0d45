"""Activation masks for the figures: the dissection's own masks over the images a unit likes most.

The mask of a unit on an image is the dissection's (:func:`neurosem.dissect.tally.unit_masks`, the
function the tally and the HTML report use): the unit's stored map ``[h, w]`` upsampled bilinearly
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


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64: row ``o`` holds the bilinear (``align_corners=False``) weights of
    output ``o`` (:func:`neurosem.dissect._kernels.axis_tables`' geometry)."""
    from neurosem.dissect._kernels import axis_tables

    lo, lam, _, _ = axis_tables(n_in, n_out)
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


def dissection_masks(raw: np.ndarray, thresholds: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The dissection's masks of ``raw: [U, I, h, w]`` (thresholds ``[U]``, float64) at ``size``:
    ``bool [U, I, sh, sw]``, computed by the dissection's own CPU kernel
    (:func:`neurosem.dissect._kernels.map_masks`, no torch import) or, where numba is missing, by
    :func:`neurosem.dissect.tally.unit_masks` (the two agree bit for bit, tests/dissect/test_kernels.py)."""
    from neurosem.dissect import _kernels as K

    raw = np.asarray(raw)
    u_n, i_n, h, w = raw.shape
    thr = np.asarray(thresholds, dtype=np.float64)
    if K.HAVE_NUMBA:
        units = np.repeat(np.arange(u_n, dtype=np.int64), i_n)
        if raw.dtype not in (np.float16, np.float32, np.float64):
            raw = raw.astype(np.float32)
        out = K.map_masks(raw.reshape(u_n * i_n, h, w), thr, units, K.Geometry(h, w, *size))
        return out.reshape(u_n, i_n, *size)
    import torch

    from neurosem.dissect.tally import unit_masks

    acts = torch.from_numpy(np.ascontiguousarray(np.swapaxes(raw, 0, 1), dtype=np.float32))   # [I, U, h, w]
    return np.swapaxes(unit_masks(acts, torch.as_tensor(thr), size).numpy(), 0, 1)


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
