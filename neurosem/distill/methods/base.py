"""The interface every distillation method implements, and the small types it is built from.

A method is an ``nn.Module`` subclass of :class:`Method` registered by name (see
:mod:`neurosem.distill.methods`). It declares which tensors it reads (:meth:`Method.taps`), its
default loss weights (CRD's, or the paper's for SKD), whether it runs the teacher, whether it needs
each sample's dataset index (CRD), and whether it has an initialisation stage (AB, FT, FSP, as in
RepDistiller's ``--init_epochs``). Its ``forward`` returns the method's loss term for one batch
(``None`` when the main stage has none: AB and FSP act only through their initialisation stage).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from neurosem.distill.losses import LossWeights
from neurosem.errors import NeurosemError


class MethodShapeError(NeurosemError):
    """A teacher and a student whose features one method cannot align."""


@dataclass(frozen=True)
class Taps:
    """The tensors a method reads from one model.

    ``maps``: module names whose output is kept; a name ending in ``:input`` keeps that module's
    first input instead (how pre-activation maps are reached). ``pooled``: the classifier whose
    input (the pooled feature ``[B, D]``) is kept, under the key ``"<pooled>:input"``.
    """

    maps: tuple[str, ...] = ()
    pooled: str | None = None

    def keys(self) -> list[str]:
        return list(self.maps) + ([f"{self.pooled}:input"] if self.pooled else [])

    def outputs(self) -> list[str]:
        return [k for k in self.maps if not k.endswith(":input")]

    def inputs(self) -> list[str]:
        ins = [k[: -len(":input")] for k in self.maps if k.endswith(":input")]
        return ins + ([self.pooled] if self.pooled else [])


@dataclass(frozen=True)
class MethodOptions:
    """Every setting of a method (defaults: RepDistiller's ``train_student.py``; SKD: the paper).

    ``kd_T``: KD temperature; ``hint_layer``: FitNet's feature index; ``temperature``: SKD's tau;
    ``feat_dim``: CRD's (and CC's) embedding width; ``nce_k``/``nce_t``/``nce_m``: CRD's negatives,
    temperature and memory momentum; ``seed``/``vector_dim``: skd-random's vectors.
    """

    kd_T: float = 4.0
    hint_layer: int = 2
    temperature: float = 1.0
    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5
    seed: int = 0
    vector_dim: int = 16
    #: IEPKT's settings (:class:`neurosem.distill.methods.iepkt.IEPKTOptions`; ``None``: its defaults)
    iepkt: Any = None


@dataclass
class BuildContext:
    """What a method's constructor may use: the model names, the shapes ``[1, C, H, W]`` (or
    ``[1, D]``) of each tapped tensor for one 32x32 image, the options, and, when the method asks
    for them, the training set's size and labels (CRD) or SKD's teacher vectors."""

    student: str
    teacher: str | None
    s_taps: Taps
    t_taps: Taps
    s_shapes: dict[str, tuple[int, ...]]
    t_shapes: dict[str, tuple[int, ...]]
    options: MethodOptions = field(default_factory=MethodOptions)
    n_data: int | None = None
    labels: torch.Tensor | None = None
    vectors: Sequence[torch.Tensor] | None = None

    def shapes(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """The student's and the teacher's shapes in tap order."""
        return ([self.s_shapes[k] for k in self.s_taps.keys()],
                [self.t_shapes[k] for k in self.t_taps.keys()])


@dataclass
class Batch:
    """One batch as a method sees it: tapped tensors (tap order), logits ``[B, classes]``, labels
    ``y: [B]`` and dataset indices ``index: [B]`` (``None`` unless the method needs them)."""

    fs: list[torch.Tensor]
    ft: list[torch.Tensor]
    logits_s: torch.Tensor | None = None
    logits_t: torch.Tensor | None = None
    y: torch.Tensor | None = None
    index: torch.Tensor | None = None


def shape_error(method: str, stage: str, s_shape: Sequence[int], t_shape: Sequence[int], why: str) -> MethodShapeError:
    """The one-line error for features ``method`` cannot align at ``stage``."""
    return MethodShapeError(f"{method} cannot align the {stage} features: student {list(s_shape)}, "
                            f"teacher {list(t_shape)} ({why})")


def stage_shapes(method: str, ctx: "BuildContext") -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """``ctx.shapes()`` for a method that pairs the stages one to one; different stage counts are
    one :func:`shape_error`."""
    ss, ts = ctx.shapes()
    if len(ss) != len(ts):
        raise shape_error(method, "stage", [len(ss)], [len(ts)],
                          f"student {ctx.student} has {len(ss)} stages, teacher {ctx.teacher} {len(ts)}")
    return ss, ts


class Method(nn.Module):
    """Base class of every method (see the module docstring)."""

    name: ClassVar[str] = ""
    weights: ClassVar[LossWeights] = LossWeights(1.0, 0.0, 0.0)
    needs_teacher: ClassVar[bool] = True
    needs_index: ClassVar[bool] = False
    init_stage: ClassVar[bool] = False
    #: whether the main stage's term reads the teacher (AB and FSP: no; KD's alpha term may still)
    main_uses_teacher: ClassVar[bool] = True
    #: whether ``forward`` returns a term (CE, KD, AB and FSP: no)
    has_main_term: ClassVar[bool] = True
    #: whether the initialisation stage reads the student (FT's does not)
    init_uses_student: ClassVar[bool] = True
    #: epochs of the initialisation stage when none are asked (RepDistiller's 30; IEPKT 20)
    default_init_epochs: ClassVar[int] = 30
    summary: ClassVar[str] = ""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        """The tensors read from zoo model ``model`` (student and teacher alike unless overridden)."""
        return Taps()

    @classmethod
    def teacher_taps(cls, model: str, options: MethodOptions) -> Taps:
        return cls.taps(model, options)

    def forward(self, batch: Batch) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind_student(self, student: nn.Module) -> None:
        """Called once by the Distiller with the student (IEPKT clips gradients in its parameters)."""

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of each main-stage epoch (0-based; IEPKT's clipping ramp)."""

    def main_parameters(self) -> list[nn.Parameter]:
        """Parameters the main stage trains besides the student's (default: all of the method's)."""
        return list(self.parameters())

    # -- the initialisation stage of two-stage methods (RepDistiller ``helper/pretrain.py``)
    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """Parameters the initialisation stage trains."""
        return []

    def init_loss(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{self.name} has no initialisation stage")

    def init_lr(self, student: str, lr: float) -> float:
        """Learning rate of the initialisation stage (RepDistiller: the main one)."""
        return lr


def feature_modules(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """The parameters of ``model``'s modules ``names`` (RepDistiller's ``get_feat_modules``,
    :data:`neurosem.distill.zoo.FEAT_MODULES`)."""
    return [p for n in names for p in model.get_submodule(n).parameters()]
