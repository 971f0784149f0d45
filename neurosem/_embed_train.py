"""The two trainers of the neuron embedding (see :mod:`neurosem.embed` for the math).

- :func:`train_fit` (default): S is optimised at full batch against P-bar with L-BFGS (float64,
  analytic gradient) until the loss stops changing. Exact: eq. 1 is linear in P, so the loss on
  P-bar *is* the loss on the data.
- :func:`train_paper`: the paper's protocol: SGD (lr 0.1, momentum 0.9, weight decay 5e-4) on
  mini-batches of images (batch 64), 100 epochs, lr x0.1 after epochs 50, 75, 90; float32
  vectors. The paper names SGD but no momentum; we use 0.9, the value of the CRD protocol the
  paper follows for its other training (configurable, 0 gives plain SGD).

The activations come from :class:`StoreSource` (the run's ``activations.h5``) or
:class:`ModelSource` (the model itself, ``--no-store``).

Both start from the same initialisation (standard normal, drawn from the seed and the layer name,
so a layer's start does not depend on which other layers are embedded) and report the loss
history as eq. 1 evaluated on P-bar, i.e. on the full data, so the two are directly comparable.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from neurosem._progress import progress as _progress
from neurosem.embed import accumulation_device, as_tensor, embedding_loss, sum_similarity_probs
from neurosem.errors import NeurosemError, RunMismatchError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

#: ``epoch -> iterable of {layer: acts [B, C, H, W]}`` (one shuffled pass over the images).
EpochBatches = Callable[[int], Iterable[Mapping[str, Any]]]


@dataclass
class TrainResult:
    """What a trainer returns (all NumPy, on the CPU).

    ``history_loss[t]`` is eq. 1 on P-bar, averaged over layers, at progress ``history_step[t]``
    (optimiser step for ``fit``, epoch for ``paper``; step 0 is the initialisation).
    """

    trainer: str
    layers: list[str]
    vectors: "dict[str, np.ndarray]"            # [C, K] float32, final
    snapshots: "dict[str, np.ndarray]"          # [T, C, K] float32
    snapshot_steps: "np.ndarray"                # [T] int64
    history_step: "np.ndarray"                  # [H] int64
    history_loss: "np.ndarray"                  # [H] float64
    layer_loss: "dict[str, np.ndarray]"         # [H] float64 per layer
    train_loss: "np.ndarray | None" = None      # paper: mean mini-batch loss per epoch [H] (NaN at 0)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return float(self.history_loss[-1])


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from ``seed`` and a name (stable across runs and platforms)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (1 << 63)


def init_vectors(n_units: int, dim: int, seed: int, layer: str) -> "torch.Tensor":
    """The initial S ``[C, K]`` float64 on the CPU: standard normal from ``(seed, layer)``.

    Example:
        >>> bool((init_vectors(4, 2, 0, "layer1") == init_vectors(4, 2, 0, "layer1")).all())
        True
    """
    import torch

    g = torch.Generator().manual_seed(layer_seed(seed, layer))
    return torch.randn(n_units, dim, generator=g, dtype=torch.float64)


def _is_snapshot_step(step: int) -> bool:
    return step == 0 or (step & (step - 1)) == 0       # 0, 1, 2, 4, 8, ...


# ---------------------------------------------------------------------------------------------
# fit

def train_fit(pbar: "Mapping[str, torch.Tensor]", dim: int = 16, temperature: float = 1.0, seed: int = 0,
              max_steps: int = 5000, tol: float = 1e-9, window: int = 10,
              device: "torch.device | str | None" = None, progress: bool = False) -> TrainResult:
    """Minimise eq. 1 against P-bar at full batch, one layer at a time (the layers are independent).

    L-BFGS (history 20, backtracking Armijo line search) in float64 with the analytic gradient
    (:func:`loss_and_grad`). On the CPU it runs on one torch thread: the [C, C] operations are too
    small to gain from more (threads that wait for each other made it 3x slower on a busy
    2-core machine), and torch splits large sums differently for each thread count, so this
    makes the vectors the same to the bit on every machine. A layer stops when its loss fell by at most ``tol * max(1, |loss|)``
    over the last ``window`` steps, or after ``max_steps``. Snapshots: the initialisation, steps
    1, 2, 4, 8, ... and the last step.

    The loss converges fast, but at tau = 1 the optimum is a flat valley: solutions within 1e-7 of
    the loss can still differ in a good part of their nearest neighbours (``benchmarks/embed.py``
    prints the neighbour agreement between seeds).

    Args:
        pbar: ``{layer: P-bar [C, C]}`` (see :func:`neurosem.embed.accumulate_pbar`).
        device: where to optimise (default: where each P-bar lives; MPS -> CPU, no float64).

    Example:
        >>> import torch
        >>> res = train_fit({"l": torch.full((3, 3), 1 / 3, dtype=torch.float64)}, dim=2)
        >>> res.vectors["l"].shape
        (3, 2)
    """
    import numpy as np
    import torch

    layers = list(pbar)
    per_layer: dict[str, tuple[list[float], dict[int, np.ndarray], int, bool]] = {}
    threads = torch.get_num_threads()
    for layer in _progress(layers, desc="fit", enabled=progress, unit="layer"):
        P = pbar[layer]
        dev = accumulation_device(torch.device(device) if device is not None else P.device)
        P = P.to(dev, torch.float64)
        S0 = init_vectors(P.shape[0], dim, seed, layer).to(dev)
        if dev.type == "cpu":
            torch.set_num_threads(1)
        try:
            per_layer[layer] = _fit_layer(P, S0, temperature, max_steps, tol, window)
        finally:
            torch.set_num_threads(threads)

    total = max(last for _, _, last, _ in per_layer.values())
    steps = np.arange(total + 1, dtype=np.int64)
    layer_loss = {l: np.array(losses + [losses[-1]] * (total + 1 - len(losses)))
                  for l, (losses, _, _, _) in per_layer.items()}
    snap_steps = [s for s in range(total + 1) if _is_snapshot_step(s) or s == total]
    snapshots, vectors = {}, {}
    for l, (_, states, last, _) in per_layer.items():
        snapshots[l] = np.stack([states[min(s, last)] for s in snap_steps]).astype(np.float32)
        vectors[l] = states[last].astype(np.float32)
    return TrainResult(
        trainer="fit", layers=layers, vectors=vectors, snapshots=snapshots,
        snapshot_steps=np.array(snap_steps, dtype=np.int64), history_step=steps,
        history_loss=np.mean([layer_loss[l] for l in layers], axis=0), layer_loss=layer_loss,
        info={"steps": {l: v[2] for l, v in per_layer.items()},
              "converged": {l: v[3] for l, v in per_layer.items()}})


def loss_and_grad(P: "torch.Tensor", S: "torch.Tensor", temperature: float = 1.0,
                  row_sums: "torch.Tensor | None" = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """Eq. 1 and its gradient with respect to ``S [C, K]`` in closed form (about 3x autograd's speed).

    With N the row-normalised S, Z = N N^T / tau, Q = softmax_j Z and r_i = sum_j P_ij
    (``row_sums``, 1 for P-bar): dL/dZ = G = (Q * r - P) / C, dL/dN = (G + G^T) N / tau, and
    dL/ds_i = (I - n_i n_i^T) dL/dn_i / |s_i|. One exp per entry serves both Q and log Q.
    """
    from neurosem.embed import EPS

    C = S.shape[0]
    r = P.sum(1, keepdim=True) if row_sums is None else row_sums
    norm = S.norm(dim=1, keepdim=True).clamp_min(EPS)
    N = S / norm
    Z = N @ N.T
    if temperature != 1.0:
        Z = Z / temperature
    zmax = Z.amax(1, keepdim=True)
    E = (Z - zmax).exp_()
    total = E.sum(1, keepdim=True)
    log_q = Z - zmax - total.log()
    loss = -(P * log_q).sum() / C
    G = E.mul_(r / total).sub_(P).div_(C)
    dN = (G + G.T) @ N
    if temperature != 1.0:
        dN = dN / temperature
    dS = (dN - (dN * N).sum(1, keepdim=True) * N) / norm
    return loss, dS


def _fit_layer(P: "torch.Tensor", S0: "torch.Tensor", temperature: float, max_steps: int, tol: float,
               window: int, history: int = 20) -> "tuple[list[float], dict[int, np.ndarray], int, bool]":
    """L-BFGS on one layer -> (loss per step, {step: S} at snapshot steps and the last, last, converged).

    Two-loop recursion with the scaled identity ys/yy as initial Hessian; a step tries t = 1 (the
    first step: a unit-length move along -g) and backtracks with safeguarded quadratic
    interpolation until the Armijo condition holds; pairs with ys <= 1e-10 are skipped.
    """
    x = S0.clone()
    r = P.sum(1, keepdim=True)
    f, g = loss_and_grad(P, x, temperature, r)
    fx = float(f)
    losses = [fx]
    states = {0: x.cpu().numpy().copy()}
    dirs: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    step, converged = 0, False
    for step in range(1, max_steps + 1):
        q = -g
        alphas = []
        for s, y, rho in reversed(dirs):
            a = rho * float((s * q).sum())
            alphas.append(a)
            q = q - a * y
        if dirs:
            s, y, rho = dirs[-1]
            q = q * (1.0 / (rho * float((y * y).sum())))
        else:
            q = q / max(float(g.norm()), 1e-300)
        for (s, y, rho), a in zip(dirs, reversed(alphas)):
            q = q + (a - rho * float((y * q).sum())) * s
        d = q
        gtd = float((g * d).sum())
        if not gtd < 0:                                 # not a descent direction: restart
            dirs.clear()
            d = -g / max(float(g.norm()), 1e-300)
            gtd = float((g * d).sum())
        if gtd == 0.0:
            converged = True
            break
        t = 1.0
        while True:
            x_new = x + t * d
            f_new, g_new = loss_and_grad(P, x_new, temperature, r)
            fn = float(f_new)
            if fn <= fx + 1e-4 * t * gtd:
                break
            if not math.isfinite(fn):
                t_next = 0.1 * t
            else:
                t_next = -gtd * t * t / (2.0 * (fn - fx - gtd * t))
                t_next = min(max(t_next, 0.1 * t), 0.5 * t)
            t = t_next
            if t < 1e-20:
                break
        if t < 1e-20:                                   # no decrease possible: at the floor of float64
            converged = True
            break
        s_vec, y_vec = x_new - x, g_new - g
        ys = float((y_vec * s_vec).sum())
        if ys > 1e-10:
            dirs.append((s_vec, y_vec, 1.0 / ys))
            if len(dirs) > history:
                dirs.pop(0)
        x, fx, g = x_new, fn, g_new
        losses.append(fx)
        if _is_snapshot_step(step):
            states[step] = x.cpu().numpy().copy()
        if step >= window and losses[-1 - window] - fx <= tol * max(1.0, abs(fx)):
            converged = True
            break
    last = len(losses) - 1
    states[last] = x.cpu().numpy().copy()
    return losses, states, last, converged


# ---------------------------------------------------------------------------------------------
# paper

def train_paper(epoch_batches: EpochBatches, n_units: Mapping[str, int], dim: int = 16, epochs: int = 100,
                lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                milestones: Sequence[int] = (50, 75, 90), temperature: float = 1.0, seed: int = 0,
                device: "torch.device | str | None" = None, pbar: "Mapping[str, torch.Tensor] | None" = None,
                progress: bool = False, comm: Any = None) -> TrainResult:
    """The paper's protocol: SGD on mini-batches of images, lr x0.1 after each milestone epoch.

    Epochs count from 1; with milestones (50, 75, 90), epochs 1-50 run at ``lr``, 51-75 at
    ``lr/10``, ... (the rule of CRD's ``adjust_learning_rate``, which the paper's protocol follows).

    Each step minimises the mean over layers of eq. 1 on the batch (P_n of every image in the
    batch). Snapshot and history entry after every epoch (and the initialisation, epoch 0). With
    ``pbar`` the history is eq. 1 on the full data (P-bar); without it, the mean mini-batch loss.

    Args:
        epoch_batches: ``epoch -> iterable of {layer: acts [B, C, H, W]}``, one shuffled pass
            (e.g. :func:`tensor_epoch_batches`, :func:`store_epoch_batches`).
        n_units: ``{layer: C}``, in the order of the layers.
        comm: under ``torchrun`` (:func:`neurosem.distributed.current`), every rank is given the
            same global mini-batches and trains on its share of each with DistributedDataParallel
            (:class:`neurosem._dist_embed.PaperShards`): the global batch, the learning rate and the
            vectors stay those of one process (up to float summation order).

    Example:
        >>> import torch
        >>> batches = tensor_epoch_batches({"l": torch.rand(8, 3, 2, 2)}, batch_size=4, seed=0)
        >>> res = train_paper(batches, {"l": 3}, dim=2, epochs=2, milestones=(1,))
        >>> res.snapshots["l"].shape
        (3, 3, 2)
    """
    import numpy as np
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    sum_dtype = torch.float32 if dev.type == "mps" else torch.float64       # MPS has no float64
    layers = list(n_units)
    params = {l: torch.nn.Parameter(init_vectors(c, dim, seed, l).to(dev, torch.float32))
              for l, c in n_units.items()}
    shards = None
    if comm is not None:
        from neurosem._dist_embed import PaperShards

        shards = PaperShards(comm, [params[l] for l in layers], temperature, dev)
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)

    def exact() -> dict[str, float]:
        if pbar is None:
            return {}
        with torch.no_grad():
            return {l: float(embedding_loss(pbar[l], params[l].detach().to(pbar[l].device, torch.float64),
                                            temperature)) for l in layers}

    snaps = {l: [params[l].detach().cpu().numpy().copy()] for l in layers}
    first = exact()
    layer_hist = {l: [first.get(l, math.nan)] for l in layers}
    train_hist = [math.nan]
    for epoch in _progress(range(1, epochs + 1), total=epochs, desc="paper", enabled=progress, unit="epoch"):
        total = torch.zeros((), dtype=sum_dtype, device=dev)
        seen = {l: torch.zeros((), dtype=sum_dtype, device=dev) for l in layers}
        n = 0
        for acts in epoch_batches(epoch):
            if shards is None:
                losses = []
                for l in layers:
                    x = as_tensor(acts[l], dev).flatten(2)
                    P = sum_similarity_probs(x, temperature, params[l].dtype) / x.shape[0]
                    losses.append(embedding_loss(P, params[l], temperature))
                loss = mean = torch.stack(losses).mean()
                b = x.shape[0]
            else:   # this rank's share of the batch; mean, losses: its parts of the batch's loss
                loss, mean, losses, b = shards.losses([acts[l] for l in layers])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += mean.detach().to(sum_dtype) * b
            for l, v in zip(layers, losses):
                seen[l] += v.detach().to(sum_dtype) * b
            n += b
        if n == 0:
            raise ValueError("epoch_batches yielded no images")
        if shards is not None:
            total, seen = shards.sum_epoch(total, seen)     # the parts of every rank
        sched.step()
        train = float(total) / n
        if not math.isfinite(train):
            raise FloatingPointError(f"the paper protocol diverged in epoch {epoch} (loss {train}); lower --lr")
        train_hist.append(train)
        now = exact() or {l: float(seen[l]) / n for l in layers}
        for l in layers:
            layer_hist[l].append(now[l])
            snaps[l].append(params[l].detach().cpu().numpy().copy())

    layer_loss = {l: np.array(v, dtype=np.float64) for l, v in layer_hist.items()}
    return TrainResult(
        trainer="paper", layers=layers,
        vectors={l: snaps[l][-1].astype(np.float32) for l in layers},
        snapshots={l: np.stack(snaps[l]).astype(np.float32) for l in layers},
        snapshot_steps=np.arange(epochs + 1, dtype=np.int64),
        history_step=np.arange(epochs + 1, dtype=np.int64),
        history_loss=np.mean([layer_loss[l] for l in layers], axis=0), layer_loss=layer_loss,
        train_loss=np.array(train_hist, dtype=np.float64),
        info={"epochs": epochs, "exact_history": pbar is not None})


# ---------------------------------------------------------------------------------------------
# mini-batch sources for the paper protocol

def _epoch_generator(seed: int, epoch: int) -> "torch.Generator":
    import torch

    return torch.Generator().manual_seed(layer_seed(seed, f"epoch:{epoch}"))


def tensor_epoch_batches(acts: "Mapping[str, torch.Tensor]", batch_size: int = 64, seed: int = 0) -> EpochBatches:
    """Shuffled mini-batches of in-memory activations ``{layer: [N, C, H, W]}`` (tests, small sets)."""
    import torch

    n = len(next(iter(acts.values())))

    def batches(epoch: int) -> Iterator[dict[str, Any]]:
        perm = torch.randperm(n, generator=_epoch_generator(seed, epoch))
        for b in range(0, n, batch_size):
            idx = perm[b:b + batch_size]
            yield {l: a[idx.to(a.device)] if isinstance(a, torch.Tensor) else a[idx.numpy()] for l, a in acts.items()}

    return batches


def store_epoch_batches(store: Any, layers: Sequence[str], batch_size: int = 64, seed: int = 0,
                        block_bytes: int = 256 << 20) -> EpochBatches:
    """Shuffled mini-batches read from an ``ActivationStore``.

    Whole-store random access is slow in HDF5, so each epoch reads contiguous blocks of images in a
    random block order and shuffles the images within a block (block size: as many images as fit
    in ``block_bytes`` of float16, at least one batch); leftovers carry over to the next block.
    """
    import torch

    n = int(store.n_done)
    per_image = sum(2 * math.prod(store.shape(l)[1:]) for l in layers)
    block = max(batch_size, min(n, block_bytes // max(per_image, 1)))

    def batches(epoch: int) -> Iterator[dict[str, Any]]:
        g = _epoch_generator(seed, epoch)
        starts = list(range(0, n, block))
        pending: dict[str, torch.Tensor] | None = None
        for k in torch.randperm(len(starts), generator=g).tolist():
            s, e = starts[k], min(n, starts[k] + block)
            perm = torch.randperm(e - s, generator=g)
            data = {l: torch.from_numpy(store.read(l, s, e))[perm] for l in layers}
            if pending is not None:
                data = {l: torch.cat([pending[l], data[l]]) for l in layers}
            m = len(data[layers[0]])
            full = m - m % batch_size
            for b in range(0, full, batch_size):
                yield {l: data[l][b:b + batch_size] for l in layers}
            pending = {l: data[l][full:] for l in layers} if full < m else None
        if pending is not None:
            yield pending

    return batches


# ---------------------------------------------------------------------------------------------
# where the activations come from (used by neurosem.embed.embed)

class StoreSource:
    """Activations from the run's ``activations.h5``."""

    def __init__(self, path: Path, layers: list[str] | None, device: "torch.device", progress: bool) -> None:
        from neurosem.store import ActivationStore

        self.store = ActivationStore.open(path)
        try:
            self.layers = list(layers) if layers else list(self.store.layers)
            self.n_units = {l: self.store.shape(l)[1] for l in self.layers}   # missing layer: NeurosemError
        except BaseException:
            self.store.close()
            raise
        self.device, self.progress = device, progress
        self.n_images = self.store.n_done
        prov = self.store.provenance
        self.provenance = prov
        self.model_spec, self.weights, self.data = prov.get("model"), prov.get("weights"), prov.get("data")

    @classmethod
    def for_run(cls, rd: Any, model: Any, data: Any, layers: list[str] | None, weights: str, batch_size: int,
                device: "torch.device", progress: bool) -> "StoreSource":
        from neurosem.record import ensure_activations

        try:
            path = ensure_activations(rd.path, model=model, data=data, layers=layers, weights=weights,
                                      batch_size=batch_size, device=device, progress=progress)
        except RunMismatchError as exc:
            raise RunMismatchError(str(exc).replace(
                "use --force to record again",
                f"record them again with `neurosem record MODEL --data PATH --force --run {rd.path}`, use "
                "--no-store,")) from None
        return cls(path, layers, device, progress)

    def image_ids(self) -> list[str]:
        return self.store.image_ids

    def batches(self) -> Iterable[tuple[int, dict[str, Any]]]:
        from neurosem._progress import progress as bar

        step = 256
        return bar(self.store.iter_batches(self.layers, batch_size=step), total=-(-self.n_images // step),
                   desc="P-bar", enabled=self.progress, unit="batch")

    def epoch_batches(self, batch_size: int, seed: int) -> Any:
        return store_epoch_batches(self.store, self.layers, batch_size=batch_size, seed=seed)

    def close(self) -> None:
        self.store.close()


class ModelSource:
    """Activations straight from the model (``no_store=True``): nothing is written."""

    def __init__(self, model: Any, data: Any, layers: list[str] | None, weights: str, batch_size: int,
                 device: "torch.device", progress: bool) -> None:
        from neurosem.models import check_layers, load_model
        from neurosem.record import open_data

        if model is None or data is None:
            raise NeurosemError("--no-store runs the model on the data: give MODEL and --data (or --broden)")
        self.lm = load_model(model, weights) if isinstance(model, str) else model
        self.layers = check_layers(self.lm.model, layers or self.lm.default_layers)
        self.ds, self.data, self.fingerprint = open_data(data)
        self.n_images = len(self.ds)
        if self.n_images < 1:
            raise NeurosemError(f"the dataset {self.data} has no images")
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self.model_spec, self.weights = self.lm.spec, self.lm.weights
        self.provenance = {"model": self.model_spec, "weights": self.weights, "data": self.data,
                           "data_fingerprint": self.fingerprint, "layers": self.layers, "stored": False,
                           "transform": {"mean": list(self.lm.mean), "std": list(self.lm.std)}}
        self.lm.model.to(device)
        probe = self._run(shuffle=False, generator=None, limit=1)
        try:
            first = next(iter(probe))[1]
        finally:
            probe.close()                           # removes the hooks now
        self.n_units = {l: int(first[l].shape[1]) for l in self.layers}
        for l in self.layers:
            if first[l].dim() != 4:
                raise NeurosemError(f"layer {l!r} gives {first[l].dim() - 1}-D outputs; the embedding needs "
                                    "(C, H, W) maps: choose a convolutional layer")

    def image_ids(self) -> None:
        return None

    def _run(self, shuffle: bool, generator: Any, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        import torch

        from neurosem.record import Recorder

        ds = self.ds if limit is None else torch.utils.data.Subset(self.ds, range(min(limit, self.n_images)))
        loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                                             collate_fn=_stack_images)
        mean = torch.tensor(self.lm.mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.lm.std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        start = 0
        with Recorder(self.lm.model, self.layers, stop_after_last=True, to_cpu=False) as rec:
            for images in loader:
                with torch.no_grad():
                    rec.forward(images.to(self.device).float().sub_(mean).div_(std))
                yield start, dict(rec.outputs)
                start += len(images)

    def batches(self) -> Iterable[tuple[int, dict[str, Any]]]:
        from neurosem._progress import progress as bar

        return bar(self._run(shuffle=False, generator=None), total=-(-self.n_images // self.batch_size),
                   desc="P-bar", enabled=self.progress, unit="batch")

    def epoch_batches(self, batch_size: int, seed: int) -> Any:
        import torch

        def batches(epoch: int) -> Iterable[dict[str, Any]]:
            g = torch.Generator().manual_seed(layer_seed(seed, f"epoch:{epoch}"))
            for _, acts in self._run(shuffle=True, generator=g):
                yield acts

        return batches

    def close(self) -> None:
        self.lm.model.to("cpu")


def _stack_images(items: list[Any]) -> "torch.Tensor":
    """Collate dataset items (``{"image": [3, H, W], ...}``, a tuple, or a tensor) into ``[B, 3, H, W]``."""
    import torch

    def image(item: Any) -> Any:
        if isinstance(item, Mapping):
            return item["image"]
        return item[0] if isinstance(item, (tuple, list)) else item

    return torch.stack([image(it) for it in items])
