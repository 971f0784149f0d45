"""embed under torchrun: P-bar summed along the ranks in a single run's order, the fit on rank 0."""
from __future__ import annotations

import json
import shutil

import h5py
import pytest

from tests.distributed._compare import h5_differences
from tests.distributed._launch import MODEL, error_lines, torchrun


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


@pytest.mark.slow
def test_the_paper_trainer_is_refused_under_torchrun(recorded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    out = torchrun(["embed", "--run", str(run), "--trainer", "paper", "-q"])
    assert out.returncode != 0
    assert error_lines(out.stderr) == [
        "error: under torchrun, embed runs --trainer fit on the stored activations: drop --no-store / "
        "--trainer paper, or run without torchrun"]
    assert not (run / "embedding.h5").exists()
