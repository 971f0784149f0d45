"""The pieces of distill's data parallelism on one process (the two-process runs are in
tests/distributed/test_distill.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from neurosem.distill import _ddp
from neurosem.distributed import World


class _Comm:
    def __init__(self, rank: int, size: int) -> None:
        self.world = World(rank=rank, size=size, local_rank=rank)
        self.rank, self.size = rank, size


def test_spread_cuts_a_batch_into_contiguous_slices():
    spreads = [_ddp.Spread.of(_Comm(r, 2), 11) for r in range(2)]
    assert [(s.sizes, s.lo, s.hi) for s in spreads] == [((5, 6), 0, 5), ((5, 6), 5, 11)]
    assert [s.share for s in spreads] == [5 / 11, 6 / 11]
    x = torch.arange(11)
    assert torch.equal(torch.cat([s.mine(x) for s in spreads]), x)
    assert [_ddp.Spread.of(_Comm(r, 3), 7).sizes for r in range(3)] == [(2, 2, 3)] * 3


def test_a_batch_that_cannot_be_split_is_named():
    assert _ddp.check_splittable(24, 7, 2) is None           # 7, 7, 7, 3
    assert _ddp.check_splittable(24, 8, 3) is None           # no last partial batch
    assert _ddp.check_splittable(24, 23, 2) == (
        "the last batch has 1 image(s) for 2 ranks (24 images, --batch-size 23): pick a --batch-size whose "
        "last batch has at least 2 images")
    assert _ddp.check_splittable(24, 2, 4) == "--batch-size 2 is smaller than the 4 ranks: each rank needs an image"


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_is_batchnorm_on_one_rank(one_rank_group):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), ref)
    swapped = _ddp.synced_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), torch.device("cpu"))
    swapped.load_state_dict(model.state_dict())
    assert type(swapped[1]) is _ddp.GlobalBatchNorm2d and swapped.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    model, swapped = model.double(), swapped.double()
    for _ in range(2):
        y0, y1 = model(x), swapped(x)
        torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
        g0 = torch.autograd.grad(y0.square().sum(), list(model.parameters()))
        g1 = torch.autograd.grad(y1.square().sum(), list(swapped.parameters()))
        for a, b in zip(g0, g1):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for k, v in model.state_dict().items():     # running mean, unbiased running variance, count
        torch.testing.assert_close(swapped.state_dict()[k], v, rtol=1e-12, atol=1e-12)
    model.eval(), swapped.eval()
    torch.testing.assert_close(swapped(x), model(x))


def test_gathered_rows_pass_the_gradient_back_to_their_own_rows(one_rank_group):
    x = torch.randn(3, 4, requires_grad=True)
    y = _ddp.gather_rows(x, (3,), 0)
    (y * torch.arange(4.0)).sum().backward()
    assert torch.equal(y, x.detach()) and torch.equal(x.grad, torch.arange(4.0).expand(3, 4))
    assert _ddp.gather_rows(None, (3,), 0) is None
