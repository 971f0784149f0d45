"""The inside of :func:`neurosem.record.record`: the forward pass into the store, repair, cleanup.

:func:`record_from` streams images ``start..n_images`` through the model into ``activations.h5``
(created on the first batch), :func:`repair` records the damaged blocks of a store again. Both run
while the caller holds the run's lock (:meth:`neurosem.run.RunDir.lock`).
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from neurosem.errors import DiskFullError, NeurosemError, RunMismatchError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from neurosem.models import LoadedModel
    from neurosem.run import RunDir

#: most bytes of activations held in memory while one span is repaired
REPAIR_BYTES = 256 << 20


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``record``, after it has printed what is saved (the CLI adds no second line)."""

    reported = True


@dataclass
class Job:
    """What one ``record`` call records: model, data, layers, transform and where it goes."""

    lm: "LoadedModel"
    ds: Any
    layers: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_images: int
    batch_size: int
    dev: "torch.device"
    dtype: str
    num_workers: int
    progress: bool
    prov: dict[str, Any]
    rd: "RunDir"
    tokens: int | None = None      # extra tokens of [B, T, D] outputs (None: detected)
    store_path: Path | None = None  # where the store goes (None: the run's activations.h5)
    meta: bool = True              # write the record entry of run.json (a rank's shard does not)

    @property
    def path(self) -> Path:
        return self.rd.activations if self.store_path is None else self.store_path


@contextmanager
def _on_device(job: Job) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """The model on the job's device (back on the CPU afterwards); yields ``mean, std: [1, 3, 1, 1]``."""
    import torch

    net, dev = job.lm.model, job.dev
    try:
        net.to(dev)
        if dev.type == "cuda":
            net.to(memory_format=torch.channels_last)
        yield (torch.tensor(job.mean, device=dev, dtype=torch.float32).view(1, 3, 1, 1),
               torch.tensor(job.std, device=dev, dtype=torch.float32).view(1, 3, 1, 1))
    finally:
        net.to("cpu")
        if dev.type == "cuda":
            net.to(memory_format=torch.contiguous_format)


def _forward(job: Job, start: int, stop: int, layers: Sequence[str], norm: tuple[Any, Any], desc: str,
             on_batch: Callable[[Mapping[str, "torch.Tensor"], list[str]], None]) -> None:
    """Feed images ``start..stop`` in batches of ``job.batch_size``; ``on_batch(outputs, ids)`` each.

    ``outputs[layer]: [B, C, H, W]`` on the device, in the stored dtype.
    """
    import torch

    from neurosem._progress import progress as bar
    from neurosem.record import Recorder, _collate, _Indexed

    cuda = job.dev.type == "cuda"
    loader = torch.utils.data.DataLoader(
        _Indexed(job.ds, start, stop), batch_size=job.batch_size, shuffle=False, num_workers=job.num_workers,
        pin_memory=cuda, collate_fn=_collate)
    act_dtype = torch.float16 if job.dtype == "float16" else torch.float32
    mean_t, std_t = norm
    with torch.inference_mode(), Recorder(job.lm.model, layers, stop_after_last=True, to_cpu=False,
                                          dtype=act_dtype, tokens=job.tokens) as rec:
        for images, ids in bar(loader, total=len(loader), desc=desc, enabled=job.progress, unit="batch"):
            x = images.to(job.dev, non_blocking=cuda).float().sub_(mean_t).div_(std_t)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            rec.forward(x)
            on_batch(rec.outputs, ids)


def record_from(job: Job, start: int) -> Path:
    """Record images ``start..n_images`` into ``job.path`` (a new store when ``start == 0``).

    Ctrl-C saves what is queued and raises :class:`Interrupted`; a full disk keeps what was
    flushed (a store with no image saved is removed), removes temporary files and raises
    :class:`~neurosem.errors.DiskFullError`.
    """
    import torch

    from neurosem.record import Recorder, _Indexed
    from neurosem.store import ActivationStore

    path, n_images, layers, dev = job.path, job.n_images, job.layers, job.dev
    store = ActivationStore.append_to(path) if start > 0 else None
    writer = store.writer() if store is not None else None
    created = False

    def on_batch(outs: Mapping[str, "torch.Tensor"], ids: list[str]) -> None:
        nonlocal store, writer, created
        if store is None:
            shapes = {name: tuple(outs[name].shape[1:]) for name in layers}
            rows = 1 << (int(job.batch_size).bit_length() - 1)  # whole-chunk batch writes
            store = ActivationStore.create(path, shapes, n_images, job.prov, dtype=job.dtype, max_chunk_rows=rows)
            created = True
            writer = store.writer()
        else:
            _check_shapes(store, outs, path)
        if dev.type == "cuda":
            host = {k: torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for k, o in outs.items()}
            for k, o in outs.items():
                host[k].copy_(o, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            writer.put(host, ids, ready=event.synchronize)  # type: ignore[union-attr]
        elif dev.type != "cpu":  # e.g. MPS: a plain synchronous copy
            writer.put({k: o.to("cpu") for k, o in outs.items()}, ids)  # type: ignore[union-attr]
        else:
            writer.put(outs, ids)  # type: ignore[union-attr]

    try:
        with _on_device(job) as norm:
            with torch.inference_mode():
                # One whole forward pass of one image: a module that runs twice (e.g. a ReLU reused inside
                # a block) is an error here, which stopping after the last layer below could not see.
                image = _Indexed(job.ds, start, n_images)[0][0][None].to(dev).float()
                with Recorder(job.lm.model, layers, to_cpu=False, tokens=job.tokens) as probe_rec:
                    job.lm.model(image.sub_(norm[0]).div_(norm[1]))
                job.prov["adapters"] = probe_rec.maps.describe()
                flat = [name for name in layers if probe_rec.outputs[name].dim() != 4]
                if flat:  # refused before any file is written
                    shp = tuple(probe_rec.outputs[flat[0]].shape[1:])
                    raise NeurosemError(f"layer {flat[0]!r} gives {len(shp)}-D outputs {shp}; only (C, H, W) "
                                        "maps can be stored: choose a convolutional layer")
            _forward(job, start, n_images, layers, norm, f"record {job.lm.spec}", on_batch)
        writer.close()  # type: ignore[union-attr]
        store.mark_complete()  # type: ignore[union-attr]
        nonfinite = sorted(writer.nonfinite)  # type: ignore[union-attr]
    except KeyboardInterrupt:
        done = _finish(writer, store)
        if job.meta:
            job.rd.update_meta("record", {**job.prov, "activations": str(path), "complete": False, "n_done": done})
        print(f"\ninterrupted: {done} of {n_images} images are saved in {path}; "
              "rerun the same command to resume", file=sys.stderr)
        raise Interrupted() from None
    except DiskFullError:
        done = _finish(writer, store)
        if store is not None:
            store.close()
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        if created and done == 0:
            path.unlink(missing_ok=True)  # nothing saved: give all its space back
        if path.exists() and job.meta:
            try:
                job.rd.update_meta("record", {**job.prov, "activations": str(path), "complete": False,
                                              "n_done": done})
            except DiskFullError:
                pass  # run.json stays as it was; the store says what is saved
        raise
    except BaseException:
        _finish(writer, store)
        raise
    finally:
        if store is not None:
            store.close()
    if nonfinite:
        from neurosem.record import _nonfinite_warning

        print(_nonfinite_warning(path, nonfinite, job.dtype), file=sys.stderr)
    if job.meta:
        job.rd.update_meta("record", {**job.prov, "activations": str(path), "complete": True, "n_done": n_images})
    return path


def repair(job: Job) -> list[tuple[str, int, int]]:
    """Check every block of ``job.path`` against its checksum and record the damaged ones again.

    The images are recorded again in the batches of the original run (its ``batch_size``, from
    image 0), so a deterministic model writes the very bytes an undamaged run holds.

    Returns:
        The damaged ``(layer, start, stop)`` ranges that were found (and repaired).
    """
    import numpy as np

    from neurosem.store import ActivationStore

    with ActivationStore.append_to(job.path) as store:
        bad = store.damaged()
        if not bad:
            print(f"{job.path}: every stored image matches its checksum; nothing to repair", file=sys.stderr)
            return bad
        batch = int(store.provenance.get("batch_size") or job.batch_size)
        n_done, layers = store.n_done, list(store.layers)
        unit = math.lcm(store.block_rows(), batch)
        step = unit * max(1, REPAIR_BYTES // max(1, store.row_bytes() * unit))
        spans: list[tuple[int, int]] = []
        for _, a, b in sorted(bad, key=lambda t: t[1]):
            lo, hi = (a // unit) * unit, min(-(-b // unit) * unit, n_done)
            if spans and lo <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
            else:
                spans.append((lo, hi))
        original = job.batch_size
        job.batch_size = batch
        try:
            with _on_device(job) as norm:
                for lo, hi in spans:
                    for s in range(lo, hi, step):
                        e = min(s + step, hi)
                        parts: dict[str, list[Any]] = {name: [] for name in layers}
                        ids: list[str] = []

                        def keep(outs: Mapping[str, Any], batch_ids: list[str]) -> None:
                            _check_shapes(store, outs, job.path)
                            for name in layers:
                                parts[name].append(outs[name].to("cpu").numpy())
                            ids.extend(batch_ids)

                        _forward(job, s, e, layers, norm, f"repair {job.lm.spec} {s}..{e}", keep)
                        store.rewrite(s, {k: np.concatenate(v) for k, v in parts.items()}, ids)
        finally:
            job.batch_size = original
        left = [d for d in store.damaged() if any(lo <= d[1] < hi for lo, hi in spans)]
    if left:  # cannot happen: the checksums are computed from the bytes just written
        raise RuntimeError(f"repair left damaged blocks {left}")
    ranges = ", ".join(f"{layer} {a}..{b}" for layer, a, b in bad)
    print(f"{job.path}: recorded again the damaged images ({ranges})", file=sys.stderr)
    return bad


def _check_shapes(store: Any, outs: Mapping[str, Any], path: Path) -> None:
    for name, o in outs.items():
        want = store.shape(name)[1:]
        if tuple(o.shape[1:]) != want:
            raise RunMismatchError(f"{path}: layer {name} gives {tuple(o.shape[1:])} maps now but {want} "
                                   "were stored; use --force to record again or choose another --run")


def _finish(writer: Any, store: Any) -> int:
    """Write what is queued and return ``n_done`` (errors of the writer are reported, not raised)."""
    if writer is not None:
        try:
            writer.close()
        except DiskFullError:
            pass  # the caller reports it
        except Exception as exc:  # the original exception matters more
            print(f"error while saving the last batches: {type(exc).__name__}: {exc}", file=sys.stderr)
    return store.n_done if store is not None else 0
