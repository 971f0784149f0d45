"""embed under ``torchrun``: P-bar from the ranks' shares, and the paper trainer with DDP (:class:`PaperShards`).

A single process adds the ``[C, C]`` float64 part of each batch of 256 stored images to a running
sum, batch after batch. Float64 addition is not associative, so a plain all-reduce of per-rank
sums would differ from that in the last bits (and the fit, which follows P-bar, would then differ
too). Here each rank computes the parts of its contiguous share of the batches (the expensive
softmaxes, in parallel), keeps them, and the running sum travels along the ranks: rank 0 sums its
parts from zero, sends the sum to rank 1, which adds its parts in order, and so on; the last rank
sends the total to rank 0, which fits and writes. The result is P-bar bit for bit as one process
computes it. Memory: each rank > 0 holds its parts until the sum arrives (``[C, C]`` float64 per
batch of 256 images: 2 MB per batch for C = 512).
"""
from __future__ import annotations

from typing import Any, Mapping

from neurosem.distributed import Comm, together
from neurosem.errors import NeurosemError

#: images per P-bar batch (as :meth:`neurosem._embed_train.StoreSource.batches` reads them)
STEP = 256


def pbar_sharded(comm: Comm, source: Any, temperature: float, device: Any) -> "dict[str, Any] | None":
    """``{layer: P-bar [C, C] float64}`` on rank 0 (None on the other ranks).

    Args:
        source: a :class:`~neurosem._embed_train.StoreSource` (the run's ``activations.h5``).
    """
    import torch
    import torch.distributed as dist

    from neurosem._progress import progress as bar
    from neurosem.embed import PbarAccumulator

    n = source.n_images
    lo, hi = comm.shard(n, STEP)
    ids = source.image_ids()
    parts: dict[str, list[Any]] = {layer: [] for layer in source.layers}
    threads = torch.get_num_threads()
    with together(comm):
        batches = source.store.iter_batches(source.layers, batch_size=STEP, start=lo, stop=hi)
        for start, acts in bar(batches, total=-(-(hi - lo) // STEP), desc="P-bar",
                               enabled=source.progress and comm.main, unit="batch"):
            for layer in source.layers:
                acc = PbarAccumulator(source.n_units[layer], temperature, device, name=layer)
                if acc._device is None or acc._device.type == "cpu":
                    torch.set_num_threads(1)  # as accumulate_pbar on the CPU: the same sums
                try:
                    acc.add(acts[layer], start, ids)
                finally:
                    torch.set_num_threads(threads)
                parts[layer].append(acc._sum)
    out = {}
    for layer in source.layers:
        c = source.n_units[layer]
        total = torch.zeros(c, c, dtype=torch.float64)
        if comm.rank > 0:
            dist.recv(total, src=comm.rank - 1)
        for part in parts[layer]:
            total += part.cpu()     # (0 + p1) + p2 + ...: the single process's order
        if comm.rank < comm.size - 1:
            dist.send(total, dst=comm.rank + 1)
        elif comm.size > 1 and not comm.main:
            dist.send(total, dst=0)
        if comm.main and comm.size > 1:
            dist.recv(total, src=comm.size - 1)
        if comm.main:
            if n == 0:
                raise NeurosemError(f"no images were seen for layer {layer!r}: the dataset is empty")
            out[layer] = total / n
        parts[layer].clear()
    return out if comm.main else None


def check_world(comm: Comm, no_store: bool, trainer: str, batch_size: int) -> None:
    """What embed cannot do under torchrun, as one line: ``--no-store``, a batch smaller than the world."""
    if no_store:
        raise NeurosemError("under torchrun, embed reads the run's stored activations: record them first "
                            "(`torchrun ... -m neurosem -- record MODEL --data PATH --run RUN`) and drop "
                            "--no-store, or run without torchrun")
    if trainer == "paper" and batch_size < comm.size:
        raise NeurosemError(f"--batch-size {batch_size} is smaller than the {comm.size} processes: each trains on "
                            f"its share of every mini-batch; use --batch-size >= {comm.size} or fewer processes")


def check_embed_args(comm: Comm, run: str, args: Mapping[str, Any]) -> None:
    """The run directory is shared and every rank was given the same ``args``."""
    from pathlib import Path

    comm.check_shared_dir(Path(run))
    comm.check_same("embed", {**args, "run": run})


class PaperShards:
    """The paper trainer (``embed --trainer paper``) under ``torchrun``: DistributedDataParallel.

    Every rank reads the same seeded global mini-batches (:func:`~neurosem._embed_train.store_epoch_batches`
    draws the same order from the seed and the epoch on every rank) and computes the softmaxes of
    its contiguous share of each batch, ``lo..hi`` of :func:`~neurosem.distributed.shard_range`
    (uneven when the batch does not split evenly, empty for a rank when the batch has fewer
    images than ranks). The global batch and the learning rate are those of one process.

    Why the loss of a share is weighted: eq. 1 on a batch of ``B`` images is linear in its
    ``P = (1/B) sum_n P_n``, so the batch loss is the sum over ranks of ``L_r = L((1/B) sum_{n in
    share r} P_n)`` (divided by the global ``B``, not the share's size) and so is its gradient.
    DDP averages the ranks' gradients (sum / W), so each rank back-propagates ``W * L_r``; the sum
    is then the single process's gradient up to float summation order, also for uneven shares.

    Why DDP and not an all-reduce of the ``[C, K]`` gradients by hand: both are the same sum; DDP
    overlaps it with the backward pass, checks that every rank holds the same parameters (and
    broadcasts rank 0's at the start), and runs on NCCL for CUDA vectors and gloo for CPU ones
    without code of ours. The optimiser (SGD, momentum, weight decay) and the schedule then run
    on every rank on the same averaged gradient, so the vectors stay equal on every rank.

    Every rank reads the whole of each block of the store (the batches are drawn from it), the
    expensive part (the ``[b, C, C]`` softmaxes and the backward pass) is split.

    Args:
        params: the vectors ``[C, K]`` of each layer (``torch.nn.Parameter``), in layer order.
        device: where they live (CPU, or this rank's GPU).
    """

    def __init__(self, comm: Comm, params: Any, temperature: float, device: Any) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel

        from neurosem.embed import embedding_loss

        class Vectors(torch.nn.Module):
            """The vectors; ``forward([P [C, C] per layer]) -> [layers]`` eq. 1 of each layer."""

            def __init__(self) -> None:
                super().__init__()
                self.vectors = torch.nn.ParameterList(params)

            def forward(self, pbars: list[Any]) -> Any:
                return torch.stack([embedding_loss(P, S, temperature) for P, S in zip(pbars, self.vectors)])

        self.comm, self.temperature, self.device = comm, float(temperature), device
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        self.model = DistributedDataParallel(Vectors(), device_ids=ids)
        self.dtypes = [p.dtype for p in params]
        self.sizes = [int(p.shape[0]) for p in params]

    def losses(self, acts: list[Any]) -> "tuple[Any, Any, list[Any], int]":
        """One global batch ``[acts [B, C, H, W] per layer]`` -> (what to back-propagate, this rank's
        part of the batch loss, its part of each layer's loss, ``B``)."""
        import torch

        from neurosem.embed import as_tensor, sum_similarity_probs

        b = int(acts[0].shape[0])
        lo, hi = self.comm.shard(b)
        pbars = []
        for a, c, dtype in zip(acts, self.sizes, self.dtypes):
            if hi > lo:
                x = as_tensor(a[lo:hi], self.device).flatten(2)
                pbars.append(sum_similarity_probs(x, self.temperature, dtype) / b)
            else:   # no image of this batch here: no part of the loss, a zero gradient
                pbars.append(torch.zeros(c, c, dtype=dtype, device=self.device))
        parts = self.model(pbars)
        mean = parts.mean()
        return mean * self.comm.size, mean, list(parts), b

    def sum_epoch(self, total: Any, seen: Mapping[str, Any]) -> "tuple[float, dict[str, float]]":
        """The epoch's loss sums over the ranks: ``total`` and ``{layer: sum}`` (this rank's parts)."""
        import numpy as np

        names = list(seen)
        sums = self.comm.sum(np.array([float(total)] + [float(seen[l]) for l in names], dtype=np.float64))
        return float(sums[0]), {l: float(v) for l, v in zip(names, sums[1:])}
