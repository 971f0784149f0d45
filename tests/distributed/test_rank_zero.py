"""on_rank_zero: the command runs once, on rank 0 (as one process), and its failure reaches every rank."""
from __future__ import annotations

import pytest

from neurosem.distributed import ReportedOnRankZero, current, on_rank_zero
from neurosem.errors import NeurosemError
from tests.distributed._threads import run_ranks


def test_it_runs_once_on_rank_zero_and_sees_one_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")     # current() outside would join a process group
    calls = []

    def fn():
        calls.append(current())                # None: the stages inside run as one process
        return "result"

    assert list(run_ranks(2, lambda comm: on_rank_zero(fn, comm))) == ["result", None]
    assert calls == [None]


def test_one_process_just_calls_it():
    assert on_rank_zero(lambda: 7, None) == 7


@pytest.mark.parametrize("error", [NeurosemError("no embedding at runs/x"), OSError("disk full"), KeyError("k")])
def test_a_failure_on_rank_zero_is_raised_there_and_reported_on_the_others(error):
    seen = {}

    def body(comm):
        def fn():
            raise error

        try:
            on_rank_zero(fn, comm)
        except BaseException as exc:  # noqa: BLE001 - what each rank raised
            seen[comm.rank] = exc

    run_ranks(3, body)
    assert seen[0] is error
    assert [type(seen[r]) for r in (1, 2)] == [ReportedOnRankZero, ReportedOnRankZero]
    assert str(seen[1]) == str(error)


@pytest.mark.parametrize("code, others", [(0, None), (None, None), (1, ReportedOnRankZero)])
def test_sys_exit_on_rank_zero(code, others):
    seen = {}

    def body(comm):
        try:
            seen[comm.rank] = on_rank_zero(lambda: __import__("sys").exit(code), comm)
        except BaseException as exc:  # noqa: BLE001
            seen[comm.rank] = exc

    run_ranks(2, body)
    assert isinstance(seen[0], SystemExit) and seen[0].code == code
    assert seen[1] is None if others is None else isinstance(seen[1], others)
