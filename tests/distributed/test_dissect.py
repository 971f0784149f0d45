"""dissect under torchrun: exact merges of thresholds, tallies and top images; dissect.h5 equal to one process's."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from neurosem.dissect._dist import merge_f16, merge_tops, merge_top_quantile
from neurosem.dissect.topmaps import TopMaps
from neurosem.errors import NeurosemError
from tests.distributed._compare import h5_differences
from tests.distributed._launch import MODEL, error_lines, spawn, torchrun
from tests.distributed._threads import run_ranks


def _acts(seed: int = 0) -> np.ndarray:
    """[N=30, C=5, 4, 4] float16 with many ties (values on a coarse grid) and a saturated unit."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.standard_normal((30, 5, 4, 4)) * 4) / 4
    x[:, 2] = np.minimum(x[:, 2], 0.5)
    return x.astype(np.float16)


@pytest.mark.parametrize("q", [0.005, 0.05, 0.3])
@pytest.mark.parametrize("cut", [(0, 12, 30), (0, 1, 30), (0, 7, 19, 30)])
def test_f16_histograms_summed_give_the_exact_quantile(q, cut):
    from neurosem.dissect._f16quantile import F16Quantile

    x = _acts()
    ref = np.quantile(x.astype(np.float64).transpose(1, 0, 2, 3).reshape(5, -1), 1 - q, axis=1)
    total = 30 * 16

    def rank(comm):
        fq = F16Quantile(5, q, total=total)
        part = x[cut[comm.rank]:cut[comm.rank + 1]]
        for i in range(0, len(part), 4):
            fq.add(part[i:i + 4])
        merge_f16(comm, fq)
        return fq.result()

    for out in run_ranks(len(cut) - 1, rank):
        assert out.tobytes() == ref.tobytes()


@pytest.mark.parametrize("q", [0.005, 0.1])
def test_top_quantiles_merged_give_the_exact_quantile(q):
    import torch

    from neurosem.dissect.quantile import TopQuantile

    x = _acts(1).astype(np.float32)
    ref = np.quantile(x.astype(np.float64).transpose(1, 0, 2, 3).reshape(5, -1), 1 - q, axis=1)

    def rank(comm):
        tq = TopQuantile(5, q, total=30 * 16)
        lo, hi = comm.shard(30, 4)
        for i in range(lo, hi, 4):
            tq.add(torch.from_numpy(x[i:min(i + 4, hi)]))
        return merge_top_quantile(comm, tq)

    for out in run_ranks(2, rank):
        assert out.tobytes() == ref.tobytes()


def test_merged_top_images_equal_one_stream():
    rng = np.random.default_rng(2)
    n, c, k = 13, 4, 3
    sizes = rng.integers(0, 3, (n, c))            # many ties in the mask size ...
    maxes = np.round(rng.random((n, c)) * 2) / 2  # ... and in the peak: the position decides
    maxes[5, 1] = np.nan
    maps = rng.standard_normal((n, c, 2, 2)).astype(np.float16)
    one = TopMaps(c, k, (2, 2), np.float16)
    for i in range(0, n, 3):
        one.add(i, sizes[i:i + 3], maxes[i:i + 3], maps[i:i + 3])
    ref = one.result()
    for cut in ((0, 6, 13), (0, 1, 2, 13), (0, 13, 13)):
        parts = []
        for a, b in zip(cut, cut[1:]):
            t = TopMaps(c, k, (2, 2), np.float16)
            t.add(a, sizes[a:b], maxes[a:b], maps[a:b])
            parts.append(t.result())
        got = merge_tops(parts, k)
        for field in ("images", "sizes", "maxes", "maps"):
            assert getattr(got, field).tobytes() == getattr(ref, field).tobytes(), (cut, field)
    # fewer images than k: the empty slots are those of a single stream
    few = TopMaps(c, 4, (2, 2), np.float16)
    few.add(0, sizes[:2], maxes[:2], maps[:2])
    halves = [TopMaps(c, 4, (2, 2), np.float16) for _ in range(2)]
    halves[0].add(0, sizes[:1], maxes[:1], maps[:1])
    halves[1].add(1, sizes[1:2], maxes[1:2], maps[1:2])
    got = merge_tops([h.result() for h in halves], 4)
    assert got.images.tolist() == few.result().images.tolist()
    assert got.maps.tobytes() == few.result().maps.tobytes()


def test_agree_raises_one_error_on_rank_zero():
    from neurosem.distributed import ReportedOnRankZero

    def rank(comm):
        def check():
            if comm.rank == 1:
                raise NeurosemError("rank one cannot read the labels")
        try:
            comm.agree(check)
        except NeurosemError as exc:
            return type(exc).__name__, str(exc)

    assert run_ranks(2, rank) == [("NeurosemError", "rank 1: rank one cannot read the labels"),
                                  (ReportedOnRankZero.__name__, "rank one cannot read the labels")]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_broden):
    from neurosem.cli import main

    run = tmp_path_factory.mktemp("rec") / "run"
    main(["record", MODEL, "--data", str(tiny_broden), "--run", str(run), "--layers", "relu1,relu2",
          "-b", "5", "--workers", "0", "-q"])
    return run


@pytest.mark.slow
def test_two_processes_write_the_single_process_dissection(recorded, tiny_broden, tmp_path):
    from neurosem.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(recorded, one)
    shutil.copytree(recorded, two)
    args = ["--broden", str(tiny_broden), "-b", "3", "--threads", "1", "-q", "--top", "3"]
    main(["dissect", "--run", str(one), *args])
    out = torchrun(["dissect", "--run", str(two), *args])
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("dissection: ")] != []
    assert out.stdout.count("\ndissection: ") + out.stdout.startswith("dissection: ") == 1   # rank 0 alone
    assert h5_differences(one / "dissect.h5", two / "dissect.h5", skip_attrs=()) == []
    for name in ("relu1.csv", "relu2.csv", "summary.json"):
        assert (one / "dissect" / name).read_text().replace(str(one), "") == \
            (two / "dissect" / name).read_text().replace(str(two), "")


@pytest.mark.slow
def test_dissect_arguments_that_differ_between_ranks(recorded, tiny_broden, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    base = ["dissect", "--run", str(run), "--broden", str(tiny_broden), "-q", "--no-report"]
    outs = spawn([base + ["--quantile", "0.01"], base + ["--quantile", "0.02"]])
    assert [o.returncode for o in outs] == [2, 2]
    assert error_lines(outs[0].stderr) == [
        "error: the ranks were started with different dissect arguments (quantile: 0.01 on rank 0, 0.02 on "
        "rank 1); launch every rank with the same command"]
    assert error_lines(outs[1].stderr) == []
    assert not (run / "dissect.h5").exists() and not (run / "dissect").exists()


def test_torch_tallies_summed_equal_one_tally():
    import torch

    from neurosem.dissect._dist import merge_tally
    from neurosem.dissect.tally import Tally

    rng = np.random.default_rng(3)
    acts = torch.from_numpy(rng.standard_normal((9, 3, 4, 4)).astype(np.float32))
    seg = torch.from_numpy(rng.integers(0, 4, (9, 1, 8, 8)))          # labels 1, 2 (cat 0), 3 (cat 1)
    primary, thr = [-1, 0, 0, 1], torch.tensor([0.2, 0.5, 1.0])
    one = Tally(thr, primary, 2)
    one.add(acts, seg)
    ref = one.result()

    def rank(comm):
        t = Tally(thr, primary, 2)
        lo, hi = comm.shard(9, 2)
        t.add(acts[lo:hi], seg[lo:hi])
        merge_tally(comm, t)
        return t.result()

    for got in run_ranks(2, rank):
        assert got.n_images == 9
        for field in ("labels", "iou", "gt", "both", "act", "unit_pixels"):
            assert np.asarray(getattr(got, field)).tobytes() == np.asarray(getattr(ref, field)).tobytes(), field
