"""Model registry: specs, weights files, the torch hub cache, default layers, layer listing."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from neurosem.errors import NeurosemError
from neurosem.models import (IMAGENET_MEAN, state_digest, check_layers, default_layers, extract_state_dict, list_layers,
                             load_model)

PLANTED = Path(__file__).parent / "_planted.py"
sys.path.insert(0, str(Path(__file__).parent))
from _planted import SharedReLU, TinyCNN  # noqa: E402


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- user factories
def test_file_factory():
    lm = load_model(f"{PLANTED}:tiny_cnn")
    assert type(lm.model).__name__ == "TinyCNN" and not lm.model.training
    assert _same_params(lm.model, TinyCNN())
    assert lm.weights == f"factory#{state_digest(TinyCNN())}"
    assert lm.mean == IMAGENET_MEAN and lm.input_size == (3, 224, 224)
    assert lm.default_layers == ["layer1", "layer2"]  # children named layerN


def test_state_digest_tells_weights_apart_and_random_init_is_reproducible():
    a, b = TinyCNN(), TinyCNN()
    assert state_digest(a) == state_digest(b)          # deterministic init in the planted model
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert state_digest(a) != state_digest(b)
    # --weights none: the same random weights every time, and the caller's RNG is untouched
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = load_model("resnet8", weights="none", warn=False)
    assert torch.equal(torch.rand(3), expected)
    second = load_model("resnet8", weights="none", warn=False)
    assert _same_params(first.model, second.model)


def test_module_factory():
    lm = load_model("_planted:tiny_cnn")  # tests/ is on sys.path
    assert _same_params(lm.model, TinyCNN())


def test_factory_errors(tmp_path):
    with pytest.raises(NeurosemError, match="model file .*missing.py not found"):
        load_model(f"{tmp_path}/missing.py:make")
    with pytest.raises(NeurosemError, match=r"'tiny_cn' is not defined .*closest: tiny_cnn"):
        load_model(f"{PLANTED}:tiny_cn")
    with pytest.raises(NeurosemError, match=r"not_a_module\(\) returned str, not a torch.nn.Module"):
        load_model(f"{PLANTED}:not_a_module")
    with pytest.raises(NeurosemError, match="cannot import module 'no_such_pkg.models'"):
        load_model("no_such_pkg.models:make")
    broken = tmp_path / "broken.py"
    broken.write_text("raise ValueError('bad user code')\n")
    with pytest.raises(NeurosemError, match="importing .*broken.py failed: ValueError: bad user code"):
        load_model(f"{broken}:make")


def test_factory_for_a_32px_model(tmp_path):
    """A model whose classifier only fits 32x32 inputs: the probe falls back to 32x32."""
    src = tmp_path / "cifar_net.py"
    src.write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),\n"
        "                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))\n")
    lm = load_model(f"{src}:make")
    assert lm.input_size == (3, 32, 32) and lm.default_layers == ["1", "4"]


def test_factory_weights_none_reinitialises_loudly(capsys):
    lm = load_model(f"{PLANTED}:tiny_cnn", weights="none")
    assert lm.weights == "none"
    assert not _same_params(lm.model, TinyCNN())
    assert "RANDOM weights" in capsys.readouterr().err


# ---------------------------------------------------------------- weights files
def test_state_dict_file(tmp_path):
    src = TinyCNN(seed=3)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    lm = load_model(f"{PLANTED}:tiny_cnn", weights=str(path))
    assert _same_params(lm.model, src)
    assert lm.weights.startswith(f"file:{path.resolve()}#") and len(lm.weights.rsplit("#", 1)[1]) == 16


def test_checkpoint_with_state_dict_and_module_prefix(tmp_path):
    src = TinyCNN(seed=4)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "best_acc": 0.5,
                "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    lm = load_model(f"{PLANTED}:tiny_cnn", weights=str(path))
    assert _same_params(lm.model, src)
    # RepDistiller-style {'model': state_dict}
    torch.save({"model": src.state_dict(), "epoch": 1}, path)
    assert _same_params(load_model(f"{PLANTED}:tiny_cnn", weights=str(path)).model, src)


def test_extract_state_dict_rejects_dicts_without_one():
    with pytest.raises(NeurosemError, match="holds no state dict .*epoch"):
        extract_state_dict({"epoch": 3, "acc": 0.1})


def test_mismatched_weights_name_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(SharedReLU().state_dict(), path)
    with pytest.raises(NeurosemError) as err:
        load_model(f"{PLANTED}:tiny_cnn", weights=str(path))
    msg = str(err.value)
    assert "missing keys (conv1.weight" not in msg  # conv1 exists in both
    assert "bn1.weight" in msg and "unexpected keys (conv2.weight" in msg and "\n" not in msg
    torch.save(TinyCNN(num_classes=7).state_dict(), path)
    with pytest.raises(NeurosemError, match=r"shape mismatches \(fc.weight \(7, 8\) vs \(5, 8\)"):
        load_model(f"{PLANTED}:tiny_cnn", weights=str(path))
    with pytest.raises(NeurosemError, match="weights file .*nope.pth not found"):
        load_model(f"{PLANTED}:tiny_cnn", weights=str(tmp_path / "nope.pth"))


_FIX = "; pass a .pth written by torch.save(model.state_dict(), path)"


@pytest.mark.parametrize("content,reason", [
    (b"conv1.weight: 0.1 0.2\n", "is a text file, not one written by torch.save"),
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n....", "is not a file written by torch.save (it starts with b'\\x89PNG\\r\\n\\x1a\\n')"),
])
def test_weights_file_that_is_no_torch_file_is_one_line(tmp_path, content, reason):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(NeurosemError) as err:
        load_model(f"{PLANTED}:tiny_cnn", weights=str(path))
    assert str(err.value) == f"weights file {path} {reason}{_FIX}"


def test_truncated_weights_file_is_one_line(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(TinyCNN().state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(NeurosemError) as err:
        load_model(f"{PLANTED}:tiny_cnn", weights=str(path))
    msg = str(err.value)
    assert msg.startswith(f"weights file {path} is truncated or damaged (RuntimeError: ") and msg.endswith(_FIX)
    assert "\n" not in msg


class _Payload:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch '{self.marker}'",)


def test_weights_file_with_code_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "w.pth", tmp_path / "marker"
    torch.save({"state_dict": TinyCNN().state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(NeurosemError) as err:
        load_model(f"{PLANTED}:tiny_cnn", weights=str(path))
    assert str(err.value) == (f"weights file {path} holds objects other than tensors (posix.system), so it was "
                              f"not loaded (unpickling them could run code){_FIX}")
    assert not marker.exists()
    torch.load(path, weights_only=False)   # a plain torch.load would have run it
    assert marker.exists()
    torch.save(TinyCNN(), path)            # a whole pickled module: refused the same way
    with pytest.raises(NeurosemError, match=r"holds objects other than tensors \(_planted.TinyCNN\)"):
        load_model(f"{PLANTED}:tiny_cnn", weights=str(path))


def test_refusal_message_of_older_torch_releases_names_the_class(tmp_path, monkeypatch):
    import pickle

    path = tmp_path / "w.pth"
    torch.save(TinyCNN().state_dict(), path)

    def old_torch_load(*args, **kwargs):  # torch 2.0-2.3 phrase the refusal so
        raise pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` "
                                     "set to `False` will likely succeed.\n\nWeightsUnpickler error: "
                                     "Unsupported class posix.system")

    monkeypatch.setattr(torch, "load", old_torch_load)
    with pytest.raises(NeurosemError, match=r"holds objects other than tensors \(posix.system\), so"):
        load_model(f"{PLANTED}:tiny_cnn", weights=str(path))


# ---------------------------------------------------------------- torchvision
@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache and no network: a download attempt fails like offline."""
    import urllib.error

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "hub" / "checkpoints"


def test_torchvision_none_default_layers_and_warning(capsys):
    lm = load_model("resnet18", weights="none")
    assert lm.default_layers == ["layer1", "layer2", "layer3", "layer4"]
    assert lm.weights == "none" and lm.input_size == (3, 224, 224)
    assert lm.mean == (0.485, 0.456, 0.406) and lm.std == (0.229, 0.224, 0.225)
    assert "RANDOM weights" in capsys.readouterr().err


def test_default_weights_from_cache(hub_dir):
    import torchvision

    src = torchvision.models.resnet18()
    hub_dir.mkdir(parents=True)
    torch.save(src.state_dict(), hub_dir / "resnet18-f37072fd.pth")
    lm = load_model("resnet18")
    assert lm.weights == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert _same_params(lm.model, src)


def test_default_weights_missing_names_file_and_cache(hub_dir):
    with pytest.raises(NeurosemError) as err:
        load_model("resnet18")
    msg = str(err.value)
    assert "put resnet18-f37072fd.pth into" in msg and str(hub_dir) in msg and "\n" not in msg


def test_unknown_model_suggests_names():
    with pytest.raises(NeurosemError, match=r"unknown model 'resnet81' \(closest: .*resnet18"):
        load_model("resnet81", weights="none")


def test_torchvision_import_failure_points_to_doctor(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(NeurosemError, match="torchvision does not import .*neurosem doctor"):
        load_model("resnet18", weights="none")


def test_list_layers_resnet18_64px():
    import torchvision

    layers = dict(list_layers(torchvision.models.resnet18(), (3, 64, 64)))
    assert layers["conv1"] == (64, 32, 32)
    assert layers["maxpool"] == (64, 16, 16)
    assert layers["layer1"] == (64, 16, 16)
    assert layers["layer1.0.conv2"] == (64, 16, 16)
    assert layers["layer2"] == (128, 8, 8)
    assert layers["layer2.0.downsample"] == (128, 8, 8)
    assert layers["layer3"] == (256, 4, 4)
    assert layers["layer4"] == (512, 2, 2)
    assert layers["avgpool"] == (512, 1, 1)
    assert layers["fc"] == (1000,)
    assert "" not in layers and len(layers) == 67  # every named module of resnet18 runs


def test_check_layers_suggests_close_names():
    import torchvision

    m = torchvision.models.resnet18()
    assert check_layers(m, ["layer4", "layer1.0.conv1"]) == ["layer4", "layer1.0.conv1"]
    with pytest.raises(NeurosemError, match=r"unknown layer 'layr4' \(closest: layer4"):
        check_layers(m, ["layr4"])
    with pytest.raises(NeurosemError, match=r"'layer4.1.conv3' \(closest: layer4.1.conv2, layer4.1.conv1"):
        check_layers(m, ["layer4.1.conv3"])
    with pytest.raises(NeurosemError, match="given twice"):
        check_layers(m, ["layer4", "layer4"])


# ---------------------------------------------------------------- default-layer rules
def _vgg_like() -> nn.Module:
    m = nn.Module()
    m.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    m.forward = lambda x: m.features(x)
    return m


def test_default_layer_rules():
    assert default_layers(_vgg_like(), (3, 16, 16)) == ["features.1", "features.4", "features.7"]
    dense = nn.Module()
    dense.features = nn.Sequential()
    dense.features.add_module("conv0", nn.Conv2d(3, 4, 1))
    dense.features.add_module("denseblock1", nn.Identity())
    dense.features.add_module("denseblock2", nn.Identity())
    assert default_layers(dense) == ["features.denseblock1", "features.denseblock2"]
    # generic rule: an nn.Sequential trunk with several sizes is expanded
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert default_layers(net, (3, 8, 8)) == ["0.1", "0.3"]


def test_zoo_models_and_ambiguous_names(capsys):
    from neurosem.distill.zoo import ALIGNED_LAYERS

    lm = load_model("resnet8x4", weights="none")
    assert lm.default_layers == ALIGNED_LAYERS["resnet8x4"] and lm.input_size == (3, 32, 32)
    assert lm.spec == "resnet8x4"
    cifar = load_model("zoo:vgg13", weights="none")
    assert cifar.spec == "zoo:vgg13" and cifar.default_layers == ALIGNED_LAYERS["vgg13"]
    with pytest.raises(NeurosemError, match="no default weights"):
        load_model("resnet8x4")


def test_zoo_absent_is_handled(monkeypatch):
    monkeypatch.setitem(sys.modules, "neurosem.distill.zoo", None)
    with pytest.raises(NeurosemError, match="not in the CIFAR zoo .*not available"):
        load_model("zoo:resnet8x4", weights="none")
    with pytest.raises(NeurosemError, match="unknown model 'resnet8x4'"):
        load_model("resnet8x4", weights="none")


def test_layer_table(capsys):
    import json

    from neurosem.models import layer_table

    text = layer_table(f"{PLANTED}:tiny_cnn", 16, weights="none")
    lines = text.splitlines()
    assert lines[0] == f"{PLANTED}:tiny_cnn (input 3x16x16; * = default layers)"
    assert "* layer1    6 x 8 x 8" in lines and "  conv1     4 x 16 x 16" in lines and "  fc        5  -> no maps (1-D)" in lines
    assert "RANDOM" not in capsys.readouterr().err  # listing layers needs no warning
    data = json.loads(layer_table(f"{PLANTED}:tiny_cnn", (3, 8, 8), as_json=True))
    assert data["input_size"] == [3, 8, 8]
    assert {"name": "layer2", "shape": [8, 2, 2], "default": True} in data["layers"]


def test_a_model_file_without_factory_says_to_name_it():
    with pytest.raises(NeurosemError, match=r"model models/net.py: name the function that builds it, e.g. models/net.py:build"):
        load_model("models/net.py")


# ---------------------------------------------------------------- own models: import path, warnings, modules
def test_factory_module_in_the_working_directory(tmp_path, monkeypatch):
    """``neurosem layers mymodel:make`` from the folder holding mymodel.py (the script does not put
    the working directory on sys.path; ``python -m`` does)."""
    (tmp_path / "nsm_cwd_model.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "nsm_cwd_model", raising=False)
    lm = load_model("nsm_cwd_model:make")
    assert isinstance(lm.model, nn.Sequential) and sys.path[-1] == str(tmp_path)
    monkeypatch.delitem(sys.modules, "nsm_cwd_model", raising=False)
    with pytest.raises(NeurosemError, match=r"cannot import module 'nsm_nowhere_xyz' \(from MODEL "
                                            r"nsm_nowhere_xyz:make\): .*in the working directory"):
        load_model("nsm_nowhere_xyz:make")


def test_messages_name_MODEL_not_a_missing_option():
    with pytest.raises(NeurosemError) as err:
        load_model("nowhere/net.py:build")
    assert str(err.value) == "model file nowhere/net.py not found (from MODEL nowhere/net.py:build); " \
                             "give path/to/file.py:factory"
    import inspect

    import neurosem.models as models

    for fn in (models._load_factory, models._load_torchvision, models._import_user_module):
        assert "--model" not in inspect.getsource(fn)


def test_unseeded_factory_warns_at_load(tmp_path, capsys):
    path = tmp_path / "unseeded.py"
    path.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())\n")
    load_model(f"{path}:make")
    err = capsys.readouterr().err
    assert err.startswith(f"WARNING: {path}:make builds different weights on every call (an unseeded random init?)")
    assert "--weights FILE" in err and len(err.strip().splitlines()) == 1
    load_model(f"{path}:make", warn=False)                  # neurosem layers: no warning
    load_model(f"{PLANTED}:tiny_cnn")                        # a seeded factory: no warning
    assert capsys.readouterr().err == ""


def test_a_module_is_accepted_as_it_is(capsys):
    model = TinyCNN()
    lm = load_model(model)
    assert lm.model is model and not model.training
    assert lm.spec == f"<{TinyCNN.__module__}.TinyCNN>" and lm.weights == f"module#{state_digest(TinyCNN())}"
    assert lm.default_layers == ["layer1", "layer2"] and lm.input_size == (3, 224, 224)
    assert capsys.readouterr().err == ""
    with pytest.raises(NeurosemError, match=r"weights='none' cannot be applied to a model given as a module"):
        load_model(TinyCNN(), weights="none")
    with pytest.raises(NeurosemError) as err:
        load_model(lm.spec)
    assert str(err.value).startswith(f"{lm.spec} was a model given from Python (an nn.Module), which a name "
                                     "cannot rebuild: pass the module itself again")


def test_record_takes_a_module(tmp_path, tiny_broden, monkeypatch, capsys):
    from neurosem.record import record
    from neurosem.store import ActivationStore

    monkeypatch.chdir(tmp_path)
    path = record(TinyCNN(), str(tiny_broden), layers="layer2", progress=False)
    assert path == Path("runs/TinyCNN/activations.h5")
    with ActivationStore.open(path) as st:
        assert st.complete and st.shape("layer2") == (12, 8, 8, 8)
    assert "unknown model" not in capsys.readouterr().err


def test_factory_runs_are_named_by_their_file(tmp_path, tiny_broden, monkeypatch):
    from neurosem.record import record

    monkeypatch.chdir(tmp_path)
    path = record(f"{PLANTED}:tiny_cnn", str(tiny_broden), layers="layer1", progress=False)
    assert path == Path("runs/_planted/activations.h5")


def test_offline_download_shows_only_the_error(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(NeurosemError, match=r"default weights for resnet18 are not cached and could not be "
                                            r"downloaded \(URLError\)"):
        load_model("resnet18")
    out, err = capsys.readouterr()
    assert "Downloading" not in out + err


def test_download_line_goes_to_stderr_once_the_download_runs(capsys):
    from neurosem._download import HeldDownloadLine

    with HeldDownloadLine().active():
        sys.stdout.write('Downloading: "u" to f\n')
        assert capsys.readouterr() == ("", "")             # held back until the download shows progress
        sys.stderr.write("bar 10%")
        print("other output")
    assert capsys.readouterr() == ("other output\n", 'Downloading: "u" to f\nbar 10%')
    with HeldDownloadLine().active():                     # no progress at all: written at the end
        sys.stdout.write('Downloading: "u" to f\n')
    assert capsys.readouterr() == ("", 'Downloading: "u" to f\n')


def test_a_planted_file_in_the_torch_cache_is_refused_without_running_it(tmp_path, monkeypatch):
    """torchvision reads its cache with weights_only=False; neurosem checks the file tensors-only first."""
    import neurosem.models as models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = models.weights_cache_dir()
    cache.mkdir(parents=True)
    marker = tmp_path / "marker"
    torch.save({"fc.weight": torch.zeros(1), "x": _Payload(marker)}, cache / "resnet18-f37072fd.pth")
    with pytest.raises(NeurosemError, match=r"cached weights file .*resnet18-f37072fd.pth holds objects other "
                                            r"than tensors \(posix.system\)"):
        load_model("resnet18", weights="default")
    assert not marker.exists()
