"""Figures drawn side by side (neurosem.analysis._parallel): the same files, logs and errors as one process."""
from __future__ import annotations

import logging
import multiprocessing
import os

import pytest

from neurosem.analysis import _parallel as par
from neurosem.analysis import figures as figmod
from neurosem.errors import NeurosemError

needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")
log = logging.getLogger("neurosem")


def _warn_and_return(value, message):
    def task():
        log.warning("task %s: %s", value, message)
        return value, os.getpid()
    return task


@needs_fork
def test_results_and_logs_come_back_in_task_order(caplog):
    tasks = [_warn_and_return(k, f"m{k}") for k in range(5)]
    with caplog.at_level(logging.WARNING, logger="neurosem"):
        out = par.run_tasks(tasks, workers=2, costs=[1, 5, 2, 4, 3])      # started 1, 3, 4, 2, 0
    assert [v for v, _ in out] == [0, 1, 2, 3, 4]
    assert all(pid != os.getpid() for _, pid in out)                    # drawn in the workers
    assert [r.getMessage() for r in caplog.records] == [f"task {k}: m{k}" for k in range(5)]   # once each


def test_one_worker_runs_here():
    out = par.run_tasks([_warn_and_return(1, "x"), _warn_and_return(2, "y")], workers=1)
    assert out == [(1, os.getpid()), (2, os.getpid())]


@needs_fork
def test_the_first_error_in_task_order_is_raised_after_the_logs_before_it(caplog):
    def fails(k):
        def task():
            raise NeurosemError(f"bad {k}")
        return task

    tasks = [_warn_and_return(0, "ok"), fails(1), fails(2)]
    with caplog.at_level(logging.WARNING, logger="neurosem"), pytest.raises(NeurosemError, match="^bad 1$"):
        par.run_tasks(tasks, workers=2)
    assert [r.getMessage() for r in caplog.records] == ["task 0: ok"]


def test_default_workers_at_most_two_and_the_tasks():
    assert par.default_workers(1) == 1
    assert 1 <= par.default_workers(6) <= 2


@needs_fork
def test_make_figures_in_two_workers_writes_the_same_files(tmp_path):
    """Every file (and figures.json) byte for byte the same with one worker and with two."""
    import shutil

    from tests.analysis.test_figures import _make_run

    run, *_ = _make_run(tmp_path / "a")
    copy = tmp_path / "b" / run.name
    shutil.copytree(run, copy)
    one = figmod.make_figures(run, formats=("pdf", "png", "svg"), dpi=40, n_images=3, workers=1)
    two = figmod.make_figures(copy, formats=("pdf", "png", "svg"), dpi=40, n_images=3, workers=2)
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 18
    for p, q in zip(one + [run / "figures" / "figures.json"], two + [copy / "figures" / "figures.json"]):
        assert p.read_bytes() == q.read_bytes(), p.name
