"""neurosem: explain trained vision networks neuron by neuron.

The public API is re-exported here lazily, so ``import neurosem`` does not import torch. The stage
functions live in modules of the same name (``neurosem.record.record``,
``neurosem.dissect.dissect``, ``neurosem.embed.embed``, ``neurosem.distill.distill``,
``neurosem.quickstart.quickstart``): a
package attribute cannot be both the submodule and its function, so they are not re-exported here.

Example:
    >>> import neurosem
    >>> neurosem.parse_neuron("layer4:312")
    NeuronId(layer='layer4', index=312)
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # errors, ids, run directories, devices
    "NeurosemError": "neurosem.errors",
    "DataError": "neurosem.errors",
    "RunMismatchError": "neurosem.errors",
    "NeuronId": "neurosem.ids",
    "parse_neuron": "neurosem.ids",
    "RunDir": "neurosem.run",
    "resolve_run": "neurosem.run",
    "resolve_device": "neurosem._device",
    # models and recording
    "load_model": "neurosem.models",
    "list_layers": "neurosem.models",
    "Recorder": "neurosem.record",
    "ActivationStore": "neurosem.store",
    # data
    "BrodenDataset": "neurosem.data.broden",
    "write_synthetic_broden": "neurosem.data.synthetic",
    "open_image_dataset": "neurosem.data",
    # stages
    "load_dissection": "neurosem.dissect",
    "load_embedding": "neurosem.embed",
    "kl_curves": "neurosem.analysis.kl",
    "query": "neurosem.analysis.query",
    "make_figures": "neurosem.analysis.figures",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'neurosem' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
