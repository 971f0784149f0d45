"""Layer adapters: a layer's output -> unit maps ``[B, C, H, W]``.

Every recorded layer passes through one small, explicit adapter, chosen from the output itself:

- ``channels_first``: ``[B, C, H, W]`` as it is (CNNs; ConvNeXt stages);
- ``channels_last``: ``[B, H, W, C]`` permuted (Swin stages, the LayerNorm/Linear inside
  ConvNeXt blocks): a 4-D output whose dims 1, 2 follow the input's height and width while its
  dims 2, 3 do not;
- ``tokens``: ``[B, T, D]`` token sequences: the first ``extra`` (class, distillation, register)
  tokens are dropped and the remaining ``h * w`` patch tokens reshaped to ``[B, D, h, w]``, with
  ``h / w`` the input's aspect ratio (a square grid for a square input). ``extra`` is detected
  from the model (:func:`prefix_tokens`: timm's ``num_prefix_tokens``, else the size of
  parameters named ``class_token``/``cls_token``/``dist_token``/``reg_token``/
  ``register_tokens``; torchvision's ViT has 1) or given (``--tokens N``). A layer before the
  class token is prepended (a patch embedding) gives a grid without it.

A 4-D output that fits both layouts (``C`` equal to the spatial size, e.g. ``[B, 7, 7, 7]``) or
neither, or any 4-D output when the input size is unknown, is taken as channels-first.

Tuple/list and dict outputs: ``layer[index]`` / ``layer[key]`` picks one (chained:
``layer[0][out]``); a bare ``layer`` takes the first tensor found, as before.

Example:
    >>> import torch
    >>> a = choose_adapter("blocks.2", torch.zeros(2, 17, 16), input_hw=(32, 32), extra_tokens=1)
    >>> a.describe()["kind"], tuple(a.to_maps(torch.zeros(2, 17, 16)).shape)
    ('tokens', (2, 16, 4, 4))
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

from neurosem.errors import NeurosemError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: parameter names (last component) that hold extra, non-patch tokens: [1, n, D]
TOKEN_PARAMS = ("class_token", "cls_token", "dist_token", "reg_token", "register_tokens")

_NAME = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]+\])*)$")
_SELECTOR = re.compile(r"\[([^\[\]]+)\]")


class AdapterError(NeurosemError):
    """A layer's output cannot be turned into unit maps (one line naming the layer and the shape)."""


# ---------------------------------------------------------------------- layer names
@dataclass(frozen=True)
class LayerRef:
    """A layer name split into its module and the selectors after it: ``attn[0]`` -> ``("attn", (0,))``."""

    module: str
    select: tuple[Union[int, str], ...] = ()


def parse_layer(name: str) -> LayerRef:
    """Split ``module[index][key]...`` (integers are indices, anything else keys; quotes are stripped).

    Example:
        >>> parse_layer("encoder.layers.encoder_layer_1.self_attention[0]")
        LayerRef(module='encoder.layers.encoder_layer_1.self_attention', select=(0,))
    """
    m = _NAME.match(str(name).strip())
    if m is None:
        raise NeurosemError(f"malformed layer name {name!r}: write MODULE, MODULE[index] or MODULE[key]")
    select: list[Union[int, str]] = []
    for raw in _SELECTOR.findall(m.group(2)):
        text = raw.strip().strip("'\"")
        if not text or ":" in text or "," in text or "/" in text:
            raise NeurosemError(f"malformed selector [{raw}] in layer {name!r}: "
                                "an index or key holds no ':', ',' or '/'")
        select.append(int(text) if re.fullmatch(r"-?\d+", text) else text)
    return LayerRef(m.group(1).strip(), tuple(select))


def module_name(name: str) -> str:
    """The module part of a layer name: ``blocks.3[0]`` -> ``blocks.3``."""
    return parse_layer(name).module


def _batch_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(["B", *(str(int(v)) for v in shape[1:])]) + "]"


def _describe_output(out: Any) -> str:
    import torch

    if isinstance(out, torch.Tensor):
        return f"a tensor {_batch_shape(out.shape)}"
    if isinstance(out, (tuple, list)):
        parts = [_batch_shape(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in out]
        return f"a {type(out).__name__} of {len(out)} ({', '.join(parts)})"
    if isinstance(out, dict):
        return f"a dict with keys {', '.join(str(k) for k in out)}"
    return type(out).__name__


def select_output(layer: str, output: Any) -> "tuple[torch.Tensor, str]":
    """The tensor ``layer``'s selectors pick from ``output`` and how it was picked (``""``: it is the output).

    Raises:
        AdapterError: an index out of range, a missing key, a selector on a tensor, no tensor at all.
    """
    import torch

    from neurosem.models import _first_tensor

    ref = parse_layer(layer)
    value, how = output, []
    for sel in ref.select:
        if isinstance(value, (tuple, list)) and isinstance(sel, int):
            if not -len(value) <= sel < len(value):
                raise AdapterError(f"layer {layer!r}: index {sel} is out of range for its output, "
                                   f"{_describe_output(value)}; use {ref.module}[0]..{ref.module}[{len(value) - 1}]")
            value = value[sel]
        elif isinstance(value, dict):
            key = sel if sel in value else str(sel)
            if key not in value:
                raise AdapterError(f"layer {layer!r}: its output, {_describe_output(value)}, has no key {sel!r}")
            value = value[key]
        else:
            raise AdapterError(f"layer {layer!r}: [{sel}] cannot select from {_describe_output(value)}; "
                               f"{'use an integer index' if isinstance(value, (tuple, list)) else 'drop the selector'}")
        how.append(f"[{sel}]")
    if isinstance(value, torch.Tensor):
        return value, "".join(how)
    first = _first_tensor(value)
    if first is None:
        raise AdapterError(f"layer {layer!r} returned no tensor ({type(value).__name__}); record a different layer")
    return first, "".join(how) + f" first tensor of {_describe_output(value)}"


# ---------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class ChannelsFirst:
    """``[B, C, H, W]`` unchanged."""

    shape: tuple[int, ...]  # (C, H, W)
    kind = "channels_first"

    def to_maps(self, t: "torch.Tensor") -> "torch.Tensor":
        """``t: [B, C, H, W]`` -> the same tensor."""
        return t

    @property
    def map_shape(self) -> tuple[int, int, int]:
        c, h, w = self.shape
        return (c, h, w)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class ChannelsLast:
    """``[B, H, W, C]`` -> ``[B, C, H, W]``."""

    shape: tuple[int, ...]  # (H, W, C)
    kind = "channels_last"

    def to_maps(self, t: "torch.Tensor") -> "torch.Tensor":
        """``t: [B, H, W, C]`` -> ``[B, C, H, W]`` (contiguous)."""
        return t.permute(0, 3, 1, 2).contiguous()

    @property
    def map_shape(self) -> tuple[int, int, int]:
        h, w, c = self.shape
        return (c, h, w)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "permute": [0, 3, 1, 2]}


@dataclass(frozen=True)
class TokenGrid:
    """``[B, T, D]`` with ``T = extra + h * w`` -> the patch tokens as ``[B, D, h, w]`` (row-major grid)."""

    shape: tuple[int, ...]  # (T, D)
    extra: int
    grid: tuple[int, int]  # (h, w)
    kind = "tokens"

    def to_maps(self, t: "torch.Tensor") -> "torch.Tensor":
        """``t: [B, T, D]`` -> ``[B, D, h, w]``: token ``extra + r * w + c`` is pixel ``(r, c)``."""
        h, w = self.grid
        return t[:, self.extra:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2).contiguous()

    @property
    def map_shape(self) -> tuple[int, int, int]:
        return (int(self.shape[1]), *self.grid)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "extra_tokens": self.extra, "grid": list(self.grid)}


Layout = Union[ChannelsFirst, ChannelsLast, TokenGrid]


@dataclass(frozen=True)
class LayerAdapter:
    """How one layer's output becomes unit maps: the selection, then the layout."""

    layer: str
    select: str
    layout: Layout

    def to_maps(self, t: "torch.Tensor") -> "torch.Tensor":
        """The selected tensor (``[B, C, H, W]``, ``[B, H, W, C]`` or ``[B, T, D]``) -> ``[B, C, H, W]``."""
        return self.layout.to_maps(t)

    @property
    def map_shape(self) -> tuple[int, int, int]:
        return self.layout.map_shape

    def describe(self) -> dict[str, Any]:
        """For the provenance: kind, input shape (without the batch), map shape and the selection."""
        out = {**self.layout.describe(), "output_shape": list(self.layout.shape), "map_shape": list(self.map_shape)}
        if self.select:
            out["select"] = self.select.strip()
        return out

    def text(self) -> str:
        """One short phrase for tables: ``tokens: 1 extra + 4x4 grid``."""
        lay = self.layout
        if isinstance(lay, TokenGrid):
            body = f"tokens: {lay.extra} extra + {lay.grid[0]}x{lay.grid[1]} grid"
        else:
            body = lay.kind.replace("_", "-")
        return f"{self.select.strip()}; {body}" if self.select else body


def _follows(h: int, w: int, hw: tuple[int, int]) -> bool:
    """Whether an ``h x w`` grid is the input ``H x W`` downsampled by one stride (up to rounding)."""
    big_h, big_w = hw
    return 1 <= h <= big_h and 1 <= w <= big_w and abs(h * big_w - w * big_h) <= max(big_h, big_w)


def _token_grid(n: int, hw: "tuple[int, int] | None") -> "tuple[int, int] | None":
    """``(h, w)`` with ``h * w = n`` and ``h / w`` the input's aspect ratio (square without an input)."""
    if n < 1:
        return None
    big_h, big_w = hw if hw is not None else (1, 1)
    h = max(1, round(math.sqrt(n * big_h / big_w)))
    for cand in (h, h - 1, h + 1):
        if cand >= 1 and n % cand == 0:
            w = n // cand
            if (hw is None and cand == w) or (hw is not None and _follows(cand, w, hw)):
                return cand, w
    return None


def choose_layout(layer: str, t: "torch.Tensor", input_hw: "tuple[int, int] | None" = None,
                  extra_tokens: "int | None" = 0, tokens_given: bool = False) -> Layout:
    """The layout of ``t`` (see the module docstring).

    Args:
        layer: the layer name, for messages.
        t: ``[B, C, H, W]``, ``[B, H, W, C]`` or ``[B, T, D]``.
        input_hw: the model input's ``(H, W)``; None when unknown.
        extra_tokens: the class/register tokens before the patch tokens.
        tokens_given: ``extra_tokens`` came from ``--tokens`` (then only that count is tried).

    Raises:
        AdapterError: not 3-D or 4-D, or a token count that is not ``extra + h * w``.
    """
    shape = tuple(int(v) for v in t.shape[1:])
    if t.dim() == 4:
        cf = input_hw is not None and _follows(shape[1], shape[2], input_hw)
        cl = input_hw is not None and _follows(shape[0], shape[1], input_hw)
        return ChannelsLast(shape) if cl and not cf else ChannelsFirst(shape)
    if t.dim() == 3:
        extra = int(extra_tokens or 0)
        counts = [extra] if tokens_given or extra == 0 else [extra, 0]
        for k in counts:
            grid = _token_grid(shape[0] - k, input_hw)
            if grid is not None:
                return TokenGrid(shape, k, grid)
        size = f" for a {input_hw[0]}x{input_hw[1]} input" if input_hw is not None else ""
        how = "given by --tokens" if tokens_given else "detected from the model"
        raise AdapterError(
            f"layer {layer!r} gives tokens {_batch_shape(t.shape)}: {shape[0]} tokens are not {extra} extra "
            f"(class/register) token(s) ({how}) + a patch grid{size}; pass --tokens N with the number of "
            "extra tokens, or choose another layer")
    raise AdapterError(
        f"layer {layer!r} gives {t.dim()}-D outputs {_batch_shape(t.shape)}, not unit maps: choose a layer "
        "with [B, C, H, W], [B, H, W, C] or [B, T, D] outputs (see `neurosem layers MODEL`)")


def choose_adapter(layer: str, output: Any, input_hw: "tuple[int, int] | None" = None,
                   extra_tokens: "int | None" = 0, tokens_given: bool = False) -> LayerAdapter:
    """The adapter for ``layer`` given one of its outputs (a tensor, tuple, list or dict).

    Example:
        >>> choose_adapter("features.1", torch.zeros(1, 8, 8, 12), input_hw=(32, 32)).text()  # doctest: +SKIP
        'channels-last'
    """
    t, how = select_output(layer, output)
    return LayerAdapter(layer, how, choose_layout(layer, t, input_hw, extra_tokens, tokens_given))


# ---------------------------------------------------------------------- per model
def prefix_tokens(model: "nn.Module") -> int:
    """Extra (non-patch) tokens of a transformer: timm's ``num_prefix_tokens``, else :data:`TOKEN_PARAMS`.

    Example:
        >>> prefix_tokens(torchvision.models.vit_b_16())  # doctest: +SKIP
        1
    """
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
        return n
    total = 0
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in TOKEN_PARAMS and p.dim() == 3 and p.shape[0] == 1:
            total += int(p.shape[1])
    return total


def input_hw(args: Sequence[Any]) -> "tuple[int, int] | None":
    """``(H, W)`` of the first ``[B, C, H, W]`` tensor among a forward call's arguments."""
    import torch

    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 4:
            return int(a.shape[2]), int(a.shape[3])
    return None


class LayerMaps:
    """The adapters of one model's layers; used by :class:`neurosem.record.Recorder`.

    Call :meth:`new_pass` with the model's forward arguments (it notes the input size), then
    :meth:`to_maps` in each layer's hook. ``tokens``: the number of extra tokens (None: detect).
    """

    def __init__(self, model: "nn.Module", layers: Sequence[str], tokens: "int | None" = None) -> None:
        if tokens is not None and int(tokens) < 0:
            raise NeurosemError(f"--tokens must be >= 0, got {tokens}")
        self.tokens_given = tokens is not None
        self.extra = int(tokens) if tokens is not None else prefix_tokens(model)
        self.layers = list(layers)
        self.input_hw: "tuple[int, int] | None" = None
        self.chosen: dict[str, LayerAdapter] = {}

    def new_pass(self, args: Sequence[Any] = ()) -> None:
        """Note the input size of a forward pass (``args``: the model's positional arguments)."""
        hw = input_hw(args)
        if hw is not None:
            self.input_hw = hw

    def to_maps(self, layer: str, output: Any) -> "torch.Tensor":
        """``output`` of ``layer`` -> ``[B, C, H, W]``; the adapter used is kept in :attr:`chosen`."""
        t, how = select_output(layer, output)
        adapter = LayerAdapter(layer, how, choose_layout(layer, t, self.input_hw, self.extra, self.tokens_given))
        self.chosen[layer] = adapter
        return adapter.to_maps(t)

    def describe(self) -> dict[str, dict[str, Any]]:
        """``{layer: adapter.describe()}`` for the layers seen so far (for the provenance)."""
        return {name: self.chosen[name].describe() for name in self.layers if name in self.chosen}


def trace_maps(model: "nn.Module", input_size: Sequence[int], tokens: "int | None" = None
               ) -> dict[str, "LayerAdapter | str"]:
    """For every named module that runs: its adapter, or why it gives no maps (a short reason).

    One forward pass on a dummy ``[1, *input_size]`` input (a module called twice: its first call).

    Example:
        >>> trace_maps(vit, (3, 32, 32))["encoder.layers.encoder_layer_0"].map_shape  # doctest: +SKIP
        (16, 4, 4)
    """
    import torch

    maps = LayerMaps(model, [], tokens)
    maps.input_hw = (int(input_size[-2]), int(input_size[-1]))
    found: dict[str, "LayerAdapter | str"] = {}

    def hook_for(name: str) -> Any:
        def hook(_m: Any, _inp: Any, out: Any) -> None:
            if name in found:
                return
            try:
                found[name] = choose_adapter(name, out, maps.input_hw, maps.extra, maps.tokens_given)
            except AdapterError as exc:
                t = out if isinstance(out, torch.Tensor) else None
                found[name] = f"{t.dim() - 1}-D" if t is not None and t.dim() not in (3, 4) else _reason(exc)
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if n]
    try:
        param = next(iter(model.parameters()), None)
        x = torch.rand((1, *[int(v) for v in input_size]), generator=torch.Generator().manual_seed(0))
        if param is not None:
            x = x.to(param.device, param.dtype if param.is_floating_point() else torch.float32)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                model(x)
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return found


def _reason(exc: AdapterError) -> str:
    text = str(exc)
    if "tokens" in text and "are not" in text:
        return "tokens not extra + grid"
    return "no tensor" if "no tensor" in text else "not maps"
