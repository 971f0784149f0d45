"""record() and data loss: the run lock (two real processes), checksum repair, a full disk, messages."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from neurosem.errors import DiskFullError, RunLockedError, RunMismatchError, StoreDamagedError
from neurosem.models import LoadedModel
from neurosem.record import record
from neurosem.run import RunDir, format_bytes
from neurosem.store import ActivationStore, store_bytes

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from _planted import RandomImages, TinyCNN  # noqa: E402
from test_record import _h5_contents  # noqa: E402

LAYERS = ["layer1", "layer2"]


def _tiny(weights: str = "seed0") -> LoadedModel:
    return LoadedModel(TinyCNN(), "tiny", weights, default_layers=list(LAYERS))


# ---------------------------------------------------------------- the run lock
_GATED_CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from _planted import RandomImages, TinyCNN
from neurosem.models import LoadedModel
from neurosem.record import record

class Gated(RandomImages):
    def __getitem__(self, i):
        while i >= 4 and not os.path.exists({gate!r}):  # holds the run until the test opens the gate
            time.sleep(0.02)
        return super().__getitem__(i)

lm = LoadedModel(TinyCNN(), "tiny", "seed0", default_layers=["layer1", "layer2"])
record(lm, Gated(n=8, size=16), run={run!r}, batch_size=2, progress=False)
"""


def test_a_second_record_of_the_same_run_stops_with_one_line(tmp_path, tiny_broden):
    run, gate = tmp_path / "run", tmp_path / "gate"
    child = subprocess.Popen([sys.executable, "-c", _GATED_CHILD.format(tests=str(TESTS), gate=str(gate),
                                                                        run=str(run))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:  # the first batches are written
            path = run / "activations.h5"
            if path.exists():
                try:
                    with h5py.File(path, "r", locking=False) as f:
                        if int(f.attrs["n_done"]) > 0:
                            break
                except (OSError, KeyError):
                    pass
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read().decode()
        locked = (f"{run} is being written by `neurosem record` (pid {child.pid}): wait for it to finish "
                  "or choose another --run")
        # the CLI with --force (which would delete the first one's store), in a third process ...
        cli = [sys.executable, "-c", "from neurosem.cli import main; main()", "record",
               f"{TESTS / '_planted.py'}:tiny_cnn", "--data", str(tiny_broden), "--run", str(run),
               "--layers", "conv1", "--workers", "0", "--quiet", "--force"]
        second = subprocess.run(cli, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert second.returncode == 2 and second.stderr == f"error: {locked}\n", second.stderr
        # ... and another recording (other layers) from this process
        with pytest.raises(RunLockedError) as err:
            record(_tiny(), RandomImages(n=8, size=16), run=run, layers=["conv1"], progress=False)
        assert str(err.value) == locked
        gate.touch()
        assert child.wait(timeout=120) == 0, child.stderr.read().decode()
    finally:
        gate.touch()
        if child.poll() is None:
            child.kill()
            child.wait()
    with ActivationStore.open(run / "activations.h5") as store:  # the first recording, whole
        assert store.complete and store.layers == LAYERS and store.n_done == 8
    record(_tiny(), RandomImages(n=8, size=16), run=tmp_path / "whole", batch_size=2, progress=False)
    a, b = _h5_contents(run / "activations.h5"), _h5_contents(tmp_path / "whole" / "activations.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flock", [True, False])
def test_lock_is_exclusive_and_released(tmp_path, flock):
    rd = RunDir(tmp_path / "run")
    with rd.lock("record", flock=flock):
        with pytest.raises(RunLockedError) as err:
            with rd.lock("record", flock=flock):
                pass
        stale = f"; if none is running, delete {rd.lock_file}" if not flock else ""
        assert str(err.value) == (f"{rd.path} is being written by `neurosem record` (pid {os.getpid()}): "
                                  f"wait for it to finish or choose another --run{stale}")
    with rd.lock("record", flock=flock):  # released on exit
        pass
    assert rd.lock_file.exists() == flock  # an O_EXCL lock file is removed, a flock file stays (empty)


# ---------------------------------------------------------------- checksums and repair
def test_damaged_range_is_named_and_repair_records_only_it(tmp_path, capsys, monkeypatch):
    """conv1 at 64x64: 32 KiB per image, chunks of 4 images (128 KiB); 64 KiB of chunk 2 zeroed."""
    lm, run = _tiny(), tmp_path / "run"
    path = record(lm, RandomImages(n=16, size=64), run=run, layers=["conv1", "layer2"], batch_size=4,
                  progress=False)
    with h5py.File(path, "r") as f:
        assert f["acts/conv1"].chunks == (4, 4, 64, 64)
        info = f["acts/conv1"].id.get_chunk_info(2)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 32 * 1024)
        fh.write(b"\0" * (64 * 1024))
    with ActivationStore.open(path) as store, pytest.raises(StoreDamagedError) as err:
        for _ in store.iter_batches(batch_size=4):
            pass
    assert str(err.value) == (
        f"{path} is damaged: the activations of layer 'conv1', images 8..12, do not match their checksum; "
        f"re-record them with `neurosem record tiny --data PATH --run {run} --layers conv1,layer2 --limit 16 "
        "--repair` (only the damaged images are recorded again)")
    capsys.readouterr()
    seen, get = set(), RandomImages.__getitem__
    monkeypatch.setattr(RandomImages, "__getitem__", lambda self, i: (seen.add(i), get(self, i))[1])
    ds = RandomImages(n=16, size=64)
    assert record(lm, ds, run=run, layers=["conv1", "layer2"], batch_size=16, repair=True, progress=False) == path
    assert seen == set(range(8, 12))  # the damaged block, in the original batches of 4
    monkeypatch.undo()
    assert capsys.readouterr().err == f"{path}: recorded again the damaged images (conv1 8..12)\n"
    record(lm, RandomImages(n=16, size=64), run=tmp_path / "whole", layers=["conv1", "layer2"], batch_size=4,
           progress=False)
    a, b = _h5_contents(path), _h5_contents(tmp_path / "whole" / "activations.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    record(lm, ds, run=run, layers=["conv1", "layer2"], repair=True, progress=False)
    assert capsys.readouterr().err == f"{path}: every stored image matches its checksum; nothing to repair\n"


# ---------------------------------------------------------------- a full disk
def _disk_with(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - free, free))


def test_a_store_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    # layer1 6x8x8 + layer2 8x4x4 float16 per 16x16 image: 1024 bytes
    needed = store_bytes({"layer1": (6, 8, 8), "layer2": (8, 4, 4)}, 12, 2)
    assert needed == 12 * 1024 + 12 * (256 + 8) + 3 * 65536
    _disk_with(monkeypatch, 1000)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError) as err:
        record(_tiny(), RandomImages(n=12, size=16), run=run, batch_size=2, progress=False)
    assert str(err.value) == (f"not enough disk space for {run / 'activations.h5'}: it needs "
                              f"{format_bytes(needed)} more, 1000 B are free on {run}; free space (or write the "
                              "run elsewhere with --run DIR) and run the same command again")
    assert sorted(p.name for p in run.iterdir()) == [".neurosem.lock"]  # no store, no .tmp, no run.json
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        record(_tiny(), RandomImages(n=12, size=16, interrupt_at=7), run=run, batch_size=2, progress=False)
    _disk_with(monkeypatch, 5000)
    with pytest.raises(DiskFullError, match=r"it needs 6.0 KiB more, 4.9 KiB are free on .*; 6 of 12 images "
                                            r"are saved; free space"):
        record(_tiny(), RandomImages(n=12, size=16), run=run, batch_size=2, progress=False)
    with ActivationStore.open(run / "activations.h5") as store:
        assert store.n_done == 6


def _fail_writes_after(monkeypatch, n_ok: int) -> None:
    real, calls = h5py.Dataset.write_direct, []

    def write_direct(self, *a, **k):
        calls.append(1)
        if len(calls) > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(h5py.Dataset, "write_direct", write_direct)


def test_a_disk_that_fills_up_keeps_what_was_flushed_and_resumes(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    path = run / "activations.h5"
    _fail_writes_after(monkeypatch, 6)  # three batches of two layers land
    with pytest.raises(DiskFullError) as err:
        record(_tiny(), RandomImages(n=12, size=16), run=run, batch_size=2, progress=False)
    assert "; 6 of 12 images are saved; free space" in str(err.value) and "\n" not in str(err.value)
    assert f"it needs {format_bytes(6 * 1024)} more" in str(err.value)
    assert sorted(p.name for p in run.iterdir()) == [".neurosem.lock", "activations.h5", "run.json"]
    monkeypatch.undo()
    with ActivationStore.open(path) as store:
        assert store.n_done == 6 and not store.complete and store.damaged() == []
    capsys.readouterr()
    record(_tiny(), RandomImages(n=12, size=16), run=run, batch_size=2, progress=False)
    assert "resuming at image 6 of 12" in capsys.readouterr().err
    record(_tiny(), RandomImages(n=12, size=16), run=tmp_path / "whole", batch_size=2, progress=False)
    a, b = _h5_contents(path), _h5_contents(tmp_path / "whole" / "activations.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_full_disk_at_the_first_write_leaves_no_store(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _fail_writes_after(monkeypatch, 0)
    with pytest.raises(DiskFullError, match="; 0 of 12 images are saved"):
        record(_tiny(), RandomImages(n=12, size=16), run=run, batch_size=2, progress=False)
    assert sorted(p.name for p in run.iterdir()) == [".neurosem.lock"]


# ---------------------------------------------------------------- messages
def test_mismatched_weights_hints(tmp_path):
    run = tmp_path / "run"
    record(_tiny("file:/models/trained.pth#ab12"), RandomImages(n=2, size=8), run=run, progress=False)
    with pytest.raises(RunMismatchError) as err:  # the factory's own weights asked for: name the file
        record(_tiny("factory#cd34"), RandomImages(n=2, size=8), run=run, progress=False)
    assert str(err.value) == (
        f"{run / 'activations.h5'} was recorded with other arguments (weights: file:/models/trained.pth#ab12 "
        "vs factory#cd34; stored vs requested); it was recorded with --weights /models/trained.pth: pass that "
        "to use these activations; to record the new weights choose another --run (--force would replace "
        "these activations)")
    other = tmp_path / "other"
    record(_tiny("factory#aaaa"), RandomImages(n=2, size=8), run=other, progress=False)
    with pytest.raises(RunMismatchError) as err:  # the same factory, other weights: an unseeded init
        record(_tiny("factory#bbbb"), RandomImages(n=2, size=8), run=other, progress=False)
    assert "(an unseeded random init?)" in str(err.value)
    for lm in (_tiny("file:/models/new.pth#ef56"),  # a deliberate change of --weights
               LoadedModel(TinyCNN(), "tiny2", "factory#bbbb", default_layers=list(LAYERS))):  # of model
        with pytest.raises(RunMismatchError) as err:
            record(lm, RandomImages(n=2, size=8), run=other, progress=False)
        assert "unseeded" not in str(err.value) and str(err.value).endswith(
            "record again with `neurosem record ... --force` or choose another --run")


def test_ctrl_c_in_the_cli_prints_one_interrupted_line(tmp_path, monkeypatch, capsys):
    import neurosem.record as rec
    from neurosem.cli import main

    monkeypatch.setattr(rec, "open_data", lambda spec: (RandomImages(n=12, size=16, interrupt_at=7),
                                                        "random", "random-12"))
    with pytest.raises(SystemExit) as exit_:
        main(["record", f"{TESTS / '_planted.py'}:tiny_cnn", "--data", "x", "--run", str(tmp_path / "run"),
              "--layers", "layer1", "--batch-size", "2", "--workers", "0", "--quiet"])
    assert exit_.value.code == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines == [f"interrupted: 6 of 12 images are saved in {tmp_path / 'run' / 'activations.h5'}; "
                     "rerun the same command to resume"]


def test_a_store_stopped_before_its_completion_mark_is_completed(tmp_path):
    run = tmp_path / "run"
    path = record(_tiny(), RandomImages(n=4, size=8), run=run, batch_size=2, progress=False)
    with h5py.File(path, "r+") as f:  # as left by a kill between the last write and mark_complete()
        f.attrs.modify("complete", False)
    with ActivationStore.open(path) as store:
        assert store.n_done == 4 and not store.complete
    assert record(_tiny(), RandomImages(n=4, size=8), run=run, batch_size=2, progress=False) == path
    with ActivationStore.open(path) as store:
        assert store.complete and store.damaged() == []


def test_a_read_only_run_is_reused_without_a_lock(tmp_path, monkeypatch):
    run = tmp_path / "run"
    path = record(_tiny(), RandomImages(n=4, size=8), run=run, batch_size=2, progress=False)
    (run / ".neurosem.lock").unlink()
    real_open = os.open

    def read_only(file, flags, *a):
        if str(file).endswith(".neurosem.lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, *a)

    monkeypatch.setattr(os, "open", read_only)
    assert record(_tiny(), RandomImages(n=4, size=8), run=run, batch_size=2, progress=False) == path
    assert not (run / ".neurosem.lock").exists()
