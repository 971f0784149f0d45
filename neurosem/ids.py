"""Neuron ids: ``layer:index`` (``layer4:312``, ``layer4.1.conv2:7``), parsed here and only here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from neurosem.errors import NeurosemError


@dataclass(frozen=True, order=True)
class NeuronId:
    """One unit (channel) of one layer."""

    layer: str
    index: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.index}"


def parse_neuron(text: str) -> NeuronId:
    """Parse ``"layer4:312"`` into ``NeuronId("layer4", 312)``.

    The layer is everything before the last colon, so dotted module paths work.

    Example:
        >>> parse_neuron("layer4.1.conv2:7")
        NeuronId(layer='layer4.1.conv2', index=7)
    """
    raw = str(text).strip()
    layer, sep, index = raw.rpartition(":")
    if not sep or not layer or not index:
        raise NeurosemError(f"malformed neuron id {raw!r}: write LAYER:INDEX, e.g. layer4:312")
    try:
        value = int(index)
    except ValueError:
        raise NeurosemError(
            f"malformed neuron id {raw!r}: the index after ':' must be an integer, e.g. layer4:312") from None
    if value < 0:
        raise NeurosemError(f"malformed neuron id {raw!r}: the index must be >= 0")
    return NeuronId(layer, value)


def check_neuron(neuron: NeuronId, units_per_layer: Mapping[str, int], what: str = "the embedding") -> None:
    """Raise a one-line error when ``neuron`` names a layer or a unit that ``units_per_layer`` lacks."""
    if neuron.layer not in units_per_layer:
        known = ", ".join(units_per_layer) or "none"
        raise NeurosemError(f"layer {neuron.layer!r} of {neuron} is not in {what} (layers: {known})")
    n = units_per_layer[neuron.layer]
    if neuron.index >= n:
        raise NeurosemError(f"{neuron} is out of range: {neuron.layer} has {n} units (0..{n - 1})")


def closest_names(name: str, names: Iterable[str], n: int = 5) -> list[str]:
    """The valid names closest to a misspelt one, for "did you mean" messages."""
    import difflib

    names = list(names)
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.4)
    if not close:
        close = [m for m in names if name.split(".")[0] in m][:n]
    return close
