"""Which layers a model has and which are its defaults: forward-pass shape tracing, the
default stage ends (rules in :mod:`neurosem.models`), the transformer families' defaults.

Example:
    >>> default_layers(torchvision.models.resnet18())  # doctest: +SKIP
    ['layer1', 'layer2', 'layer3', 'layer4']
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from neurosem.errors import NeurosemError
from neurosem.ids import closest_names

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


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
