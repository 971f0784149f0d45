"""The layout of ``activations.h5`` (see :mod:`neurosem.store`): chunk shapes, sizes, creation.

Import these from :mod:`neurosem.store`.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from neurosem.errors import NeurosemError

FORMAT = "neurosem-activations"
VERSION = 2  # 2: crc/<layer> checksums (version-1 stores are read without verification)
CHUNK_BYTES = 1 << 20
MAX_CHUNK_ROWS = 256
DEFAULT_ID_WIDTH = 256
_DTYPES = {"float16": np.float16, "float32": np.float32}


def chunk_shape(shape: Sequence[int], itemsize: int, target: int = CHUNK_BYTES,
                max_rows: int = MAX_CHUNK_ROWS) -> tuple[int, int, int, int]:
    """Chunk ``(rows, channels, H, W)`` of about ``target`` bytes for an ``(N, C, H, W)`` dataset.

    A chunk always spans whole maps (H, W). When one image's C maps exceed ``target`` the chunk
    holds one image and a block of channels; otherwise it holds all channels of a power-of-two
    number of images (so the rows of all layers divide each other and one aligned write covers
    whole chunks of every layer).

    Example:
        >>> chunk_shape((1000, 64, 56, 56), 2)
        (2, 64, 56, 56)
    """
    n, c, h, w = (int(v) for v in shape)
    per_map = max(1, h * w * itemsize)
    if c * per_map >= target:
        return (1, max(1, min(c, target // per_map)), h, w)
    rows = 1
    while rows * 2 * c * per_map <= target and rows * 2 <= max_rows:
        rows *= 2
    return (max(1, min(rows, n)), c, h, w)


def create_file(tmp: Path, shapes: Mapping[str, Sequence[int]], n_images: int,
                 provenance: Mapping[str, Any] | None, dtype: str, compression: str | None,
                 id_width: int, chunk_bytes: int, max_chunk_rows: int) -> None:
    """Write a new, empty store to ``tmp``: every chunk allocated, ``n_done = 0``.

    See :meth:`neurosem.store.ActivationStore.create` for the arguments.
    """
    import h5py

    np_dtype = np.dtype(_DTYPES[dtype])
    with h5py.File(tmp, "w", libver="earliest") as h5:  # superblock v0: no open-for-write flag
        acts = h5.create_group("acts")
        crcs = h5.create_group("crc")
        for layer, shp in shapes.items():
            if "/" in layer:
                raise NeurosemError(f"layer name {layer!r} contains '/', which HDF5 keys cannot hold")
            full = (n_images, *[int(v) for v in shp])
            if len(full) != 4:
                raise NeurosemError(f"layer {layer!r} gives {len(full) - 1}-D outputs {tuple(shp)}; "
                                    "only (C, H, W) maps can be stored: choose a convolutional layer")
            chunks = chunk_shape(full, np_dtype.itemsize, chunk_bytes, max_chunk_rows)
            acts.create_dataset(layer, shape=full, dtype=np_dtype, chunks=chunks,
                                compression=compression, dcpl=_early_dcpl(compression is None),
                                fill_time="never" if compression is None else None)
            crcs.create_dataset(layer, shape=(-(-n_images // chunks[0]),), dtype=np.uint32,
                                dcpl=_early_dcpl(True), fill_time="alloc")
        _create_ids(h5, n_images, id_width)
        h5.attrs["format"] = FORMAT
        h5.attrs["version"] = VERSION
        h5.attrs["n_images"] = int(n_images)
        h5.attrs["n_done"] = np.int64(0)
        h5.attrs["complete"] = False
        h5.attrs["layers"] = json.dumps(list(shapes))
        h5.attrs["shapes"] = json.dumps({k: [int(v) for v in s] for k, s in shapes.items()})
        h5.attrs["dtype"] = dtype
        h5.attrs["provenance"] = json.dumps(dict(provenance or {}), default=str)
        # A new id per recording: outputs derived from the store (dissect.h5) keep it, so a
        # re-recording is noticed even when its arguments look the same (e.g. a changed factory).
        h5.attrs["store_id"] = uuid.uuid4().hex


def store_bytes(shapes: Mapping[str, Sequence[int]], n_images: int, itemsize: int,
                id_width: int = DEFAULT_ID_WIDTH) -> int:
    """Bytes a store of ``n_images`` takes on disk: ``N * C * H * W * itemsize`` per layer, ids, checksums.

    Example:
        >>> store_bytes({"layer4": (512, 7, 7)}, 1000, 2)
        50567072
    """
    acts = sum(int(n_images) * int(np.prod([int(v) for v in s])) * int(itemsize) for s in shapes.values())
    return acts + int(n_images) * (int(id_width) + 4 * len(shapes)) + 64 * 1024 * (1 + len(shapes))


def _early_dcpl(early: bool) -> Any:
    if not early:
        return None
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _create_ids(h5: Any, n_images: int, width: int) -> Any:
    import h5py

    return h5.create_dataset("image_ids", shape=(n_images,), dtype=h5py.string_dtype("utf-8", int(width)),
                             dcpl=_early_dcpl(True), fill_time="alloc")
