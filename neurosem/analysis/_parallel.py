"""Independent tasks side by side in forked worker processes, for :func:`~.figures.make_figures`.

Each figure of a run is drawn and written by itself (matplotlib is single-threaded: a second core
helps only from a second process). :func:`run_tasks` runs callables in ``workers`` forked processes,
the longest first, and returns their results in the order given, so that the output does not
depend on the number of workers. What a task logs on the ``neurosem`` logger is replayed in the
calling process, in task order (a warning from a worker reaches the user's handlers exactly once).
Where ``fork`` is unavailable (Windows, macOS's default) or ``workers`` is 1, the tasks run in this
process, one after another.

Example:
    >>> run_tasks([lambda: 1, lambda: 2], workers=1)
    [1, 2]
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Any, Callable, Sequence

log = logging.getLogger("neurosem")

# The tasks of the current run_tasks call, read by the forked workers (inherited, never pickled).
_TASKS: list[Callable[[], Any]] = []


def default_workers(n_tasks: int) -> int:
    """Worker processes for ``n_tasks``: 2 when this process may use two cores or more and the
    machine leaves at least half a core idle (1-minute load average <= cores - 0.5), else 1; at
    most ``n_tasks``.

    Two: the figures of a run are five or six tasks of uneven length, the longest about a fifth of
    the total. One on a busy machine: there a second process only adds its start-up and the
    imports it repeats (measured on 2 cores at load 3: 8.2-8.5 s with one worker, 8.9-9.7 s with
    two; at load 0.9, 5.0-5.6 s with two). The files do not depend on it.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                              # not on Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] > os.cpu_count() - 0.5 if cores >= 2 else True
    except (AttributeError, OSError):                   # no load average (Windows)
        busy = False
    return max(1, min(1 if busy else 2, cores, n_tasks))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None     # picklable whatever the arguments
        record.exc_info, record.exc_text = None, None
        self.records.append(record)


def _run_one(k: int) -> tuple[Any, list[logging.LogRecord]]:
    """In a worker: task ``k`` with the ``neurosem`` logger's records collected, not emitted."""
    collect = _Collect()
    handlers, propagate = log.handlers[:], log.propagate
    log.handlers, log.propagate = [collect], False
    try:
        return _TASKS[k](), collect.records
    finally:
        log.handlers, log.propagate = handlers, propagate


def run_tasks(tasks: Sequence[Callable[[], Any]], workers: int | None = None,
              costs: Sequence[float] | None = None) -> list[Any]:
    """``[task() for task in tasks]``, computed in ``workers`` forked processes (default
    :func:`default_workers`), the tasks of the largest ``costs`` started first.

    A task's exception is raised here (the first in task order). Results must be picklable.
    """
    tasks = list(tasks)
    n = default_workers(len(tasks)) if workers is None else max(1, min(int(workers), len(tasks)))
    if n <= 1 or not can_fork():
        return [task() for task in tasks]
    order = sorted(range(len(tasks)), key=lambda k: -(costs[k] if costs else 0.0))
    _TASKS[:] = tasks
    try:
        with multiprocessing.get_context("fork").Pool(n) as pool:
            pending = {k: pool.apply_async(_run_one, (k,)) for k in order}
            outcomes = []
            for k in range(len(tasks)):
                try:
                    outcomes.append((True, pending[k].get()))
                except Exception as exc:                # noqa: BLE001  (re-raised below, in task order)
                    outcomes.append((False, exc))
    finally:
        _TASKS.clear()
    results = []
    for ok, value in outcomes:
        if not ok:
            raise value
        result, records = value
        for record in records:
            log.handle(record)
        results.append(result)
    return results


class Background:
    """``fn()`` in a forked process started now, its result discarded (it leaves files behind, e.g. a
    cache); :meth:`wait` returns when it has finished, also from a process forked after this one
    was made (the figure workers), so a task can wait for what it needs.

    Example:
        >>> job = Background(lambda: None)
        >>> job.wait(10)
        True
        >>> job.join()
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        ctx = multiprocessing.get_context("fork")
        self._done = ctx.Event()
        self._proc = ctx.Process(target=self._main, args=(fn, self._done), daemon=True)
        self._proc.start()

    @staticmethod
    def _main(fn: Callable[[], Any], done: Any) -> None:
        try:
            fn()
        finally:                                    # also when fn fails: the waiters compute it themselves
            done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the process has finished (or ``timeout`` seconds); True when it has."""
        return bool(self._done.wait(timeout))

    def join(self) -> None:
        """Reap the process (only from the process that started it)."""
        self._proc.join()


def can_fork() -> bool:
    """Whether worker processes can be forked here (not on a platform without ``fork``, nor from a
    daemonic process, e.g. a multiprocessing pool's worker, which may not have children)."""
    return "fork" in multiprocessing.get_all_start_methods() and not multiprocessing.current_process().daemon

