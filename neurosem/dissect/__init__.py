"""Network dissection (NetDissect with NetDissect-Lite's rules and an exact threshold).

``dissect()`` runs the stage on a run directory; ``load_dissection()`` reads ``dissect.h5`` back.
Submodules: ``quantile`` (exact streaming top quantile), ``tally`` (IoU), ``report`` (dissect.h5,
CSV, JSON, HTML, figure), ``run`` (the driver). torch is imported only when they are used.
"""
from __future__ import annotations

from typing import Any

__all__ = ["dissect", "load_dissection", "Dissection", "DissectionResult"]


def __getattr__(name: str) -> Any:
    if name == "dissect":
        from neurosem.dissect.run import dissect

        return dissect
    if name in ("load_dissection", "Dissection", "DissectionResult"):
        from neurosem.dissect import report

        return getattr(report, name)
    raise AttributeError(f"module 'neurosem.dissect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
