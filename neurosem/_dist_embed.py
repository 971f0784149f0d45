"""P-bar under ``torchrun`` (``embed --trainer fit``): the ranks' shares, summed in a single run's order.

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


def check_embed_args(comm: Comm, run: str, args: Mapping[str, Any]) -> None:
    """The run directory is shared and every rank was given the same ``args``."""
    from pathlib import Path

    comm.check_shared_dir(Path(run))
    comm.check_same("embed", {**args, "run": run})
