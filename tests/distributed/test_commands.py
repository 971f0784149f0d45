"""The commands that do not share their work, under torchrun: rank 0 alone writes one process's files.

concepts: a missing dissection across the ranks, then the training on rank 0 (files equal to one
process's); kl, query, figures: rank 0 alone (the same output and files as one process, nothing on
rank 1); explain failing, a usage error, quickstart: one line on rank 0, nothing on rank 1.
"""
from __future__ import annotations

import shutil

import pytest

from tests.distributed._compare import h5_differences
from tests.distributed._launch import MODEL, error_lines, spawn, torchrun


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """96 synthetic images of 16 px, recorded (relu1, relu2): no dissection, no embedding."""
    from neurosem.cli import main
    from neurosem.data.synthetic import write_synthetic_broden

    root = tmp_path_factory.mktemp("cmds")
    write_synthetic_broden(root / "broden", n_images=96, image_size=16, seg_size=16, seed=3)
    main(["record", MODEL, "--data", str(root / "broden"), "--run", str(root / "run"), "--layers", "relu1,relu2",
          "-b", "32", "--workers", "0", "-q"])
    return root


@pytest.fixture(scope="module")
def analysed(recorded, tmp_path_factory):
    """The recorded run dissected and embedded (one process)."""
    from neurosem.cli import main

    run = tmp_path_factory.mktemp("analysed") / "run"
    shutil.copytree(recorded / "run", run)
    main(["dissect", "--run", str(run), "--broden", str(recorded / "broden"), "--no-report", "-q"])
    main(["embed", "--run", str(run), "--dim", "3", "-q"])
    return run


def _one(args, capsys):
    from neurosem.cli import main

    capsys.readouterr()
    main(args)
    return capsys.readouterr().out


def _files(run):
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_concepts_dissect_across_the_ranks_then_train_on_rank_zero(recorded, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(recorded / "run", one)
    shutil.copytree(recorded / "run", two)
    args = ["--broden", str(recorded / "broden"), "--epochs", "2", "-b", "32", "-q"]
    single = _one(["concepts", "--run", str(one), *args], capsys)
    out = torchrun(["concepts", "--run", str(two), *args])
    assert out.returncode == 0, out.stderr
    assert out.stdout == single.replace(str(one), str(two))         # printed once, the same lines
    assert _files(one) == _files(two)
    assert h5_differences(one / "dissect.h5", two / "dissect.h5") == []
    assert h5_differences(one / "concepts.h5", two / "concepts.h5", skip_attrs=()) == []
    for name in ("concepts/relu1.csv", "concepts/relu2.csv", "concepts/global.json", "dissect/relu2.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.slow
def test_concepts_refuses_ranks_started_with_different_arguments(recorded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded / "run", run)
    argv = ["concepts", "--run", str(run), "--broden", str(recorded / "broden"), "-b", "32", "-q"]
    outs = spawn([[*argv, "--epochs", "2"], [*argv, "--epochs", "3"]])
    assert [o.returncode for o in outs] == [2, 2]
    assert error_lines(outs[0].stderr) == [
        "error: the ranks were started with different concepts arguments (epochs: 2 on rank 0, 3 on rank 1); "
        "launch every rank with the same command"]
    assert (outs[1].stdout, outs[1].stderr) == ("", "")
    assert _files(run) == _files(recorded / "run")                           # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("command", [["kl", "-q"], ["query", "-n", "relu2:1", "-k", "3", "--figure", "FIG"],
                                     ["figures", "--formats", "png", "--dpi", "20"]])
def test_analysis_runs_on_rank_zero_alone(analysed, tmp_path, capsys, command):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(analysed, one)
    shutil.copytree(analysed, two)
    before = _files(two)
    single = _one([*[str(one / "q.png") if a == "FIG" else a for a in command], "--run", str(one)], capsys)
    argv = [*[str(two / "q.png") if a == "FIG" else a for a in command], "--run", str(two)]
    outs = spawn([argv, argv])
    assert [o.returncode for o in outs] == [0, 0], outs[0].stderr + outs[1].stderr
    assert outs[0].stdout == single.replace(str(one), str(two))
    assert (outs[1].stdout, outs[1].stderr) == ("", "")
    assert _files(one) == _files(two) and _files(two) > before             # it wrote its files
    for name in sorted(_files(two) - before):
        if name.endswith((".json", ".csv", ".png")) and name != "run.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.slow
def test_a_failure_on_rank_zero_is_one_line_there_and_nothing_on_rank_one(analysed, tmp_path):
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
    argv = ["explain", str(image), "--run", str(analysed)]
    outs = spawn([argv, argv])
    assert [o.returncode for o in outs] == [2, 2]
    assert error_lines(outs[0].stderr) == [f"error: no concept vectors at {analysed / 'concepts.h5'}: run "
                                           f"`neurosem concepts --broden PATH --run {analysed}`"]
    assert (outs[1].stdout, outs[1].stderr) == ("", "")
    outs = spawn([["kl", "--bogus"]] * 2)                                     # a usage error
    assert [o.returncode for o in outs] == [2, 2]
    assert error_lines(outs[0].stderr) == ["error: No such option '--bogus'. (see `neurosem kl --help`)"]
    assert outs[1].stderr == ""


@pytest.mark.slow
def test_quickstart_is_refused_under_torchrun(tmp_path):
    argv = ["quickstart", "--out", str(tmp_path / "qs"), "-q"]
    outs = spawn([argv, argv])
    assert [o.returncode for o in outs] == [2, 2]
    assert error_lines(outs[0].stderr) == [
        "error: quickstart runs as one process: run `neurosem quickstart` without torchrun; under torchrun run "
        "the stages (record, dissect, embed, concepts) one by one"]
    assert (outs[1].stdout, outs[1].stderr) == ("", "")
    assert list(tmp_path.iterdir()) == []
