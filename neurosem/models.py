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
    from torch import nn

# The CRD/RepDistiller statistics, the ones the zoo's training uses (one definition, in data.cifar),
# and ImageNet's (one definition, in data.transforms).
from neurosem.data.cifar import CIFAR100_MEAN, CIFAR100_STD  # noqa: E402
from neurosem.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from neurosem.layers import (_first_tensor, _trace_shapes, check_layers, default_layers,  # noqa: E402,F401 (re-exported)
                             family_default_layers, list_layers)
from neurosem.weights import _STATE_KEYS, _file_digest, extract_state_dict, load_weights_file  # noqa: E402,F401 (re-exported)


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


# ---------------------------------------------------------------------- timm
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
