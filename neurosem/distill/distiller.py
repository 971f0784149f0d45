"""One training step of every method: hooks on the stage ends, the student (and, for the
baselines, the teacher) forward pass, and the loss ``gamma CE + alpha KD + beta L_method``.

:func:`build_distiller` wires a zoo student to its loss; :class:`Distiller` runs a batch.
:mod:`neurosem.distill.train` runs the epochs around it; ``benchmarks/distill_time.py`` times it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neurosem.distill import losses as L
from neurosem.distill import zoo
from neurosem.errors import NeurosemError

#: Methods that run the teacher's forward pass on every batch.
TEACHER_METHODS = ("kd", "fitnet", "at", "sp", "cc", "cc-rbf", "rkd", "pkt")
METHODS = ("ce", "skd", "skd-random") + TEACHER_METHODS


# ------------------------------------------------------------------------------------------------
# hooks

class FeatureTaps:
    """Forward hooks that keep the named modules' outputs *with* their autograd graph.

    ``inputs_of`` names modules whose first input is kept instead (e.g. ``fc``: the pooled
    feature), under the key ``"<name>:input"``. Use as a context manager; the hooks are removed
    on exit. ``pop()`` returns the tensors of the last forward pass and forgets them.

    Example:
        >>> m = zoo.build("resnet8")
        >>> with FeatureTaps(m, ["layer1"], inputs_of=["fc"]) as taps:
        ...     _ = m(torch.zeros(2, 3, 32, 32))
        ...     sorted(taps.pop())
        ['fc:input', 'layer1']
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] = (), inputs_of: Sequence[str] = ()) -> None:
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.inputs_of = list(dict.fromkeys(inputs_of))
        self._out: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "FeatureTaps":
        modules = dict(self.model.named_modules())
        for name in self.layers + self.inputs_of:
            if name not in modules:
                raise NeurosemError(f"the model has no module {name!r}")
        try:
            for name in self.layers:
                self._handles.append(modules[name].register_forward_hook(self._keep_output(name)))
            for name in self.inputs_of:
                self._handles.append(modules[name].register_forward_pre_hook(self._keep_input(name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._out.clear()

    def _keep_output(self, name: str):
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            self._out[name] = out
        return hook

    def _keep_input(self, name: str):
        def hook(_m: nn.Module, inp: tuple[Any, ...]) -> None:
            self._out[f"{name}:input"] = inp[0]
        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        out, self._out = self._out, {}
        return out


# ------------------------------------------------------------------------------------------------
# the per-batch loss

@dataclass(frozen=True)
class Taps:
    """Which tensors a method compares: feature maps ``maps`` and/or the pooled ``pooled`` key."""

    maps: tuple[str, ...] = ()
    pooled: str | None = None   # the classifier whose input is the pooled feature

    def keys(self) -> list[str]:
        return list(self.maps) + ([f"{self.pooled}:input"] if self.pooled else [])


def method_taps(method: str, model_name: str) -> Taps:
    """The tensors ``method`` uses in zoo model ``model_name`` (CRD's choices for the baselines).

    Example:
        >>> method_taps("at", "wrn_40_2").maps
        ('block1', 'block2', 'block3')
    """
    feats = zoo.FEATURE_LAYERS[model_name]
    if method in ("skd", "skd-random"):
        return Taps(maps=tuple(zoo.ALIGNED_LAYERS[model_name]))
    if method == "at":
        return Taps(maps=tuple(feats[1:]))        # RepDistiller feat[1:-1]
    if method == "fitnet":
        return Taps(maps=(feats[2],))             # hint_layer = 2
    if method == "sp":
        return Taps(maps=(feats[-1],))            # feat[-2]: the last stage
    if method in ("rkd", "pkt", "cc", "cc-rbf"):
        return Taps(pooled=zoo.CLASSIFIER[model_name])   # feat[-1]: the pooled feature
    return Taps()


class Distiller:
    """Student (+ teacher) + criterion: ``step(x, y) -> (loss, logits, parts)`` for one batch.

    ``x: [B, 3, 32, 32]``, ``y: [B]``. The teacher (when the method needs it) runs in eval mode
    under ``no_grad``; SKD and CE have no teacher. Use ``with distiller.hooked():`` around the
    steps. ``parameters()`` are the trainable ones (student + regressors/embeddings of the loss).
    """

    def __init__(self, method: str, student: nn.Module, student_taps: Taps, weights: L.LossWeights,
                 criterion: nn.Module | None = None, teacher: nn.Module | None = None,
                 teacher_taps: Taps | None = None, kd_T: float = 4.0) -> None:
        if method in TEACHER_METHODS and teacher is None:
            raise ValueError(f"method {method} needs a teacher")
        self.method = method
        self.student = student
        self.teacher = teacher
        self.criterion = criterion
        self.weights = weights
        self.s_taps = student_taps
        self.t_taps = teacher_taps or Taps()
        self.kd = L.KDLoss(kd_T)
        self._stack: contextlib.ExitStack | None = None
        self._s: FeatureTaps | None = None
        self._t: FeatureTaps | None = None
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self.student.parameters()
        if self.criterion is not None:
            yield from self.criterion.parameters()

    def to(self, device: torch.device) -> "Distiller":
        self.student.to(device)
        if self.criterion is not None:
            self.criterion.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def train(self) -> None:
        self.student.train()
        if self.criterion is not None:
            self.criterion.train()
        if self.teacher is not None:
            self.teacher.eval()

    @contextlib.contextmanager
    def hooked(self) -> Iterator["Distiller"]:
        with contextlib.ExitStack() as stack:
            self._s = stack.enter_context(FeatureTaps(
                self.student, self.s_taps.maps, [self.s_taps.pooled] if self.s_taps.pooled else []))
            if self.teacher is not None:
                self._t = stack.enter_context(FeatureTaps(
                    self.teacher, self.t_taps.maps, [self.t_taps.pooled] if self.t_taps.pooled else []))
            try:
                yield self
            finally:
                self._s = self._t = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one batch, the student's logits and the loss terms (detached)."""
        if self._s is None:
            raise RuntimeError("call Distiller.step inside `with distiller.hooked():`")
        logits = self.student(x)
        fs = self._s.pop()
        ce = F.cross_entropy(logits, y)
        loss = self.weights.ce * ce
        parts = {"ce": ce.detach()}
        if self.method == "ce":
            return loss, logits, parts
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(x)
            ft = self._t.pop()  # type: ignore[union-attr]
        m = self.method
        if m == "kd":
            term = self.kd(logits, t_logits)
            loss = loss + self.weights.kd * term
            parts["kd"] = term.detach()
            return loss, logits, parts
        s_keys, t_keys = self.s_taps.keys(), self.t_taps.keys()
        if m in ("skd", "skd-random"):
            term = self.criterion([fs[k] for k in s_keys])
        elif m in ("at", "sp"):
            term = self.criterion([fs[k] for k in s_keys], [ft[k] for k in t_keys])
        else:  # fitnet, cc, cc-rbf, rkd, pkt: one tensor each
            term = self.criterion(fs[s_keys[0]], ft[t_keys[0]])
        loss = loss + self.weights.beta * term
        parts[m] = term.detach()
        return loss, logits, parts


def probe_shapes(model: nn.Module, taps: Taps, input_size: Sequence[int] = zoo.INPUT_SIZE) -> dict[str, tuple[int, ...]]:
    """Output shapes ``[1, C, H, W]`` (or ``[1, D]``) of ``taps`` for one zero image, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with FeatureTaps(model, taps.maps, [taps.pooled] if taps.pooled else []) as t, torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
            return {k: tuple(v.shape) for k, v in t.pop().items()}
    finally:
        model.train(was_training)


def default_beta(method: str, teacher: str | None, student: str) -> float:
    """The weight of the method's loss term (see :data:`neurosem.distill.losses.WEIGHTS`)."""
    if method in ("skd", "skd-random") and teacher is not None:
        pair = L.SKD_PAIR_BETA.get((teacher, student))
        if pair is not None:
            return pair
    w = L.WEIGHTS[method]
    return w.kd if method == "kd" else w.beta


def build_distiller(method: str, student: str, teacher: str | None = None, num_classes: int = 100,
                    vectors: Sequence[torch.Tensor] | None = None, teacher_model: nn.Module | None = None,
                    beta: float | None = None, temperature: float = 1.0, seed: int = 0,
                    vector_dim: int = 16) -> Distiller:
    """Construct the student (seeded), the loss of ``method`` and, for the baselines, wire the
    given trained ``teacher_model``. SKD takes the teacher's ``vectors`` (one ``[C, K]`` per
    aligned layer, in order); ``skd-random`` draws vectors of the same shape from ``seed``.

    Example:
        >>> d = build_distiller("skd-random", "resnet8", num_classes=10)
        >>> d.criterion.widths()
        [16, 32, 64]
    """
    if method not in METHODS:
        raise NeurosemError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    torch.manual_seed(seed)
    s_model = zoo.build(student, num_classes=num_classes)
    s_taps = method_taps(method, student)
    b = default_beta(method, teacher, student) if beta is None else float(beta)
    base = L.WEIGHTS[method]
    weights = L.LossWeights(ce=base.ce, kd=b if method == "kd" else base.kd, beta=0.0 if method == "kd" else b)
    if method == "ce":
        return Distiller(method, s_model, s_taps, weights)
    s_shapes = probe_shapes(s_model, s_taps)
    if method == "skd":
        if vectors is None:
            raise ValueError("skd needs the teacher's vectors")
        return Distiller(method, s_model, s_taps, weights, L.SKDLoss(vectors, temperature=temperature))
    if method == "skd-random":
        widths = [s_shapes[k][1] for k in s_taps.maps]
        dim = int(vectors[0].shape[1]) if vectors else vector_dim
        return Distiller(method, s_model, s_taps, weights,
                         L.SKDRandomLoss(widths, dim=dim, seed=seed, temperature=temperature))
    if teacher is None or teacher_model is None:
        raise ValueError(f"{method} needs the teacher's name and model")
    t_taps = method_taps(method, teacher)
    t_shapes = probe_shapes(teacher_model, t_taps)
    sk, tk = s_taps.keys(), t_taps.keys()
    if method == "kd":
        crit = None
    elif method == "fitnet":
        (ss,), (ts,) = [s_shapes[k] for k in sk], [t_shapes[k] for k in tk]
        if ss[2:] != ts[2:]:
            raise NeurosemError(f"FitNet hint layers differ in size: student {sk[0]} {ss[2:]}, "
                                f"teacher {tk[0]} {ts[2:]}")
        crit = L.FitNetLoss(ss[1], ts[1])
    elif method == "at":
        crit = L.ATLoss()
    elif method == "sp":
        crit = L.SPLoss()
    elif method in ("cc", "cc-rbf"):
        crit = L.CCLoss(s_shapes[sk[0]][1], t_shapes[tk[0]][1], kernel="crd" if method == "cc" else "rbf")
    elif method == "rkd":
        crit = L.RKDLoss()
    else:
        crit = L.PKTLoss()
    return Distiller(method, s_model, s_taps, weights, crit, teacher=teacher_model, teacher_taps=t_taps)


def zoo_widths(name: str) -> dict[str, int]:
    """Channels of each aligned layer of zoo model ``name`` (from one 32x32 forward pass)."""
    model = zoo.build(name, num_classes=10)
    shapes = probe_shapes(model, Taps(maps=tuple(zoo.ALIGNED_LAYERS[name])))
    return {k: int(v[1]) for k, v in shapes.items()}
