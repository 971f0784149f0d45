"""Semantic vectors per neuron (paper arXiv 2211.07647, eq. 1).

For a layer with C units, image n gives activation maps A_n in R^{C x HW} and

    P_n(j|i) = softmax_j( cos(a_ni, a_nj) / tau )        (targets, from the activations)
    Q(j|i)   = softmax_j( cos(s_i, s_j) / tau )          (model, from S in R^{C x K})
    L_emb    = -(1/C) sum_i sum_j mean_n P_n(j|i) log Q(j|i),   averaged over layers.

Conventions (fixed here, used everywhere):

- The sum over j includes j = i, as in eq. 1 (the paper sums over all pairs i, j). The diagonal
  holds cos = 1 for every non-zero map and vector.
- A map (or vector) that is all zero is normalised with an epsilon, so it has cosine 0 with every
  map, itself included: never NaN.
- ``temperature`` (tau) divides the cosines before both softmaxes; tau = 1 is the paper's formula.
  Cosines of non-negative (post-ReLU) maps lie in [0, 1], so with tau = 1 no two logits of a row
  differ by more than 1 and every P(j|i) lies within a factor e of every other: the targets are
  nearly uniform (row entropy close to log C) and the loss changes little with S. A smaller tau
  sharpens both P and Q (logit range 1/tau), so the vectors follow the strongest similarities more
  closely; as tau -> 0 each row of P concentrates on i itself (the diagonal) and then on the most
  similar units. ``benchmarks/embed.py`` prints the spread of P-bar and the neighbour overlap for
  several tau.

Q does not depend on the image, so the loss is linear in P and P-bar = mean_n P_n is a sufficient
statistic: the ``fit`` trainer accumulates P-bar in one streaming pass (:class:`PbarAccumulator`)
and minimises the same objective at full batch; the ``paper`` trainer runs the paper's SGD protocol
on mini-batches. The trainers live in :mod:`neurosem._embed_train`; this module holds the loss, the
accumulator, :func:`embed` (the stage) and :func:`load_embedding`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from neurosem.errors import NeurosemError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

#: Norm floor used to normalise maps and vectors (an all-zero row gets cosine 0 with everything).
EPS = 1e-12
#: Elements allowed in one temporary [b, C, C] / [b, C, D] block while accumulating P-bar: large
#: blocks on accelerators (few kernel launches), cache-sized ones on the CPU (measured 4x faster
#: than 128 MB blocks, which the allocator returns to the OS and faults in again every time).
_BLOCK_ELEMENTS = 1 << 25
_CPU_BLOCK_ELEMENTS = 1 << 19


# ---------------------------------------------------------------------------------------------
# the loss

def cosine_matrix(x: "torch.Tensor", eps: float = EPS) -> "torch.Tensor":
    """Pairwise cosine similarities of the rows: ``x [..., C, D] -> [..., C, C]``.

    Half-precision input is computed in float32; an all-zero row has cosine 0 with every row.

    Example:
        >>> import torch
        >>> cosine_matrix(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        tensor([[1., 0.],
                [0., 0.]])
    """
    import torch

    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        x = x.float()
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    return xn @ xn.transpose(-1, -2)


def similarity_probs(x: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
    """Row-wise softmax of cosine similarities: ``x [B, C, D] -> P [B, C, C]`` (or ``[C, D] -> [C, C]``).

    ``P[b, i, j] = exp(cos(x_bi, x_bj)/tau) / sum_j' exp(cos(x_bi, x_bj')/tau)``; the diagonal j = i
    is included (eq. 1 sums over all i, j). ``x`` may also be activation maps ``[B, C, H, W]``; the
    spatial dimensions are flattened.

    Example:
        >>> import torch
        >>> similarity_probs(torch.eye(2)[None]).sum(-1)
        tensor([[1., 1.]])
    """
    _check_temperature(temperature)
    if x.dim() == 4:
        x = x.flatten(2)
    return (cosine_matrix(x) / temperature).softmax(dim=-1)


def log_similarity_probs(s: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
    """``log Q`` for vectors ``s [..., C, K]`` (a numerically stable log-softmax): ``[..., C, C]``."""
    _check_temperature(temperature)
    return (cosine_matrix(s) / temperature).log_softmax(dim=-1)


def embedding_loss(P: "torch.Tensor", S: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
    """Eq. 1 for one layer: ``-(1/C) sum_i sum_j P(j|i) log Q(j|i)`` with Q from ``S [C, K]``.

    ``P`` is ``[C, C]`` (e.g. P-bar) or ``[B, C, C]`` (one P_n per image; the loss is then the mean
    over the batch, which equals the loss of the batch mean). The multi-layer loss is the mean of
    this over layers. Computed in the wider dtype of ``P`` and ``S``.

    Example:
        >>> import torch
        >>> P = torch.full((3, 3), 1 / 3)
        >>> round(float(embedding_loss(P, torch.eye(3))), 4)  # log(e + 2) - 1/3
        1.2181
    """
    import torch

    C = S.shape[0]
    if P.shape[-2:] != (C, C) or P.dim() not in (2, 3):
        raise ValueError(f"P must be [C, C] or [B, C, C] with C = {C}; got {tuple(P.shape)}")
    dtype = torch.promote_types(P.dtype, S.dtype)
    log_q = log_similarity_probs(S.to(dtype), temperature)
    P = P.to(dtype)
    if P.dim() == 3:
        P = P.mean(0)
    return -(P * log_q).sum() / C


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise NeurosemError(f"--temperature must be > 0 (got {temperature}); 1 is the paper's formula")


# ---------------------------------------------------------------------------------------------
# P-bar

def accumulation_device(device: "torch.device") -> "torch.device":
    """Where float64 statistics live: ``device`` itself, except MPS (no float64) -> CPU."""
    import torch

    return torch.device("cpu") if device.type == "mps" else device


def as_tensor(acts: Any, device: "torch.device | None" = None) -> "torch.Tensor":
    """A NumPy array or tensor on ``device`` (transferred as is, e.g. float16; cast on the device)."""
    import torch

    t = acts if isinstance(acts, torch.Tensor) else torch.from_numpy(acts)
    if device is not None and t.device != device:
        t = t.to(device, non_blocking=True)
    return t


def check_finite(acts: "torch.Tensor", layer: str, start: int | None = None,
                 image_ids: Sequence[str] | None = None) -> None:
    """Raise a one-line error naming the layer and the first image whose activations are NaN/Inf.

    ``acts [B, ...]`` are images ``start .. start + B`` of the data (``start=None``: batch-relative).
    """
    import torch

    if bool(torch.isfinite(acts).all()):
        return
    bad = int((~torch.isfinite(acts.flatten(1))).any(1).nonzero()[0, 0])
    where = f"image {bad} of this batch" if start is None else f"image {start + bad}"
    if image_ids is not None and start is not None and start + bad < len(image_ids):
        where += f" ({image_ids[start + bad]})"
    if bool(torch.isnan(acts).any()) or acts.dtype != torch.float16:
        raise NeurosemError(f"activations of layer {layer!r} are NaN/Inf at {where}: the model itself computes "
                            "them; check the model and its weights, then record again with --force")
    raise NeurosemError(
        f"activations of layer {layer!r} are Inf at {where}: beyond the float16 range (65504) of the store; "
        "record them with `neurosem record ... --dtype float32 --force`, or use --no-store")


class PbarAccumulator:
    """Streaming mean of P_n over images for one layer, in float64 on the device.

    Args:
        n_units: C, the number of units (channels) of the layer.
        temperature: tau of :func:`similarity_probs`.
        device: where the [C, C] float64 sum lives (default: the device of the first batch;
            MPS -> CPU, which has no float64).
        name: the layer name, used in error messages.

    Example:
        >>> import torch
        >>> acc = PbarAccumulator(2)
        >>> acc.add(torch.ones(3, 2, 4, 4))
        >>> acc.result()
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]], dtype=torch.float64)
    """

    def __init__(self, n_units: int, temperature: float = 1.0, device: "torch.device | str | None" = None,
                 name: str = "") -> None:
        _check_temperature(temperature)
        self.n_units = int(n_units)
        self.temperature = float(temperature)
        self.name = name
        self._device = None if device is None else _as_device(device)
        self._sum: "torch.Tensor | None" = None
        self.count = 0

    def add(self, acts: Any, start: int | None = None, image_ids: Sequence[str] | None = None) -> None:
        """Add a batch ``acts [B, C, H, W]`` (or ``[B, C, D]``; tensor or NumPy array, any float dtype).

        ``start`` (the index of the batch's first image) only serves error messages.
        """
        import torch

        x = as_tensor(acts, self._device)
        if x.dim() < 3 or x.shape[1] != self.n_units:
            raise ValueError(f"expected activations [B, {self.n_units}, ...] for layer {self.name!r}; "
                             f"got {tuple(x.shape)}")
        x = x.flatten(2)
        part = sum_similarity_probs(x, self.temperature, torch.float64 if x.device.type != "mps"
                                    else torch.float32)
        # A NaN/Inf activation makes its image's rows NaN, so checking the [C, C] sum finds every
        # one (the [B, C, D] batch is searched only then, to name the image).
        if not bool(torch.isfinite(part).all()):
            check_finite(x, self.name, start, image_ids)
            where = "a batch" if start is None else f"the batch from image {start}"
            raise NeurosemError(f"P-bar of layer {self.name!r} is NaN/Inf in {where}: check the model's "
                                "activations, then record again with --force")
        if self._sum is None:
            dev = accumulation_device(self._device or x.device)
            self._sum = torch.zeros(self.n_units, self.n_units, dtype=torch.float64, device=dev)
        self._sum += part.to(self._sum.device, torch.float64)
        self.count += x.shape[0]

    def result(self) -> "torch.Tensor":
        """P-bar ``[C, C]`` float64 (each row sums to 1)."""
        if self.count == 0 or self._sum is None:
            raise NeurosemError(f"no images were seen for layer {self.name!r}: the dataset is empty")
        return self._sum / self.count

    def state_dict(self) -> dict[str, Any]:
        return {"n_units": self.n_units, "temperature": self.temperature, "count": self.count,
                "sum": None if self._sum is None else self._sum.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["n_units"]) != self.n_units or float(state["temperature"]) != self.temperature:
            raise ValueError(f"state for C={state['n_units']}, tau={state['temperature']} does not match "
                             f"C={self.n_units}, tau={self.temperature}")
        self.count = int(state["count"])
        s = state["sum"]
        if s is None:
            self._sum = None
        else:
            dev = accumulation_device(self._device or s.device)
            self._sum = s.to(dev, dtype=s.dtype).clone()


def sum_similarity_probs(x: "torch.Tensor", temperature: float = 1.0, dtype: "torch.dtype | None" = None
                         ) -> "torch.Tensor":
    """``sum_b P_b``: ``x [B, C, D]`` (or ``[B, C, H, W]``) -> ``[C, C]`` in ``dtype``, in blocks of images.

    The blocks keep the temporary ``[b, C, C]`` and float32 ``[b, C, D]`` tensors near
    ``_BLOCK_ELEMENTS`` elements (``_CPU_BLOCK_ELEMENTS`` on the CPU) whatever the batch size.
    """
    x = x.flatten(2)
    C, D = x.shape[1], x.shape[2]
    budget = _CPU_BLOCK_ELEMENTS if x.device.type == "cpu" else _BLOCK_ELEMENTS
    step = max(1, budget // max(C * C, C * D))
    total = None
    for b in range(0, x.shape[0], step):
        part = similarity_probs(x[b:b + step], temperature).sum(0, dtype=dtype)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no images in the batch")
    return total


def _as_device(device: "torch.device | str") -> "torch.device":
    import torch

    return device if isinstance(device, torch.device) else torch.device(device)


def accumulate_pbar(batches: Iterable[tuple[int, Mapping[str, Any]]], n_units: Mapping[str, int],
                    temperature: float = 1.0, device: "torch.device | str | None" = None,
                    image_ids: Sequence[str] | None = None, workers: int | None = None
                    ) -> "dict[str, torch.Tensor]":
    """One pass over ``(start, {layer: acts [B, C, H, W]})`` batches -> ``{layer: P-bar [C, C] float64}``.

    ``batches`` is e.g. ``ActivationStore.iter_batches(layers)``; NaN/Inf raise a one-line error
    naming the layer and the first bad image.

    On the CPU the layers are accumulated side by side, one thread each (up to ``workers``,
    default: the CPU cores), each on one torch thread: the cache-sized blocks of
    :func:`sum_similarity_probs` are too small for torch's own threads, which on a busy 2-core
    machine made the pass 10x slower. Each layer's sum runs in the same order as alone, so
    P-bar is the same whatever ``workers``.

    Example:
        >>> import torch
        >>> pbar = accumulate_pbar([(0, {"l": torch.rand(4, 3, 2, 2)})], {"l": 3})
        >>> pbar["l"].shape
        torch.Size([3, 3])
    """
    import torch

    accs = {layer: PbarAccumulator(c, temperature, device, name=layer) for layer, c in n_units.items()}
    on_cpu = device is None or _as_device(device).type == "cpu"
    n_workers = min(len(accs), _cpu_cores() if workers is None else max(1, int(workers))) if on_cpu else 1
    threads = torch.get_num_threads()
    pool = None
    try:
        if n_workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(n_workers)
        for start, acts in batches:                         # (a model may compute them: all threads)
            if on_cpu:
                torch.set_num_threads(1)
            try:
                if pool is None:
                    for layer, acc in accs.items():
                        acc.add(acts[layer], start, image_ids)
                else:
                    for _ in pool.map(lambda item: item[1].add(acts[item[0]], start, image_ids), accs.items()):
                        pass                                # re-raises the first layer's error
            finally:
                torch.set_num_threads(threads)
    finally:
        if pool is not None:
            pool.shutdown()
    return {layer: acc.result() for layer, acc in accs.items()}


def _cpu_cores() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                                  # not on Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# embedding.h5

FORMAT = "neurosem-embedding"
VERSION = 1


@dataclass
class Embedding:
    """A loaded ``embedding.h5``: semantic vectors per layer, snapshots and history.

    Example:
        >>> emb = load_embedding("runs/resnet18")                  # doctest: +SKIP
        >>> emb.vectors("layer4").shape                            # doctest: +SKIP
        (512, 16)
    """

    path: Path
    layers: list[str]
    config: dict[str, Any]
    model: str
    snapshot_steps: "np.ndarray"             # [T]
    history_step: "np.ndarray"               # [H]
    history_loss: "np.ndarray"               # [H] eq. 1 on P-bar, mean over layers
    final_loss: float
    _vectors: "dict[str, np.ndarray]" = field(repr=False, default_factory=dict)
    _snapshots: "dict[str, np.ndarray]" = field(repr=False, default_factory=dict)
    _layer_loss: "dict[str, np.ndarray]" = field(repr=False, default_factory=dict)

    @property
    def trainer(self) -> str:
        return str(self.config.get("trainer", "fit"))

    @property
    def temperature(self) -> float:
        return float(self.config.get("temperature", 1.0))

    @property
    def n_units(self) -> dict[str, int]:
        return {layer: int(v.shape[0]) for layer, v in self._vectors.items()}

    def _check(self, layer: str) -> str:
        if layer not in self._vectors:
            from neurosem.ids import closest_names

            near = closest_names(layer, self.layers)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise NeurosemError(f"layer {layer!r} is not in {self.path}{hint}; embedded layers: "
                                f"{', '.join(self.layers)}")
        return layer

    def vectors(self, layer: str) -> "np.ndarray":
        """The final semantic vectors S ``[C, K]`` float32 of a layer."""
        return self._vectors[self._check(layer)]

    def snapshots(self, layer: str) -> "np.ndarray":
        """S along training ``[T, C, K]`` (at :attr:`snapshot_steps`; the first is the initialisation)."""
        return self._snapshots[self._check(layer)]

    def layer_loss(self, layer: str) -> "np.ndarray":
        """Eq. 1 on P-bar for one layer along :attr:`history_step` ``[H]``."""
        return self._layer_loss[self._check(layer)]

    def pbar(self, layer: str) -> "np.ndarray":
        """The target P-bar ``[C, C]`` float64 (mean over images of P_n, at the embedding's tau)."""
        import h5py
        import numpy as np

        with h5py.File(self.path, "r") as f:
            return np.asarray(f["layers"][self._check(layer)]["pbar"][()])


def load_embedding(run_or_path: "str | Path | Any") -> Embedding:
    """Load ``embedding.h5`` from a run directory (or a ``RunDir``, or the file itself).

    Example:
        >>> emb = load_embedding("runs/resnet18")                  # doctest: +SKIP
        >>> emb.layers                                              # doctest: +SKIP
        ['layer1', 'layer2', 'layer3', 'layer4']
    """
    import h5py
    import numpy as np

    from neurosem.run import RunDir

    if isinstance(run_or_path, RunDir):
        path = run_or_path.embedding
    else:
        p = Path(run_or_path)
        path = p if p.suffix in (".h5", ".hdf5") or p.is_file() else RunDir(p).embedding
    if not path.exists():
        raise NeurosemError(f"no embedding at {path}: run `neurosem embed MODEL --run {path.parent}` first")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise KeyError("no neurosem-embedding format mark")
            config = json.loads(f.attrs["config"])
            layers = list(json.loads(f.attrs["layers"]))
            group = f["layers"]
            return Embedding(
                path=path, layers=layers, config=config, model=str(f.attrs.get("model", "")),
                snapshot_steps=np.asarray(f["snapshot_steps"][()]),
                history_step=np.asarray(f["history/step"][()]),
                history_loss=np.asarray(f["history/loss"][()]),
                final_loss=float(f.attrs["final_loss"]),
                _vectors={l: np.asarray(group[l]["S"][()]) for l in layers},
                _snapshots={l: np.asarray(group[l]["snapshots"][()]) for l in layers},
                _layer_loss={l: np.asarray(group[l]["history_loss"][()]) for l in layers})
    except (OSError, KeyError, ValueError) as exc:
        raise NeurosemError(f"{path} is not a readable neurosem embedding ({exc}); "
                            "run `neurosem embed` again to rewrite it") from None


def write_embedding(path: Path, result: Any, config: Mapping[str, Any], model: str = "",
                    pbar: "Mapping[str, torch.Tensor] | None" = None) -> Path:
    """Write a trainer's :class:`~neurosem._embed_train.TrainResult` to ``path`` (atomically).

    Layout (docs/internals.md): root attrs ``config`` (JSON), ``model``, ``layers`` (JSON),
    ``trainer``, ``final_loss``; ``layers/<layer>/S [C, K]`` float32, ``snapshots [T, C, K]``,
    ``history_loss [H]``, ``pbar [C, C]`` float64; ``snapshot_steps [T]``, ``history/step [H]``,
    ``history/loss [H]`` (and ``history/train_loss [H]`` for the paper trainer).
    """
    import h5py
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["config"] = json.dumps(dict(config), default=str)
        f.attrs["model"] = model or ""
        f.attrs["layers"] = json.dumps(list(result.layers))
        f.attrs["trainer"] = result.trainer
        f.attrs["final_loss"] = float(result.final_loss)
        f["snapshot_steps"] = np.asarray(result.snapshot_steps, dtype=np.int64)
        f["history/step"] = np.asarray(result.history_step, dtype=np.int64)
        f["history/loss"] = np.asarray(result.history_loss, dtype=np.float64)
        if result.train_loss is not None:
            f["history/train_loss"] = np.asarray(result.train_loss, dtype=np.float64)
        layers = f.create_group("layers")
        for layer in result.layers:
            g = layers.create_group(layer)
            g["S"] = np.asarray(result.vectors[layer], dtype=np.float32)
            g["snapshots"] = np.asarray(result.snapshots[layer], dtype=np.float32)
            g["history_loss"] = np.asarray(result.layer_loss[layer], dtype=np.float64)
            g.attrs["final_loss"] = float(result.layer_loss[layer][-1])
            if pbar is not None:
                g["pbar"] = pbar[layer].detach().cpu().numpy().astype(np.float64)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# the stage

TRAINERS = ("fit", "paper")


def embed(model: "str | None" = None, data: Any = None, run: "str | Path | None" = None,
          layers: "Sequence[str] | str | None" = None, dim: int = 16, trainer: str = "fit", epochs: int = 100,
          batch_size: int = 64, lr: float = 0.1, weight_decay: float = 5e-4,
          milestones: Sequence[int] = (50, 75, 90), temperature: float = 1.0, seed: int = 0,
          device: "str | torch.device" = "auto", no_store: bool = False, weights: str = "default",
          progress: bool = True, momentum: float = 0.9, max_steps: int = 5000, tol: float = 1e-9) -> Path:
    """Learn a semantic vector per unit of each layer (eq. 1) and write ``RUN/embedding.h5``.

    The activations come from the run's ``activations.h5`` when it exists and matches (recorded
    first otherwise, see :func:`neurosem.record.ensure_activations`), or, with ``no_store=True``,
    straight from the model (nothing written but the embedding; the ``paper`` trainer then runs
    the model every epoch). One streaming pass accumulates P-bar per layer; then

    - ``trainer="fit"`` (default): full-batch L-BFGS on P-bar until the loss changes by less than
      ``tol`` (relative, over 10 steps) or ``max_steps``: the exact minimiser of the same objective;
    - ``trainer="paper"``: the paper's SGD protocol on mini-batches of ``batch_size`` images for
      ``epochs`` epochs (``lr``, ``momentum``, ``weight_decay``, lr x0.1 after each of
      ``milestones``).

    ``temperature`` divides the cosines before both softmaxes (see the module docstring: with the
    paper's tau = 1 the targets are nearly uniform). Same seed, same vectors (bitwise on the CPU).

    Returns:
        The path of ``embedding.h5``.

    Example:
        >>> embed("resnet18", data="data/broden1_224", dim=16)      # doctest: +SKIP
        PosixPath('runs/resnet18/embedding.h5')
    """
    import torch

    from neurosem._device import resolve_device
    from neurosem._embed_train import ModelSource, StoreSource, train_fit, train_paper
    from neurosem.distributed import current, together
    from neurosem.run import resolve_run

    comm = current()  # under torchrun: P-bar from the ranks' shares, fit on rank 0 / paper with DDP (_dist_embed)
    with together(comm):
        trainer, milestones, layer_list = _check_args(dim, trainer, epochs, batch_size, lr, momentum,
                                                      weight_decay, milestones, temperature, max_steps, tol, layers)
        if comm is not None:
            from neurosem._dist_embed import check_world

            check_world(comm, no_store, trainer, batch_size)
        dim = int(dim)
        dev = resolve_device(device)
        rd = resolve_run(run, getattr(model, "spec", model))
    if comm is not None:
        from neurosem._dist_embed import check_embed_args

        check_embed_args(comm, str(rd.path), {"layers": layer_list, "dim": dim, "temperature": temperature,
                                              "seed": seed, "max_steps": max_steps, "tol": tol,
                                              "batch_size": batch_size, "model": str(model), "data": str(data),
                                              "trainer": trainer, "epochs": epochs, "lr": lr, "momentum": momentum,
                                              "weight_decay": weight_decay, "milestones": list(milestones)})
        progress = progress and comm.main
    source = (ModelSource(model, data, layer_list, weights, batch_size, dev, progress) if no_store
              else StoreSource.for_run(rd, model, data, layer_list, weights, batch_size, dev, progress))
    try:
        for layer, c in source.n_units.items():
            if c < 2:
                raise NeurosemError(f"layer {layer!r} has {c} unit; the embedding relates units to each other "
                                    "and needs >= 2 per layer: choose other --layers")
        if comm is not None:
            from neurosem._dist_embed import pbar_sharded

            pbar = pbar_sharded(comm, source, temperature, dev)
            if not comm.main and trainer == "fit":  # rank 0 fits and writes
                source.close()
                comm.barrier()
                return rd.embedding
        else:
            pbar = accumulate_pbar(source.batches(), source.n_units, temperature, dev, source.image_ids())
        if trainer == "fit":
            result = train_fit(pbar, dim=dim, temperature=temperature, seed=seed, max_steps=max_steps, tol=tol,
                               device=dev, progress=progress)
        else:
            result = train_paper(source.epoch_batches(batch_size, seed), source.n_units, dim=dim, epochs=epochs,
                                 lr=lr, momentum=momentum, weight_decay=weight_decay, milestones=milestones,
                                 temperature=temperature, seed=seed, device=dev, pbar=pbar, progress=progress,
                                 comm=comm)
    finally:
        source.close()
    if comm is not None and not comm.main:  # the paper trainer ran on every rank; rank 0 writes
        comm.barrier()
        return rd.embedding
    stuck = [l for l, ok in result.info.get("converged", {}).items() if not ok]
    if stuck:
        import sys

        print(f"note: the fit of {', '.join(stuck)} stopped at max_steps={max_steps} before the loss settled "
              f"(tol {tol}); the vectors are usable, pass max_steps higher to go on", file=sys.stderr)
    config = {
        "trainer": trainer, "model": source.model_spec, "weights": source.weights, "data": source.data,
        "run": str(rd.path), "layers": list(result.layers), "n_units": dict(source.n_units),
        "n_images": source.n_images, "dim": dim, "temperature": temperature, "seed": seed,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
        "weight_decay": weight_decay, "milestones": list(milestones), "max_steps": max_steps, "tol": tol,
        "no_store": bool(no_store), "device": str(dev), "activations": source.provenance,
        "loss": "eq. 1 on P-bar (mean over layers)", "init": "standard normal per (seed, layer)",
        "torch": torch.__version__,
    }
    path = write_embedding(rd.embedding, result, config, model=source.model_spec or "", pbar=pbar)
    rd.update_meta("embed", {**{k: v for k, v in config.items() if k != "activations"},
                             "embedding": str(path), "final_loss": result.final_loss,
                             "layer_loss": {l: float(v[-1]) for l, v in result.layer_loss.items()},
                             "steps": int(result.history_step[-1]), "info": result.info})
    if comm is not None:
        comm.barrier()
    return path


def _check_args(dim: int, trainer: str, epochs: int, batch_size: int, lr: float, momentum: float,
                weight_decay: float, milestones: Sequence[int], temperature: float, max_steps: int, tol: float,
                layers: "Sequence[str] | str | None") -> tuple[str, tuple[int, ...], list[str] | None]:
    trainer = str(trainer).strip().lower()
    if trainer not in TRAINERS:
        raise NeurosemError(f"unknown --trainer {trainer!r}: use fit (exact, default) or paper (the paper's SGD)")
    if int(dim) != dim or dim < 1:
        raise NeurosemError(f"--dim must be an integer >= 1 (got {dim}); the paper uses 16")
    _check_temperature(temperature)
    if epochs < 1:
        raise NeurosemError(f"--epochs must be >= 1 (got {epochs})")
    if batch_size < 1:
        raise NeurosemError(f"--batch-size must be >= 1 (got {batch_size})")
    if not lr > 0 or momentum < 0 or weight_decay < 0:
        raise NeurosemError(f"--lr must be > 0, momentum and weight decay >= 0 (got {lr}, {momentum}, {weight_decay})")
    if max_steps < 1 or not tol >= 0:
        raise NeurosemError(f"max_steps must be >= 1 and tol >= 0 (got {max_steps}, {tol})")
    try:
        ms = tuple(int(m) for m in milestones)
    except (TypeError, ValueError):
        raise NeurosemError(f"milestones must be epoch numbers, e.g. 50,75,90 (got {milestones!r})") from None
    if list(ms) != sorted(ms):
        raise NeurosemError(f"milestones must increase (got {list(ms)})")
    if isinstance(layers, str):
        layers = [x.strip() for x in layers.split(",") if x.strip()]
    layer_list = [str(x) for x in layers] if layers else None
    if layer_list is not None and len(set(layer_list)) != len(layer_list):
        raise NeurosemError(f"--layers names a layer twice ({', '.join(layer_list)})")
    return trainer, ms, layer_list
