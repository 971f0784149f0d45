"""One training step of every method: hooks on the tapped layers, the student (and, when the
method needs it, the teacher) forward pass, and the loss ``gamma CE + alpha KD + beta L_method``.

:func:`build_distiller` wires a zoo student to a method of the registry
(:mod:`neurosem.distill.methods`); :class:`Distiller` runs a batch (and, for AB, FT and FSP, a
batch of the initialisation stage). :mod:`neurosem.distill.train` runs the epochs around it;
``benchmarks/distill_time.py`` times it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neurosem.distill import losses as L
from neurosem.distill import methods as M
from neurosem.distill import zoo
from neurosem.distill.methods import Batch, BuildContext, LossWeights, MethodOptions, Taps
from neurosem.errors import NeurosemError

#: Every registered method, and those that run the teacher's forward pass.
METHODS = tuple(M.names())
TEACHER_METHODS = tuple(n for n in METHODS if M.get(n).needs_teacher)


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

def method_taps(method: str, model_name: str, options: MethodOptions | None = None) -> Taps:
    """The tensors ``method`` reads in zoo model ``model_name`` (CRD's choices for the baselines).

    Example:
        >>> method_taps("at", "wrn_40_2").maps
        ('block1', 'block2', 'block3')
    """
    return M.get(method).taps(model_name, options or MethodOptions())


class Distiller:
    """Student (+ teacher) + method: ``step(x, y, index) -> (loss, logits, parts)`` for one batch.

    ``x: [B, 3, 32, 32]``, ``y: [B]``, ``index: [B]`` (dataset indices; CRD needs them). The
    teacher runs in eval mode under ``no_grad``, and only when the step reads it (SKD, CE, and the
    main stages of AB and FSP never run it). Use ``with distiller.hooked():`` around the steps.
    ``parameters()`` are the main stage's trainable ones (student + the method's regressors and
    embeddings); ``init_parameters()`` those of the initialisation stage (AB, FT, FSP).
    """

    def __init__(self, method: M.Method, student: nn.Module, student_taps: Taps, weights: LossWeights,
                 teacher: nn.Module | None = None, teacher_taps: Taps | None = None, kd_T: float = 4.0) -> None:
        if type(method).needs_teacher and teacher is None:
            raise ValueError(f"method {method.name} needs a teacher")
        if weights.kd > 0 and teacher is None:
            raise NeurosemError(f"the KD weight alpha = {weights.kd} needs a teacher: pass --teacher and "
                                f"--teacher-weights, or --alpha 0")
        self.method = method.name
        self.student = student
        self.teacher = teacher
        self.criterion = method
        self.weights = weights
        self.s_taps = student_taps
        self.t_taps = teacher_taps or Taps()
        self.kd = L.KDLoss(kd_T)
        self._s: FeatureTaps | None = None
        self._t: FeatureTaps | None = None
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
        method.bind_student(student)

    def part_names(self) -> list[str]:
        """The loss terms ``step`` reports, in order: ``ce``, then ``kd`` (alpha > 0), then the method's."""
        names = ["ce"] + (["kd"] if self.weights.kd > 0 else [])
        return names + ([self.method] if type(self.criterion).has_main_term else [])

    def unweighted(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``gamma CE + alpha KD + beta term`` from the parts ``step`` returned (detached)."""
        total = self.weights.ce * parts["ce"]
        if "kd" in parts:
            total = total + self.weights.kd * parts["kd"]
        if self.method in parts and self.method != "ce":
            total = total + self.weights.beta * parts[self.method]
        return total

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self.student.parameters()
        yield from self.criterion.main_parameters()

    def init_parameters(self) -> list[nn.Parameter]:
        return self.criterion.init_parameters(self.student)

    def to(self, device: torch.device) -> "Distiller":
        self.student.to(device)
        self.criterion.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def train(self) -> None:
        self.student.train()
        self.criterion.train()
        if self.teacher is not None:
            self.teacher.eval()

    @contextlib.contextmanager
    def hooked(self) -> Iterator["Distiller"]:
        with contextlib.ExitStack() as stack:
            self._s = stack.enter_context(FeatureTaps(
                self.student, self.s_taps.outputs(), self.s_taps.inputs()))
            if self.teacher is not None:
                self._t = stack.enter_context(FeatureTaps(
                    self.teacher, self.t_taps.outputs(), self.t_taps.inputs()))
            try:
                yield self
            finally:
                self._s = self._t = None

    def _teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            t_logits = self.teacher(x)  # type: ignore[misc]
        ft = self._t.pop()  # type: ignore[union-attr]
        return t_logits, [ft[k] for k in self.t_taps.keys()]

    def step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None,
             spread: Any = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one batch, the student's logits and the loss terms (detached).

        ``spread`` (a :class:`neurosem.distill._ddp.Spread`, under torchrun): ``x, y, index`` are
        this rank's rows of the global batch; CE and KD are weighted by the rank's share and the
        method's term is computed on the gathered global batch (the parts are unweighted: CE and
        KD this rank's means, the term the global batch's).
        """
        if self._s is None:
            raise RuntimeError("call Distiller.step inside `with distiller.hooked():`")
        share = 1.0 if spread is None else spread.share
        logits = self.student(x)
        fs = self._s.pop()
        ce = F.cross_entropy(logits, y)
        loss = self.weights.ce * ce * share
        parts = {"ce": ce.detach()}
        if self.method == "ce":
            return loss, logits, parts
        uses_teacher = self.teacher is not None and (self.weights.kd > 0 or type(self.criterion).main_uses_teacher)
        t_logits, ft = self._teacher(x) if uses_teacher else (None, [])
        if self.weights.kd > 0:
            kd = self.kd(logits, t_logits)
            loss = loss + self.weights.kd * kd * share
            parts["kd"] = kd.detach()
        batch = Batch(fs=[fs[k] for k in self.s_taps.keys()], ft=ft, logits_s=logits, logits_t=t_logits,
                      y=y, index=index)
        term = self.criterion(batch if spread is None else spread.batch(batch))
        if term is not None:
            loss = loss + self.weights.beta * term
            parts[self.method] = term.detach()
        return loss, logits, parts

    def init_step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None,
                  spread: Any = None) -> torch.Tensor:
        """The loss of one batch of the initialisation stage (AB, FT, FSP); ``spread`` as in :meth:`step`
        (the loss is the global batch's)."""
        if self._s is None:
            raise RuntimeError("call Distiller.init_step inside `with distiller.hooked():`")
        fs: list[torch.Tensor] = []
        if type(self.criterion).init_uses_student:
            self.student(x)
            out = self._s.pop()
            fs = [out[k] for k in self.s_taps.keys()]
        t_logits, ft = self._teacher(x)
        batch = Batch(fs=fs, ft=ft, logits_t=t_logits, y=y, index=index)
        return self.criterion.init_loss(batch if spread is None else spread.batch(batch))


def probe_shapes(model: nn.Module, taps: Taps, input_size: Sequence[int] = zoo.INPUT_SIZE) -> dict[str, tuple[int, ...]]:
    """Output shapes ``[1, C, H, W]`` (or ``[1, D]``) of ``taps`` for one zero image, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with FeatureTaps(model, taps.outputs(), taps.inputs()) as t, torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
            return {k: tuple(v.shape) for k, v in t.pop().items()}
    finally:
        model.train(was_training)


def default_beta(method: str, teacher: str | None, student: str) -> float:
    """The weight of the method's loss term (each method's ``weights``; for ``kd``: the KD weight)."""
    if method in ("skd", "skd-random") and teacher is not None:
        pair = L.SKD_PAIR_BETA.get((teacher, student))
        if pair is not None:
            return pair
    w = M.get(method).weights
    return w.kd if method == "kd" else w.beta


def resolve_weights(method: str, teacher: str | None, student: str, beta: float | None = None,
                    alpha: float | None = None, gamma: float | None = None) -> LossWeights:
    """``gamma`` (CE), ``alpha`` (KD) and ``beta`` (the method's term): the given ones, else the
    method's defaults. For ``kd``, ``beta`` is accepted as the KD weight when ``alpha`` is not given."""
    base = M.get(method).weights
    if method == "ce" and (alpha or beta):
        raise NeurosemError("--method ce trains with cross-entropy alone: for a KD term use --method kd "
                            "(or another method with --alpha)")
    b = default_beta(method, teacher, student) if beta is None else float(beta)
    if method == "kd":
        kd = float(alpha) if alpha is not None else b
        b = 0.0
    else:
        kd = base.kd if alpha is None else float(alpha)
    for name, v in (("gamma", gamma), ("alpha", kd), ("beta", b)):
        if v is not None and (v < 0 or v != v):
            raise NeurosemError(f"--{name} must be >= 0, got {v}")
    return LossWeights(ce=base.ce if gamma is None else float(gamma), kd=kd, beta=b)


def build_distiller(method: str, student: str, teacher: str | None = None, num_classes: int = 100,
                    vectors: Sequence[torch.Tensor] | None = None, teacher_model: nn.Module | None = None,
                    beta: float | None = None, temperature: float = 1.0, seed: int = 0,
                    vector_dim: int = 16, *, alpha: float | None = None, gamma: float | None = None,
                    options: MethodOptions | None = None, n_data: int | None = None,
                    labels: torch.Tensor | None = None) -> Distiller:
    """Construct the student (seeded), the method and, when it reads the teacher, wire the given
    trained ``teacher_model``. SKD takes the teacher's ``vectors`` (one ``[C, K]`` per aligned layer,
    in order); ``skd-random`` draws vectors of the same shape from ``seed``; CRD needs the training
    set's size ``n_data`` and ``labels: [n_data]``. ``options`` overrides ``temperature``, ``seed``
    and ``vector_dim``.

    Example:
        >>> d = build_distiller("skd-random", "resnet8", num_classes=10)
        >>> d.criterion.widths()
        [16, 32, 64]
    """
    cls = M.get(method)
    opts = options or MethodOptions(temperature=temperature, seed=seed, vector_dim=vector_dim)
    torch.manual_seed(opts.seed)
    s_model = zoo.build(student, num_classes=num_classes)
    weights = resolve_weights(method, teacher, student, beta, alpha, gamma)
    needs_teacher = cls.needs_teacher or weights.kd > 0
    if needs_teacher and (teacher is None or teacher_model is None):
        raise ValueError(f"{method} needs the teacher's name and model")
    try:
        s_taps = cls.taps(student, opts)
        t_taps = cls.teacher_taps(teacher, opts) if (cls.needs_teacher and teacher) else Taps()
    except ValueError as exc:
        raise NeurosemError(str(exc)) from None
    ctx = BuildContext(student=student, teacher=teacher, s_taps=s_taps, t_taps=t_taps,
                       s_shapes=probe_shapes(s_model, s_taps) if s_taps.keys() else {},
                       t_shapes=probe_shapes(teacher_model, t_taps) if t_taps.keys() else {},  # type: ignore[arg-type]
                       options=opts, n_data=n_data, labels=labels, vectors=vectors)
    crit = cls(ctx)
    return Distiller(crit, s_model, s_taps, weights, teacher=teacher_model if needs_teacher else None,
                     teacher_taps=t_taps, kd_T=opts.kd_T)


def zoo_widths(name: str) -> dict[str, int]:
    """Channels of each aligned layer of zoo model ``name`` (from one 32x32 forward pass)."""
    model = zoo.build(name, num_classes=10)
    shapes = probe_shapes(model, Taps(maps=tuple(zoo.ALIGNED_LAYERS[name])))
    return {k: int(v[1]) for k, v in shapes.items()}
