"""The activation store: ``activations.h5``, written in whole batches, resumable, read in batches.

Layout (see docs/internals.md)::

    acts/<layer>   (N, C, H, W) float16 (or float32), chunked by (rows, channel block, H, W)
                   with about 1 MB per chunk, uncompressed by default
    crc/<layer>    (ceil(N / rows),) uint32: CRC-32 of the bytes of each block of ``rows`` images
                   (the layer's chunk rows; the block holding ``n_done`` covers rows up to it)
    image_ids      (N,) fixed-width utf-8 strings
    attrs          format, version, n_images, n_done, complete, layers (JSON list),
                   shapes (JSON {layer: [C, H, W]}), dtype, provenance (JSON), store_id

Why it survives a kill: every chunk of every dataset is allocated when the file is created (and the
file is created under a temporary name and renamed once it is complete), so a write afterwards only
changes raw data plus the ``n_done`` attribute, which is advanced *after* the data has been written
and flushed. A killed writer therefore leaves a file whose first ``n_done`` rows are valid.

Writes come from :class:`StoreWriter`, a background thread fed through a bounded queue: the caller
never waits on the disk unless it is more than ``max_pending`` batches ahead, an exception in the
thread is re-raised in the caller, and rows are written in spans aligned to the chunk rows, so
every write covers whole chunks.

Integrity: every read checks the CRC-32 of each block it touches (once per block and open store;
a mismatch is a :class:`~neurosem.errors.StoreDamagedError` naming the layer and the images, which
``neurosem record ... --repair`` records again). Disk space: :meth:`ActivationStore.create` refuses
a store that does not fit (one line with the space needed and free); a write that meets a full disk
stops the writer, keeps ``n_done`` at what was flushed and raises a
:class:`~neurosem.errors.DiskFullError`. The file is written without HDF5's chunk cache, so a
failed write fails at once and leaves nothing dirty that closing the file would write again (with
the cache, HDF5 retries the dirty chunks on close and crashes).
"""
from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from neurosem._store_layout import (CHUNK_BYTES, DEFAULT_ID_WIDTH, FORMAT, MAX_CHUNK_ROWS, VERSION,  # noqa: F401
                                    _DTYPES, _create_ids, chunk_shape, create_file, store_bytes)
from neurosem._store_threads import StoreWriter, _prefetched, has_nonfinite  # noqa: F401
from neurosem.errors import NeurosemError, StoreDamagedError
from neurosem.run import check_free_space, disk_full_error, is_disk_full


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
            #: whether the store holds checksums (stores of format version 1 do not)
            self.checksummed = "crc" in h5
            self._block_rows = {layer: int((h5["acts"][layer].chunks or (1,))[0]) for layer in self.layers}
            if self.checksummed:
                for layer in self.layers:
                    h5["crc"][layer]
        except NeurosemError:
            h5.close()
            raise
        except Exception as exc:  # missing attrs/datasets, bad JSON
            h5.close()
            raise _corrupt(self.path, f"{type(exc).__name__}: {exc}") from None
        self._verified = {layer: np.zeros(-(-self.n_images // self._block_rows[layer]), bool)
                          for layer in self.layers}
        self._broken: BaseException | None = None  # a failed write: nothing more is written

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
            # writing without a chunk cache: a failed write fails in write_direct and leaves no dirty
            # chunk for flush/close to retry (HDF5 crashes on such a retry after ENOSPC)
            h5 = h5py.File(path, mode, rdcc_nbytes=4 * CHUNK_BYTES if mode == "r" else 0)
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

        Raises:
            DiskFullError: the store would not fit on the disk (checked before anything is written).

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
        needed = store_bytes(shapes, n_images, np_dtype.itemsize, id_width)
        old = path.stat().st_size if path.exists() else 0  # replaced: its space comes back
        if compression is None:
            check_free_space(path, max(0, needed - old))
        tmp = path.with_name(path.name + ".tmp")
        try:
            create_file(tmp, shapes, n_images, provenance, dtype, compression, id_width, chunk_bytes,
                        max_chunk_rows)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full_error(path, needed) from None
            raise
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

    def read(self, layer: str, start: int = 0, stop: int | None = None, verify: bool = True) -> np.ndarray:
        """Activations of images ``start..stop`` (default: up to ``n_done``): ``[B, C, H, W]``.

        With ``verify`` (the default) each block of chunk rows that the range touches is checked
        against its CRC-32 the first time this open store reads it (the whole block is read then).

        Raises:
            StoreDamagedError: a block does not match its checksum (names the layer and images).
        """
        ds = self._dataset(layer)
        n_done = self.n_done
        start = int(start)
        stop = n_done if stop is None else int(stop)
        if not 0 <= start <= stop <= n_done:
            raise NeurosemError(f"cannot read images {start}..{stop} of {layer!r}: "
                                f"only 0..{n_done} are recorded in {self.path}")
        r = self._block_rows[layer]
        k0, k1 = start // r, -(-stop // r)
        if verify and self.checksummed and stop > start and not self._verified[layer][k0:k1].all():
            lo, hi = k0 * r, min(k1 * r, n_done)
            buf = self._read_raw(ds, lo, hi)
            self._verify_blocks(layer, buf, k0, n_done)
            out = buf[start - lo:stop - lo]
            return out.copy() if 2 * len(out) < len(buf) else out
        return self._read_raw(ds, start, stop)

    @staticmethod
    def _read_raw(ds: Any, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *ds.shape[1:]), dtype=ds.dtype)
        if stop > start:
            ds.read_direct(out, np.s_[start:stop])
        return out

    def _bad_blocks(self, layer: str, buf: np.ndarray, k0: int, n_done: int) -> list[int]:
        """Blocks ``k0..`` held by ``buf`` (rows ``k0 * rows``.. of ``layer``) that fail their CRC."""
        r = self._block_rows[layer]
        n_blocks = -(-len(buf) // r)
        stored = self._f["crc"][layer][k0:k0 + n_blocks]
        bad = []
        for j in range(n_blocks):
            if zlib.crc32(buf[j * r:(j + 1) * r]) != int(stored[j]):
                bad.append(k0 + j)
            elif (k0 + j + 1) * r <= n_done or n_done == self.n_images:
                self._verified[layer][k0 + j] = True  # a block still growing is checked every time
        return bad

    def _verify_blocks(self, layer: str, buf: np.ndarray, k0: int, n_done: int) -> None:
        bad = self._bad_blocks(layer, buf, k0, n_done)
        if bad:
            r = self._block_rows[layer]
            first, last = bad[0] * r, min((bad[-1] + 1) * r, n_done)
            raise StoreDamagedError(
                f"{self.path} is damaged: the activations of layer {layer!r}, images {first}..{last}, do not "
                f"match their checksum; re-record them with `{self.record_command()} --repair` "
                "(only the damaged images are recorded again)")

    def damaged(self, layers: Sequence[str] | None = None, rows: int = 4096) -> list[tuple[str, int, int]]:
        """Check every block of ``layers`` (default: all) up to ``n_done``; the damaged image ranges.

        Returns:
            ``[(layer, start, stop)]``, consecutive damaged blocks merged (empty: all match, or the
            store holds no checksums).
        """
        out: list[tuple[str, int, int]] = []
        if not self.checksummed:
            return out
        n_done = self.n_done
        for layer in self.layers if layers is None else layers:
            ds, r = self._dataset(layer), self._block_rows[layer]
            step = max(r, (rows // r) * r)
            for lo in range(0, n_done, step):
                hi = min(lo + step, n_done)
                for k in self._bad_blocks(layer, self._read_raw(ds, lo, hi), lo // r, n_done):
                    a, b = k * r, min((k + 1) * r, n_done)
                    if out and out[-1][0] == layer and out[-1][2] == a:
                        out[-1] = (layer, out[-1][1], b)
                    else:
                        out.append((layer, a, b))
        return out

    def record_command(self) -> str:
        """The ``neurosem record`` command line that recorded this store (from its provenance)."""
        prov = self.provenance
        data = str(prov.get("data", "PATH"))
        parts = ["neurosem record", str(prov.get("model", "MODEL")),
                 "--data", "PATH" if data.startswith("<") else data, "--run", str(self.path.parent),
                 "--layers", ",".join(self.layers), "--limit", str(self.n_images)]
        weights = str(prov.get("weights_arg", "default"))
        if weights != "default":
            parts += ["--weights", weights]
        if self.dtype != "float16":
            parts += ["--dtype", self.dtype]
        return " ".join(parts)

    def block_rows(self) -> int:
        """Images per checksum block common to every layer (their least common multiple)."""
        return math.lcm(*self._block_rows.values()) if self._block_rows else 1

    def row_bytes(self) -> int:
        """Bytes of one image's activations over all layers."""
        return sum(int(np.prod(self.shape(layer)[1:])) * np.dtype(self.dtype).itemsize for layer in self.layers)

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

    def rewrite(self, start: int, acts: Mapping[str, Any], ids: Sequence[str]) -> None:
        """Write rows ``start..start+B`` again (a repair), leaving ``n_done`` as it is.

        ``start`` must begin a block of every layer (a multiple of :meth:`block_rows`) and the rows
        must end a block or at ``n_done``, so that every checksum is computed afresh.
        """
        end = start + len(ids)
        if start % self.block_rows() or end > self.n_done or (end % self.block_rows() and end != self.n_done):
            raise NeurosemError(f"cannot rewrite images {start}..{end} of {self.path}: the range must cover "
                                f"whole blocks of {self.block_rows()} images up to {self.n_done}")
        self._write_rows(start, acts, ids, advance=False)

    def _write_rows(self, start: int, acts: Mapping[str, Any], ids: Sequence[str], advance: bool = True) -> None:
        if not self.writable:
            raise NeurosemError(f"{self.path} is open read-only")
        if self._broken is not None:
            raise NeurosemError(f"{self.path}: an earlier write failed ({self._broken}); nothing more is written")
        b = len(ids)
        if start + b > self.n_images:
            raise NeurosemError(f"{self.path} holds {self.n_images} images; cannot write images {start}..{start + b}")
        if set(acts) != set(self.layers):
            raise NeurosemError(f"batch has layers {sorted(acts)} but the store holds {self.layers}")
        group = self._f["acts"]
        arrays = {}
        for layer in self.layers:
            ds = group[layer]
            arr = np.ascontiguousarray(np.asarray(acts[layer]), dtype=ds.dtype)
            if arr.shape != (b, *ds.shape[1:]):
                raise NeurosemError(f"layer {layer!r}: batch shape {arr.shape[1:]} differs from the stored "
                                    f"{tuple(ds.shape[1:])}; the images or the model changed, use --force")
            arrays[layer] = arr
        try:
            for layer, arr in arrays.items():
                crcs = self._block_crcs(layer, start, arr) if self.checksummed else None
                group[layer].write_direct(arr, dest_sel=np.s_[start:start + b])
                if crcs is not None:
                    k0 = start // self._block_rows[layer]
                    self._f["crc"][layer][k0:k0 + len(crcs)] = crcs
            self._write_ids(start, ids)
            self._f.flush()  # data lands before n_done says so
            if advance:
                self._f.attrs.modify("n_done", np.int64(start + b))
                self._f.flush()
        except BaseException as exc:
            self._broken = exc
            if is_disk_full(exc):
                n_done = self.n_done
                raise disk_full_error(self.path, self.row_bytes() * (self.n_images - n_done),
                                      f"; {n_done} of {self.n_images} images are saved") from None
            raise

    def _block_crcs(self, layer: str, start: int, arr: np.ndarray) -> np.ndarray:
        """CRC-32 of each block that rows ``start..start+B`` (``arr: [B, C, H, W]``) write into.

        A block begun by an earlier write (rows before ``start``) continues from the CRC of those
        rows, read back from the file.
        """
        r = self._block_rows[layer]
        end = start + len(arr)
        k0, k1 = start // r, -(-end // r)
        out = np.empty(k1 - k0, np.uint32)
        for k in range(k0, k1):
            lo, hi = max(k * r, start), min((k + 1) * r, end)
            seed = 0
            if lo > k * r:
                seed = zlib.crc32(self._read_raw(self._f["acts"][layer], k * r, lo))
            out[k - k0] = zlib.crc32(arr[lo - start:hi - start], seed)
        return out

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
        if self._broken is not None:
            raise NeurosemError(f"{self.path}: an earlier write failed ({self._broken})")
        if self.n_done != self.n_images:
            raise NeurosemError(f"{self.path}: only {self.n_done} of {self.n_images} images are written")
        try:
            self._f.attrs.modify("complete", True)
            self._f.flush()
        except BaseException as exc:
            self._broken = exc
            if is_disk_full(exc):
                raise disk_full_error(self.path, 4096, f"; all {self.n_images} images are saved, the mark "
                                      "that they are complete is missing") from None
            raise

    def chunk_rows(self) -> int:
        """Rows of an aligned write: a multiple of every layer's chunk rows."""
        rows = 1
        for layer in self.layers:
            r = (self._f["acts"][layer].chunks or (1,))[0]
            rows = max(rows, int(r))
        return rows

    def writer(self, max_pending: int = 3) -> StoreWriter:
        """A background writer appending at ``n_done`` (see :class:`StoreWriter`)."""
        return StoreWriter(self, max_pending=max_pending)
