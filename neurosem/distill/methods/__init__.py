"""The registry of distillation methods: one name -> one :class:`~.base.Method` subclass.

One registry and one factory (as timm's models): :func:`register` adds a class under its
``name``, :func:`get` finds one (an unknown name is a one-line error naming the closest ones),
:func:`create` builds it for a teacher/student pair, :func:`names` lists them. Each method or
family lives in its own module: ``logits`` (ce, kd), ``skd`` (skd, skd-random), ``hints`` (fitnet,
vid, ab, ft), ``maps`` (at, sp, nst, fsp), ``relations`` (cc, cc-rbf, rkd, pkt), ``contrast`` (crd),
``iepkt`` (iepkt, iepkt-bb).

Example:
    >>> get("crd").weights
    LossWeights(ce=1.0, kd=0.0, beta=0.8)
"""
from __future__ import annotations

from neurosem.distill.methods.base import (Batch, BuildContext, LossWeights, Method, MethodOptions,
                                           MethodShapeError, Taps)
from neurosem.errors import NeurosemError

__all__ = ["Batch", "BuildContext", "LossWeights", "Method", "MethodOptions", "MethodShapeError", "Taps",
           "UnknownMethodError", "create", "get", "names", "register"]

_REGISTRY: dict[str, type[Method]] = {}


class UnknownMethodError(NeurosemError):
    """A method name that is not registered."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` under ``cls.name`` (names are unique)."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Every registered method, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> type[Method]:
    """The class of method ``name``; an unknown name lists the closest ones."""
    if name not in _REGISTRY:
        from neurosem.ids import closest_names

        near = closest_names(name, list(_REGISTRY))
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise UnknownMethodError(f"unknown method {name!r}{hint}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def create(name: str, ctx: BuildContext) -> Method:
    """Build method ``name`` for the pair described by ``ctx``."""
    return get(name)(ctx)


# the modules register their methods on import (order = the order of `names()`)
from neurosem.distill.methods import logits as _logits  # noqa: E402,F401
from neurosem.distill.methods import skd as _skd  # noqa: E402,F401
from neurosem.distill.methods import hints as _hints  # noqa: E402,F401
from neurosem.distill.methods import maps as _maps  # noqa: E402,F401
from neurosem.distill.methods import relations as _relations  # noqa: E402,F401
from neurosem.distill.methods import contrast as _contrast  # noqa: E402,F401
from neurosem.distill.methods import iepkt as _iepkt  # noqa: E402,F401
