"""PaperShards in this process: a world of one rank (gloo) trains the vectors of train_paper, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from neurosem.distributed import Comm, World


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Comm(World(rank=0, size=1))
    finally:
        dist.destroy_process_group()


def test_ddp_of_one_rank_is_train_paper(one_rank_group):
    import torch

    from neurosem._embed_train import tensor_epoch_batches, train_paper

    g = torch.Generator().manual_seed(0)
    acts = {"a": torch.rand(10, 4, 3, 3, generator=g), "b": torch.rand(10, 5, 2, 2, generator=g)}
    kwargs = dict(dim=3, epochs=3, milestones=(2,), temperature=0.5, seed=1)
    plain = train_paper(tensor_epoch_batches(acts, 4, 0), {"a": 4, "b": 5}, **kwargs)      # batches 4, 4, 2
    ddp = train_paper(tensor_epoch_batches(acts, 4, 0), {"a": 4, "b": 5}, comm=one_rank_group, **kwargs)
    for layer in ("a", "b"):
        assert ddp.snapshots[layer].tobytes() == plain.snapshots[layer].tobytes()
        assert not np.array_equal(plain.snapshots[layer][0], plain.snapshots[layer][-1])
    assert ddp.train_loss.tobytes() == plain.train_loss.tobytes()
    assert ddp.history_loss.tobytes() == plain.history_loss.tobytes()
