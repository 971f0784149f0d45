"""Recording activations: :class:`Recorder` (forward hooks) and :func:`record` (dataset -> store).

``record()`` streams a dataset through a model under ``torch.inference_mode`` and writes the
requested layers to ``runs/<name>/activations.h5`` (see :mod:`neurosem.store`). Batches are
normalised on the device, the forward pass stops after the last requested layer, outputs are cast
to float16 on the device and handed to a background writer thread, so the device never waits on
the disk and only a few batches are ever in memory.

A run is identified by its *provenance*: model, weights, layers, data spec and fingerprint,
number of images, normalisation (mean/std) and stored dtype. The batch size, the device and the
library versions are recorded but are not part of the identity (images are processed in a fixed
order, so a run resumed with another batch size writes the same file).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from neurosem._recording import Job, record_from
from neurosem._recording import repair as _repair
from neurosem.errors import DataError, NeurosemError, RunMismatchError
from neurosem.adapters import LayerMaps, module_name
from neurosem.models import LoadedModel, check_layers, load_model

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: provenance fields that must match for a store to be resumed or reused
IDENTITY = ("model", "weights", "layers", "data", "data_fingerprint", "n_images", "transform", "dtype", "tokens")


class StopForward(Exception):
    """Raised by the last hook of a ``Recorder(stop_after_last=True)``; :meth:`Recorder.forward` swallows it."""


class Recorder:
    """Forward hooks on ``layers`` of ``model``, registered on entry and removed on exit.

    After a forward pass ``rec.outputs[layer]`` holds the layer's unit maps ``[B, C, H, W]`` (its
    output through the adapter :mod:`neurosem.adapters` chooses; ``tokens``: extra tokens),
    detached, cast to ``dtype`` when given and moved to the CPU when ``to_cpu``.
    The stored tensor is always a copy, so a later in-place op (``ReLU(inplace=True)``) cannot
    change it. A hooked module that runs twice in one forward pass is an error (its output would
    be ambiguous). With ``stop_after_last=True`` the pass stops as soon as every requested layer
    has run: call :meth:`forward` (which swallows the internal :class:`StopForward`), not
    ``model(x)``.

    Example:
        >>> with Recorder(model, ["layer3", "layer4"]) as rec:  # doctest: +SKIP
        ...     rec.forward(images)               # images: [B, 3, H, W]
        ...     rec.outputs["layer4"].shape       # [B, 512, H/32, W/32]
    """

    def __init__(self, model: "nn.Module", layers: Sequence[str], stop_after_last: bool = False,
                 detach: bool = True, to_cpu: bool = True, dtype: "torch.dtype | None" = None,
                 tokens: int | None = None) -> None:
        self.model = model
        self.layers = check_layers(model, [layers] if isinstance(layers, str) else list(layers))
        self.stop_after_last = stop_after_last
        self.detach = detach
        self.to_cpu = to_cpu
        self.dtype = dtype
        self.maps = LayerMaps(model, self.layers, tokens)  # outputs -> [B, C, H, W] (neurosem.adapters)
        self.outputs: dict[str, "torch.Tensor"] = {}
        self._fired: set[str] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> "Recorder":
        modules = dict(self.model.named_modules())
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._new_pass))
            for name in self.layers:
                self._handles.append(modules[module_name(name)].register_forward_hook(self._hook_for(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def _new_pass(self, _module: Any = None, args: Any = ()) -> None:
        self.maps.new_pass(args)
        self._fired = set()
        self.outputs = {}

    def _hook_for(self, name: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if name in self._fired:
                raise NeurosemError(
                    f"layer {name!r} ran twice in one forward pass (the module is reused, e.g. a shared "
                    "activation); record a different layer, e.g. its parent block or the module before it")
            self._fired.add(name)
            t = self.maps.to_maps(name, output)
            copied = False
            if self.detach:
                t = t.detach()
            if self.dtype is not None and t.dtype != self.dtype:
                t = t.to(self.dtype)
                copied = True
            if self.to_cpu and t.device.type != "cpu":
                t = t.to("cpu")
                copied = True
            self.outputs[name] = t if copied else t.clone()
            if self.stop_after_last and len(self._fired) == len(self.layers):
                raise StopForward()
        return hook

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model; returns its output, or None when stopped after the last layer.

        Raises:
            NeurosemError: when a requested layer did not run.
        """
        self._new_pass()
        try:
            out = self.model(*args, **kwargs)
        except StopForward:
            out = None
        missing = [name for name in self.layers if name not in self.outputs]
        if missing:
            raise NeurosemError(f"layers {', '.join(missing)} did not run in the forward pass; "
                                "choose layers that the model uses (see `neurosem layers MODEL`)")
        return out


# ---------------------------------------------------------------------- data
class _Indexed:
    """Items ``start..stop`` of a dataset as ``(image [3, H, W], id)`` (picklable for workers)."""

    def __init__(self, ds: Any, start: int, stop: int) -> None:
        self.ds, self.start, self.stop = ds, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[Any, str]:
        index = self.start + i
        item = self.ds[index]
        if isinstance(item, Mapping):
            return item["image"], str(item.get("id", index))
        if isinstance(item, (tuple, list)):
            return item[0], str(index)
        return item, str(index)


def _collate(items: list[tuple[Any, str]]) -> tuple[Any, list[str]]:
    import torch

    first = items[0][0].shape
    for image, image_id in items[1:]:
        if image.shape != first:
            raise DataError(
                f"images of different sizes: {items[0][1]} is {first[-2]}x{first[-1]} but {image_id} is "
                f"{image.shape[-2]}x{image.shape[-1]}; resize the images to one size first (Broden and CIFAR "
                "images already share one)")
    return torch.stack([it[0] for it in items]), [it[1] for it in items]


def _normalize_spec(spec: str) -> str:
    p = Path(spec).expanduser()
    if p.exists():
        return str(p.resolve())
    kind, sep, root = spec.partition(":")
    if sep and root and Path(root).expanduser().exists():
        return f"{kind}:{Path(root).expanduser().resolve()}"
    return spec


def open_data(data: Any) -> tuple[Any, str, str | None]:
    """``(dataset, description, fingerprint)`` for a data spec string or a Dataset object.

    A Dataset object's description is its class; its fingerprint is ``ds.fingerprint()`` when it
    has one (without one, a run made from it can never be resumed or reused).

    Example:
        >>> ds, desc, fp = open_data("data/broden1_224")  # doctest: +SKIP
        >>> desc, fp
        ('/abs/data/broden1_224', '3f1c2a9e0b7d4c11')
    """
    if isinstance(data, (str, Path)):
        import neurosem.data as ndata

        opener = getattr(ndata, "open_image_dataset", None)
        fingerprint = getattr(ndata, "dataset_fingerprint", None)
        if opener is None or fingerprint is None:
            raise NeurosemError("this neurosem install lacks neurosem.data.open_image_dataset; reinstall neurosem")
        spec = str(data)
        ds = opener(spec, transform=None)
        return ds, _normalize_spec(spec), str(fingerprint(spec))
    fp = getattr(data, "fingerprint", None)
    return data, f"<{type(data).__module__}.{type(data).__qualname__}>", (str(fp()) if callable(fp) else None)


# ---------------------------------------------------------------------- provenance
def _versions() -> dict[str, str]:
    import h5py
    import torch

    import neurosem

    out = {"neurosem": neurosem.__version__, "torch": torch.__version__, "h5py": h5py.__version__,
           "python": sys.version.split()[0]}
    tv = sys.modules.get("torchvision")
    if tv is not None:
        out["torchvision"] = str(getattr(tv, "__version__", "unknown"))
    else:  # importing torchvision only for its version would cost seconds
        from importlib import metadata

        try:
            out["torchvision"] = metadata.version("torchvision")
        except metadata.PackageNotFoundError:
            out["torchvision"] = "not installed"
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def differences(old: Mapping[str, Any], new: Mapping[str, Any], allow_layer_subset: bool = False) -> list[str]:
    """The identity fields in which two provenances differ, as ``"field: old vs new"``.

    A missing data fingerprint (a dataset object without ``fingerprint()``) always differs; the
    data path may differ when the fingerprints match (the dataset was moved).

    Example:
        >>> differences({"model": "resnet18"}, {"model": "vgg16"})[0]  # doctest: +SKIP
        "model: 'resnet18' vs 'vgg16'"
    """
    diffs = []
    same_data = old.get("data_fingerprint") is not None and old.get("data_fingerprint") == new.get("data_fingerprint")
    for key in IDENTITY:
        a, b = old.get(key), new.get(key)
        if key == "data" and same_data:
            continue  # a moved dataset: the fingerprint does not depend on where it lives
        if key == "layers" and allow_layer_subset and isinstance(a, list) and isinstance(b, list):
            if set(b) <= set(a):
                continue
        if key == "data_fingerprint" and (a is None or b is None):
            diffs.append(f"{key}: {_short(a)} vs {_short(b)} (a dataset without fingerprint() cannot be matched)")
            continue
        if a != b:
            diffs.append(f"{key}: {_short(a)!s} vs {_short(b)!s}")
    return diffs


def _mismatch(path: Path, diffs: list[str], old: Mapping[str, Any], new: Mapping[str, Any]) -> RunMismatchError:
    hint, tail = "", "record again with `neurosem record ... --force` or choose another --run"
    old_arg, new_arg = str(old.get("weights_arg", "default")), str(new.get("weights_arg", "default"))
    same_model = old.get("model") == new.get("model")
    weights_differ = any(d.startswith("weights:") for d in diffs)
    if same_model and weights_differ and old_arg not in ("default", "none") and old_arg != new_arg:
        stored = str(old.get("weights", ""))
        file = _weights_arg(stored) if stored.startswith("file:") else old_arg  # the absolute path
        hint = f"it was recorded with --weights {file}: pass that to use these activations; "
        tail = "to record the new weights choose another --run (--force would replace these activations)"
    elif (same_model and weights_differ and old_arg == new_arg == "default"
          and str(old.get("weights")).startswith("factory#") and str(new.get("weights")).startswith("factory#")):
        hint = ("the factory built other weights than last time (an unseeded random init?): seed it inside "
                "the factory or pass --weights FILE; ")
    return RunMismatchError(
        f"{path} was recorded with other arguments ({'; '.join(diffs)}; stored vs requested); "
        f"{hint}{tail}")


def _parse_layers(layers: "str | Sequence[str] | None") -> list[str] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        return [x.strip() for x in layers.split(",") if x.strip()] or None
    return [str(x) for x in layers] or None


# ---------------------------------------------------------------------- record
def record(model: "str | LoadedModel", data: Any, run: "str | Path | None" = None,
           layers: "Sequence[str] | str | None" = None, weights: str = "default", batch_size: int = 64,
           device: "str | torch.device" = "auto", force: bool = False, limit: int | None = None,
           num_workers: int = 0, progress: bool = True, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None, dtype: str = "float16", repair: bool = False,
           tokens: int | None = None) -> Path:
    """Record ``layers`` of ``model`` on every image of ``data`` into the run's ``activations.h5``.

    Args:
        model: a model spec (see :func:`neurosem.models.load_model`) or a :class:`LoadedModel`
            (then ``weights`` is ignored).
        data: a data spec (Broden dir, ``cifar100:ROOT``, image folder) or a Dataset whose items
            are ``{"image": FloatTensor[3, H, W] in [0, 1], "index", "id"}``; images are fed at
            their stored size.
        run: the run directory (default ``runs/<model>``).
        layers: module names (list or comma-separated); default: the model's default layers.
        mean, std: normalisation applied on the device (default: the weights' transforms, or
            ImageNet statistics).
        limit: record only the first ``limit`` images.
        force: discard an existing store and start over.
        repair: check every stored image against its checksum first and record the damaged ones
            again (in the batches of the original run); then resume or reuse the store as usual.
        tokens: the class/register tokens of ``[B, T, D]`` outputs (None: detected from the model).

    Returns:
        The path of the complete ``activations.h5``.

    An unfinished store made with the same arguments is resumed at ``n_done``; a complete one is
    reused; one made with other arguments raises :class:`RunMismatchError`. Ctrl-C leaves a
    resumable file. The run directory is locked while recording: a second ``record`` of the same
    run raises :class:`~neurosem.errors.RunLockedError`. A store that would not fit on the disk is
    refused before anything is written, and a disk that fills up meanwhile keeps what was flushed
    (:class:`~neurosem.errors.DiskFullError`; the same command resumes).

    Example:
        >>> record("resnet18", "data/broden1_224", layers="layer3,layer4")  # doctest: +SKIP
        PosixPath('runs/resnet18/activations.h5')
    """
    from neurosem.distributed import current, together

    comm = current()  # under torchrun: the ranks record shards of the images (neurosem._dist_record)
    with together(comm):  # a bad argument: one line on rank 0
        job = _job(model, data, run, layers, weights, batch_size, device, limit, num_workers, progress,
                   mean, std, dtype, tokens)
    if comm is not None:
        from neurosem._dist_record import record_sharded

        return record_sharded(job, comm, force=force, repair=repair)
    if not force:
        from neurosem._dist_record import shard_files

        worlds = sorted({w for _, w in shard_files(job.rd.path).values()})
        if worlds:
            raise NeurosemError(f"{job.rd.path} holds an unfinished recording made by {worlds[0]} processes: resume "
                                f"it with `torchrun --nproc-per-node {worlds[0]} -m neurosem -- record ...`, or "
                                "start over with --force")
    with job.rd.lock("record"):  # held while the store is checked, created, renamed, written or deleted
        return _record_locked(job, force=force, repair=repair)


def _job(model: Any, data: Any, run: Any, layers: Any, weights: str, batch_size: int, device: Any,
         limit: int | None, num_workers: int, progress: bool, mean: Any, std: Any, dtype: str,
         tokens: int | None) -> Job:
    """The checked arguments of :func:`record` as a :class:`Job` (nothing written yet)."""
    from neurosem._device import resolve_device
    from neurosem.run import resolve_run

    if batch_size < 1:
        raise NeurosemError(f"--batch-size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise NeurosemError(f"--workers must be >= 0 (0: load in the main process), got {num_workers}")
    if dtype not in ("float16", "float32"):
        raise NeurosemError(f"unknown activation dtype {dtype!r}: use float16 or float32")
    lm = model if isinstance(model, LoadedModel) else load_model(model, weights)
    layers = check_layers(lm.model, _parse_layers(layers) or lm.default_layers)
    mean = tuple(float(v) for v in (mean if mean is not None else lm.mean))
    std = tuple(float(v) for v in (std if std is not None else lm.std))
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise NeurosemError(f"mean and std need 3 values each, std > 0 (got mean={mean}, std={std})")
    ds, data_desc, fingerprint = open_data(data)
    n_images = len(ds) if limit is None else min(len(ds), int(limit))
    if n_images < 1:
        raise DataError(f"the dataset {data_desc} has no images" if limit is None
                        else f"--limit {limit} leaves no images to record")
    dev = resolve_device(device)
    rd = resolve_run(run, lm.spec)
    prov = {"model": lm.spec, "weights": lm.weights,
            "weights_arg": _weights_arg(lm.weights) if isinstance(model, LoadedModel) else str(weights),
            "layers": layers, "data": data_desc, "data_fingerprint": fingerprint,
            "n_images": n_images, "transform": {"mean": list(mean), "std": list(std), "resize": None},
            "dtype": dtype, "tokens": tokens, "batch_size": int(batch_size), "device": str(dev),
            "versions": _versions()}

    return Job(lm=lm, ds=ds, layers=layers, mean=mean, std=std, n_images=n_images,  # type: ignore[arg-type]
               batch_size=int(batch_size), dev=dev, dtype=dtype, num_workers=num_workers, progress=progress,
               prov=prov, rd=rd, tokens=tokens)


def _record_locked(job: Job, force: bool, repair: bool) -> Path:
    from neurosem.run import check_free_space
    from neurosem.store import ActivationStore

    path, prov, n_images = job.path, job.prov, job.n_images
    start = 0
    if force:
        for p in (path, path.with_name(path.name + ".tmp")):
            if p.exists():
                p.unlink()
    elif path.exists():
        with ActivationStore.open(path) as old:
            complete = old.complete
            diffs = differences(old.provenance, prov, allow_layer_subset=complete)
            if diffs:
                raise _mismatch(path, diffs, old.provenance, prov)
            start = old.n_done
            if old.provenance.get("data") != prov["data"]:
                print(f"note: the data moved ({old.provenance.get('data')} -> {prov['data']}); "
                      "its fingerprint is unchanged", file=sys.stderr)
            if not complete:  # before anything is written: the rest must fit
                check_free_space(path, old.row_bytes() * (n_images - start),
                                 f"; {start} of {n_images} images are saved")
        if repair:
            _repair(job)
        if complete:
            if not repair:
                print(f"{path}: complete activations with the same arguments exist; reusing them "
                      "(`neurosem record ... --force` records again)", file=sys.stderr)
            return path
        if start == n_images:  # stopped after the last write, before the completion mark
            with ActivationStore.append_to(path) as st:
                st.mark_complete()
            job.rd.update_meta("record", {**prov, "activations": str(path), "complete": True, "n_done": n_images})
            return path
        print(f"{path}: resuming at image {start} of {n_images}", file=sys.stderr)
    elif repair:
        print(f"note: {path} does not exist yet, there is nothing to repair; recording it", file=sys.stderr)
    return record_from(job, start)


def _nonfinite_warning(path: Path, layers: Sequence[str], dtype: str) -> str:
    """The warning for layers holding inf/NaN: NaN comes from the model, inf from float16 overflow."""
    import numpy as np

    from neurosem.store import ActivationStore

    with ActivationStore.open(path) as st:
        nan = [name for name in layers
               if any(bool(np.isnan(b[name]).any()) for _, b in st.iter_batches([name], prefetch=0))]
    inf = [name for name in layers if name not in nan]
    parts = []
    if nan:
        parts.append(f"layers {', '.join(nan)} hold NaN values in {path}: the model itself computes NaN "
                     "(check the model and its weights)")
    if inf:
        why = ("beyond the float16 range (65504): record with --dtype float32 --force" if dtype == "float16"
               else "the model itself computes inf (check the model and its weights)")
        parts.append(f"layers {', '.join(inf)} hold inf values in {path}: {why}")
    return "WARNING: " + "; ".join(parts)


def _weights_arg(desc: str) -> str:
    """The ``weights`` argument that reloads a LoadedModel's weights (from its description)."""
    if desc.startswith("file:"):
        return desc[len("file:"):].rsplit("#", 1)[0]
    return "none" if desc == "none" else "default"


def ensure_activations(run: "str | Path | None", model: "str | LoadedModel | None" = None, data: Any = None,
                       layers: "Sequence[str] | str | None" = None, weights: str = "default",
                       batch_size: int = 64, device: "str | torch.device" = "auto", progress: bool = True,
                       **kw: Any) -> Path:
    """The run's complete activations, recording (or resuming) them when needed.

    With ``model``/``data``/``layers`` None, whatever the run holds is accepted; given ones must
    match the stored provenance (layers: a subset of the stored ones is enough). Extra keyword
    arguments go to :func:`record`.

    Example:
        >>> ensure_activations("runs/resnet18")  # doctest: +SKIP
        PosixPath('runs/resnet18/activations.h5')
    """
    from neurosem.run import resolve_run
    from neurosem.store import ActivationStore

    spec = model.spec if isinstance(model, LoadedModel) else model
    rd = resolve_run(run, spec)
    wanted = _parse_layers(layers)
    prov: dict[str, Any] | None = None
    complete = False
    if rd.activations.exists():
        with ActivationStore.open(rd.activations) as st:
            prov, complete, stored = st.provenance, st.complete, st.layers
        if complete and model is None and data is None and (wanted is None or set(wanted) <= set(stored)):
            return rd.activations
    if prov is not None:
        same_model = model is None or spec == prov.get("model")
        if model is None:
            model = prov.get("model")
            weights = prov.get("weights_arg", weights)
        if data is None and not str(prov.get("data", "<")).startswith("<"):
            data = prov.get("data")
        if wanted is None and same_model:
            wanted = list(prov.get("layers") or []) or None
        if same_model:
            kw.setdefault("limit", prov.get("n_images"))
            kw.setdefault("tokens", prov.get("tokens"))
        if "mean" not in kw and "std" not in kw and same_model:
            tf = prov.get("transform") or {}
            kw["mean"], kw["std"] = tf.get("mean"), tf.get("std")
        kw.setdefault("dtype", prov.get("dtype") or "float16")  # a float32 store is read as it is
    if model is None or data is None:
        raise NeurosemError(f"no activations in {rd.path}: pass MODEL and --data to record them "
                            f"(or run `neurosem record MODEL --data PATH --run {rd.path}`)")
    return record(model, data, run=rd.path, layers=wanted, weights=weights, batch_size=batch_size,
                  device=device, progress=progress, **kw)
