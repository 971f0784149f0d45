"""record under torchrun: the launcher form, the shards, the merge, resume after a killed rank."""
from __future__ import annotations

import h5py
import pytest

from neurosem.distributed import World, shard_range, world_from_env
from neurosem.errors import NeurosemError
from tests.distributed._compare import h5_differences
from tests.distributed._launch import MODEL, error_lines, spawn, torchrun

ARGS = ["--layers", "relu1,relu2", "-b", "5", "--workers", "0", "-q"]


def test_torchrun_needs_the_double_dash_before_neurosem_options():
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    with pytest.raises(SystemExit):   # "ambiguous option: --run could match --run-path, --run_path"
        parser.parse_args(["--nproc-per-node", "2", "-m", "neurosem", "record", "m", "--run", "d"])
    args = parser.parse_args(["--nproc-per-node", "2", "-m", "neurosem", "--", "record", "m", "--run", "d"])
    assert (args.training_script, args.training_script_args) == ("neurosem", ["record", "m", "--run", "d"])


def test_world_from_env_and_shards():
    assert world_from_env({}) == World(0, 1, 0)
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(NeurosemError, match="0 <= RANK < WORLD_SIZE"):
        world_from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(NeurosemError, match="not a number"):
        world_from_env({"WORLD_SIZE": "two"})
    # 24 images in batches of 5: 5 batches, 2 to rank 0 and 3 to rank 1
    assert [shard_range(24, 2, r, 5) for r in range(2)] == [(0, 10), (10, 24)]
    assert [shard_range(3, 4, r, 2) for r in range(4)] == [(0, 0), (0, 2), (2, 2), (2, 3)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_broden):
    """The single-process recording every distributed one is compared with."""
    from neurosem.cli import main

    run = tmp_path_factory.mktemp("one") / "run"
    main(["record", MODEL, "--data", str(tiny_broden), "--run", str(run), *ARGS])
    return run


def _files(run):
    return sorted(p.name for p in run.iterdir() if not p.name.startswith("."))   # not the lock file


def test_two_processes_write_the_single_process_store(one_process, tiny_broden, tmp_path):
    run = tmp_path / "two"
    out = torchrun(["record", MODEL, "--data", str(tiny_broden), "--run", str(run), *ARGS])
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("activations: ") == 1            # rank 0 alone prints the result
    assert h5_differences(one_process / "activations.h5", run / "activations.h5") == []
    assert _files(run) == ["activations.h5", "run.json"]   # shards merged away


@pytest.mark.slow
def test_a_killed_rank_resumes_and_the_world_size_is_kept(one_process, tiny_broden, tmp_path):
    run = tmp_path / "killed"
    cmd = ["record", MODEL, "--data", str(tiny_broden), "--run", str(run), *ARGS]
    out = torchrun(cmd, env={"DIE_AFTER_BATCHES": "1"})     # rank 1 dies at its 2nd batch
    assert out.returncode != 0
    assert not (run / "activations.h5").exists()
    with h5py.File(run / "activations.shard0of2.h5", "r") as f:
        assert bool(f.attrs["complete"]) and int(f.attrs["n_done"]) == 5     # tiny set: 12 images
    # another number of processes is refused, nothing written
    before = [(n, (run / n).stat().st_mtime_ns) for n in _files(run)]
    three = torchrun(cmd, nproc=3)
    assert three.returncode != 0
    assert error_lines(three.stderr) == [
        f"error: {run} holds an unfinished recording made by 2 processes, not 3: resume it with "
        "`torchrun --nproc-per-node 2 ...` (nodes x processes = 2), or start over with --force"]
    assert [(n, (run / n).stat().st_mtime_ns) for n in _files(run)] == before
    again = torchrun(cmd)
    assert again.returncode == 0, again.stderr
    assert h5_differences(one_process / "activations.h5", run / "activations.h5") == []


@pytest.mark.slow
def test_mismatched_arguments_and_a_run_not_shared(tiny_broden, tmp_path):
    base = ["record", MODEL, "--data", str(tiny_broden), "--workers", "0", "-q", "--layers", "relu1"]
    run = tmp_path / "run"
    outs = spawn([base + ["--run", str(run), "-b", "4"], base + ["--run", str(run), "-b", "6"]])
    assert [o.returncode for o in outs] == [2, 2]
    assert error_lines(outs[0].stderr) == [
        "error: the ranks were started with different record arguments (batch_size: 4 on rank 0, 6 on rank 1); "
        "launch every rank with the same command"]
    assert error_lines(outs[1].stderr) == []
    assert not run.exists()
    outs = spawn([base + ["--run", str(tmp_path / "a")], base + ["--run", str(tmp_path / "b")]])
    assert [o.returncode for o in outs] == [2, 2]
    lines = error_lines(outs[0].stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: rank 1: the run directory {tmp_path / 'b'} is not "
                                                   "shared: rank 1 on ")
    assert error_lines(outs[1].stderr) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_plan_of_rank_zero(one_process, tiny_broden, tmp_path):
    """A merge cut short is merged again; an unfinished single-process store is not taken over."""
    import shutil

    from neurosem._dist_record import _plan, shard_path
    from neurosem.record import _job

    def job(run):
        return _job(MODEL, str(tiny_broden), run, ["relu1", "relu2"], "default", 5, "cpu", None, 0, False,
                    None, None, "float16", None)

    run = tmp_path / "cut"
    run.mkdir()
    shard = shard_path(run, 0, 2)
    shard.write_bytes(b"a shard")
    (run / "activations.h5").write_bytes(b"half a merge")
    assert _plan(job(run), 2, force=False, repair=False) == "shards"
    assert _files(run) == [shard.name]                      # the shards stay, the cut merge is gone
    single = tmp_path / "single"
    shutil.copytree(one_process, single)
    assert _plan(job(single), 2, force=False, repair=False) == "done"   # complete: reused
    with h5py.File(single / "activations.h5", "r+") as f:
        f.attrs.modify("complete", False)
        f.attrs.modify("n_done", 5)
    with pytest.raises(NeurosemError, match="unfinished recording made by one process .5 of 12 images.: resume it "
                                            "with the same command without torchrun"):
        _plan(job(single), 2, force=False, repair=False)
