"""distill under ``torchrun``: data parallel with the global batch preserved, equal to one process.

Every rank builds the same loader (the same per-epoch seeded shuffle and augmentation as a single
process), reads the whole global batch of ``--batch-size`` images and trains on its contiguous
slice of it (``batch_size / world_size`` images, the later ranks one more when it does not
divide). Reading the whole batch costs each rank the decoding of the others' images (CIFAR's are
3 KB each) and buys exactness: the augmented images, the shuffle and the RNG draws (CRD's
negatives) are the single process's, for any ``--workers``.

The step (:meth:`neurosem.distill.distiller.Distiller.step` with a :class:`Spread`):

- the student runs on this rank's slice; its BatchNorm layers normalise with the statistics of the
  global batch (``torch.nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm2d` over gloo on CPU);
- CE and KD are per-image means, weighted by this rank's share ``n_r / n``;
- the method's term sees the global batch: the tapped features, logits, labels and indices are
  gathered (:func:`gather_rows`; the gradient of the gathered features flows back to this rank's
  rows only), so batch relations (SP, CC, RKD, PKT), CRD's memory bank (kept whole on every rank,
  updated with the global batch: every rank holds the same bank) and regressors with BatchNorm
  see what a single process sees;
- after ``backward`` the student's gradients are summed over the ranks and the method's own
  parameters' gradients (computed in full on every rank) are averaged, in one all-reduce
  (:func:`reduce_gradients`), and every rank takes the same optimiser step.

The result is one process's training up to float summation order. This is what
``DistributedDataParallel`` does for a single module, written out, because a distillation step
trains two (the student, whose gradients are summed, and the method's regressors, embeddings and
memory, which must see the global batch), with parameters that change between the stages of AB,
FT and FSP. IEPKT is not run this way: its gradient clipping differentiates inside the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from torch import nn

from neurosem.distributed import Comm, shard_range

if TYPE_CHECKING:  # pragma: no cover
    from neurosem.distill.methods.base import Batch


def _all_gather_rows(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Every rank's ``x: [sizes[r], ...]`` stacked in rank order: ``[sum(sizes), ...]``."""
    import torch.distributed as dist

    m = max(sizes)
    padded = x.new_zeros((m, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather along the batch; the gradient of the whole is the same on every rank (the term
    is computed identically there), so each rank keeps its own rows of it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: tuple[int, ...], lo: int) -> torch.Tensor:  # type: ignore[override]
        ctx.lo, ctx.n = lo, x.shape[0]
        return _all_gather_rows(x.detach(), sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return grad[ctx.lo: ctx.lo + ctx.n], None, None


def gather_rows(x: torch.Tensor | None, sizes: Sequence[int], lo: int) -> torch.Tensor | None:
    """The global batch from each rank's rows ``x: [n_r, ...]`` -> ``[n, ...]`` (None stays None).

    Differentiable: the gradient reaching this rank's ``x`` is its rows ``lo:lo + n_r`` of the
    global gradient.
    """
    if x is None:
        return None
    if x.requires_grad:
        return _GatherRows.apply(x, tuple(sizes), lo)
    return _all_gather_rows(x, sizes)


class _SumOverRanks(torch.autograd.Function):
    """``sum_r t_r`` on every rank; the gradient of each ``t_r`` is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's, over any backend (gloo too).

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this is the same computation on CPU tensors:
    the per-channel sum is all-reduced for the mean, then the sum of squared deviations for the
    (biased) variance that normalises; the running variance takes the unbiased one, with the
    global count, as BatchNorm does. The state dict is a BatchNorm2d's (checkpoints load in a
    single process). ``x: [n_r, C, H, W]``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.training:
            return super().forward(x)
        # the count travels with the sums (one all-reduce): exact in float32 up to 2^24 values
        local = torch.cat([x.sum((0, 2, 3)), x.new_full((1,), float(x.shape[0] * x.shape[2] * x.shape[3]))])
        sums = _SumOverRanks.apply(local)
        n = float(sums[-1].detach().item())
        mean = sums[:-1] / n
        d = x - mean[None, :, None, None]
        var = _SumOverRanks.apply((d * d).sum((0, 2, 3))) / n
        y = d * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1.0, 1.0)) * m)
        return y


def synced_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm2d normalising over the global batch (in place where possible).

    CUDA: ``torch.nn.SyncBatchNorm``; otherwise :class:`GlobalBatchNorm2d`. Parameters and
    buffers keep their names and values.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _swap_bn(module)


def _swap_bn(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, device=_device_of(module))
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _swap_bn(child))
    return module


def _device_of(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


@dataclass(frozen=True)
class Spread:
    """How one global batch of ``n`` images is split over the ranks (contiguous slices).

    Example:
        >>> s = Spread.of(comm, 9)   # doctest: +SKIP
        >>> s.sizes, s.lo, s.hi      # on rank 1 of 2  # doctest: +SKIP
        ((4, 5), 4, 9)
    """

    n: int
    sizes: tuple[int, ...]
    lo: int
    hi: int

    @classmethod
    def of(cls, comm: Comm, n: int) -> "Spread":
        cuts = [shard_range(n, comm.size, r) for r in range(comm.size)]
        lo, hi = cuts[comm.rank]
        return cls(n=int(n), sizes=tuple(h - l for l, h in cuts), lo=lo, hi=hi)

    @classmethod
    def split(cls, comm: "Comm | None", *tensors: torch.Tensor) -> "tuple[Spread | None, ...]":
        """``(spread, *this rank's rows of each tensor)`` of a global batch; ``(None, *tensors)``
        for a single process (``comm`` None)."""
        if comm is None:
            return (None, *tensors)
        spread = cls.of(comm, int(tensors[0].shape[0]))
        return (spread, *(spread.mine(t) for t in tensors))

    @property
    def share(self) -> float:
        """This rank's weight ``n_r / n`` for per-image means (CE, KD)."""
        return (self.hi - self.lo) / self.n

    def mine(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's rows of a global-batch tensor."""
        return None if t is None else t[self.lo: self.hi]

    def gather(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The global batch from this rank's rows (see :func:`gather_rows`)."""
        return gather_rows(t, self.sizes, self.lo)

    def batch(self, b: "Batch") -> "Batch":
        """``b`` (this rank's rows) as the global batch the method sees."""
        from neurosem.distill.methods.base import Batch

        return Batch(fs=[self.gather(f) for f in b.fs], ft=[self.gather(f) for f in b.ft],
                     logits_s=self.gather(b.logits_s), logits_t=self.gather(b.logits_t),
                     y=self.gather(b.y), index=self.gather(b.index))


def broadcast_state(modules: Iterable[nn.Module]) -> None:
    """Rank 0's parameters and buffers on every rank (in place)."""
    import torch.distributed as dist

    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                dist.broadcast(t.data, src=0)


class GradientSync:
    """After ``backward``: the student's gradients summed and the others' averaged over the ranks
    (:func:`reduce_gradients`), with the split of ``params`` made once.

    Args:
        params: the parameters the optimiser steps (the student's and the method's).
        student: the student's parameters (those among ``params`` are summed).
    """

    def __init__(self, comm: Comm, params: Iterable[nn.Parameter], student: Iterable[nn.Parameter]) -> None:
        ids = {id(p) for p in student}
        params = list(params)
        self.comm = comm
        self.summed = [p for p in params if id(p) in ids]
        self.averaged = [p for p in params if id(p) not in ids]

    def __call__(self) -> None:
        reduce_gradients(self.comm, self.summed, self.averaged)


def reduce_gradients(comm: Comm, summed: Sequence[nn.Parameter], averaged: Sequence[nn.Parameter]) -> None:
    """Sum the ``summed`` parameters' gradients and average the ``averaged`` ones over the ranks,
    in one flat all-reduce (parameters without a gradient are left without one: the same on every
    rank, as every rank runs the same graph)."""
    import torch.distributed as dist

    pairs = [(p, 1.0) for p in summed if p.grad is not None]
    pairs += [(p, 1.0 / comm.size) for p in averaged if p.grad is not None]
    if not pairs:
        return
    flat = torch.cat([p.grad.reshape(-1) for p, _ in pairs])
    dist.all_reduce(flat)
    at = 0
    for p, scale in pairs:
        k = p.grad.numel()
        g = flat[at: at + k].view_as(p.grad)
        p.grad.copy_(g if scale == 1.0 else g * scale)
        at += k


def check_splittable(n_train: int, batch_size: int, world: int) -> str | None:
    """Why the global batches of ``n_train`` images cannot be split over ``world`` ranks, or None."""
    last = n_train % batch_size
    if batch_size < world:
        return f"--batch-size {batch_size} is smaller than the {world} ranks: each rank needs an image"
    if 0 < last < world:
        return (f"the last batch has {last} image(s) for {world} ranks ({n_train} images, --batch-size "
                f"{batch_size}): pick a --batch-size whose last batch has at least {world} images")
    return None
