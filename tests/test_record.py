"""Recorder hooks, record() against a plain forward pass, resume after Ctrl-C and after a real kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from neurosem.errors import DataError, NeurosemError, RunMismatchError
from neurosem.models import IMAGENET_MEAN, IMAGENET_STD, LoadedModel
from neurosem.record import Recorder, ensure_activations, record
from neurosem.store import ActivationStore

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from _planted import RandomImages, SharedReLU, TinyCNN, TupleOut  # noqa: E402

LAYERS = ["layer1", "layer2"]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _tiny(seed: int = 0) -> LoadedModel:
    return LoadedModel(TinyCNN(seed=seed), "tiny", f"seed{seed}", default_layers=list(LAYERS))


def _reference(model: TinyCNN, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layers computed by hand, without hooks: ``x: [B, 3, S, S]`` already normalised."""
    with torch.no_grad():
        bn1 = model.bn1(model.conv1(x))
        l1 = model.layer1(torch.relu(bn1))
        return {"bn1": bn1, "layer1": l1, "layer2": model.layer2(l1)}


def _normalise(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _h5_contents(path: Path) -> dict:
    """Every dataset (as bytes) and the attrs that must match between two runs."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()].tobytes())
                     if isinstance(obj, h5py.Dataset) else None)
        for key in ("n_done", "complete", "layers", "shapes", "dtype", "n_images"):
            out[f"attr:{key}"] = f.attrs[key]
    return out


# ---------------------------------------------------------------- Recorder
def test_hooks_removed_after_exception_in_block():
    model = TinyCNN()
    with pytest.raises(RuntimeError, match="boom"):
        with Recorder(model, ["layer1", "bn1"]) as rec:
            assert _hooks(model) == 3  # two forward hooks + the pass-reset pre-hook
            rec.forward(torch.rand(1, 3, 8, 8))
            raise RuntimeError("boom")
    assert _hooks(model) == 0


def test_hooks_removed_after_forward_error():
    model = TinyCNN()
    with pytest.raises(RuntimeError):
        with Recorder(model, ["layer1"]) as rec:
            rec.forward(torch.rand(1, 5, 8, 8))  # 5 channels: conv1 fails
    assert _hooks(model) == 0


def test_module_firing_twice_is_an_error():
    model = SharedReLU()
    with pytest.raises(NeurosemError, match="'act' ran twice in one forward pass .*different layer"):
        with Recorder(model, ["act"]) as rec:
            rec.forward(torch.rand(1, 3, 4, 4))
    assert _hooks(model) == 0
    with Recorder(model, ["conv2"]) as rec:  # the same model, a layer that runs once: fine, twice in a row
        rec.forward(torch.rand(1, 3, 4, 4))
        rec.forward(torch.rand(2, 3, 4, 4))
        assert rec.outputs["conv2"].shape == (2, 4, 4, 4)


def test_stop_after_last_skips_later_modules():
    model = TinyCNN()
    calls = []
    model.layer2.register_forward_hook(lambda *a: calls.append("layer2"))
    model.fc.register_forward_hook(lambda *a: calls.append("fc"))
    x = torch.rand(2, 3, 8, 8)
    with Recorder(model, ["layer1", "bn1"], stop_after_last=True) as rec:
        assert rec.forward(x) is None
        assert calls == []
    assert torch.equal(rec.outputs["layer1"], _reference(model, x)["layer1"])
    calls.clear()
    with Recorder(model, ["layer1"]) as rec:
        out = rec.forward(x)
    assert calls == ["layer2", "fc"] and torch.equal(out, model(x))


def test_outputs_are_copies_safe_from_inplace_ops():
    """bn1 is followed by ReLU(inplace=True): the recorded bn1 must keep its negative values."""
    model = TinyCNN()
    x = torch.rand(3, 3, 8, 8)
    with Recorder(model, ["bn1"]) as rec:
        rec.forward(x)
    ref = _reference(model, x)["bn1"]
    assert (ref < 0).any()
    assert torch.equal(rec.outputs["bn1"], ref)


def test_tuple_output_dtype_and_missing_layer():
    model = TupleOut()
    x = torch.rand(2, 3, 4, 4)
    with Recorder(model, ["pair"], dtype=torch.float16) as rec:
        rec.forward(x)
    with torch.no_grad():
        ref = model.pair.conv(x)
    assert rec.outputs["pair"].dtype == torch.float16
    assert torch.equal(rec.outputs["pair"], ref.half())
    unused = TinyCNN()
    unused.spare = nn.Conv2d(1, 1, 1)
    with pytest.raises(NeurosemError, match="spare did not run"):
        with Recorder(unused, ["spare"]) as rec:
            rec.forward(x)
    with pytest.raises(NeurosemError, match=r"unknown layer 'layer3' \(closest: layer2, layer1"):
        Recorder(unused, ["layer3"])


# ---------------------------------------------------------------- record()
def test_record_equals_plain_forward(tmp_path, capsys):
    lm, ds = _tiny(), RandomImages(n=10, size=16)
    path = record(lm, ds, run=tmp_path / "run", batch_size=4, progress=False)
    assert path == tmp_path / "run" / "activations.h5"
    x = _normalise(ds.batch(0, 10))
    whole = _reference(lm.model, x)
    with ActivationStore.open(path) as store:
        assert store.layers == LAYERS and store.n_done == 10 and store.complete
        assert store.shape("layer1") == (10, 6, 8, 8) and store.shape("layer2") == (10, 8, 4, 4)
        assert store.image_ids == [f"img{i:04d}.png" for i in range(10)]
        prov = store.provenance
        for name in LAYERS:
            got = store.read(name)
            assert got.dtype == np.float16
            # the same batches by hand give the same bits; the whole set at once, float16 precision
            by_batch = torch.cat([_reference(lm.model, x[i:i + 4])[name] for i in range(0, 10, 4)])
            np.testing.assert_array_equal(got, by_batch.half().numpy())
            np.testing.assert_allclose(got.astype(np.float32), whole[name].numpy(), rtol=2 ** -10, atol=1e-6)
    assert prov["model"] == "tiny" and prov["weights"] == "seed0" and prov["layers"] == LAYERS
    assert prov["data_fingerprint"] == "random-images-10-16-0" and prov["n_images"] == 10
    assert prov["transform"]["mean"] == list(IMAGENET_MEAN) and prov["batch_size"] == 4
    assert prov["versions"]["torch"] == torch.__version__
    meta = json.loads((tmp_path / "run" / "run.json").read_text())["record"]
    assert meta["complete"] is True and meta["layers"] == LAYERS

    # a complete matching store is reused, not rewritten
    mtime = path.stat().st_mtime_ns
    assert record(lm, ds, run=tmp_path / "run", batch_size=8, progress=False) == path
    assert path.stat().st_mtime_ns == mtime and "reusing" in capsys.readouterr().err
    # ... also for a subset of its layers
    assert record(lm, ds, run=tmp_path / "run", layers="layer2", progress=False) == path


def test_mean_std_override_and_limit(tmp_path):
    lm, ds = _tiny(), RandomImages(n=9, size=8, seed=5)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 1.0)
    path = record(lm, ds, run=tmp_path, layers=["bn1"], batch_size=3, limit=5, mean=mean, std=std,
                  progress=False)
    x = _normalise(ds.batch(0, 5), mean, std)
    with ActivationStore.open(path) as store:
        assert store.n_done == 5 and store.provenance["transform"]["std"] == list(std)
        by_batch = torch.cat([_reference(lm.model, x[i:i + 3])["bn1"] for i in range(0, 5, 3)])
        np.testing.assert_array_equal(store.read("bn1"), by_batch.half().numpy())


def test_float16_overflow_is_reported(tmp_path, capsys):
    """Tiny std makes the inputs huge: layer2 exceeds 65504 and is stored as inf, with a warning."""
    path = record(_tiny(), RandomImages(n=2, size=8), run=tmp_path, layers=["conv1", "layer2"],
                  std=(1e-2, 1e-2, 1e-6), progress=False)
    with ActivationStore.open(path) as store:
        assert not np.isinf(store.read("conv1")).all() and np.isinf(store.read("layer2")).any()
        flagged = [name for name in store.layers if not np.isfinite(store.read(name)).all()]
    assert f"WARNING: layers {', '.join(flagged)} hold inf values" in capsys.readouterr().err


def test_mismatch_names_each_field_and_force_starts_over(tmp_path):
    run = tmp_path / "run"
    record(_tiny(), RandomImages(n=4, size=8), run=run, batch_size=2, progress=False)
    with pytest.raises(RunMismatchError) as err:
        record(_tiny(seed=1), RandomImages(n=4, size=8), run=run, layers=["layer1", "bn1"], progress=False)
    msg = str(err.value)
    assert "weights: seed0 vs seed1" in msg and "layers: ['layer1', 'layer2'] vs ['layer1', 'bn1']" in msg
    assert "--force" in msg and "--run" in msg and "\n" not in msg
    with pytest.raises(RunMismatchError, match="data_fingerprint: random-images-4-8-0 vs random-images-4-8-3"):
        record(_tiny(), RandomImages(n=4, size=8, seed=3), run=run, progress=False)
    with pytest.raises(RunMismatchError, match=r"transform: .*0\.485.* vs .*0\.5"):
        record(_tiny(), RandomImages(n=4, size=8), run=run, mean=(0.5, 0.5, 0.5), progress=False)
    path = record(_tiny(seed=1), RandomImages(n=4, size=8), run=run, layers=["bn1"], force=True, progress=False)
    with ActivationStore.open(path) as store:
        assert store.layers == ["bn1"] and store.provenance["weights"] == "seed1" and store.complete


def test_corrupt_store_asks_for_force(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "activations.h5").write_bytes(b"\0" * 64)
    with pytest.raises(NeurosemError, match="--force"):
        record(_tiny(), RandomImages(n=2, size=8), run=run, progress=False)
    path = record(_tiny(), RandomImages(n=2, size=8), run=run, force=True, progress=False)
    with ActivationStore.open(path) as store:
        assert store.complete


def test_resume_after_keyboard_interrupt(tmp_path, capsys):
    lm = _tiny()
    with pytest.raises(KeyboardInterrupt):
        record(lm, RandomImages(n=12, size=16, interrupt_at=7), run=tmp_path / "a", batch_size=2, progress=False)
    err = capsys.readouterr().err
    assert "interrupted: 6 of 12 images are saved" in err and "rerun the same command to resume" in err
    with ActivationStore.open(tmp_path / "a" / "activations.h5") as store:
        assert store.n_done == 6 and not store.complete
    record(lm, RandomImages(n=12, size=16), run=tmp_path / "a", batch_size=2, progress=False)
    assert "resuming at image 6 of 12" in capsys.readouterr().err
    record(lm, RandomImages(n=12, size=16), run=tmp_path / "b", batch_size=2, progress=False)
    a, b = _h5_contents(tmp_path / "a" / "activations.h5"), _h5_contents(tmp_path / "b" / "activations.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from _planted import RandomImages, TinyCNN
from neurosem.models import LoadedModel
from neurosem.record import record
lm = LoadedModel(TinyCNN(), "tiny", "seed0", default_layers=["layer1", "layer2"])
record(lm, RandomImages(n={n}, size=16, delay={delay}), run={run!r}, batch_size=2, progress=False)
"""


def test_resume_after_a_real_kill(tmp_path):
    n = 40
    run = tmp_path / "killed"
    path = run / "activations.h5"
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(TESTS), n=n, delay=0.05, run=str(run))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    n_done, deadline = 0, time.time() + 120
    try:
        while n_done == 0 and time.time() < deadline and child.poll() is None:
            time.sleep(0.01)
            if path.exists():
                try:
                    with h5py.File(path, "r", locking=False) as f:
                        n_done = int(f.attrs["n_done"])
                except (OSError, KeyError):
                    pass
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    with ActivationStore.open(path) as store:  # a valid, partial file
        assert 0 < store.n_done < n and not store.complete
        killed_at = store.n_done
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the child
    try:
        lm = LoadedModel(TinyCNN(), "tiny", "seed0", default_layers=list(LAYERS))
        record(lm, RandomImages(n=n, size=16), run=run, batch_size=2, progress=False)
        record(lm, RandomImages(n=n, size=16), run=tmp_path / "whole", batch_size=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = _h5_contents(path), _h5_contents(tmp_path / "whole" / "activations.h5")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), f"killed at {killed_at}"


def test_ensure_activations(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(NeurosemError, match="no activations in .*pass MODEL and --data"):
        ensure_activations(run)
    lm, ds = _tiny(), RandomImages(n=4, size=8)
    path = ensure_activations(run, model=lm, data=ds, batch_size=2, progress=False)
    with ActivationStore.open(path) as store:
        assert store.complete and store.layers == LAYERS
    mtime = path.stat().st_mtime_ns
    assert ensure_activations(run) == path
    assert ensure_activations(run, layers=["layer2"]) == path
    assert ensure_activations(run, model=lm, data=ds, progress=False) == path
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(RunMismatchError, match="weights: seed0 vs seed2"):
        ensure_activations(run, model=_tiny(seed=2), data=ds, progress=False)


def test_record_a_data_spec(tmp_path, tiny_broden, capsys):
    """The real path: a Broden directory through neurosem.data.open_image_dataset."""
    import neurosem.data as ndata

    if not hasattr(ndata, "open_image_dataset"):
        pytest.skip("neurosem.data.open_image_dataset is not written yet")
    lm = _tiny()
    path = record(lm, str(tiny_broden), run=tmp_path / "b", batch_size=5, progress=False)
    ds = ndata.open_image_dataset(str(tiny_broden))
    x = _normalise(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    with ActivationStore.open(path) as store:
        assert store.n_done == len(ds) and store.image_ids == [ds[i]["id"] for i in range(len(ds))]
        assert store.provenance["data"] == str(Path(tiny_broden).resolve())
        assert store.provenance["data_fingerprint"] == ndata.dataset_fingerprint(str(tiny_broden))
        ref = _reference(lm.model, x)["layer2"]
        np.testing.assert_allclose(store.read("layer2").astype(np.float32), ref.numpy(), rtol=2 ** -10, atol=1e-6)
    assert ensure_activations(tmp_path / "b") == path
    # the same dataset moved elsewhere: same fingerprint, the store is reused
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(tiny_broden, moved)
    assert record(lm, str(moved), run=tmp_path / "b", progress=False) == path
    assert "the data moved" in capsys.readouterr().err


class _ReusedRelu(nn.Module):
    """``relu`` runs twice per forward pass (as inside torchvision's BasicBlock)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.relu(self.conv(x)) - 0.5).mean((2, 3))


def test_a_module_run_twice_is_an_error_even_as_the_last_layer(tmp_path):
    lm = LoadedModel(_ReusedRelu(), "reused", "seed0", default_layers=["relu"])
    with pytest.raises(NeurosemError, match="twice") as info:
        record(lm, RandomImages(n=4, size=8), run=tmp_path / "run", layers=["relu"], progress=False)
    assert "\n" not in str(info.value)
    assert _hooks(lm.model) == 0 and not (tmp_path / "run" / "activations.h5").exists()


class _MixedSizes(RandomImages):
    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i == 2:
            item["image"] = item["image"][:, :8, :8]
        return item


def test_images_of_different_sizes_are_one_line(tmp_path):
    with pytest.raises(DataError, match="img0000.png is 16x16 but img0002.png is 8x8; resize") as info:
        record(_tiny(), _MixedSizes(n=4, size=16), run=tmp_path / "run", batch_size=4, progress=False)
    assert "\n" not in str(info.value)
