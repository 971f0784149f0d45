"""Two distill steps in float64, on one process or as one rank of several (``python -m`` this file).

``python -m tests.distributed._ddp_step OUT METHOD[,METHOD...]`` writes ``OUT/<method>-rank<r>.pt``: the gradients of
every trainable parameter after each step (after the ranks' all-reduce) and the student's and the
method's states after the steps. Run once without ``WORLD_SIZE`` (the reference) and once per
rank of a launch: the files must agree up to float64 summation order.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

BATCH = 11          # 5 + 6 images on two ranks: an uneven split
N_DATA = 40


def main(out: Path, method: str) -> None:
    from neurosem.distill import zoo
    from neurosem.distill._ddp import GradientSync, Spread, synced_batchnorm
    from neurosem.distill.distiller import build_distiller
    from neurosem.distill.methods import MethodOptions
    from neurosem.distributed import current

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    comm = current()
    torch.manual_seed(5)
    teacher = zoo.build("resnet8", num_classes=4).eval()
    labels = torch.arange(N_DATA) % 4
    opts = MethodOptions(nce_k=7, feat_dim=8, seed=0)
    d = build_distiller(method, "resnet8", "resnet8", num_classes=4, teacher_model=teacher, options=opts,
                        n_data=N_DATA, labels=labels)
    if comm is not None:
        d.student = synced_batchnorm(d.student, torch.device("cpu"))
    params = list(d.init_parameters()) if method in ("ab", "ft", "fsp") else list(d.parameters())
    sync = GradientSync(comm, params, d.student.parameters()) if comm is not None else None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, BATCH, 3, 32, 32, generator=g)
    index = torch.randperm(N_DATA, generator=g)[: 2 * BATCH].view(2, BATCH)
    y = labels[index]
    grads = []
    d.train()
    with d.hooked():
        for step in range(2):
            torch.manual_seed(10 + step)     # CRD draws its negatives from the global RNG
            spread, xs, ys, ix = Spread.split(comm, x[step], y[step], index[step])
            if method in ("ab", "ft", "fsp"):
                loss = d.init_step(xs, ys, ix, spread)
            else:
                loss, _, _ = d.step(xs, ys, ix, spread)
            for p in params:
                p.grad = None
            loss.backward()
            if sync is not None:
                sync()
            grads.append([None if p.grad is None else p.grad.clone() for p in params])
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p -= 0.1 * p.grad
    rank = 0 if comm is None else comm.rank
    torch.save({"grads": grads, "student": d.student.state_dict(), "criterion": d.criterion.state_dict()},
               out / f"{method}-rank{rank}.pt")


if __name__ == "__main__":
    for name in sys.argv[2].split(","):
        main(Path(sys.argv[1]), name)
