"""IEPKT (Lee & Song, AAAI 2021): interpretable embedding-procedure knowledge via stacked PCA and
a message-passing GNN, as the methods ``iepkt`` and ``iepkt-bb`` (+ the black-box term).

The algorithm follows the authors' TensorFlow code ``sseung0703/IEPKT`` (``nets/Distillation.py``,
cited ``file:line``; the pieces are in :mod:`.iepkt_parts`), written anew in PyTorch:

1. Sensing points: the BN+ReLU outputs at the end of each WRN group (``nets/WResNet.py:14-24,
   65-67, 109-111``: the pre-activation of the next group's first block, and the final BN+ReLU); for the
   other zoo families the stage ends (post-ReLU). Teacher and student must match in channels and
   size at each point (``Distillation.py:46-51`` reshapes the student with the teacher's sizes).
2. Per image, the teacher's top singular pair ``(u, v)`` (sign fixed); the student's
   ``v_S = normalize(F_Sᵀ u_T)``; both mapped sphere -> plane; then the teacher's incremental PCA
   (``C/2`` components) projects both: ``c_T``, ``c_S`` (``Distillation.py:35-51``).
3. An MPNN per pair of consecutive points (``Distillation.py:53-66``). The *initialisation stage*
   (``init_epochs``, 20 as ``train_w_distill.py:34``) trains it alone on the teacher:
   ``sum_l KL(A_l || Ã_l)``, ``A_l`` the cosine graph of ``c_T``. The main stage freezes it and
   trains the student on ``alt_weight * L_alt + int_weight * L_int`` (+ ``bb_weight * L_BB``):
   ``L_alt = sum_l mean_vw |M_S - M_T|_1``, ``L_int = sum_l KL(Ã_T || Ã_S)``,
   ``L_BB = sum_l KL(tanh G_S || tanh G_T)`` (``Distillation.py:65-66, 171``).

Not from the paper or its code (its optimiser file ``op_util.py`` is missing), each an option of
:class:`IEPKTOptions`: the loss weights (1 each); how the distillation gradients are clipped to
the cross-entropy gradient's norm (``tensor``: per parameter tensor, with the author's epoch ramp,
as his MHGD optimiser in ``sseung0703/KD_methods_with_TF`` ``op_util.py``); whether the PCA
statistics keep updating in the main stage (``frozen``: that MHGD optimiser runs only the
student's update ops in its main stage); whether a batch is projected with the statistics before
or after its own update (the TF graph leaves the order of the read and the assign open).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neurosem.distill import zoo
from neurosem.distill.losses import LossWeights
from neurosem.distill.methods import register
from neurosem.distill.methods.base import BuildContext, Method, MethodOptions, Taps, shape_error, stage_shapes
from neurosem.distill.methods.iepkt_parts import (MPNN, AttentionHeads, Estimator, IncrementalPCA, clip_scale,
                                                  cosine_affinity, first_pca, kl_rows, plane_map, ramp,
                                                  student_vector)
from neurosem.errors import NeurosemError

CLIP_MODES = ("tensor", "global", "none")
STATS_MODES = ("frozen", "update")
PROJECT_MODES = ("updated", "previous")


@dataclass(frozen=True)
class IEPKTOptions:
    """IEPKT's settings that the paper's code leaves open (none is from the paper).

    ``alt_weight``, ``int_weight``, ``bb_weight``: the weights of L_alt, L_int, L_BB (1 each).
    ``clip``: each weighted term's gradient clipped to the CE gradient's norm ``tensor`` by tensor
    (the author's MHGD optimiser), over the whole gradient (``global``), or not (``none``).
    ``ramp``: that norm times ``sigmoid(epoch)`` in the main stage's epoch ``epoch`` (0-based).
    ``stats``: the PCA statistics in the main stage, ``frozen`` (after the GNN stage) or ``update``d
    from the teacher at each step. ``project``: a batch projected with the statistics ``updated``
    by it, or the ``previous`` ones. ``iters``: MPNN iterations (2, the code's);
    ``heads``: black-box heads, the extrinsic one included (8, the code's).
    """

    alt_weight: float = 1.0
    int_weight: float = 1.0
    bb_weight: float = 1.0
    clip: str = "tensor"
    ramp: bool = True
    stats: str = "frozen"
    project: str = "updated"
    iters: int = 2
    heads: int = 8

    def check(self) -> "IEPKTOptions":
        """``self``, or a one-line error naming the bad setting."""
        for name, v, choices in (("clip", self.clip, CLIP_MODES), ("stats", self.stats, STATS_MODES),
                                 ("project", self.project, PROJECT_MODES)):
            if v not in choices:
                raise NeurosemError(f"--iep-{name} must be one of {', '.join(choices)}, got {v!r}")
        for name, w in (("alt", self.alt_weight), ("int", self.int_weight), ("bb", self.bb_weight)):
            if not w >= 0:
                raise NeurosemError(f"--iep-{name} must be >= 0, got {w}")
        if self.iters < 1 or self.heads < 2:
            raise NeurosemError(f"IEPKT needs iters >= 1 and heads >= 2, got {self.iters} and {self.heads}")
        return self


def iepkt_options(options: MethodOptions) -> IEPKTOptions:
    """The :class:`IEPKTOptions` inside ``options`` (the defaults when it has none), checked."""
    got = getattr(options, "iepkt", None)
    return (got if isinstance(got, IEPKTOptions) else IEPKTOptions(**(got or {}))).check()


def sensing_points(model: str) -> tuple[str, ...]:
    """IEPKT's sensing points of zoo model ``model``: a WRN's three group-end BN+ReLU outputs
    (``[B, 16k, 32, 32]``, ``[B, 32k, 16, 16]``, ``[B, 64k, 8, 8]``), else its stage ends.

    Example:
        >>> sensing_points("wrn_16_4")
        ('block2.layer.0.relu1', 'block3.layer.0.relu1', 'relu')
    """
    if model.startswith("wrn"):
        return ("block2.layer.0.relu1", "block3.layer.0.relu1", "relu")
    return tuple(zoo.ALIGNED_LAYERS[model])


@register
class IEPKT(Method):
    """``iepkt``: the GNN stage (``init_loss``), then the student with the GNN frozen (``forward``)."""

    name = "iepkt"
    summary = "IEPKT (Lee & Song, AAAI 2021): stacked PCA + MPNN embedding-procedure knowledge"
    weights = LossWeights(1.0, 0.0, 1.0)
    init_stage = True
    init_uses_student = False
    default_init_epochs: ClassVar[int] = 20
    black_box: ClassVar[bool] = False

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.opts = iepkt_options(ctx.options)
        ss, ts = stage_shapes(self.name, ctx)
        s_keys, t_keys = ctx.s_taps.keys(), ctx.t_taps.keys()
        if len(ts) < 2:
            raise shape_error(self.name, "sensing point", [len(ss)], [len(ts)], "IEPKT needs at least two")
        for i, (s, t) in enumerate(zip(ss, ts)):
            if tuple(s[1:]) != tuple(t[1:]):
                raise shape_error(self.name, f"sensing point {i + 1} ({s_keys[i]} / {t_keys[i]})", s, t,
                                  "the student is projected on the teacher's vectors: channels and size "
                                  "must be equal, e.g. wrn_40_4 -> wrn_16_4")
        dims = [int(t[1]) for t in ts]
        self.dims = dims
        self.pca = nn.ModuleList(IncrementalPCA(c) for c in dims)
        k = [c // 2 for c in dims]
        self.gnn = nn.ModuleList(MPNN(k[l], k[l - 1], dims[l] // 2, self.opts.iters) for l in range(1, len(dims)))
        if self.black_box:
            h = self.opts.heads
            self.heads = nn.ModuleList(AttentionHeads(k[l], k[l - 1], (k[l] + k[l - 1]) // 2, h - 1)
                                       for l in range(1, len(dims)))
            self.estimators = nn.ModuleList(Estimator(k[l - 1], k[l], h) for l in range(1, len(dims)))
        self._student_params: list[nn.Parameter] = []
        self._epoch = 0

    @classmethod
    def taps(cls, model: str, options: MethodOptions) -> Taps:
        return Taps(maps=sensing_points(model))

    # -- the Distiller's hooks
    def bind_student(self, student: nn.Module) -> None:
        """Keep the student's parameters (not as submodules): the clipping needs their gradients."""
        self._student_params = [p for p in student.parameters() if p.requires_grad]

    def set_epoch(self, epoch: int) -> None:
        """The main stage's epoch (0-based), for the clipping ramp."""
        self._epoch = int(epoch)

    def main_parameters(self) -> list[nn.Parameter]:
        return []      # the GNN is frozen in the main stage

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.parameters())     # the GNN (and the black-box heads); the PCA state is buffers

    def _graph_modules(self) -> list[nn.Module]:
        return [self.gnn] + ([self.heads, self.estimators] if self.black_box else [])

    def _set_stage(self, init: bool) -> None:
        for m in self._graph_modules():
            m.train(init)
            for p in m.parameters():
                p.requires_grad_(init)

    # -- the teacher's side
    def teacher_points(self, ft: Sequence[torch.Tensor], update: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The teacher's spatial vectors ``u_l: [B, HW]`` and projections ``c_l: [B, C_l/2]``;
        ``update``: fold the batch into the PCA statistics (before or after projecting, ``project``)."""
        us, cs = [], []
        with torch.no_grad():
            for f, pca in zip(ft, self.pca):
                u, v = first_pca(f)
                p = plane_map(v)
                if update and self.opts.project == "updated":
                    pca.update(p)
                cs.append(pca.project(p))
                if update and self.opts.project == "previous":
                    pca.update(p)
                us.append(u)
        return us, cs

    def init_loss(self, batch) -> torch.Tensor:
        """The GNN stage: ``sum_l KL(A_l || Ã_l)`` on the teacher (+ the black-box estimators')."""
        self._set_stage(True)
        _, cs = self.teacher_points(batch.ft, update=True)
        loss = cs[0].new_zeros(())
        if cs[0].shape[0] < 2:      # a last batch of one image: no batch statistics, nothing to learn
            return loss + sum(p.sum() * 0 for p in self.init_parameters(None))  # type: ignore[arg-type]
        for l, gnn in enumerate(self.gnn, start=1):
            loss = loss + kl_rows(cosine_affinity(cs[l]), gnn(cs[l], cs[l - 1])[0])
        if self.black_box:
            loss = loss + self._estimator_loss(cs)
        return loss

    def _estimator_loss(self, cs: list[torch.Tensor]) -> torch.Tensor:
        """``sum_l mean(1 - <c_l, est_l>)`` (``Distillation.py:165-167``; ``c_l`` not normalised, as there)."""
        loss = cs[0].new_zeros(())
        for l, (gnn, heads, est) in enumerate(zip(self.gnn, self.heads, self.estimators), start=1):
            gnn.eval()
            with torch.no_grad():
                extrinsic = gnn(cs[l], cs[l - 1])[1].mean(-1) * gnn.iters    # Distillation.py:69
            gnn.train()
            guess = est(cs[l - 1], heads(cs[l], cs[l - 1]), extrinsic)
            loss = loss + (1 - (cs[l] * guess).sum(-1)).mean()
        return loss

    # -- the main stage
    def terms(self, fs: Sequence[torch.Tensor], ft: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unweighted terms ``alt``, ``int`` (and ``bb``) of one batch, GNN frozen."""
        self._set_stage(False)
        us, ct = self.teacher_points(ft, update=self.opts.stats == "update")
        cs = [pca.project(plane_map(student_vector(f, u.to(f.dtype)))) for f, u, pca in zip(fs, us, self.pca)]
        alt = cs[0].new_zeros(())
        inter = cs[0].new_zeros(())
        bb = cs[0].new_zeros(())
        for l, gnn in enumerate(self.gnn, start=1):
            with torch.no_grad():
                a_t, m_t = gnn(ct[l], ct[l - 1])
            a_s, m_s = gnn(cs[l], cs[l - 1])
            alt = alt + (m_s - m_t).abs().sum(-1).mean()
            inter = inter + kl_rows(a_t, a_s)
            if self.black_box:
                with torch.no_grad():
                    g_t = self.heads[l - 1](ct[l], ct[l - 1])
                bb = bb + kl_rows(torch.tanh(self.heads[l - 1](cs[l], cs[l - 1])), torch.tanh(g_t))
        out = {"alt": alt, "int": inter}
        if self.black_box:
            out["bb"] = bb
        return out

    def forward(self, batch) -> torch.Tensor:
        """``alt_weight L_alt + int_weight L_int (+ bb_weight L_BB)``; with clipping, a term of that
        value whose gradient is the clipped one (see :meth:`clipped`)."""
        terms = self.terms(batch.fs, batch.ft)
        weighted = [w * terms[k] for k, w in (("alt", self.opts.alt_weight), ("int", self.opts.int_weight),
                                              ("bb", self.opts.bb_weight)) if k in terms]
        if self.opts.clip == "none":
            return torch.stack(weighted).sum()
        return self.clipped(weighted, F.cross_entropy(batch.logits_s, batch.y))

    def clipped(self, weighted: Sequence[torch.Tensor], ce: torch.Tensor) -> torch.Tensor:
        """A scalar of value ``sum(weighted)`` whose gradient in the student's parameters is
        ``sum_k clip(grad weighted_k)``, each clipped to ``ramp * |grad ce|`` (per tensor, or over
        the whole gradient), as the author's ``clip_by_norm``: ``g * n / max(|g|, n)``."""
        params = self._student_params
        if not params:
            raise RuntimeError("IEPKT's clipping needs bind_student(student) first (the Distiller calls it)")
        r = ramp(self._epoch) if self.opts.ramp else 1.0
        g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
        n_ce = [torch.zeros((), device=ce.device) if g is None else g.detach().norm() for g in g_ce]
        total: list[torch.Tensor | None] = [None] * len(params)
        for term in weighted:
            if not term.requires_grad:
                continue
            g = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            if self.opts.clip == "tensor":
                scales = [None if gi is None else clip_scale(gi.norm(), r * n) for gi, n in zip(g, n_ce)]
            else:
                norm = torch.sqrt(sum(gi.pow(2).sum() for gi in g if gi is not None))
                limit = r * torch.sqrt(torch.stack([n.pow(2) for n in n_ce]).sum())
                scales = [clip_scale(norm, limit)] * len(params)
            for i, (gi, s) in enumerate(zip(g, scales)):
                if gi is not None:
                    total[i] = gi * s if total[i] is None else total[i] + gi * s
        value = torch.stack([t.detach() for t in weighted]).sum()
        lin = sum((gi.detach() * p).sum() for gi, p in zip(total, params) if gi is not None)
        if not isinstance(lin, torch.Tensor):
            return value
        return value + (lin - lin.detach())


@register
class IEPKTBB(IEPKT):
    """``iepkt-bb``: IEPKT plus the black-box term (the code's multi-head graph, MHGD):
    ``heads - 1`` learned heads and the extrinsic one from the MPNN's messages, trained in the GNN
    stage with the estimator; the main stage adds ``bb_weight * KL(tanh G_S || tanh G_T)``."""

    name = "iepkt-bb"
    summary = "IEPKT + the black-box multi-head graph term"
    black_box = True
