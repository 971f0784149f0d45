"""distill(): end to end on a generated CIFAR-format folder, resume, teacher-free SKD, messages."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neurosem.distill import distiller as D
from neurosem.distill import train as T
from neurosem.distill import zoo
from neurosem.errors import DataError, NeurosemError, RunMismatchError
from tests._cifar import write_bright_cifar



FAST = dict(protocol="paper", epochs=2, batch_size=8, num_workers=0, progress=False, device="cpu")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """24 train / 8 test images of 4 classes (class = the brightest colour channel)."""
    return write_bright_cifar(tmp_path_factory.mktemp("cifar"), 24, 8)


def _embedding(tmp: Path, teacher: str, data_root: Path, dim: int = 4) -> Path:
    """The teacher's vectors with neurosem.embed's fit, from P-bar over the training images."""
    from neurosem._embed_train import train_fit
    from neurosem.data.cifar import cifar_dataset, cifar_test_transform
    from neurosem.embed import similarity_probs, write_embedding

    torch.manual_seed(1)
    model = zoo.build(teacher).eval()
    layers = zoo.ALIGNED_LAYERS[teacher]
    ds = cifar_dataset(data_root, transform=cifar_test_transform())
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with D.FeatureTaps(model, layers) as taps, torch.no_grad():
        model(x)
        acts = taps.pop()
    pbar = {l: similarity_probs(acts[l]).mean(0).double() for l in layers}
    res = train_fit(pbar, dim=dim, max_steps=4)
    return write_embedding(tmp / "embedding.h5", res, {"trainer": "fit", "dim": dim}, model=teacher)


@pytest.fixture(scope="module")
def vectors_resnet14(tmp_path_factory, cifar_root) -> Path:
    return _embedding(tmp_path_factory.mktemp("teacher14"), "resnet14", cifar_root)


def test_skd_two_epochs_end_to_end_without_the_teacher(tmp_path, cifar_root, vectors_resnet14, monkeypatch):
    def boom(**kwargs):
        raise AssertionError("SKD must not construct the teacher")

    monkeypatch.setitem(zoo.ZOO, "resnet14", boom)
    out = T.distill(teacher="resnet14", student="resnet8", method="skd", data=f"cifar100:{cifar_root}",
                    run=tmp_path / "run", teacher_vectors=vectors_resnet14.parent, seed=0, **FAST)
    assert out["status"] == "complete" and out["epochs_done"] == 2
    assert len(out["test_acc"]) == 2 and len(out["epoch_time"]) == 2
    assert out["final_acc"] == out["test_acc"][-1] and out["best_acc"] == max(out["test_acc"])
    assert all(0 <= a <= 100 for a in out["test_acc"]) and out["teacher_acc"] is None
    h = out["history"]
    assert h["lr"] == pytest.approx([0.1, 0.01])      # paper milestones 50/75/90 scaled to 2 epochs
    assert all(np.isfinite(h["train_skd"])) and min(h["train_skd"]) > 0
    # loss = CE + 0.5 * SKD per epoch (means over the same samples)
    np.testing.assert_allclose(h["train_loss"], np.array(h["train_ce"]) + 0.5 * np.array(h["train_skd"]), rtol=1e-5)
    assert out["config"]["teacher_layers"] == ["layer1", "layer2", "layer3"]
    saved = json.loads(Path(out["results_path"]).read_text())
    assert saved["test_acc"] == out["test_acc"] and saved["status"] == "complete"
    state = torch.load(out["weights_path"], weights_only=True)
    student = zoo.build("resnet8")
    student.load_state_dict(state)
    # the saved weights reproduce the reported final accuracy
    from neurosem.data.cifar import cifar_dataset, cifar_test_transform

    ds = cifar_dataset(cifar_root, train=False, transform=cifar_test_transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=T._collate)
    acc, _ = T.evaluate(student, loader, torch.device("cpu"))
    assert acc == pytest.approx(out["final_acc"])
    # the student's aligned layers were the ones regularised: the loss module holds P_S of the file
    from neurosem.embed import load_embedding, similarity_probs

    emb = load_embedding(vectors_resnet14)
    ck = torch.load(out["checkpoint_path"], weights_only=True)
    torch.testing.assert_close(ck["criterion"]["loss.target_0"],
                               similarity_probs(torch.as_tensor(emb.vectors("layer1"))).float())


def test_resume_gives_the_same_final_state(tmp_path, cifar_root, vectors_resnet14, monkeypatch):
    args = dict(teacher="resnet14", student="resnet8", method="skd", data=f"cifar100:{cifar_root}",
                teacher_vectors=vectors_resnet14, seed=3, **FAST)
    full = T.distill(run=tmp_path / "full", **args)

    real_save = T._save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        T.distill(run=tmp_path / "cut", **args)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(T, "_save_checkpoint", real_save)
    resumed = T.distill(run=tmp_path / "cut", **args)
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]
    a = torch.load(full["weights_path"], weights_only=True)
    b = torch.load(resumed["weights_path"], weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run returns its results; other arguments in the same run are refused
    again = T.distill(run=tmp_path / "cut", **args)
    assert again["test_acc"] == full["test_acc"]
    with pytest.raises(RunMismatchError, match="seed=3"):
        T.distill(run=tmp_path / "cut", **{**args, "seed": 4})


def test_ce_teacher_then_kd_with_its_weights(tmp_path, cifar_root):
    teacher = T.train_teacher("resnet14", f"cifar100:{cifar_root}", run=tmp_path / "t", protocol="crd",
                              epochs=1, batch_size=8, num_workers=0, progress=False, device="cpu")
    assert teacher["config"]["method"] == "ce" and teacher["config"]["lr"] == 0.05
    out = T.distill(teacher="resnet14", student="resnet8", method="kd", data=f"cifar100:{cifar_root}",
                    run=tmp_path / "kd", teacher_weights=teacher["weights_path"],
                    **{**FAST, "epochs": 1})
    # the teacher was evaluated with the trained weights
    assert out["teacher_acc"] == pytest.approx(teacher["final_acc"])
    h = out["history"]
    np.testing.assert_allclose(h["train_loss"], 0.1 * np.array(h["train_ce"]) + 0.9 * np.array(h["train_kd"]),
                               rtol=1e-5)


@pytest.mark.parametrize("method", ["kd", "fitnet", "at", "sp", "cc", "cc-rbf", "rkd", "pkt", "skd-random"])
def test_every_method_takes_a_step(method):
    torch.manual_seed(0)
    teacher = zoo.build("resnet14", num_classes=10).eval()
    d = D.build_distiller(method, "resnet8", "resnet14", num_classes=10, teacher_model=teacher, seed=0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    d.train()
    with d.hooked():
        loss, logits, parts = d.step(x, y)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (4, 10)
    assert set(parts) == {"ce", method}
    assert float(parts[method]) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert d.student.layer1[0].conv1.weight.grad is not None
    if method in ("fitnet", "cc", "cc-rbf"):
        assert any(p.grad is not None for p in d.criterion.parameters())
    # the hooks are gone afterwards
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in d.student.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())


def test_baselines_use_crds_layers():
    assert D.method_taps("at", "resnet8x4").maps == ("layer1", "layer2", "layer3")
    assert D.method_taps("at", "vgg8").maps == ("block1", "block2", "block3", "block4")
    assert D.method_taps("fitnet", "wrn_16_2").maps == ("block2",)
    assert D.method_taps("fitnet", "vgg13").maps == ("block2",)
    assert D.method_taps("sp", "vgg8").maps == ("block4",)
    assert D.method_taps("rkd", "vgg8").pooled == "classifier"
    assert D.method_taps("skd", "vgg8").maps == tuple(f"block{i}" for i in range(5))
    assert D.default_beta("skd", "vgg13", "vgg8") == 0.05
    assert D.default_beta("skd", "resnet32x4", "resnet8x4") == 0.5
    assert D.default_beta("kd", "resnet32x4", "resnet8x4") == 0.9


def test_protocols():
    assert T.PROTOCOLS["paper"].scaled(None).milestones == (50, 75, 90)
    assert T.PROTOCOLS["paper"].scaled(10).milestones == (5, 8, 9)
    crd = T.PROTOCOLS["crd"]
    assert (crd.lr, crd.momentum, crd.weight_decay, crd.batch_size, crd.epochs, crd.milestones) == \
        (0.05, 0.9, 5e-4, 64, 240, (150, 180, 210))
    paper = T.PROTOCOLS["paper"]
    assert (paper.lr, paper.weight_decay, paper.batch_size, paper.epochs) == (0.1, 5e-4, 64, 100)


def test_width_mismatch_names_both_layers(tmp_path, cifar_root):
    path = _embedding(tmp_path, "resnet8x4", cifar_root)
    with pytest.raises(NeurosemError, match="teacher layer layer1 has 64 vectors but student layer layer1 has 16 channels"):
        T.distill(teacher="resnet8x4", student="resnet8", method="skd", data=f"cifar100:{cifar_root}",
                  run=tmp_path / "r", teacher_vectors=path, **FAST)


def test_vectors_of_another_teacher_are_refused(vectors_resnet14):
    # resnet20 has resnet14's widths (16/32/64): only the embedding's model name tells them apart
    with pytest.raises(NeurosemError, match="were made for resnet14, not the teacher resnet20"):
        T.load_teacher_vectors(vectors_resnet14, "resnet20", "resnet8", [16, 32, 64])
    vectors, layers, _ = T.load_teacher_vectors(vectors_resnet14, "zoo:resnet14", "resnet8", [16, 32, 64])
    assert [v.shape[0] for v in vectors] == [16, 32, 64]


def test_messages(tmp_path, cifar_root):
    with pytest.raises(DataError, match="cifar-100-python/"):
        T.distill(student="resnet8", method="ce", data=f"cifar100:{tmp_path / 'none'}", run=tmp_path / "r", **FAST)
    with pytest.raises(NeurosemError, match="--teacher-weights"):
        T.distill(teacher="resnet14", student="resnet8", method="kd", data=f"cifar100:{cifar_root}",
                  run=tmp_path / "r", **FAST)
    with pytest.raises(NeurosemError, match="no teacher vectors at"):
        T.distill(teacher="resnet14", student="resnet8", method="skd", data=f"cifar100:{cifar_root}",
                  run=tmp_path / "r", teacher_vectors=tmp_path / "nothing", **FAST)
    with pytest.raises(NeurosemError, match="did you mean"):
        T.distill(student="resnet8x5", method="ce", data=f"cifar100:{cifar_root}", **FAST)
    with pytest.raises(NeurosemError, match=r"unknown method 'crdd' \(did you mean crd"):
        T.distill(student="resnet8", method="crdd", data=f"cifar100:{cifar_root}", **FAST)


def test_progress_bars_do_not_change_the_results(tmp_path, cifar_root, monkeypatch):
    monkeypatch.delenv("NEUROSEM_NO_PROGRESS", raising=False)
    args = dict(student="resnet8", method="ce", data=f"cifar100:{cifar_root}", **{**FAST, "epochs": 1})
    quiet = T.distill(run=tmp_path / "quiet", **args)
    shown = T.distill(run=tmp_path / "shown", **{**args, "progress": True})
    assert quiet["history"]["train_loss"] == shown["history"]["train_loss"]


def test_cli_distill(tmp_path, cifar_root, capsys):
    from neurosem.cli import main

    main(["distill", "--student", "resnet8", "--method", "ce", "--data", f"cifar100:{cifar_root}",
          "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet",
          "--run", str(tmp_path / "cli")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "cli" / "distill.json").read_text())
    assert out["final_acc"] == saved["final_acc"] and out["results_path"] == saved["results_path"]


# ---------------------------------------------------------------- checkpoints from elsewhere

@pytest.fixture(scope="module")
def ce_run(tmp_path_factory, cifar_root):
    """A finished one-epoch run: (run directory, the distill arguments)."""
    run = tmp_path_factory.mktemp("ce") / "run"
    args = dict(student="resnet8", method="ce", data=f"cifar100:{cifar_root}", **{**FAST, "epochs": 1})
    T.distill(run=run, **args)
    return run, args


def _pickle_globals(path: Path) -> set:
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(data))
    return {arg.replace(" ", ".") if op.name == "GLOBAL" else f"{ops[i - 2][1]}.{ops[i - 1][1]}"
            for i, (op, arg, _) in enumerate(ops) if op.name in ("GLOBAL", "STACK_GLOBAL")}


def test_checkpoint_holds_tensors_and_plain_containers_only(ce_run):
    run, _ = ce_run
    names = _pickle_globals(run / "checkpoint.pt")
    assert "torch._utils._rebuild_tensor_v2" in names
    assert names <= {"torch._utils._rebuild_tensor_v2", "collections.OrderedDict", "torch.FloatStorage",
                     "torch.LongStorage", "torch.ByteStorage"}, names   # no numpy, no Counter
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["rng"]["numpy"]["keys"].dtype == torch.int64 and state["rng"]["numpy"]["keys"].shape == (624,)
    assert type(state["scheduler"]["milestones"]) is dict


def test_rng_state_round_trip():
    np.random.seed(11)
    np.random.standard_normal()      # leaves a cached gaussian in the state
    random_state = T._rng_state()
    want = (np.random.standard_normal(3), __import__("random").random(), torch.rand(2))
    np.random.seed(0)
    T._set_rng_state(random_state)
    got = (np.random.standard_normal(3), __import__("random").random(), torch.rand(2))
    assert np.array_equal(want[0], got[0]) and want[1] == got[1] and torch.equal(want[2], got[2])


class _Payload:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch '{self.marker}'",)


def _copy_run(ce_run, tmp_path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ce_run[0], run)
    return run


def test_planted_checkpoint_is_refused_without_running_it(tmp_path, ce_run):
    run = _copy_run(ce_run, tmp_path)
    ckpt, marker = run / "checkpoint.pt", tmp_path / "marker"
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "history": _Payload(marker)}, ckpt)
    with pytest.raises(NeurosemError) as err:
        T.distill(run=run, **ce_run[1])
    assert str(err.value) == (f"checkpoint {ckpt} holds objects other than tensors (posix.system), so it was "
                              "not loaded (unpickling them could run code); delete it to start the run afresh, "
                              "or pass another --run")
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)   # the old reader would have run it
    assert marker.exists()


@pytest.mark.parametrize("damage,expected", [
    ("text", "is a text file, not one written by torch.save;"),
    ("empty", "is empty;"),
    ("truncated", "is truncated or damaged (RuntimeError: PytorchStreamReader failed reading zip archive"),
    ("garbage", "is not a file written by torch.save (it starts with b'\\x00\\x01\\x02"),
    ("foreign", "is not a neurosem distill checkpoint (no epoch, model, optimizer, scheduler, history, rng);"),
    ("no model", "does not fit this run (RuntimeError: Error(s) in loading state_dict for CifarResNet: Missing key(s)"),
])
def test_damaged_checkpoint_is_one_line(tmp_path, ce_run, damage, expected):
    run = _copy_run(ce_run, tmp_path)
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    if damage == "text":
        ckpt.write_text("epoch 3\n")
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "truncated":
        ckpt.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(bytes(range(200)))
    elif damage == "foreign":
        torch.save({"config": torch.load(ckpt, weights_only=True)["config"]}, ckpt)
    else:
        torch.save({**torch.load(ckpt, weights_only=True), "model": {}}, ckpt)
    with pytest.raises(NeurosemError) as err:
        T.distill(run=run, **ce_run[1])
    msg = str(err.value)
    assert msg.startswith(f"checkpoint {ckpt} {expected}"), msg
    assert msg.endswith("; delete it to start the run afresh, or pass another --run") and "\n" not in msg


def test_cli_damaged_checkpoint_exits_2(tmp_path, ce_run, cifar_root, capsys):
    from neurosem.cli import main

    run = _copy_run(ce_run, tmp_path)
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--student", "resnet8", "--method", "ce", "--data", f"cifar100:{cifar_root}",
              "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet",
              "--run", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: checkpoint {run / 'checkpoint.pt'} is truncated or damaged (")


# ---------------------------------------------------------------------------------------------
# the new methods end to end, the resolved settings, the protocol defaults

@pytest.fixture(scope="module")
def teacher14(tmp_path_factory, cifar_root) -> str:
    out = T.train_teacher("resnet14", f"cifar100:{cifar_root}", run=tmp_path_factory.mktemp("t14") / "t",
                          epochs=1, batch_size=8, num_workers=0, progress=False, device="cpu")
    return out["weights_path"]


def test_crd_end_to_end_with_dataset_indices_and_resolved_settings(tmp_path, cifar_root, teacher14):
    out = T.distill(teacher="resnet14", student="resnet8", method="crd", data=f"cifar100:{cifar_root}",
                    run=tmp_path / "crd", teacher_weights=teacher14, nce_k=5, alpha=0.5,
                    **{**FAST, "epochs": 1, "protocol": None})
    cfg = json.loads((tmp_path / "crd" / "distill.json").read_text())["config"]
    assert cfg["protocol"] == "crd" and cfg["lr"] == 0.05            # CRD's protocol by default
    assert cfg["weights"] == {"ce": 1.0, "kd": 0.5, "beta": 0.8}
    assert cfg["options"] == {"kd_T": 4.0, "feat_dim": 128, "nce_k": 5, "nce_t": 0.07, "nce_m": 0.5}
    h = out["history"]
    np.testing.assert_allclose(h["train_loss"], np.array(h["train_ce"]) + 0.5 * np.array(h["train_kd"])
                               + 0.8 * np.array(h["train_crd"]), rtol=1e-5)
    ck = torch.load(out["checkpoint_path"], weights_only=True)
    bank = ck["criterion"]["contrast.memory_s"]
    assert bank.shape == (24, 128)
    # every training image's entry was written once (unit norm), the normalisers were set
    np.testing.assert_allclose(bank.norm(dim=1).numpy(), np.ones(24), rtol=1e-5)
    assert (ck["criterion"]["contrast.z"] > 0).all()


def test_ab_runs_its_initialisation_stage_and_resumes_after_it(tmp_path, cifar_root, teacher14, monkeypatch):
    args = dict(teacher="resnet14", student="resnet8", method="ab", data=f"cifar100:{cifar_root}",
                teacher_weights=teacher14, init_epochs=2, **{**FAST, "epochs": 1})
    full = T.distill(run=tmp_path / "full", **args)
    assert len(full["history"]["init_loss"]) == 2 and full["config"]["init_epochs"] == 2
    assert full["config"]["init_lr"] == 0.1                     # the main lr (paper protocol here)
    assert set(k for k in full["history"] if k.startswith("train_")) == {"train_loss", "train_acc", "train_ce"}
    # stop after the first initialisation epoch, then resume: the same final state
    import neurosem.distill.train as train_mod

    calls = {"n": 0}
    real = train_mod._init_epoch

    def stop_after_one(*a, **k):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "_init_epoch", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        T.distill(run=tmp_path / "cut", **args)
    monkeypatch.setattr(train_mod, "_init_epoch", real)
    assert len(json.loads((tmp_path / "cut" / "distill.json").read_text())["history"]["init_loss"]) == 1
    resumed = T.distill(run=tmp_path / "cut", **args)
    assert resumed["history"]["init_loss"] == full["history"]["init_loss"]
    assert resumed["history"]["train_loss"] == full["history"]["train_loss"]


def test_protocol_defaults_and_weight_options(tmp_path, cifar_root, teacher14):
    assert T.default_protocol("skd") == "paper" and T.default_protocol("skd-random") == "paper"
    assert all(T.default_protocol(m) == "crd" for m in ("ce", "kd", "crd", "fitnet", "ab"))
    assert T.protocol_lr("crd", "ShuffleV1") == 0.01 and T.protocol_lr("crd", "resnet8") == 0.05
    assert T.protocol_lr("paper", "ShuffleV1") == 0.1
    out = T.distill(teacher="resnet14", student="resnet8", method="kd", data=f"cifar100:{cifar_root}",
                    run=tmp_path / "kd", teacher_weights=teacher14, gamma=0.5, alpha=2.0, kd_T=2.0,
                    **{**FAST, "epochs": 1})
    assert out["config"]["weights"] == {"ce": 0.5, "kd": 2.0, "beta": 0.0}
    assert out["config"]["options"] == {"kd_T": 2.0}
    h = out["history"]
    np.testing.assert_allclose(h["train_loss"], 0.5 * np.array(h["train_ce"]) + 2.0 * np.array(h["train_kd"]), rtol=1e-5)
    fit = T.distill(teacher="resnet14", student="resnet8", method="fitnet", data=f"cifar100:{cifar_root}",
                    run=tmp_path / "fit", teacher_weights=teacher14, hint_layer=1, **{**FAST, "epochs": 1})
    assert fit["config"]["options"] == {"hint_layer": 1} and fit["config"]["student_layers"] == ["layer1"]
    with pytest.raises(NeurosemError, match=r"--hint-layer must be 0..3 for resnet8"):
        T.distill(teacher="resnet14", student="resnet8", method="fitnet", data=f"cifar100:{cifar_root}",
                  run=tmp_path / "bad", teacher_weights=teacher14, hint_layer=7, **FAST)
    with pytest.raises(NeurosemError, match=r"--method ce trains with cross-entropy alone"):
        D.resolve_weights("ce", None, "resnet8", alpha=0.5)
    with pytest.raises(NeurosemError, match=r"--gamma must be >= 0, got -1.0"):
        D.resolve_weights("kd", "resnet14", "resnet8", gamma=-1.0)
    with pytest.raises(NeurosemError, match=r"--alpha 0.5 \(the KD term\) runs a teacher"):
        T.distill(student="resnet8", method="skd-random", data=f"cifar100:{cifar_root}", run=tmp_path / "a",
                  alpha=0.5, **FAST)


def test_cli_seeds_run_each_seed_and_write_the_summary(tmp_path, cifar_root, capsys):
    from neurosem.cli import main

    base = ["distill", "--student", "resnet8", "--data", f"cifar100:{cifar_root}", "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet", "--seeds", "0,1"]
    main(base + ["--method", "ce", "--run", str(tmp_path / "resnet8-ce")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["runs"] == [str(tmp_path / "resnet8-ce" / "s0"), str(tmp_path / "resnet8-ce" / "s1")]
    saved = [json.loads((tmp_path / "resnet8-ce" / f"s{s}" / "distill.json").read_text()) for s in (0, 1)]
    assert [r["config"]["seed"] for r in saved] == [0, 1] and out["final_acc"] == [r["final_acc"] for r in saved]
    assert all(r["config"]["protocol"] == "crd" for r in saved)        # the default for every method but SKD
    row = next(csv.DictReader(open(tmp_path / "resnet8-ce" / "table.csv")))
    assert row["n"] == "2" and float(row["last_mean"]) == pytest.approx(np.mean(out["final_acc"]))
    # a second call resumes (nothing to train) and prints the same numbers
    main(base + ["--method", "ce", "--run", str(tmp_path / "resnet8-ce")])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["final_acc"] == out["final_acc"]


def test_the_sampler_is_passed_in_and_told_each_epoch(tmp_path, cifar_root):
    class Recording(torch.utils.data.Sampler):
        def __init__(self, n):
            self.n, self.epochs, self.seen = n, [], []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            order = list(range(self.n))[::-1][:8]      # the last 8 images, backwards
            self.seen.append(order)
            return iter(order)

        def __len__(self):
            return 8

    sampler = Recording(24)
    out = T.distill(student="resnet8", method="ce", data=f"cifar100:{cifar_root}", run=tmp_path / "s",
                    sampler=sampler, **FAST)
    assert sampler.epochs == [0, 1] and len(sampler.seen) == 2
    assert out["data"]["n_train"] == 24 and len(out["history"]["train_loss"]) == 2


def test_cli_bad_input_is_one_line(tmp_path, cifar_root, capsys):
    from neurosem.cli import main

    base = ["distill", "--student", "resnet8", "--data", f"cifar100:{cifar_root}", "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--quiet", "--run", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exc:
        main(base + ["--method", "crdd"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: unknown method 'crdd' (did you mean crd")
    with pytest.raises(SystemExit):
        main(base + ["--method", "ce", "--seeds", "0,x"])
    assert capsys.readouterr().err.strip() == "error: --seeds takes comma-separated integers such as 0,1,2, got '0,x'"
