"""The CLI on ranks > 0 of a launch: no result lines, no usage errors (rank 0 prints them)."""
from __future__ import annotations

import pytest

from neurosem.cli import main
from neurosem.distributed import ReportedOnRankZero, is_quiet_rank


def test_quiet_rank_detection():
    assert is_quiet_rank({"WORLD_SIZE": "2", "RANK": "1"})
    assert not is_quiet_rank({"WORLD_SIZE": "2", "RANK": "0"})
    assert not is_quiet_rank({"WORLD_SIZE": "1", "RANK": "0"})
    assert not is_quiet_rank({"WORLD_SIZE": "x"})          # not a launch: the error comes later


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_a_usage_error_is_printed_by_rank_zero_only(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exc:
        main(["record", "resnet18"])                         # --data missing: before any collective
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (err == "error: Missing option '--data'. (see `neurosem record --help`)\n") is printed
    assert printed or err == ""


def test_reported_on_rank_zero_exits_silently_and_stdout_is_quiet(monkeypatch, capsys):
    import neurosem.record as record

    def fail(*args, **kwargs):
        print("a result line")
        raise ReportedOnRankZero("rank 0 prints this")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(record, "record", fail)
    with pytest.raises(SystemExit) as exc:
        main(["record", "m", "--data", "d"])
    assert exc.value.code == 2
    assert capsys.readouterr() == ("", "")
