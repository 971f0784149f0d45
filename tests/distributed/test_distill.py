"""distill under torchrun (two gloo processes): the same training as one process with the same
global batch, rank-0 files, resume on another world size, one-line refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._cifar import write_bright_cifar
from tests.distributed._launch import ROOT, _env, error_lines, spawn

#: every method but IEPKT (refused under torchrun); ab, ft, fsp take their initialisation step
METHODS = ("ce", "kd", "skd-random", "fitnet", "vid", "at", "sp", "nst", "cc", "rkd", "pkt", "crd",
           "ab", "ft", "fsp")


def _distill(data: Path, run: Path, epochs: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    # batch 7 over 24 images: batches of 7, 7, 7, 3, split 3 + 4 and 1 + 2 (uneven on purpose)
    return ["distill", "--student", "resnet8", "--method", "ce", "--data", f"cifar100:{data}",
            "--protocol", "paper", "--epochs", str(epochs), "--batch-size", "7", "--workers", "0",
            "--device", "cpu", "--run", str(run), "-q", *extra]


def _one(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neurosem", *argv], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=240)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "weights.pth", weights_only=True)


@pytest.mark.slow
def test_every_method_steps_as_one_process_in_float64(tmp_path):
    """Two steps of every method (float64, batches of 11 split 5 + 6): the gradients after the
    all-reduce and the states after the steps equal one process's to float64 rounding. This holds
    the global BatchNorm, the gathered batch of the relation methods, CRD's memory bank, the
    regressors' BatchNorm and the initialisation stages."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    methods = ",".join(METHODS)
    ref = subprocess.run([sys.executable, "-m", "tests.distributed._ddp_step", str(one), methods], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=400)
    assert ref.returncode == 0, ref.stderr[-2000:]
    outs = spawn([[str(two), methods]] * 2, module="tests.distributed._ddp_step", timeout=400)
    assert [o.returncode for o in outs] == [0, 0], outs[0].stderr[-2000:]
    for method in METHODS:
        a = torch.load(one / f"{method}-rank0.pt", weights_only=True)
        for rank in (0, 1):
            b = torch.load(two / f"{method}-rank{rank}.pt", weights_only=True)
            for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
                assert [g is None for g in ga] == [g is None for g in gb], method
                scale = max(float(g.abs().max()) for g in ga if g is not None)
                assert scale > 0, method
                for i, (u, v) in enumerate(zip(ga, gb)):
                    if u is not None:   # relative to the largest gradient (a bias before BN has ~0)
                        torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-11 * scale,
                                                   msg=f"{method} step {step} parameter {i} rank {rank}")
            for part in ("student", "criterion"):
                assert a[part].keys() == b[part].keys()
                for k in a[part]:
                    torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-9, atol=1e-12,
                                               msg=f"{method} {part} {k}")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_bright_cifar(tmp_path_factory.mktemp("cifar"), 24, 8)


def _float64(run: Path, data: Path, epochs: int) -> list[str]:
    return [str(run), str(data), str(epochs)]


def _state_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()       # plain BatchNorm names: loads in one process
    for k in a:
        torch.testing.assert_close(b[k].double(), a[k].double(), rtol=rtol, atol=atol, msg=k)


@pytest.mark.slow
def test_two_ranks_train_as_one_process_in_float64(tmp_path, data):
    """The real training loop (distill(), 3 epochs, float64): two ranks end with one process's
    weights, optimiser state and history to float64 rounding (1e-10)."""
    one = subprocess.run([sys.executable, "-m", "tests.distributed._distill64",
                          *_float64(tmp_path / "one", data, 3)], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    outs = spawn([_float64(tmp_path / "two", data, 3)] * 2, module="tests.distributed._distill64")
    assert [o.returncode for o in outs] == [0, 0], outs[0].stderr[-2000:]
    _state_close(_weights(tmp_path / "one"), _weights(tmp_path / "two"), 1e-10, 1e-12)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["momentum_buffer"], sa["momentum_buffer"], rtol=1e-10, atol=1e-12)
    for key in ("train_loss", "train_acc", "test_acc", "test_loss"):
        np.testing.assert_allclose(b["history"][key], a["history"][key], rtol=1e-10)


@pytest.mark.slow
def test_the_command_on_two_ranks_and_rank_zero_writes(tmp_path, data):
    """`neurosem distill` on two ranks (float32): rank 1 prints nothing, rank 0 writes the same
    files as one process, with the same settings. Float32 rounding grows through training (the
    last batch of 3 images, split 1 + 2, is nearly degenerate for BatchNorm), so the results are
    compared loosely here: the training loss to 2e-4 (measured 4e-5), the test accuracy exactly,
    the weights to 2e-3 (measured 4e-4); the float64 tests hold the training to 1e-10."""
    one = _one(_distill(data, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    outs = spawn([_distill(data, tmp_path / "two")] * 2)
    assert [o.returncode for o in outs] == [0, 0], outs[0].stderr[-2000:]
    assert outs[1].stdout == "" and outs[1].stderr == ""      # rank 1 prints nothing
    a = json.loads((tmp_path / "one" / "distill.json").read_text())
    b = json.loads((tmp_path / "two" / "distill.json").read_text())
    assert a["config"] == b["config"] and b["config"]["batch_size"] == 7
    assert b["data"]["n_train"] == 24 and b["epochs_done"] == 2
    np.testing.assert_allclose(b["history"]["train_loss"], a["history"]["train_loss"], rtol=2e-4)
    assert b["test_acc"] == a["test_acc"]
    _state_close(_weights(tmp_path / "one"), _weights(tmp_path / "two"), 0, 2e-3)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow
def test_a_killed_launch_resumes_on_one_process(tmp_path, data):
    """Both ranks killed after an epoch's checkpoint; the same training on one process (another
    world size) resumes and ends where an uninterrupted one-process run ends (float64, 1e-10)."""
    import socket

    full = subprocess.run([sys.executable, "-m", "tests.distributed._distill64",
                           *_float64(tmp_path / "full", data, 4)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=240)
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "cut"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed._distill64", *_float64(run, data, 4)],
                              cwd=ROOT, env=_env({"WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
                                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for r in range(2)]
    deadline = time.time() + 200
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    done = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < 4, done
    resumed = subprocess.run([sys.executable, "-m", "tests.distributed._distill64", *_float64(run, data, 4)],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "full" / "distill.json").read_text())
    b = json.loads((run / "distill.json").read_text())
    assert b["epochs_done"] == 4 and b["test_acc"] == a["test_acc"]
    np.testing.assert_allclose(b["history"]["train_loss"], a["history"]["train_loss"], rtol=1e-10)
    _state_close(_weights(tmp_path / "full"), _weights(run), 1e-10, 1e-12)


@pytest.mark.slow
def test_bad_launches_are_one_line_on_rank_zero_and_write_nothing(tmp_path, data):
    cases = [
        ([_distill(data, tmp_path / "r", extra=("--seed", "0")), _distill(data, tmp_path / "r", extra=("--seed", "1"))],
         "error: the ranks were started with different distill arguments (seed: 0 on rank 0, 1 on rank 1); "
         "launch every rank with the same command"),
        ([_distill(data, tmp_path / "r")[:-1] + ["--method", "iepkt", "--teacher", "wrn_16_4",
                                                 "--teacher-weights", "t.pth", "-q"]] * 2,
         "error: --method iepkt does not run under torchrun (its gradient clipping differentiates inside the "
         "loss): run it as one process"),
        ([[*_distill(data, tmp_path / "r")[:-1], "--batch-size", "23", "-q"]] * 2,
         "error: the last batch has 1 image(s) for 2 ranks (24 images, --batch-size 23): pick a --batch-size "
         "whose last batch has at least 2 images (under torchrun each rank trains on a slice of every batch)"),
    ]
    for argvs, line in cases:
        outs = spawn(argvs)
        assert [o.returncode for o in outs] == [2, 2], outs[0].stderr[-2000:]
        assert error_lines(outs[0].stderr) == [line]
        assert error_lines(outs[1].stderr) == []
        assert not (tmp_path / "r").exists()
