"""distill under torchrun: refused (one line on rank 0, nothing written) until it trains with DDP."""
from __future__ import annotations

import pytest

from tests.distributed._launch import error_lines, spawn


@pytest.mark.slow
def test_distill_is_refused_under_torchrun(tmp_path):
    argv = ["distill", "--student", "resnet8x4", "--method", "ce", "--data", f"cifar100:{tmp_path / 'cifar'}",
            "--run", str(tmp_path / "run"), "-q"]
    outs = spawn([argv, argv])
    assert [o.returncode for o in outs] == [2, 2]
    assert error_lines(outs[0].stderr) == [
        "error: distill does not run under torchrun yet (no DistributedDataParallel training): run "
        "`neurosem distill ...` as one process"]
    assert error_lines(outs[1].stderr) == []
    assert list(tmp_path.iterdir()) == []
