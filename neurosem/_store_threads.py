"""The store's threads: :class:`StoreWriter` (background writes) and the prefetching reader of
:meth:`neurosem.store.ActivationStore.iter_batches`; :func:`has_nonfinite`.

Import them from :mod:`neurosem.store`.
"""
from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from neurosem.errors import NeurosemError

if TYPE_CHECKING:  # pragma: no cover
    from neurosem.store import ActivationStore


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
