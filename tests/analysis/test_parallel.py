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


@pytest.mark.parametrize("cores,load,n_tasks,expected", [(2, 0.0, 6, 2), (2, 1.5, 6, 2), (2, 1.51, 6, 1),
                                                         (2, 3.0, 6, 1), (8, 3.0, 6, 2), (8, 0.0, 1, 1), (1, 0.0, 6, 1)])
def test_default_workers_two_when_a_core_is_idle(monkeypatch, cores, load, n_tasks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert par.default_workers(n_tasks) == expected


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


@needs_fork
def test_background_runs_in_another_process_and_waits_from_a_later_fork(tmp_path):
    marker = tmp_path / "done"
    job = par.Background(lambda: marker.write_text(str(os.getpid())))
    seen = par.run_tasks([lambda: (job.wait(60), marker.read_text())] * 2, workers=2)
    job.join()
    assert seen[0] == seen[1] == (True, marker.read_text()) and marker.read_text() != str(os.getpid())


@needs_fork
def test_background_failure_still_releases_the_waiters():
    def boom():
        raise RuntimeError("boom")

    job = par.Background(boom)
    assert job.wait(60)
    job.join()


@needs_fork
def test_the_map_is_prefetched_into_the_cache_with_two_workers(tmp_path, monkeypatch):
    """Two workers, no cached map: the t-SNE runs in the background and the map task reads the cache."""
    import numpy as np

    from neurosem.analysis import maps
    from tests.analysis import write_embedding

    S = np.random.default_rng(0).standard_normal((60, 6))
    write_embedding(tmp_path / "r", {"l": S})
    cache = tmp_path / "r" / "figures" / ".cache" / "map-l.npz"
    started = []
    real = par.Background
    monkeypatch.setattr(par, "Background", lambda fn: started.append(1) or real(fn))
    paths = figmod.make_figures(tmp_path / "r", formats="png", dpi=30, workers=2)
    assert started == [1]
    assert sorted(p.name for p in paths) == ["semantic_map.png", "similarity_heatmap.png"]
    from neurosem.analysis.query import load_run_embedding

    assert maps.map_is_cached(np.asarray(load_run_embedding(tmp_path / "r").vectors("l")), "auto", cache)
    fresh = figmod.semantic_map_figure(tmp_path / "r", cache=False).neurosem_info["xy"]
    with np.load(cache) as data:
        assert np.array_equal(data["xy"], fresh)                    # the prefetched map is the map
    monkeypatch.setattr(par, "Background", lambda fn: pytest.fail("prefetched although cached"))
    figmod.make_figures(tmp_path / "r", formats="png", dpi=30, workers=2)


@needs_fork
def test_inside_a_daemonic_worker_the_tasks_run_in_that_process():
    with multiprocessing.get_context("fork").Pool(1) as pool:
        out = pool.apply(par.run_tasks, ([os.getpid, os.getpid],), {"workers": 2})
    assert len(set(out)) == 1 and out[0] != os.getpid()
