"""Messages that mislead (issue 12): float32 stores, NaN vs float16 overflow, refusals that leave
nothing behind, progress lines in files and pipes."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from neurosem.errors import NeurosemError
from neurosem.models import LoadedModel
from neurosem.record import ensure_activations, record
from neurosem.store import ActivationStore

PLANTED = Path(__file__).parent / "_planted.py"
TINY = f"{PLANTED}:tiny_cnn"


# ---------------------------------------------------------------- a float32 store works everywhere
def test_a_float32_store_is_reused_by_every_stage(tmp_path, tiny_broden, capsys):
    from neurosem.dissect import dissect
    from neurosem.embed import embed

    run = tmp_path / "run"
    path = record(TINY, str(tiny_broden), run=run, layers="layer1,layer2", dtype="float32", progress=False)
    stamp = path.stat().st_mtime_ns
    # the stages given MODEL and the data find the float32 store theirs (no "dtype: float32 vs float16")
    assert ensure_activations(run, model=TINY, data=str(tiny_broden), progress=False) == path
    assert dissect(run=run, broden=str(tiny_broden), model=TINY, device="cpu", progress=False) is not None
    assert embed(TINY, data=str(tiny_broden), run=run, dim=2, device="cpu", progress=False).exists()
    with ActivationStore.open(path) as st:
        assert st.provenance["dtype"] == "float32" and st.complete
    assert path.stat().st_mtime_ns == stamp                       # reused, not recorded again
    assert "recorded with other arguments" not in capsys.readouterr().err


# ---------------------------------------------------------------- NaN is the model's, inf may be float16's
class _Scaled(nn.Module):
    """``layer: [B, 2, H, W]``: channel 0 = the mean input, channel 1 = ``value`` everywhere."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(1, keepdim=True)
        return self.layer(torch.cat([x, torch.full_like(x, self.value)], 1))


def _loaded(value: float) -> LoadedModel:
    return LoadedModel(model=_Scaled(value), spec=f"scaled{value}", weights="none", input_size=(3, 32, 32),
                       default_layers=["layer"])


@pytest.mark.parametrize("value, dtype, says", [
    (1e6, "float16", "layers layer hold inf values in {path}: beyond the float16 range (65504): record with "
                     "--dtype float32 --force"),
    (float("nan"), "float16", "layers layer hold NaN values in {path}: the model itself computes NaN (check "
                              "the model and its weights)"),
    (float("inf"), "float32", "layers layer hold inf values in {path}: the model itself computes inf (check "
                              "the model and its weights)"),
])
def test_nonfinite_warning_blames_the_right_thing(tmp_path, tiny_broden, capsys, value, dtype, says):
    path = record(_loaded(value), str(tiny_broden), run=tmp_path, dtype=dtype, progress=False)
    assert capsys.readouterr().err.strip() == "WARNING: " + says.format(path=path)


def test_a_float32_store_holds_what_float16_cannot(tmp_path, tiny_broden, capsys):
    path = record(_loaded(1e6), str(tiny_broden), run=tmp_path, dtype="float32", progress=False)
    assert capsys.readouterr().err == ""
    with ActivationStore.open(path) as st:
        assert float(st.read("layer", 0, 1)[0, 1].max()) == 1e6


def test_embed_tells_float16_overflow_from_model_nan():
    from neurosem.embed import check_finite

    acts = torch.ones(3, 2, 2, 2, dtype=torch.float16)
    acts[1, 0, 0, 0] = float("inf")
    with pytest.raises(NeurosemError) as err:
        check_finite(acts, "layer4", start=10)
    assert str(err.value) == ("activations of layer 'layer4' are Inf at image 11: beyond the float16 range "
                              "(65504) of the store; record them with `neurosem record ... --dtype float32 "
                              "--force`, or use --no-store")
    acts[2, 1, 0, 0] = float("nan")
    with pytest.raises(NeurosemError, match=r"are NaN/Inf at image 11: the model itself computes them"):
        check_finite(acts, "layer4", start=10)
    wide = acts.float()
    wide[2, 1, 0, 0] = 0.0                                       # only the inf is left, in float32: the model's
    with pytest.raises(NeurosemError, match=r"are NaN/Inf at image 11: the model itself computes them"):
        check_finite(wide, "layer4", start=10)


# ---------------------------------------------------------------- refusals leave nothing behind
def test_a_layer_without_maps_is_refused_before_any_file(tmp_path, tiny_broden):
    run = tmp_path / "run"
    with pytest.raises(NeurosemError) as err:
        record(TINY, str(tiny_broden), run=run, layers="layer2,fc", progress=False)
    assert str(err.value) == ("layer 'fc' gives 2-D outputs [B, 5], not unit maps: choose a layer with "
                              "[B, C, H, W], [B, H, W, C] or [B, T, D] outputs (see `neurosem layers MODEL`)")
    # only the run lock (an empty file kept on purpose: unlinking a flock file races) may be there
    assert not run.exists() or sorted(p.name for p in run.iterdir()) in ([], [".neurosem.lock"])


def test_negative_workers_are_refused(tmp_path, tiny_broden):
    with pytest.raises(NeurosemError, match=r"--workers must be >= 0 \(0: load in the main process\), got -1"):
        record(TINY, str(tiny_broden), run=tmp_path, num_workers=-1, progress=False)


def test_kl_refuses_an_unknown_layer_before_writing(tmp_path, tiny_broden, monkeypatch):
    import neurosem.analysis.commands as commands
    from neurosem.dissect import dissect
    from neurosem.embed import embed

    run = tmp_path / "run"
    dissect(run=run, broden=str(tiny_broden), model=TINY, device="cpu", progress=False)
    embed(run=run, dim=2, device="cpu", progress=False)

    def no_compute(*args, **kwargs):
        raise AssertionError("kl_curves ran before the layer was checked")

    monkeypatch.setattr(commands, "kl_curves", no_compute)
    with pytest.raises(NeurosemError) as err:
        commands.kl_report(run, layer="fc", progress=False)
    assert str(err.value) == "no KL curve for layer 'fc': choose one of layer1, layer2, or mean"
    assert not (run / "kl.json").exists() and not (run / "kl.csv").exists()


# ---------------------------------------------------------------- progress in files and pipes
class _Clock:
    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_progress_in_a_file_writes_occasional_plain_lines(monkeypatch):
    from neurosem._progress import progress

    monkeypatch.delenv("NEUROSEM_NO_PROGRESS", raising=False)
    out = io.StringIO()                                   # not a terminal
    items = list(progress(range(10), desc="record m", unit="batch", interval=10.0, stream=out, clock=_Clock(4.0)))
    assert items == list(range(10))
    # the clock reads 4 s at the start and 4 s more after each item: lines after items 3, 6 and 9
    assert out.getvalue() == ("record m: 3/10 batch (30%), 12 s\n"
                              "record m: 6/10 batch (60%), 24 s\n"
                              "record m: 9/10 batch (90%), 36 s\n"
                              "record m: 10/10 batch (100%), 44 s - done\n")
    assert "\r" not in out.getvalue()


def test_progress_short_loops_stay_silent_and_generators_have_no_total(monkeypatch):
    from neurosem._progress import progress

    monkeypatch.delenv("NEUROSEM_NO_PROGRESS", raising=False)
    out = io.StringIO()
    assert list(progress(range(5), interval=30.0, stream=out, clock=_Clock(1.0))) == list(range(5))
    assert out.getvalue() == ""
    list(progress((i for i in range(3)), desc="x", interval=1.0, stream=out, clock=_Clock(1.0)))
    assert out.getvalue() == "x: 1 it, 1 s\nx: 2 it, 2 s\nx: 3 it, 3 s\nx: 3 it, 4 s - done\n"


def test_progress_on_a_terminal_is_a_bar(monkeypatch):
    from neurosem._progress import progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NEUROSEM_NO_PROGRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    out = Tty()
    assert list(progress(range(3), desc="bar", stream=out)) == [0, 1, 2]
    assert "\r" in out.getvalue() and "bar" in out.getvalue()
