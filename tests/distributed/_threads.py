"""W ranks as threads of one process: :class:`ThreadComm` offers what the merges call of a Comm."""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from neurosem.distributed import Comm, World


class _Shared:
    def __init__(self, size: int) -> None:
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size)


class ThreadComm(Comm):
    """A :class:`~neurosem.distributed.Comm` whose collectives exchange through shared memory."""

    def __init__(self, rank: int, shared: _Shared) -> None:
        super().__init__(World(rank=rank, size=len(shared.slots), local_rank=rank))
        self.shared = shared

    def gather(self, obj: Any) -> list[Any]:
        self.shared.slots[self.rank] = obj
        self.shared.barrier.wait()
        out = list(self.shared.slots)
        self.shared.barrier.wait()
        return out

    def broadcast(self, obj: Any) -> Any:
        return self.gather(obj)[0]

    def sum(self, arr: np.ndarray, rows: int = 0) -> np.ndarray:
        a = np.asarray(arr)
        dtype = np.int64 if a.dtype.kind in "iub" else np.float64
        return np.sum([np.asarray(p, dtype=dtype) for p in self.gather(a)], axis=0).reshape(a.shape)


def run_ranks(size: int, fn: Callable[[ThreadComm], Any]) -> Sequence[Any]:
    """``fn(comm)`` on ``size`` threads at once; their results in rank order (an error re-raised)."""
    shared = _Shared(size)
    out: list[Any] = [None] * size
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            out[rank] = fn(ThreadComm(rank, shared))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            shared.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out
