"""Running the stages under ``torchrun``: world detection, the process group, collective checks.

``torchrun --nproc-per-node N -m neurosem -- record ...`` starts N processes with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` set. :func:`current` sees them and joins the process group (gloo for
CPU tensors, NCCL for CUDA tensors when a GPU is visible: ``cpu:gloo,cuda:nccl``); with
``WORLD_SIZE`` unset or 1 it returns None and torch.distributed is never imported. The ``--``
after ``-m neurosem`` matters: torchrun's own parser prefix-matches options after the module
(``--run`` would be "ambiguous: --run-path, --run_path") unless ``--`` ends its options.

Conventions of the stages: every rank computes its share, the partial results are summed or
merged here (numpy arrays through CPU tensors, so NCCL is never asked for a CPU reduction), rank 0
writes the shared files and prints the progress, and a failure that one rank detects is raised on
rank 0 as one line while the other ranks raise :class:`ReportedOnRankZero` (the CLI prints
nothing for it). The process group is destroyed by :func:`session` (the CLI wraps every command
in it). A command that does not split its work (``kl``, ``figures``, ...) runs on rank 0 alone, as
one process, while the others wait (:func:`on_rank_zero`).
"""
from __future__ import annotations

import contextvars
import datetime
import json
import os
import socket
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, TypeVar

from neurosem.errors import NeurosemError

if TYPE_CHECKING:  # pragma: no cover - numpy is imported by the collectives (the CLI imports this module)
    import numpy as np

T = TypeVar("T")
#: how long a rank waits in a collective for the others
WAIT_HOURS = 4
#: True while rank 0 runs a command alone (:func:`on_rank_zero`): :func:`current` is then None
_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("neurosem_alone", default=False)


class ReportedOnRankZero(NeurosemError):
    """Raised on ranks > 0 when rank 0 reports the failure (the CLI exits 2 without a line)."""


@dataclass(frozen=True)
class World:
    """Where this process stands in a ``torchrun`` launch (``size`` 1: a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the process that prints and writes the shared outputs)."""
        return self.rank == 0


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The :class:`World` that ``torchrun`` describes in ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``.

    Example:
        >>> world_from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
        World(rank=1, size=2, local_rank=1)
        >>> world_from_env({})
        World(rank=0, size=1, local_rank=0)
    """
    env = os.environ if env is None else env
    values = {}
    for key, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
        raw = env.get(key, "")
        try:
            values[key] = int(raw) if raw.strip() else default
        except ValueError:
            raise NeurosemError(f"{key}={raw!r} is not a number: launch with torchrun, which sets it") from None
    size, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if size < 1 or not 0 <= rank < size or local < 0:
        raise NeurosemError(f"WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local} do not describe a launch "
                            "(0 <= RANK < WORLD_SIZE): launch with torchrun, which sets them")
    return World(rank=rank, size=size, local_rank=local)


def is_quiet_rank(env: Mapping[str, str] | None = None) -> bool:
    """True on ranks > 0 of a launch (they leave the output to rank 0); never raises.

    Example:
        >>> is_quiet_rank({"WORLD_SIZE": "2", "RANK": "1"}), is_quiet_rank({})
        (True, False)
    """
    try:
        world = world_from_env(env)
    except NeurosemError:
        return False
    return world.size > 1 and not world.main


class Comm:
    """The collective operations the stages use, over the default process group.

    Args:
        world: this process's place in the launch.
    """

    def __init__(self, world: World) -> None:
        self.world = world

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    @property
    def main(self) -> bool:
        return self.world.main

    # -- primitives ------------------------------------------------------------------------------
    def barrier(self) -> None:
        """Wait for every rank (a CPU all-reduce, which works with any backend)."""
        import numpy as np

        self.sum(np.zeros(1, np.int64))

    def sum(self, arr: "np.ndarray", rows: int = 1 << 22) -> "np.ndarray":
        """The element-wise sum of ``arr`` over the ranks (same shape and dtype on every rank).

        Integers are summed exactly in int64; large arrays go in pieces of about ``rows`` elements.
        Returns a new array of ``arr``'s shape (int64 for integers, float64 for floats).
        """
        import numpy as np
        import torch
        import torch.distributed as dist

        a = np.asarray(arr)
        dtype = np.int64 if a.dtype.kind in "iub" else np.float64
        flat = np.ascontiguousarray(a, dtype=dtype).reshape(-1).copy()
        for lo in range(0, max(1, flat.size), rows):
            t = torch.from_numpy(flat[lo:lo + rows])
            dist.all_reduce(t)
        return flat.reshape(a.shape)

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- checks ----------------------------------------------------------------------------------
    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; when it fails on any, every rank raises.

        Rank 0 raises the first failure (a NeurosemError keeps its one line, prefixed with the rank
        that met it when that is not rank 0); the other ranks raise :class:`ReportedOnRankZero`.
        ``fn`` must not call collectives itself.
        """
        with self.together():
            return fn()
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def together(self) -> Iterator[None]:
        """The block runs on every rank; a NeurosemError on any rank is raised on every rank (as
        :meth:`agree`). The block must not call collectives itself."""
        try:
            yield
        except NeurosemError as exc:
            self._settle(exc)
            raise
        self._settle(None)

    def _settle(self, error: BaseException | None) -> None:
        failures = self.gather(None if error is None else str(error))
        first = next(((r, m) for r, m in enumerate(failures) if m is not None), None)
        if first is None:
            return
        r, message = first
        if not self.main:
            raise ReportedOnRankZero(message)
        if r == 0 and error is not None:
            raise error
        raise NeurosemError(f"rank {r}: {message}")

    def check_same(self, what: str, args: Mapping[str, Any]) -> None:
        """Raise (as :meth:`agree`) when the ranks were given different ``args``.

        Example:
            >>> comm.check_same("record", {"batch_size": 64})  # doctest: +SKIP
        """
        mine = json.loads(json.dumps(dict(args), default=str, sort_keys=True))
        every = self.gather(mine)

        def check() -> None:
            if not self.main:
                return
            for r, other in enumerate(every[1:], start=1):
                if other != mine:
                    keys = sorted(k for k in set(mine) | set(other) if mine.get(k) != other.get(k))
                    diff = "; ".join(f"{k}: {_short(mine.get(k))} on rank 0, {_short(other.get(k))} on rank {r}"
                                     for k in keys[:3])
                    raise NeurosemError(f"the ranks were started with different {what} arguments ({diff}); "
                                        "launch every rank with the same command")

        self.agree(check)

    def check_shared_dir(self, path: Path) -> None:
        """Raise (as :meth:`agree`) when ``path`` is not the same directory on every rank.

        Rank 0 writes a token file into it (the directory is made when missing), every rank reads
        it back; the token (and a directory made for it) is removed again before anyone goes on.
        """
        path = Path(path)
        made = False
        token = path / f".neurosem-shared-{uuid.uuid4().hex}" if self.main else None

        def write() -> str:
            nonlocal made
            if self.main:
                made = not path.exists()
                path.mkdir(parents=True, exist_ok=True)
                token.write_text(socket.gethostname())  # type: ignore[union-attr]
            return ""

        try:
            self.agree(write)
            name = self.broadcast(token.name if token is not None else None)

            def read() -> None:
                if not (path / name).is_file():
                    raise NeurosemError(
                        f"the run directory {path} is not shared: rank {self.rank} on {socket.gethostname()} "
                        f"does not see what rank 0 wrote there; put --run on a file system every node mounts")

            self.agree(read)
        finally:
            if token is not None:
                token.unlink(missing_ok=True)
                if made:
                    try:
                        path.rmdir()
                    except OSError:
                        pass
            self.barrier()

    # -- sharding --------------------------------------------------------------------------------
    def shard(self, n: int, unit: int = 1) -> tuple[int, int]:
        """This rank's contiguous share ``lo..hi`` of ``n`` items, cut at multiples of ``unit``."""
        return shard_range(n, self.size, self.rank, unit)


def shard_range(n: int, size: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part of ``0..n`` split ``size`` ways at multiples of ``unit``.

    Whole units (e.g. batches) are dealt out as evenly as possible, the earlier ranks first; a
    rank may get nothing when there are fewer units than ranks.

    Example:
        >>> [shard_range(10, 2, r, unit=4) for r in range(2)]
        [(0, 4), (4, 10)]
    """
    units = -(-int(n) // int(unit))
    lo_u, hi_u = units * rank // size, units * (rank + 1) // size
    return min(n, lo_u * unit), min(n, hi_u * unit)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def together(comm: "Comm | None") -> Any:
    """:meth:`Comm.together`, or a plain block for a single process (``comm`` None)."""
    import contextlib

    return contextlib.nullcontext() if comm is None else comm.together()


def current(env: Mapping[str, str] | None = None) -> Comm | None:
    """The :class:`Comm` of this launch (joining the process group on the first call), or None.

    None for a single process (``WORLD_SIZE`` unset or 1): then nothing is imported; None also on
    rank 0 while it runs a command alone (:func:`on_rank_zero`).
    """
    world = world_from_env(env)
    if world.size <= 1 or _ALONE.get():
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and dist.is_nccl_available():
            backend = "cpu:gloo,cuda:nccl"
            torch.cuda.set_device(world.local_rank % max(1, torch.cuda.device_count()))
        # rank 0 alone builds the label cache, merges the record shards or writes the report while
        # the others wait: longer than the default 30 minutes on a full Broden (a rank that dies is
        # noticed by torchrun, which stops the others, not by this timeout)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=WAIT_HOURS))
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise NeurosemError(f"the process group ({dist.get_world_size()} ranks) does not match WORLD_SIZE="
                            f"{world.size}: initialise it from torchrun's environment")
    return Comm(world)


def on_rank_zero(fn: Callable[[], T], comm: "Comm | None") -> "T | None":
    """``fn()`` on rank 0 alone, as one process, while the other ranks wait; their result is None.

    For the commands that do not split their work (``kl``, ``figures``, the concept training...):
    one process writes, so nothing is written twice, and what it writes is a single run's. Inside
    ``fn`` :func:`current` is None, so a stage it calls runs as one process too. When ``fn``
    fails on rank 0 (any exception, or ``sys.exit`` with a status other than 0) rank 0 raises it
    as it is and the others raise :class:`ReportedOnRankZero`; Ctrl-C is not waited for.
    With ``comm`` None (one process) it is just ``fn()``.
    """
    if comm is None:
        return fn()
    if not comm.main:
        message = comm.gather(None)[0]
        if message is not None:
            raise ReportedOnRankZero(message)
        return None
    token = _ALONE.set(True)
    try:
        out = fn()
    except SystemExit as exc:
        comm.gather(None if exc.code in (None, 0) else f"exit status {exc.code}")
        raise
    except Exception as exc:
        comm.gather(str(exc) or type(exc).__name__)
        raise
    finally:
        _ALONE.reset(token)
    comm.gather(None)
    return out


@contextmanager
def session() -> Iterator[None]:
    """Destroy the process group on exit when a stage inside joined it (the CLI wraps commands in it)."""
    try:
        yield
    finally:
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
