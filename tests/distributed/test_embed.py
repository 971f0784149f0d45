"""embed under torchrun: P-bar summed along the ranks in a single run's order, the fit on rank 0, the paper
trainer with DDP (the vectors of one process within ATOL), the refusals."""
from __future__ import annotations

import json
import shutil

import h5py
import pytest

from tests.distributed._compare import h5_differences
from tests.distributed._launch import MODEL, error_lines, spawn, torchrun


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """300 images: two P-bar batches of 256 images, one per rank."""
    from neurosem.cli import main
    from neurosem.data.synthetic import write_synthetic_broden

    root = tmp_path_factory.mktemp("b300")
    write_synthetic_broden(root / "broden", n_images=300, image_size=16, seg_size=16, seed=2)
    run = root / "run"
    main(["record", MODEL, "--data", str(root / "broden"), "--run", str(run), "--layers", "relu1,relu2",
          "-b", "64", "--workers", "0", "-q"])
    return run


def _config(path):
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["config"])
    config.pop("run")
    return config


@pytest.mark.slow
def test_two_processes_write_the_single_process_embedding(recorded, tmp_path):
    from neurosem.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(recorded, one)
    shutil.copytree(recorded, two)
    main(["embed", "--run", str(one), "--dim", "3", "-q"])
    out = torchrun(["embed", "--run", str(two), "--dim", "3", "-q"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("embedding: ") == 1
    assert h5_differences(one / "embedding.h5", two / "embedding.h5", skip_attrs=("config",)) == []
    assert _config(one / "embedding.h5") == _config(two / "embedding.h5")


def _vectors(path):
    with h5py.File(path, "r") as f:
        return {name: (f["layers"][name]["S"][()], f["layers"][name]["snapshots"][()]) for name in f["layers"]}, \
            f["history/loss"][()], f["history/train_loss"][()]


#: the paper trainer under DDP sums the gradients of the ranks' shares: the single process's up to
#: float32 summation order, which SGD carries on over the steps (measured: at most 1.2e-7 after 3
#: and after 20 epochs, the vectors' entries being up to 2.5 and moving by 0.1-1)
ATOL = 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("batch", ["63", "299"])
def test_two_processes_train_the_paper_embedding_of_one(recorded, tmp_path, batch):
    """-b 63: every batch splits 31/32 and the last (48 images of 300) 24/24; -b 299: 149/150, then
    a batch of one image, which rank 0 has no share of. 3 epochs."""
    import numpy as np

    from neurosem.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(recorded, one)
    shutil.copytree(recorded, two)
    args = ["--dim", "3", "--trainer", "paper", "--epochs", "3", "-b", batch, "-q"]
    main(["embed", "--run", str(one), *args])
    out = torchrun(["embed", "--run", str(two), *args])
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("embedding: ") == 1
    (v1, h1, t1), (v2, h2, t2) = _vectors(one / "embedding.h5"), _vectors(two / "embedding.h5")
    assert sorted(v1) == sorted(v2) == ["relu1", "relu2"]
    for name in v1:
        assert v1[name][0].shape == v2[name][0].shape == (6 if name == "relu1" else 8, 3)
        np.testing.assert_allclose(v2[name][0], v1[name][0], rtol=0, atol=ATOL)
        np.testing.assert_allclose(v2[name][1], v1[name][1], rtol=0, atol=ATOL)
        assert np.abs(v1[name][0] - v1[name][1][0]).max() > 100 * ATOL      # the vectors did move
        assert (v2[name][1][0] == v1[name][1][0]).all()                     # the same initialisation
    np.testing.assert_allclose(h2, h1, rtol=0, atol=ATOL)
    np.testing.assert_allclose(t2, t1, rtol=0, atol=ATOL, equal_nan=True)
    assert _config(one / "embedding.h5") == _config(two / "embedding.h5")
    with h5py.File(one / "embedding.h5", "r") as f, h5py.File(two / "embedding.h5", "r") as g:
        for name in v1:   # P-bar is summed along the ranks in a single run's order: the same bits
            assert f["layers"][name]["pbar"][()].tobytes() == g["layers"][name]["pbar"][()].tobytes()


@pytest.mark.slow
def test_the_paper_trainer_refuses_a_batch_smaller_than_the_world(recorded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    argv = ["embed", "--run", str(run), "--trainer", "paper", "-b", "1", "-q"]
    outs = spawn([argv, argv])
    assert [o.returncode for o in outs] == [2, 2]
    assert error_lines(outs[0].stderr) == [
        "error: --batch-size 1 is smaller than the 2 processes: each trains on its share of every mini-batch; "
        "use --batch-size >= 2 or fewer processes"]
    assert outs[1].stderr == ""
    assert not (run / "embedding.h5").exists()


@pytest.mark.slow
def test_no_store_is_refused_under_torchrun(recorded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    argv = ["embed", MODEL, "--data", "nowhere", "--run", str(run), "--no-store", "-q"]
    outs = spawn([argv, argv])
    assert [o.returncode for o in outs] == [2, 2]
    assert error_lines(outs[0].stderr) == [
        "error: under torchrun, embed reads the run's stored activations: record them first (`torchrun ... -m "
        "neurosem -- record MODEL --data PATH --run RUN`) and drop --no-store, or run without torchrun"]
    assert outs[1].stderr == ""
    assert not (run / "embedding.h5").exists()


@pytest.mark.slow
def test_the_paper_trainer_refuses_ranks_with_different_epochs(recorded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    argv = ["embed", "--run", str(run), "--trainer", "paper", "-q"]
    outs = spawn([[*argv, "--epochs", "2"], [*argv, "--epochs", "3"]])
    assert [o.returncode for o in outs] == [2, 2]
    assert error_lines(outs[0].stderr) == [
        "error: the ranks were started with different embed arguments (epochs: 2 on rank 0, 3 on rank 1); "
        "launch every rank with the same command"]
    assert outs[1].stderr == ""
    assert not (run / "embedding.h5").exists()
