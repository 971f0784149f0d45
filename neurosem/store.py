"""The activation store: ``activations.h5``, written in whole batches, resumable, read in batches.

Layout (see docs/internals.md)::

    acts/<layer>   (N, C, H, W) float16 (or float32), chunked by (rows, channel block, H, W)
                   with about 1 MB per chunk, uncompressed by default
    image_ids      (N,) fixed-width utf-8 strings
    attrs          format, version, n_images, n_done, complete, layers (JSON list),
                   shapes (JSON {layer: [C, H, W]}), dtype, provenance (JSON)

Why it survives a kill: every chunk of every dataset is allocated when the file is created (and the
file is created under a temporary name and renamed once it is complete), so a write afterwards only
changes raw data plus the ``n_done`` attribute, which is advanced *after* the data has been written
and flushed. A killed writer therefore leaves a file whose first ``n_done`` rows are valid.

Writes come from :class:`StoreWriter`, a background thread fed through a bounded queue: the caller
never waits on the disk unless it is more than ``max_pending`` batches ahead, an exception in the
thread is re-raised in the caller, and rows are written in spans aligned to the chunk rows, so
every write covers whole chunks.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from neurosem.errors import NeurosemError

FORMAT = "neurosem-activations"
VERSION = 1
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


def _corrupt(path: Path, why: str) -> NeurosemError:
    return NeurosemError(
        f"{path} is not a readable neurosem activation store ({why}); "
        "rerun the record command with --force to record it again")


class ActivationStore:
    """One ``activations.h5`` file: read-only via :meth:`open`, writable via :meth:`create`/:meth:`append_to`.

    Example:
        >>> with ActivationStore.open("runs/resnet18/activations.h5") as store:  # doctest: +SKIP
        ...     for start, batch in store.iter_batches(["layer4"], batch_size=256):
        ...         acts = batch["layer4"]          # np.float16 [B, 512, 7, 7]
    """

    def __init__(self, path: Path, h5: Any, writable: bool) -> None:
        self.path = Path(path)
        self._f = h5
        self.writable = writable
        try:
            attrs = h5.attrs
            if attrs.get("format") != FORMAT:
                raise _corrupt(self.path, "no neurosem format mark")
            self.layers: list[str] = list(json.loads(attrs["layers"]))
            self.provenance: dict[str, Any] = json.loads(attrs["provenance"])
            self.store_id: str | None = str(attrs["store_id"]) if "store_id" in attrs else None
            self.n_images = int(attrs["n_images"])
            self.dtype = str(attrs["dtype"])
            for layer in self.layers:
                h5["acts"][layer]
            h5["image_ids"]
        except NeurosemError:
            h5.close()
            raise
        except Exception as exc:  # missing attrs/datasets, bad JSON
            h5.close()
            raise _corrupt(self.path, f"{type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: "str | Path") -> "ActivationStore":
        """Open an existing store read-only (a missing or corrupt file is a one-line error)."""
        return cls._open(Path(path), "r")

    @classmethod
    def append_to(cls, path: "str | Path") -> "ActivationStore":
        """Open an existing store to continue writing it at ``n_done`` (resume)."""
        return cls._open(Path(path), "r+")

    @classmethod
    def _open(cls, path: Path, mode: str) -> "ActivationStore":
        import h5py

        if not path.exists():
            raise NeurosemError(f"no activations at {path}: record them first with `neurosem record MODEL --data PATH`")
        try:
            h5 = h5py.File(path, mode, rdcc_nbytes=4 * CHUNK_BYTES)
        except OSError as exc:
            if "unable to lock file" in str(exc):
                raise NeurosemError(f"{path} is open for writing in another process (a running "
                                    "`neurosem record`?); wait for it to finish or stop it") from None
            raise _corrupt(path, str(exc).splitlines()[0] if str(exc) else "unreadable HDF5") from None
        return cls(path, h5, writable=mode != "r")

    @classmethod
    def create(cls, path: "str | Path", shapes: Mapping[str, Sequence[int]], n_images: int,
               provenance: Mapping[str, Any] | None = None, dtype: str = "float16",
               compression: str | None = None, id_width: int = DEFAULT_ID_WIDTH,
               chunk_bytes: int = CHUNK_BYTES, max_chunk_rows: int = MAX_CHUNK_ROWS) -> "ActivationStore":
        """Create a new store (replacing ``path``) for ``n_images`` images and return it writable.

        Args:
            shapes: per layer the per-image shape ``(C, H, W)``; the order is kept.
            provenance: JSON-serialisable description of how the activations were made.
            dtype: ``"float16"`` (default) or ``"float32"``.
            compression: an h5py filter (``"gzip"``, ``"lzf"``) or None. Compressed chunks cannot be
                allocated up front, so a kill during a write is less well protected.
            max_chunk_rows: most images per chunk; the recorder passes the largest power of two
                <= its batch size, so each batch is written as whole chunks.

        Example:
            >>> store = ActivationStore.create("a.h5", {"layer4": (512, 7, 7)}, 100)  # doctest: +SKIP
        """
        import h5py

        path = Path(path)
        if dtype not in _DTYPES:
            raise NeurosemError(f"unknown activation dtype {dtype!r}: use float16 or float32")
        if n_images < 1:
            raise NeurosemError("cannot create an activation store for 0 images: the dataset is empty")
        np_dtype = np.dtype(_DTYPES[dtype])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w", libver="earliest") as h5:  # superblock v0: no open-for-write flag
            acts = h5.create_group("acts")
            for layer, shp in shapes.items():
                if "/" in layer:
                    raise NeurosemError(f"layer name {layer!r} contains '/', which HDF5 keys cannot hold")
                full = (n_images, *[int(v) for v in shp])
                if len(full) != 4:
                    raise NeurosemError(f"layer {layer!r} gives {len(full) - 1}-D outputs {tuple(shp)}; "
                                        "only (C, H, W) maps can be stored: choose a convolutional layer")
                acts.create_dataset(layer, shape=full, dtype=np_dtype,
                                    chunks=chunk_shape(full, np_dtype.itemsize, chunk_bytes, max_chunk_rows),
                                    compression=compression, dcpl=_early_dcpl(compression is None),
                                    fill_time="never" if compression is None else None)
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
        os.replace(tmp, path)
        return cls.append_to(path)

    # ------------------------------------------------------------------ reading
    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f is not None and self._f.id.valid:
            self._f.close()

    @property
    def n_done(self) -> int:
        """Images ``0..n_done`` hold valid activations."""
        return int(self._f.attrs["n_done"])

    @property
    def complete(self) -> bool:
        return bool(self._f.attrs["complete"])

    @property
    def image_ids(self) -> list[str]:
        """The ids (e.g. Broden image paths) of images ``0..n_done``."""
        raw = self._f["image_ids"][: self.n_done]
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in raw]

    def _dataset(self, layer: str) -> Any:
        if layer not in self.layers:
            raise NeurosemError(
                f"layer {layer!r} is not in {self.path} (stored layers: {', '.join(self.layers)}); "
                "record it with `neurosem record ... --layers`")
        return self._f["acts"][layer]

    def shape(self, layer: str) -> tuple[int, int, int, int]:
        """``(N, C, H, W)`` of a layer, N being all images (``n_done`` of them written)."""
        return tuple(int(v) for v in self._dataset(layer).shape)  # type: ignore[return-value]

    def read(self, layer: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Activations of images ``start..stop`` (default: up to ``n_done``): ``[B, C, H, W]``."""
        ds = self._dataset(layer)
        n_done = self.n_done
        stop = n_done if stop is None else int(stop)
        if not 0 <= start <= stop <= n_done:
            raise NeurosemError(f"cannot read images {start}..{stop} of {layer!r}: "
                                f"only 0..{n_done} are recorded in {self.path}")
        out = np.empty((stop - start, *ds.shape[1:]), dtype=ds.dtype)
        if stop > start:
            ds.read_direct(out, np.s_[start:stop])
        return out

    def iter_batches(self, layers: Sequence[str] | None = None, batch_size: int = 256,
                     start: int = 0, stop: int | None = None,
                     prefetch: int = 1) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield ``(start, {layer: np.ndarray [B, C, H, W]})`` over images ``start..stop`` (default ``n_done``).

        With ``prefetch > 0`` the next batches are read by a background thread while the caller
        works on the current one (the arrays yielded are fresh, the caller may keep them).

        Example:
            >>> for i0, batch in store.iter_batches(["layer3", "layer4"], 128):  # doctest: +SKIP
            ...     print(i0, batch["layer4"].shape)
        """
        layers = list(self.layers if layers is None else layers)
        for layer in layers:
            self._dataset(layer)
        stop = self.n_done if stop is None else int(stop)
        if batch_size < 1:
            raise NeurosemError(f"batch size must be >= 1, got {batch_size}")
        spans = [(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]

        def load(span: tuple[int, int]) -> dict[str, np.ndarray]:
            return {layer: self.read(layer, *span) for layer in layers}

        if prefetch <= 0 or len(spans) <= 1:
            for span in spans:
                yield span[0], load(span)
            return
        yield from _prefetched(spans, load, prefetch)

    # ------------------------------------------------------------------ writing
    def append(self, acts: Mapping[str, Any], ids: Sequence[str]) -> None:
        """Write one batch at ``n_done`` synchronously, flush, then advance ``n_done``.

        Args:
            acts: per stored layer an array-like ``[B, C, H, W]`` (numpy or a CPU tensor).
            ids: the B image ids.
        """
        self._write_rows(self.n_done, acts, ids)

    def _write_rows(self, start: int, acts: Mapping[str, Any], ids: Sequence[str]) -> None:
        if not self.writable:
            raise NeurosemError(f"{self.path} is open read-only")
        b = len(ids)
        if start + b > self.n_images:
            raise NeurosemError(f"{self.path} holds {self.n_images} images; cannot write images {start}..{start + b}")
        if set(acts) != set(self.layers):
            raise NeurosemError(f"batch has layers {sorted(acts)} but the store holds {self.layers}")
        group = self._f["acts"]
        for layer in self.layers:
            ds = group[layer]
            arr = np.ascontiguousarray(np.asarray(acts[layer]), dtype=ds.dtype)
            if arr.shape != (b, *ds.shape[1:]):
                raise NeurosemError(f"layer {layer!r}: batch shape {arr.shape[1:]} differs from the stored "
                                    f"{tuple(ds.shape[1:])}; the images or the model changed, use --force")
            ds.write_direct(arr, dest_sel=np.s_[start:start + b])
        self._write_ids(start, ids)
        self._f.flush()  # data lands before n_done says so
        self._f.attrs.modify("n_done", np.int64(start + b))
        self._f.flush()

    def _write_ids(self, start: int, ids: Sequence[str]) -> None:
        encoded = [str(i).encode("utf-8") for i in ids]
        ds = self._f["image_ids"]
        width = ds.dtype.itemsize
        longest = max((len(e) for e in encoded), default=0)
        if longest > width:  # rare: widen the id column (copying the ids written so far)
            old = ds[: start]
            del self._f["image_ids"]
            ds = _create_ids(self._f, self.n_images, max(2 * width, longest))
            if start:
                ds[:start] = old
            self._f.flush()
            width = ds.dtype.itemsize
        ds[start:start + len(ids)] = np.array(encoded, dtype=ds.dtype)

    def mark_complete(self) -> None:
        """Set ``complete`` once all ``n_images`` rows are written."""
        if self.n_done != self.n_images:
            raise NeurosemError(f"{self.path}: only {self.n_done} of {self.n_images} images are written")
        self._f.attrs.modify("complete", True)
        self._f.flush()

    def chunk_rows(self) -> int:
        """Rows of an aligned write: a multiple of every layer's chunk rows."""
        rows = 1
        for layer in self.layers:
            r = (self._f["acts"][layer].chunks or (1,))[0]
            rows = max(rows, int(r))
        return rows

    def writer(self, max_pending: int = 3) -> "StoreWriter":
        """A background writer appending at ``n_done`` (see :class:`StoreWriter`)."""
        return StoreWriter(self, max_pending=max_pending)


def has_nonfinite(arr: np.ndarray) -> bool:
    """Whether a float16/float32 array holds an inf or a NaN (all exponent bits set), in one fast pass.

    Example:
        >>> has_nonfinite(np.array([1.0, 70000.0]).astype(np.float16))
        True
    """
    if arr.size == 0:
        return False
    if arr.dtype == np.float16:
        return int((arr.view(np.uint16) & np.uint16(0x7C00)).max()) == 0x7C00
    if arr.dtype == np.float32:
        return int((arr.view(np.uint32) & np.uint32(0x7F800000)).max()) == 0x7F800000
    return not bool(np.isfinite(arr).all())


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


def _prefetched(spans: list[tuple[int, int]], load: Callable[[tuple[int, int]], dict[str, np.ndarray]],
                depth: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    q: "queue.Queue[tuple[str, Any]]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for span in spans:
                if not put(("ok", (span[0], load(span)))):
                    return
        except BaseException as exc:  # handed to the consumer
            put(("err", exc))
            return
        put(("end", None))

    thread = threading.Thread(target=work, name="neurosem-store-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "err":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


class StoreWriter:
    """Append batches to a store from a background thread.

    ``put(acts, ids)`` queues a batch (blocking only when ``max_pending`` batches wait); the thread
    writes rows in spans aligned to the chunk rows, flushes, then advances ``n_done``. ``close()``
    writes everything still queued (also the unaligned tail), stops the thread and re-raises an
    error the thread met. An error in the thread is also re-raised by the next ``put``.

    Example:
        >>> with store.writer() as w:  # doctest: +SKIP
        ...     for acts, ids in batches:
        ...         w.put(acts, ids)
    """

    def __init__(self, store: ActivationStore, max_pending: int = 3) -> None:
        self.store = store
        self._q: "queue.Queue[Any]" = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self.nonfinite: set[str] = set()  #: layers in which an inf/NaN was written (float16 overflow)
        self._align = store.chunk_rows()
        self._shapes = {layer: store.shape(layer)[1:] for layer in store.layers}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="neurosem-store-writer", daemon=False)
        self._thread.start()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, acts: Mapping[str, Any], ids: Sequence[str], ready: Callable[[], None] | None = None) -> None:
        """Queue one batch; ``ready()`` (e.g. a CUDA event's synchronize) runs in the thread before reading it."""
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("StoreWriter is closed")
        self._check(acts, ids)
        while True:
            try:
                self._q.put((acts, list(ids), ready), timeout=0.2)
                return
            except queue.Full:
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise RuntimeError("the store writer thread died")

    def _check(self, acts: Mapping[str, Any], ids: Sequence[str]) -> None:
        if set(acts) != set(self.store.layers):
            raise NeurosemError(f"batch has layers {sorted(acts)} but the store holds {self.store.layers}")
        for layer, shape in self._shapes.items():
            got = tuple(acts[layer].shape)
            if got != (len(ids), *shape):
                raise NeurosemError(f"layer {layer!r}: batch shape {got} does not fit {len(ids)} images of "
                                    f"{shape} maps as stored; the images or the model changed, use --force")

    def close(self) -> None:
        """Write what is queued, stop the thread, re-raise its error if any (idempotent)."""
        if not self._closed:
            self._closed = True
            while self._thread.is_alive():
                try:
                    self._q.put(None, timeout=0.2)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._closed = True
            raise err

    def _run(self) -> None:
        store = self.store
        pend_acts: dict[str, list[np.ndarray]] = {layer: [] for layer in store.layers}
        pend_ids: list[str] = []
        start = store.n_done
        try:
            while True:
                try:
                    item = self._q.get(timeout=0.5)
                except queue.Empty:
                    if threading.main_thread().is_alive():
                        continue
                    item = None  # the program is ending without close(): save what is pending
                if item is None:
                    break
                acts, ids, ready = item
                if ready is not None:
                    ready()
                for layer in store.layers:
                    arr = np.asarray(acts[layer])
                    if layer not in self.nonfinite and has_nonfinite(arr):
                        self.nonfinite.add(layer)
                    pend_acts[layer].append(arr)
                pend_ids.extend(ids)
                end = start + len(pend_ids)
                aligned = (end // self._align) * self._align
                if aligned > start:
                    start = self._flush(start, aligned - start, pend_acts, pend_ids)
            if pend_ids:
                self._flush(start, len(pend_ids), pend_acts, pend_ids)
        except BaseException as exc:
            self._error = exc
            # keep draining so that put() never blocks forever on a full queue
            while True:
                try:
                    if self._q.get(timeout=0.05) is None:
                        break
                except queue.Empty:
                    if self._closed:
                        break

    def _flush(self, start: int, n: int, pend_acts: dict[str, list[np.ndarray]], pend_ids: list[str]) -> int:
        batch = {}
        for layer, parts in pend_acts.items():
            whole = parts[0] if len(parts) == 1 else np.concatenate(parts)
            batch[layer] = whole[:n]
            rest = whole[n:]
            parts.clear()
            if len(rest):
                parts.append(rest)
        ids = pend_ids[:n]
        del pend_ids[:n]
        self.store._write_rows(start, batch, ids)
        return start + n
