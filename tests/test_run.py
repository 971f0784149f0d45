import json

import pytest

from neurosem.errors import NeurosemError
from neurosem.run import RunDir, default_run_name, resolve_run


def test_default_run_names():
    assert default_run_name("resnet18") == "resnet18"
    assert default_run_name("models/my_net.py:build") == "my_net"    # the file's name, not the factory's
    assert default_run_name("/abs/other.py:build") == "other"
    assert default_run_name("pkg.mod:factory") == "mod"
    assert default_run_name("zoo:resnet8x4") == "resnet8x4"
    assert default_run_name("<tests._planted.TinyCNN>") == "TinyCNN"  # a module given from Python


def test_update_meta_keeps_sections_and_commands(tmp_path):
    run = RunDir(tmp_path / "r")
    run.update_meta("record", {"model": "m"})
    run.update_meta("embed", {"dim": 16})
    meta = json.loads(run.meta_file.read_text())
    assert meta["record"] == {"model": "m"} and meta["embed"] == {"dim": 16}
    assert [c["stage"] for c in meta["commands"]] == ["record", "embed"]


def test_resolve_run_picks_the_only_run_and_lists_several(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NeurosemError, match="no run found"):
        resolve_run(None)
    RunDir(tmp_path / "runs" / "a").update_meta("record", {})
    assert resolve_run(None).path.name == "a"
    RunDir(tmp_path / "runs" / "b").update_meta("record", {})
    with pytest.raises(NeurosemError, match=r"several runs under runs/ \(runs/a, runs/b\): choose one with --run"):
        resolve_run(None)
    assert resolve_run("runs/b").path.name == "b"
    assert resolve_run(None, model="resnet18").path.as_posix() == "runs/resnet18"


def test_corrupt_run_json_is_one_line(tmp_path):
    run = RunDir(tmp_path).ensure()
    run.meta_file.write_text("{not json")
    with pytest.raises(NeurosemError, match="not valid JSON"):
        run.read_meta()


def test_run_json_that_is_not_an_object_is_one_line(tmp_path):
    run = RunDir(tmp_path).ensure()
    run.meta_file.write_text("[1, 2]")
    with pytest.raises(NeurosemError, match=r"run.json holds a JSON list, not an object .*; fix or delete it"):
        run.update_meta("record", {})
