"""``record`` under ``torchrun``: every rank records a contiguous shard, rank 0 merges them.

Rank ``r`` of ``W`` records the images of its share of the batches (cut at multiples of the batch
size, so every forward pass sees the very batch a single process would) into its own store,
``activations.shard<r>of<W>.h5`` (a complete :class:`~neurosem.store.ActivationStore`: checksums,
kill-safe, resumable). When every shard is complete, rank 0 copies them in order into one
``activations.h5``, created with the chunk rows a single process uses and written through
:meth:`~neurosem.store.ActivationStore.append`, so its datasets and checksums equal a single
process's byte for byte; then the shards are deleted.

Why a merge and not HDF5 virtual datasets: a virtual ``activations.h5`` would depend on W other
files (a copied or moved run breaks), its chunks and per-block checksums would follow the shard
boundaries instead of a single run's, and every reader (dissect, embed, --repair) would meet a
layout it was not written for. The merge costs one sequential copy on rank 0 (the recording, the
part that scales, is done by then).

A kill of any rank leaves every shard at its ``n_done``; the same command on the same number of
processes resumes each one (another number is refused: the shards would not line up).
"""
from __future__ import annotations

import re
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from neurosem.distributed import Comm
from neurosem.errors import NeurosemError

#: shard stores of a distributed recording: activations.shard<rank>of<world>.h5
_SHARD = re.compile(r"^activations\.shard(\d+)of(\d+)\.h5$")
#: most bytes copied per write while merging
MERGE_BYTES = 64 << 20


class _Shard:
    """Items ``lo..hi`` of a dataset, each ``{"image", "id"}`` with the id a single run gives it."""

    def __init__(self, ds: Any, lo: int, hi: int) -> None:
        self.ds, self.lo, self.hi = ds, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int) -> dict[str, Any]:
        from neurosem.record import _Indexed

        image, image_id = _Indexed(self.ds, self.lo + i, self.lo + i + 1)[0]
        return {"image": image, "id": image_id}


def shard_path(run: Path, rank: int, world: int) -> Path:
    """``run/activations.shard<rank>of<world>.h5``."""
    return Path(run) / f"activations.shard{rank}of{world}.h5"


def shard_files(run: Path) -> dict[Path, tuple[int, int]]:
    """The shard stores in ``run``: ``{path: (rank, world)}``."""
    out = {}
    if Path(run).is_dir():
        for p in sorted(Path(run).iterdir()):
            m = _SHARD.match(p.name)
            if m:
                out[p] = (int(m.group(1)), int(m.group(2)))
    return out


def _identity(prov: Mapping[str, Any]) -> dict[str, Any]:
    """What every rank must agree on (the device and versions may differ)."""
    from neurosem.record import IDENTITY

    return {**{k: prov.get(k) for k in IDENTITY}, "batch_size": prov.get("batch_size"),
            "weights_arg": prov.get("weights_arg")}


def record_sharded(job: Any, comm: Comm, force: bool, repair: bool) -> Path:
    """:func:`neurosem.record.record` of ``job`` on every rank of ``comm``; returns ``activations.h5``."""
    rd, world = job.rd, comm.size
    comm.check_shared_dir(rd.path)
    comm.check_same("record", {**_identity(job.prov), "force": force, "repair": repair, "run": str(rd.path)})
    with ExitStack() as stack:
        # rank 0 holds the run's lock for everybody (no second record of the run meanwhile)
        comm.agree(lambda: stack.enter_context(rd.lock("record")) if comm.main else None)
        plan = comm.agree(lambda: _plan(job, world, force, repair) if comm.main else None)
        plan = comm.broadcast(plan)
        if plan == "done":
            return job.path
        lo, hi = comm.shard(job.n_images, job.batch_size)
        comm.agree(lambda: _record_shard(job, comm, lo, hi))
        comm.agree(lambda: _merge(job, world) if comm.main else None)
    comm.barrier()
    return job.path


def _plan(job: Any, world: int, force: bool, repair: bool) -> str:
    """On rank 0: ``"done"`` (a complete store is reused or repaired) or ``"shards"``."""
    from neurosem._recording import repair as repair_store
    from neurosem.record import _mismatch, differences
    from neurosem.store import ActivationStore

    path, shards = job.path, shard_files(job.rd.path)
    if force:
        for p in [path, path.with_name(path.name + ".tmp"), *shards]:
            p.unlink(missing_ok=True)
        return "shards"
    other = sorted({w for _, w in shards.values() if w != world})
    if other:
        raise NeurosemError(
            f"{job.rd.path} holds an unfinished recording made by {other[0]} processes, not {world}: resume it "
            f"with `torchrun --nproc-per-node {other[0]} ...` (nodes x processes = {other[0]}), or start over "
            "with --force")
    if path.exists() and not shards:
        with ActivationStore.open(path) as old:
            diffs = differences(old.provenance, job.prov, allow_layer_subset=old.complete)
            if diffs:
                raise _mismatch(path, diffs, old.provenance, job.prov)
            complete, n_done = old.complete, old.n_done
        if not complete:
            raise NeurosemError(
                f"{path} holds an unfinished recording made by one process ({n_done} of {job.n_images} images): "
                "resume it with the same command without torchrun, or start over with --force")
        if repair:
            repair_store(job)
        else:
            print(f"{path}: complete activations with the same arguments exist; reusing them "
                  "(`neurosem record ... --force` records again)", file=sys.stderr)
        return "done"
    if repair:
        print(f"note: {path} is not complete yet, there is nothing to repair; recording it", file=sys.stderr)
    path.unlink(missing_ok=True)  # a merge that was cut short: the shards are merged again
    return "shards"


def _record_shard(job: Any, comm: Comm, lo: int, hi: int) -> None:
    """Record (or resume) this rank's images ``lo..hi`` into its shard store."""
    from neurosem._recording import record_from
    from neurosem.record import _mismatch, differences
    from neurosem.store import ActivationStore

    if hi <= lo:
        return
    path = shard_path(job.rd.path, comm.rank, comm.size)
    shard = {"rank": comm.rank, "world_size": comm.size, "start": lo, "stop": hi}
    prov = {**job.prov, "n_images": hi - lo, "shard": shard}
    sub = replace(job, ds=_Shard(job.ds, lo, hi), n_images=hi - lo, prov=prov, store_path=path, meta=False,
                  progress=job.progress and comm.main)
    start = 0
    if path.exists():
        with ActivationStore.open(path) as old:
            diffs = differences(old.provenance, prov)
            if old.provenance.get("shard") != shard:
                diffs.append(f"shard: {old.provenance.get('shard')} vs {shard}")
            if diffs:
                raise _mismatch(path, diffs, old.provenance, prov)
            if old.complete:
                return
            start = old.n_done
        if start == hi - lo:
            with ActivationStore.append_to(path) as st:
                st.mark_complete()
            return
        print(f"{path}: rank {comm.rank} resuming at image {lo + start} of its images {lo}..{hi}", file=sys.stderr)
    record_from(sub, start)


def _merge(job: Any, world: int) -> None:
    """On rank 0: the complete shards, in rank order, into one ``activations.h5``; shards removed."""
    from neurosem._progress import progress as bar
    from neurosem.store import ActivationStore

    path, n_images = job.path, job.n_images
    shards = sorted((r, p) for p, (r, w) in shard_files(job.rd.path).items() if w == world)
    stores = [ActivationStore.open(p) for _, p in shards]
    try:
        spans = [tuple(st.provenance["shard"][k] for k in ("start", "stop")) for st in stores]
        if not stores or spans[0][0] != 0 or spans[-1][1] != n_images or any(
                a[1] != b[0] for a, b in zip(spans, spans[1:])) or not all(st.complete for st in stores):
            raise NeurosemError(f"the shards in {job.rd.path} do not cover images 0..{n_images}: "
                                "run the same command again (or start over with --force)")
        first = stores[0]
        prov = {k: v for k, v in first.provenance.items() if k != "shard"}
        prov.update(n_images=n_images, device=job.prov.get("device"), world_size=world)
        shapes = {name: first.shape(name)[1:] for name in first.layers}
        rows = 1 << (int(job.batch_size).bit_length() - 1)  # the chunk rows of a single process
        out = ActivationStore.create(path, shapes, n_images, prov, dtype=first.dtype, max_chunk_rows=rows)
        with out:
            step = max(1, MERGE_BYTES // max(1, out.row_bytes()))
            pieces = [(i, a) for i, st in enumerate(stores) for a in range(0, st.n_done, step)]
            ids = [st.image_ids for st in stores]
            for i, a in bar(pieces, total=len(pieces), desc="record: merge", enabled=job.progress, unit="piece"):
                st = stores[i]
                b = min(a + step, st.n_done)
                out.append({name: st.read(name, a, b) for name in st.layers}, ids[i][a:b])  # CRC checked
            out.mark_complete()
    finally:
        for st in stores:
            st.close()
    for _, p in shards:
        p.unlink()
    job.rd.update_meta("record", {**prov, "activations": str(path), "complete": True, "n_done": n_images})
