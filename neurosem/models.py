"""Model registry: torchvision names, the CIFAR zoo, user factories; weights; default layers.

``spec`` forms:

- a torchvision classification model name (``resnet18``, ``vgg16``, ``densenet121``, ...);
- a CIFAR zoo name (``resnet8x4``, ``wrn_40_2``, ... from :mod:`neurosem.distill.zoo`); a name
  that is both (e.g. ``vgg13``) means torchvision's: write ``zoo:vgg13`` for the CIFAR one
  (``tv:NAME`` forces torchvision);
- ``path/to/file.py:factory`` or ``package.module:factory``: ``factory()`` is called with no
  arguments and must return an ``nn.Module``;
- ``timm:NAME``: timm's ``create_model(NAME)`` (timm installed: the optional extra ``timm``).

``weights``: ``"default"`` (torchvision's DEFAULT weights, from the torch hub cache or downloaded;
for a user factory: the model as the factory built it), ``"none"`` (random initialisation, with a
loud warning) or a ``.pth``/``.pt`` file holding a state dict, or a checkpoint dict holding one
under ``state_dict``/``model``/``net``/``model_state_dict`` (``module.`` prefixes are stripped).

Default layers (the end of each block/stage), by the first rule that applies:

0. torchvision ViT, Swin, ConvNeXt and timm models: :func:`family_default_layers` (every 3rd
   ViT block; the end of each Swin/ConvNeXt stage);
1. top-level children named ``layer1``, ``layer2``, ... (ResNet, ResNeXt, Wide ResNet): those;
2. a ``features`` container with dense blocks (DenseNet): each ``features.denseblockK``;
3. a ``features`` container with max-pooling (VGG, AlexNet, SqueezeNet): the module just before
   each ``MaxPool2d`` (the ReLU ending each conv stage, e.g. ``features.29`` = conv5_3 of vgg16),
   plus the last module of ``features`` when it is not a pool;
4. otherwise one forward pass on a dummy input gives every module's output size; the *trunk* is
   the top-level children, where an ``nn.Sequential`` of 3 or more children that output several
   spatial sizes is replaced by its children (recursively); in call order, the last trunk module at each spatial
   size is a stage end (1x1 outputs are skipped). MobileNet, EfficientNet, ConvNeXt, RegNet,
   MNASNet, Inception get their stage ends this way (sizes as the outputs are, channel-first);
5. fallback: every top-level child producing a 4-D output.
CIFAR zoo models use ``neurosem.distill.zoo.ALIGNED_LAYERS[name]``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from neurosem.errors import NeurosemError
from neurosem.ids import closest_names

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

# The CRD/RepDistiller statistics, the ones the zoo's training uses (one definition, in data.cifar),
# and ImageNet's (one definition, in data.transforms).
from neurosem.data.cifar import CIFAR100_MEAN, CIFAR100_STD  # noqa: E402
from neurosem.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
_STATE_KEYS = ("state_dict", "model", "net", "model_state_dict")


@dataclass
class LoadedModel:
    """A model ready to record: eval mode, on the CPU, with its normalisation and default layers.

    ``weights`` describes where the weights came from (it is part of a run's identity).
    """

    model: "nn.Module"
    spec: str
    weights: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: tuple[int, int, int] = (3, 224, 224)
    default_layers: list[str] = field(default_factory=list)


def load_model(spec: "str | nn.Module", weights: str = "default", num_classes: int | None = None,
               warn: bool = True) -> LoadedModel:
    """Build the model ``spec`` with ``weights`` (see the module docstring for both).

    ``spec`` may also be an ``nn.Module`` built in Python: it is used as it is (``weights`` must be
    ``"default"``), named ``<module.Class>`` and identified by the digest of its state dict.

    ``warn=False`` silences the random-weights warning (for listing layers, where it does not matter).

    Example:
        >>> lm = load_model("resnet18", weights="none")  # doctest: +SKIP
        >>> lm.default_layers
        ['layer1', 'layer2', 'layer3', 'layer4']
    """
    if not isinstance(spec, (str, Path)) and callable(getattr(spec, "named_modules", None)):
        return _load_module(spec, str(weights if weights is not None else "default").strip())
    spec = str(spec).strip()
    weights = str(weights if weights is not None else "default").strip()

    if spec.startswith("<") and spec.endswith(">"):
        raise NeurosemError(f"{spec} was a model given from Python (an nn.Module), which a name cannot rebuild: "
                            "pass the module itself again, e.g. neurosem.record.record(module, data, run=...)")

    if not spec:
        raise NeurosemError("empty model name: give a torchvision name (resnet18), a zoo name or file.py:factory")
    if spec.endswith(".py") and ":" not in spec:
        raise NeurosemError(f"model {spec}: name the function that builds it, e.g. {spec}:build")
    kind, _, bare = spec.partition(":")
    if kind in ("zoo", "cifar") and bare:
        zoo = _zoo()
        if zoo is None or bare not in zoo[0]:
            known = ", ".join(sorted(zoo[0])) if zoo else "none (neurosem.distill.zoo is not available)"
            raise NeurosemError(f"{bare!r} is not in the CIFAR zoo (models: {known})")
        lm = _load_zoo(bare, weights, num_classes, *zoo, warn=warn)
    elif kind in ("tv", "torchvision") and bare:
        lm = _load_torchvision(bare, weights, num_classes, warn)
    elif kind == "timm" and bare:
        lm = _load_timm(bare, weights, num_classes, warn)
    elif _is_factory_spec(spec):
        lm = _load_factory(spec, weights, warn)
    else:
        zoo = _zoo()
        if zoo is not None and spec in zoo[0] and not _is_torchvision_name(spec):
            lm = _load_zoo(spec, weights, num_classes, *zoo, warn=warn)
        else:
            lm = _load_torchvision(spec, weights, num_classes, warn)
    lm.model.eval()
    return lm


# ---------------------------------------------------------------------- spec kinds
def _is_factory_spec(spec: str) -> bool:
    if ":" not in spec:
        return False
    left, _, right = spec.rpartition(":")
    return bool(left) and bool(right) and (left.endswith(".py") or "/" in left or "\\" in left
                                          or left.replace(".", "").replace("_", "").isalnum())


def _zoo() -> "tuple[dict[str, Any], dict[str, list[str]]] | None":
    try:
        mod = importlib.import_module("neurosem.distill.zoo")
    except ImportError:
        return None
    z = getattr(mod, "ZOO", None)
    if not isinstance(z, dict):
        return None
    return z, dict(getattr(mod, "ALIGNED_LAYERS", {}) or {})


def _is_torchvision_name(name: str) -> bool:
    try:
        tv = _import_torchvision()
    except NeurosemError:
        return False
    return name in tv.models.list_models(module=tv.models)


def _import_torchvision() -> Any:
    try:
        import torchvision
        import torchvision.models  # noqa: F401
    except Exception as exc:  # ImportError, or RuntimeError from a torch/torchvision mismatch
        raise NeurosemError(
            f"torchvision does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "run `neurosem doctor` for the fix") from None
    return torchvision


def _warn_random(spec: str, warn: bool = True) -> None:
    if warn:
            print(f"WARNING: {spec} has RANDOM weights (--weights none): its units mean nothing; "
              "use this for tests only", file=sys.stderr)


# ---------------------------------------------------------------------- torchvision
def _load_torchvision(name: str, weights: str, num_classes: int | None, warn: bool = True) -> LoadedModel:
    tv = _import_torchvision()
    names = tv.models.list_models(module=tv.models)
    if name not in names:
        zoo = _zoo()
        candidates = list(names) + (list(zoo[0]) if zoo else [])
        close = closest_names(name, candidates)
        hint = f"closest: {', '.join(close)}" if close else "e.g. resnet18, vgg16, densenet121"
        raise NeurosemError(f"unknown model {name!r} ({hint}); "
                            "or give your own model as path/to/file.py:factory")
    wenum = tv.models.get_model_weights(name)
    default_w = getattr(wenum, "DEFAULT", None)
    mean, std, input_size = _weights_transform(default_w)
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if weights == "default":
        if default_w is None:
            raise NeurosemError(f"torchvision has no pretrained weights for {name}: use --weights FILE or none")
        if num_classes is not None and num_classes != len(default_w.meta.get("categories", [])):
            raise NeurosemError(f"num_classes={num_classes} does not fit {default_w} "
                                f"({len(default_w.meta.get('categories', []))} classes): use --weights FILE or none")
        model = _torchvision_pretrained(tv, name, default_w)
        desc = f"torchvision:{default_w}"
    elif weights == "none":
        with _seeded():  # the same random weights every time: a resumed recording stays one model
            model = tv.models.get_model(name, weights=None, **kwargs)
        _warn_random(name, warn)
        desc = "none"
    else:
        model = tv.models.get_model(name, weights=None, **kwargs)
        try:
            desc = load_weights_file(model, weights)
        except NeurosemError as exc:
            zoo = _zoo()
            if zoo is None or name not in zoo[0]:
                raise
            raise NeurosemError(f"{exc} (this is torchvision's {name}; for the CIFAR zoo model write "
                                f"MODEL as zoo:{name})") from None
    model.eval()
    return LoadedModel(model=model, spec=name, weights=desc, mean=mean, std=std, input_size=input_size,
                       default_layers=default_layers(model, input_size))


def _weights_transform(w: Any) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, int, int]]:
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    if w is not None:
        try:
            t = w.transforms()
            mean = tuple(float(v) for v in t.mean)
            std = tuple(float(v) for v in t.std)
            crop = getattr(t, "crop_size", None)
            if crop:
                size = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
        except Exception:  # a transform without mean/std: keep the ImageNet statistics
            pass
    return mean, std, (3, size, size)


def weights_cache_dir() -> Path:
    """Where torchvision keeps downloaded weights: ``torch.hub.get_dir()/checkpoints``.

    Example:
        >>> weights_cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/torch/hub/checkpoints')
    """
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_pretrained(tv: Any, name: str, w: Any) -> "nn.Module":
    fname = w.url.rsplit("/", 1)[-1]
    cache = weights_cache_dir()
    cached = (cache / fname).is_file()
    if cached:
        # torchvision reads the cached file with torch.load(weights_only=False): a planted file
        # there would run code. Read it tensors-only first; only a clean file reaches torchvision.
        from neurosem._torchfile import load_tensors

        load_tensors(cache / fname, "cached weights file",
                     "delete it so it is downloaded again, or pass --weights FILE")
    try:
        if cached:
            return tv.models.get_model(name, weights=w)
        from neurosem._download import HeldDownloadLine

        with HeldDownloadLine().active():
            return tv.models.get_model(name, weights=w)  # downloads into the cache
    except Exception as exc:
        if cached:
            raise NeurosemError(
                f"the cached weights {cache / fname} do not load ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); delete the file so it is downloaded "
                "again, or pass --weights FILE") from None
        raise NeurosemError(
            f"default weights for {name} are not cached and could not be downloaded "
            f"({type(exc).__name__}); download {w.url} and put {fname} into {cache}/ "
            "(or pass --weights FILE, or --weights none for random weights)") from None


# ---------------------------------------------------------------------- weights files
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _few(keys: Sequence[str], n: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def extract_state_dict(obj: Any, source: str = "the checkpoint") -> "dict[str, torch.Tensor]":
    """The state dict inside a loaded checkpoint, with ``module.``/``_orig_mod.`` prefixes stripped.

    Accepts a plain state dict or a dict holding one under ``state_dict``/``model``/``net``/
    ``model_state_dict``.

    Example:
        >>> extract_state_dict({"state_dict": {"module.fc.weight": w}})  # doctest: +SKIP
        {'fc.weight': w}
    """
    import torch

    state = obj
    if isinstance(obj, dict) and not _all_tensors(obj):
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and _all_tensors(inner):
                state = inner
                break
            if isinstance(inner, torch.nn.Module):
                state = inner.state_dict()
                break
        else:
            raise NeurosemError(
                f"{source} holds no state dict (keys: {_few([str(k) for k in obj])}); save one with "
                "torch.save(model.state_dict(), path) or put it under 'state_dict'")
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict) or not state:
        raise NeurosemError(f"{source} holds no state dict ({type(obj).__name__}); "
                            "save one with torch.save(model.state_dict(), path)")
    out = {}
    for key, value in state.items():
        key = str(key)
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _all_tensors(d: dict) -> bool:
    import torch

    return all(isinstance(v, torch.Tensor) for v in d.values())


def load_weights_file(model: "nn.Module", path: "str | Path") -> str:
    """Load a ``.pth``/``.pt`` file into ``model`` (strictly); returns its description ``file:<path>#<sha>``.

    Example:
        >>> load_weights_file(model, "teacher.pth")  # doctest: +SKIP
        'file:/abs/teacher.pth#3f2a...'
    """
    from neurosem._torchfile import load_tensors

    p = Path(path).expanduser()
    if not p.is_file():
        raise NeurosemError(f"weights file {p} not found: --weights takes default, none or a .pth file")
    obj = load_tensors(p, "weights file", "pass a .pth written by torch.save(model.state_dict(), path)")
    state = extract_state_dict(obj, source=str(p))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches ({_few(wrong, 2)})")
        raise NeurosemError(f"weights file {p} does not fit the model: {'; '.join(parts)}; "
                            "check --model (and --num-classes) against the checkpoint")
    model.load_state_dict(state, strict=True)
    return f"file:{p.resolve()}#{_file_digest(p)}"


# ---------------------------------------------------------------------- CIFAR zoo
def _load_zoo(name: str, weights: str, num_classes: int | None, zoo: dict, aligned: dict,
              warn: bool = True) -> LoadedModel:
    n = 100 if num_classes is None else int(num_classes)
    with _seeded():  # deterministic initialisation, so "--weights none" names one model
        model = zoo[name](num_classes=n)
    if weights == "none":
        _warn_random(name, warn)
        desc = "none"
    elif weights == "default":
        raise NeurosemError(f"the CIFAR zoo model {name} has no default weights: pass --weights FILE.pth "
                            "(e.g. a trained teacher checkpoint) or --weights none")
    else:
        desc = load_weights_file(model, weights)
    model.eval()
    input_size = (3, 32, 32)
    layers = list(aligned.get(name) or default_layers(model, input_size))
    mean, std = (CIFAR100_MEAN, CIFAR100_STD)
    spec = f"zoo:{name}" if _is_torchvision_name(name) else name
    return LoadedModel(model=model, spec=spec, weights=desc, mean=mean, std=std,
                       input_size=input_size, default_layers=layers)


# ---------------------------------------------------------------------- user factories
def _load_factory(spec: str, weights: str, warn: bool = True) -> LoadedModel:
    import torch

    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise NeurosemError(f"model file {path} not found (from MODEL {spec}); give path/to/file.py:factory")
        mod_name = f"neurosem_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
        try:
            mod_spec = importlib.util.spec_from_file_location(mod_name, path)
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(f"cannot import {path}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_name] = module
            mod_spec.loader.exec_module(module)
        except NeurosemError:
            raise
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise NeurosemError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = _import_user_module(target)
        except ModuleNotFoundError as exc:
            raise NeurosemError(f"cannot import module {target!r} (from MODEL {spec}): {exc}; it is looked up "
                                "on PYTHONPATH and in the working directory; or give path/to/file.py:factory") from None
        except Exception as exc:
            raise NeurosemError(f"importing {target} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        close = closest_names(attr, names)
        what = "not callable" if factory is not None else "not defined"
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise NeurosemError(f"{attr!r} is {what} in {target}{hint}")
    try:
        model = factory()
    except Exception as exc:
        raise NeurosemError(f"{spec}: calling {attr}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise NeurosemError(f"{spec}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights == "default":
        # What the factory built (its own weights, or its own random init): identified by content,
        # so a changed factory is never mistaken for the recorded one.
        desc = f"factory#{state_digest(model)}"
        if warn:
            _warn_unseeded(spec, factory, desc)
    elif weights == "none":
        _reset_parameters(model)
        _warn_random(spec, warn)
        desc = "none"
    else:
        desc = load_weights_file(model, weights)
    model.eval()
    input_size, layers = _probe_layers(model)
    return LoadedModel(model=model, spec=spec, weights=desc, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       input_size=input_size, default_layers=layers)


def _import_user_module(target: str) -> Any:
    """``importlib.import_module(target)``, also finding modules of the working directory.

    The ``neurosem`` script does not put the working directory on ``sys.path`` (``python -m``
    does); it is appended (after the installed packages) when ``target`` is not found otherwise.
    """
    import os

    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        top = target.split(".", 1)[0]
        if exc.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(target)


def _warn_unseeded(spec: str, factory: Any, desc: str) -> None:
    """Warn when a second call of ``factory()`` builds other weights: a later stage could not rebuild the model."""
    try:
        again = factory()
        same = f"factory#{state_digest(again)}" == desc
    except Exception:  # the first call worked; a failing second one is not this check's business
        return
    if not same:
        print(f"WARNING: {spec} builds different weights on every call (an unseeded random init?): "
              "a later `dissect MODEL` or `embed MODEL` builds another model and refuses this run (give "
              "them --run alone); seed it inside the factory (torch.manual_seed(0)) or save its weights and "
              "pass --weights FILE", file=sys.stderr)


def _load_module(model: "nn.Module", weights: str) -> LoadedModel:
    """A LoadedModel for an ``nn.Module`` built in Python (used as it is, in eval mode)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise NeurosemError(f"a {type(model).__name__} is not a torch.nn.Module: pass a model name or a module")
    if weights != "default":
        raise NeurosemError(f"weights={weights!r} cannot be applied to a model given as a module: load the "
                            "weights into it first (model.load_state_dict(...)) and leave weights='default'")
    cls = type(model)
    model.eval()
    input_size, layers = _probe_layers(model)
    return LoadedModel(model=model, spec=f"<{cls.__module__}.{cls.__qualname__}>",
                       weights=f"module#{state_digest(model)}", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       input_size=input_size, default_layers=layers)


def _probe_layers(model: "nn.Module") -> tuple[tuple[int, int, int], list[str]]:
    """Input size and default layers of a user model: 224x224 (ImageNet), else 32x32 (CIFAR).

    A model that runs on neither gets no default layers (``record`` then asks for ``--layers``).
    """
    for size in ((3, 224, 224), (3, 32, 32)):
        try:
            return size, default_layers(model, size)
        except NeurosemError:
            continue
    return (3, 224, 224), []


def _reset_parameters(model: "nn.Module") -> None:
    with _seeded():
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """Run with torch's CPU generator seeded, restoring the caller's random state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def state_digest(model: "nn.Module") -> str:
    """16 hex digits of SHA-256 over a model's state dict (names, shapes, dtypes, values)."""
    import torch

    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- transformers, timm
def _every_third(blocks: list[str]) -> list[str]:
    """Blocks 3, 6, 9, ... (1-based) and the last block: ViT-B's 12 blocks give 2, 5, 8, 11 (0-based)."""
    picked = blocks[2::3]
    return picked + [blocks[-1]] if blocks and (not picked or picked[-1] != blocks[-1]) else picked


def family_default_layers(model: "nn.Module") -> list[str] | None:
    """Default layers of the transformer-era families, or None for any other model.

    - torchvision ``VisionTransformer``: every 3rd block of ``encoder.layers`` and the last
      (vit_b_16: ``encoder.layers.encoder_layer_2``, ``_5``, ``_8``, ``_11``);
    - torchvision ``SwinTransformer`` / ``ConvNeXt``: the end of each stage, ``features.1``,
      ``features.3``, ``features.5``, ``features.7`` (the odd children of ``features``; the even
      ones are the stem and the downsampling/patch-merging layers);
    - timm models: each child of ``stages`` (ConvNeXt and other staged nets) or ``layers`` (Swin);
      every 3rd block of ``blocks`` and the last for ViT-like models (those with prefix tokens).

    Example:
        >>> family_default_layers(torchvision.models.swin_t())  # doctest: +SKIP
        ['features.1', 'features.3', 'features.5', 'features.7']
    """
    from torch import nn

    containers = (nn.Sequential, nn.ModuleList)
    cls, where = type(model).__name__, type(model).__module__

    def kids(prefix: str, mod: Any) -> list[str]:
        return [f"{prefix}.{n}" for n, _ in mod.named_children()] if isinstance(mod, containers) else []

    if where.startswith("torchvision.models"):
        if cls == "VisionTransformer":
            return _every_third(kids("encoder.layers", getattr(model.encoder, "layers", None))) or None
        if cls in ("SwinTransformer", "ConvNeXt"):
            return kids("features", getattr(model, "features", None))[1::2] or None
        return None
    if where.startswith("timm."):
        for attr in ("stages", "layers"):
            names = kids(attr, getattr(model, attr, None))
            if names:
                return names
        if hasattr(model, "num_prefix_tokens"):
            return _every_third(kids("blocks", getattr(model, "blocks", None))) or None
    return None


def _load_timm(name: str, weights: str, num_classes: int | None, warn: bool = True) -> LoadedModel:
    """``timm:NAME``: built by timm's own ``create_model`` (timm is the optional extra ``neurosem[timm]``)."""
    try:
        import timm
    except ImportError:
        raise NeurosemError(f"timm:{name} needs timm, which is not installed: pip install 'neurosem[timm]' "
                            "(or pip install timm)") from None
    names = timm.list_models()
    if name not in names:
        close = closest_names(name, names)
        hint = f"closest: {', '.join(close)}" if close else "list them with timm.list_models()"
        raise NeurosemError(f"unknown timm model {name!r} ({hint})")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": int(num_classes)}
    if weights == "default":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:
            raise NeurosemError(
                f"default weights for timm:{name} are not cached and could not be downloaded "
                f"({type(exc).__name__}); put them into timm's cache, or pass --weights FILE, "
                "or --weights none for random weights") from None
        tag = getattr(model, "pretrained_cfg", {}) or {}
        desc = f"timm:{name}.{tag.get('tag') or 'default'}"
    elif weights == "none":
        with _seeded():  # the same random weights every time
            model = timm.create_model(name, pretrained=False, **kwargs)
        _warn_random(f"timm:{name}", warn)
        desc = "none"
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        desc = load_weights_file(model, weights)
    model.eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    size = cfg.get("input_size", (3, 224, 224))
    input_size = (3, int(size[-2]), int(size[-1]))
    return LoadedModel(model=model, spec=f"timm:{name}", weights=desc, mean=mean, std=std,
                       input_size=input_size, default_layers=default_layers(model, input_size))


# ---------------------------------------------------------------------- layers
def _first_tensor(out: Any) -> "torch.Tensor | None":
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for v in out:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(out, dict):
        for v in out.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _trace_shapes(model: "nn.Module", input_size: Sequence[int],
                  modules: "dict[str, nn.Module]") -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch) of the first call of each module, in call order."""
    import torch

    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook_for(name: str):
        def hook(_m: Any, _inp: Any, out: Any) -> None:
            t = _first_tensor(out)
            if t is not None and name not in shapes:
                shapes[name] = tuple(int(v) for v in t.shape[1:])
        return hook

    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(hook_for(name)))
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        gen = torch.Generator().manual_seed(0)
        x = torch.rand((1, *[int(v) for v in input_size]), generator=gen).to(device=device, dtype=dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                model(x)
        except Exception as exc:
            raise NeurosemError(
                f"a forward pass on a dummy input of size {tuple(input_size)} failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass another input size") from None
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return shapes


def list_layers(model: "nn.Module", input_size: Sequence[int] = (3, 224, 224)) -> list[tuple[str, tuple[int, ...]]]:
    """Every named module with a tensor output and its output shape (without the batch dimension).

    One forward pass on a dummy ``[1, *input_size]`` input; modules that do not run are left out;
    a module called twice reports its first call. Order: ``named_modules()``.

    Example:
        >>> list_layers(resnet18, (3, 64, 64))[:2]  # doctest: +SKIP
        [('conv1', (64, 32, 32)), ('bn1', (64, 32, 32))]
    """
    named = {n: m for n, m in model.named_modules() if n}
    shapes = _trace_shapes(model, input_size, named)
    return [(n, shapes[n]) for n in named if n in shapes]


def check_layers(model: "nn.Module", layers: Sequence[str]) -> list[str]:
    """Raise a one-line error for an unknown or repeated layer name; returns the names as a list.

    Example:
        >>> check_layers(resnet18, ["layer5"])  # doctest: +SKIP
        NeurosemError: unknown layer 'layer5'; closest: layer1, layer2, ...
    """
    layers = [str(x) for x in layers]
    if not layers:
        raise NeurosemError("no layers given: pass --layers NAME[,NAME...] (list them with `neurosem layers MODEL`)")
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    from neurosem.adapters import module_name

    for layer in layers:
        if module_name(layer) not in known:
            close = closest_names(layer, names)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(names[:5])}"
            raise NeurosemError(f"unknown layer {layer!r} ({hint}); list all with `neurosem layers MODEL`")
    seen: set[str] = set()
    for layer in layers:
        if layer in seen:
            raise NeurosemError(f"layer {layer!r} is given twice in --layers")
        seen.add(layer)
    return layers


def default_layers(model: "nn.Module", input_size: Sequence[int] = (3, 224, 224)) -> list[str]:
    """The end of each block/stage, by the rules in the module docstring.

    Example:
        >>> default_layers(torchvision.models.resnet18())  # doctest: +SKIP
        ['layer1', 'layer2', 'layer3', 'layer4']
    """
    from torch import nn

    family = family_default_layers(model)
    if family:
        return family
    children = dict(model.named_children())
    stages = [n for n in children if n.startswith("layer") and n[5:].isdigit()]
    if stages:
        return sorted(stages, key=lambda n: int(n[5:]))
    features = children.get("features")
    if isinstance(features, nn.Module):
        feats = list(features.named_children())
        dense = [n for n, _ in feats if n.startswith("denseblock")]
        if dense:
            return [f"features.{n}" for n in dense]
        pools = [i for i, (_, m) in enumerate(feats) if isinstance(m, nn.MaxPool2d) and i > 0]
        if pools:
            ends = [f"features.{feats[i - 1][0]}" for i in pools]
            if not isinstance(feats[-1][1], nn.MaxPool2d):
                ends.append(f"features.{feats[-1][0]}")
            return ends
    named = dict(model.named_modules())
    shapes = _trace_shapes(model, input_size, {n: m for n, m in named.items() if n})
    order = {n: i for i, n in enumerate(shapes)}

    def sizes(names: list[str]) -> set:
        return {shapes[n][1:] for n in names if len(shapes.get(n, ())) == 3}

    def expand(names: list[str]) -> list[str]:
        out: list[str] = []
        for name in names:
            kids = [f"{name}.{k}" for k, _ in named[name].named_children()]
            seq = isinstance(named[name], nn.Sequential) and len(kids) >= 3
            out.extend(expand(kids) if seq and len(sizes(kids)) > 1 else [name])
        return out

    trunk = sorted((n for n in expand(list(children)) if len(shapes.get(n, ())) == 3), key=order.__getitem__)
    ends: list[str] = []
    for i, name in enumerate(trunk):
        size = shapes[name][1:]
        nxt = shapes[trunk[i + 1]][1:] if i + 1 < len(trunk) else None
        if size != (1, 1) and nxt != size:
            ends.append(name)
    if ends:
        return ends
    fallback = [n for n in children if len(shapes.get(n, ())) == 3]
    if not fallback:
        raise NeurosemError("cannot choose default layers (no module gives (C, H, W) maps): pass --layers "
                            "(see `neurosem layers MODEL`)")
    return fallback


def layer_table(model: str, input_size: "int | Sequence[int] | None" = None, weights: str = "none",
                as_json: bool = False, tokens: int | None = None) -> str:
    """``neurosem layers``: every layer of ``model`` with its output shape; defaults marked ``*``.

    An output that is not ``C x H x W`` maps is followed by ``-> C x H x W (adapter)``, the unit
    maps it gives (see :mod:`neurosem.adapters`; ``tokens``: extra tokens, None: detected), or by
    ``-> no maps (...)``; JSON: ``maps`` per layer.

    ``input_size``: the side of a square input (or ``(3, H, W)``); None: the model's own
    (224 for ImageNet models, 32 for the CIFAR zoo). When the model does not run at the size asked
    for, its own size is used and a note says so on stderr.

    Example:
        >>> print(layer_table("resnet18", 64))  # doctest: +SKIP
        resnet18 (input 3x64x64; * = default layers)
          conv1            64 x 32 x 32
        ...
        * layer4           512 x 2 x 2
    """
    import json

    lm = load_model(model, weights, warn=False)
    if input_size is None:
        size = tuple(lm.input_size)
    elif isinstance(input_size, int):
        size = (3, int(input_size), int(input_size))
    else:
        size = tuple(int(v) for v in input_size)
        size = size if len(size) == 3 else (3, *size[-2:])
    try:
        rows = list_layers(lm.model, size)
    except NeurosemError:
        if size == tuple(lm.input_size):
            raise
        print(f"note: {model} does not run on a {size[1]}x{size[2]} input; listing at its own size "
              f"{lm.input_size[1]}x{lm.input_size[2]}", file=sys.stderr)
        size = tuple(lm.input_size)
        rows = list_layers(lm.model, size)
    defaults = set(lm.default_layers)
    maps = _map_notes(lm.model, size, tokens)
    if as_json:
        return json.dumps({"model": lm.spec, "input_size": list(size),
                           "layers": [{"name": n, "shape": list(shp), "default": n in defaults} for n, shp in rows],
                           "maps": {n: maps[n][1] for n, _ in rows if n in maps}}, indent=2)
    width = max((len(n) for n, _ in rows), default=5)
    lines = [f"{lm.spec} (input {'x'.join(str(v) for v in size)}; * = default layers)"]
    for name, shape in rows:
        mark = "*" if name in defaults else " "
        lines.append(f"{mark} {name:<{width}}  {' x '.join(str(v) for v in shape)}{maps.get(name, ('',))[0]}")
    return "\n".join(lines)


def _map_notes(model: "nn.Module", size: Sequence[int], tokens: int | None) -> dict[str, tuple[str, Any]]:
    """Per module: the table's suffix (empty for plain ``C x H x W`` maps) and the JSON entry."""
    from neurosem.adapters import trace_maps

    out: dict[str, tuple[str, Any]] = {}
    for name, a in trace_maps(model, size, tokens).items():
        if isinstance(a, str):
            out[name] = (f"  -> no maps ({a})", {"map_shape": None, "adapter": a})
        else:
            plain = a.layout.kind == "channels_first" and not a.select
            text = "" if plain else f"  -> {' x '.join(str(v) for v in a.map_shape)} ({a.text()})"
            out[name] = (text, {"map_shape": list(a.map_shape), "adapter": a.describe()})
    return out
