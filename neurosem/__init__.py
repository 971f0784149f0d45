"""neurosem: explain trained vision networks neuron by neuron.

The public API is re-exported here lazily, so ``import neurosem`` does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "NeurosemError": "neurosem.errors",
    "NeuronId": "neurosem.ids",
    "parse_neuron": "neurosem.ids",
    "RunDir": "neurosem.run",
    "resolve_device": "neurosem._device",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'neurosem' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
