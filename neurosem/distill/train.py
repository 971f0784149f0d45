"""Training a CIFAR student: static knowledge distillation (paper eq. 2), the CRD baselines, or
plain cross-entropy (``method="ce"``, also how teachers are trained).

Protocols (:mod:`neurosem.distill.protocols`): ``crd`` (lr 0.05, 0.01 for MobileNetV2 and the
ShuffleNets, 240 epochs, RepDistiller's) for every method but SKD, whose default is ``paper``
(lr 0.1, 100 epochs). ``epochs=`` shortens a protocol; its milestones scale with it.

Loss ``gamma CE + alpha KD + beta L_method`` (each method's formula and default weights in
:mod:`neurosem.distill.methods`): ``kd``: 0.1 CE + 0.9 KD (T = 4); ``skd``/``skd-random``: CE +
beta L_SKD (beta 0.5, 0.05 for vgg13 -> vgg8); every other method: CE + beta L_method with CRD's
beta and no KD term (RepDistiller's ``-a 0``; ``alpha=`` adds one, as CRD+KD). ``beta=`` for
``kd`` is the KD weight. AB, FT and FSP first run RepDistiller's initialisation stage
(``init_epochs``, 30). The resolved settings are in ``distill.json``'s ``config``.

SKD never builds or runs the teacher: it needs only the teacher's vectors (``embedding.h5``).
Every epoch writes ``checkpoint.pt`` (model, optimiser, scheduler, epoch, history, RNG states;
tensors and plain containers only, read back with ``weights_only=True`` so a planted file cannot
run code) and ``distill.json`` (the results so far) in the run directory; running the same
command again resumes from the last completed epoch. Each epoch reseeds every RNG from ``(seed, epoch)``, so an
interrupted and resumed run ends in the same state as an uninterrupted one.

Under ``torchrun`` every rank trains on its slice of each global batch and rank 0 writes the
files; the training is one process's up to float summation order (:mod:`neurosem.distill._ddp`).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from neurosem.distill import methods as M
from neurosem.distill import zoo
from neurosem.distill._ddp import GradientSync, Spread, broadcast_state, check_splittable, synced_batchnorm
from neurosem.distill.checkpoint import (_load_checkpoint, _resume, _rng_state, _save_checkpoint,  # noqa: F401
                                         _set_rng_state, _write_json)
from neurosem.distill.distiller import build_distiller, resolve_weights, zoo_widths
from neurosem.distill.loop import _collate, _datasets, _epoch_seed, _init_epoch, _seed_all, evaluate  # noqa: F401
from neurosem.distill.methods import LossWeights, MethodOptions
from neurosem.distill.protocols import PROTOCOLS, Protocol, default_protocol, protocol_lr
from neurosem.distill.vectors import load_teacher_vectors
from neurosem.errors import NeurosemError, RunMismatchError

__all__ = ["PROTOCOLS", "Protocol", "default_protocol", "distill", "evaluate", "load_teacher_vectors",
           "protocol_lr", "resolved_options", "train_teacher"]

CHECKPOINT = "checkpoint.pt"
RESULTS = "distill.json"
WEIGHTS = "weights.pth"


def resolved_options(method: str, options: MethodOptions, weights: LossWeights) -> dict[str, Any]:
    """The options ``method`` actually uses (written to ``distill.json``)."""
    out: dict[str, Any] = {}
    if weights.kd > 0:
        out["kd_T"] = options.kd_T
    if method in ("skd", "skd-random"):
        out["temperature"] = options.temperature
    if method == "skd-random":
        out["seed"] = options.seed
    if method == "fitnet":
        out["hint_layer"] = options.hint_layer
    if method in ("cc", "cc-rbf", "crd"):
        out["feat_dim"] = options.feat_dim
    if method == "crd":
        out.update(nce_k=options.nce_k, nce_t=options.nce_t, nce_m=options.nce_m)
    if method in ("iepkt", "iepkt-bb"):
        iep = asdict(options.iepkt)
        if method == "iepkt":
            iep.pop("bb_weight")
            iep.pop("heads")
        out["iepkt"] = iep
    return out


def _iepkt_options(method: str, given: Mapping[str, Any] | None) -> Any:
    """IEPKT's settings for ``method`` (``None`` for every other method; given ones are refused there)."""
    from neurosem.distill.methods.iepkt import IEPKTOptions

    if method not in ("iepkt", "iepkt-bb"):
        if given:
            raise NeurosemError(f"the --iep-* options are IEPKT's; --method {method} takes none of them")
        return None
    if method == "iepkt" and given and "bb_weight" in given:
        raise NeurosemError("--iep-bb weighs the black-box term of --method iepkt-bb; --method iepkt has none")
    try:
        return IEPKTOptions(**(given or {})).check()
    except TypeError as exc:
        raise NeurosemError(f"unknown IEPKT setting: {exc}") from None


def _config_diff(saved: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(asked))
    return [f"{k}={saved.get(k)!r} (asked {asked.get(k)!r})" for k in keys if saved.get(k) != asked.get(k)]


def _default_run(student: str, method: str, teacher: str | None, seed: int) -> Path:
    from neurosem.run import RUNS_ROOT, default_run_name

    parts = [student, method] + ([teacher] if teacher and method != "ce" else []) + [f"s{seed}"]
    return RUNS_ROOT / default_run_name("-".join(parts))


def _abs(p: str | Path | None) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


# ------------------------------------------------------------------------------------------------
# the stage

def distill(teacher: str | None = None, student: str = "resnet8x4", method: str = "skd",
            data: str = "cifar100:data", protocol: str | None = None, epochs: int | None = None,
            seed: int = 0, device: str = "auto", run: str | Path | None = None,
            beta: float | None = None, temperature: float = 1.0,
            teacher_weights: str | Path | None = None, teacher_vectors: str | Path | None = None,
            batch_size: int | None = None, lr: float | None = None, num_workers: int = 2,
            progress: bool = True, *, alpha: float | None = None, gamma: float | None = None,
            kd_T: float = 4.0, hint_layer: int = 2, feat_dim: int = 128, nce_k: int = 16384,
            nce_t: float = 0.07, nce_m: float = 0.5, init_epochs: int | None = None,
            sampler: Any = None, iepkt: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train ``student`` on CIFAR with ``method``; returns the results (also in ``<run>/distill.json``).

    ``protocol``: ``crd`` for every method but SKD (default ``paper``), see :data:`PROTOCOLS`.
    Weights: ``gamma`` (CE), ``alpha`` (KD, temperature ``kd_T``), ``beta`` (the method's term);
    unset ones take the method's defaults. ``hint_layer``: FitNet's feature; ``feat_dim``,
    ``nce_k``, ``nce_t``, ``nce_m``: CRD's embedding width, negatives, temperature and momentum;
    ``init_epochs``: the initialisation stage of AB, FT and FSP (default 30, RepDistiller's) and
    IEPKT's GNN stage (default 20); ``iepkt``: IEPKT's settings (the fields of
    :class:`neurosem.distill.methods.iepkt.IEPKTOptions`, e.g. ``{"clip": "global"}``).
    ``sampler``: the training set's sampler (default: a shuffle seeded per epoch); one with
    ``set_epoch`` (e.g. ``DistributedSampler``) is told each epoch.

    Results: ``test_acc`` per epoch (top-1, %), ``final_acc``, ``best_acc``, ``best_epoch``,
    ``epoch_time`` (training seconds per epoch), ``teacher_acc`` (baselines), the resolved
    ``config`` (every weight, temperature and option actually used), and the paths of the
    results, the checkpoint and the final student weights (``weights.pth``, a state dict that
    ``--weights`` loads).

    Example:
        >>> distill(teacher="resnet32x4", student="resnet8x4", method="skd",
        ...         data="cifar100:data/cifar", teacher_vectors="runs/resnet32x4")  # doctest: +SKIP
        {'final_acc': 72.9, ...}
    """
    from neurosem._device import resolve_device
    from neurosem._progress import progress as bar
    from neurosem.distributed import current, together
    from neurosem.run import RunDir

    comm = current()   # under torchrun: data parallel, the global batch preserved (neurosem.distill._ddp)
    with together(comm):
        spec = M.get(method)   # an unknown name lists the closest ones
        if comm is not None and method in ("iepkt", "iepkt-bb"):
            raise NeurosemError(f"--method {method} does not run under torchrun (its gradient clipping "
                                "differentiates inside the loss): run it as one process")
        if comm is not None and sampler is not None:
            raise NeurosemError("distill(sampler=...) is a single process's: under torchrun every rank "
                                "takes its slice of the seeded global batch")
    protocol = protocol or default_protocol(method)
    if protocol not in PROTOCOLS:
        raise NeurosemError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    for flag, v in (("--temperature", temperature), ("--kd-T", kd_T), ("--nce-t", nce_t)):
        if not v > 0:
            raise NeurosemError(f"{flag} must be > 0, got {v}")
    if not 0 <= nce_m < 1:
        raise NeurosemError(f"--nce-m must be in [0, 1), got {nce_m}")
    if feat_dim < 1 or nce_k < 1:
        raise NeurosemError(f"--feat-dim and --nce-k must be >= 1, got {feat_dim} and {nce_k}")
    for name in (student, teacher):
        if name is not None and name not in zoo.ZOO:
            zoo.build(name)  # raises the one-line "unknown model, did you mean" error
    weights = resolve_weights(method, teacher, student, beta, alpha, gamma)
    runs_teacher = spec.needs_teacher or weights.kd > 0
    if runs_teacher:
        why = f"--method {method}" if spec.needs_teacher else f"--alpha {weights.kd} (the KD term)"
        if teacher is None:
            raise NeurosemError(f"{why} runs a teacher: pass --teacher MODEL and --teacher-weights FILE")
        if teacher_weights is None:
            raise NeurosemError(
                f"{why} runs the teacher {teacher}: pass --teacher-weights FILE (train one with "
                f"`neurosem distill --method ce --student {teacher} --data {data}`)")
    if method == "ce":
        teacher = None
    n_init = (spec.default_init_epochs if init_epochs is None else int(init_epochs)) if spec.init_stage else 0
    if n_init < 0:
        raise NeurosemError(f"--init-epochs must be >= 0, got {init_epochs}")
    options = MethodOptions(kd_T=float(kd_T), hint_layer=int(hint_layer), temperature=float(temperature),
                            feat_dim=int(feat_dim), nce_k=int(nce_k), nce_t=float(nce_t), nce_m=float(nce_m),
                            seed=int(seed), iepkt=_iepkt_options(method, iepkt))
    proto = PROTOCOLS[protocol].scaled(epochs)
    bs = int(batch_size or proto.batch_size)
    base_lr = float(lr if lr is not None else protocol_lr(protocol, student))

    dev = resolve_device(device)
    main = comm is None or comm.main
    progress = progress and main
    with together(comm):
        train_ds, test_ds, data_name = _datasets(data)
        why = None if comm is None else check_splittable(len(train_ds), bs, comm.size)
        if why:
            raise NeurosemError(f"{why} (under torchrun each rank trains on a slice of every batch)")
    num_classes = train_ds.num_classes
    rd = RunDir(Path(run) if run is not None else _default_run(student, method, teacher, seed))
    if comm is not None:
        comm.check_shared_dir(rd.path)
        comm.check_same("distill", {"run": str(rd.path), "teacher": teacher, "student": student, "method": method,
                                    "data": data, "protocol": protocol, "epochs": epochs, "seed": seed, "beta": beta,
                                    "alpha": alpha, "gamma": gamma, "batch_size": bs, "lr": base_lr,
                                    "num_workers": num_workers,
                                    **{k: v for k, v in asdict(options).items() if k != "seed"},
                                    "teacher_weights": _abs(teacher_weights), "teacher_vectors": _abs(teacher_vectors),
                                    "init_epochs": init_epochs})
    if main:
        rd.ensure()
    ckpt_path, results_path, weights_path = rd.path / CHECKPOINT, rd.path / RESULTS, rd.path / WEIGHTS

    # -- the student, the loss and (baselines only) the teacher
    vectors, t_layers, emb_path = None, None, None
    if method == "skd" or (method == "skd-random" and teacher_vectors is not None):
        widths = [zoo_widths(student)[l] for l in zoo.ALIGNED_LAYERS[student]]
        vectors, t_layers, emb_path = load_teacher_vectors(teacher_vectors, teacher, student, widths)
    teacher_model = None
    if runs_teacher:
        from neurosem.models import load_weights_file

        teacher_model = zoo.build(teacher, num_classes=num_classes)  # type: ignore[arg-type]
        load_weights_file(teacher_model, teacher_weights)  # type: ignore[arg-type]
        teacher_model.eval()
    labels = torch.as_tensor(train_ds.labels, dtype=torch.long) if spec.needs_index else None
    dist = build_distiller(method, student, teacher, num_classes=num_classes, vectors=vectors,
                           teacher_model=teacher_model, beta=beta, alpha=alpha, gamma=gamma, options=options,
                           n_data=len(train_ds), labels=labels)
    dist.to(dev)
    if comm is not None:   # BatchNorm over the global batch: the statistics a single process sees
        dist.student = synced_batchnorm(dist.student, dev)
    init_lr = dist.criterion.init_lr(student, base_lr) if n_init else None

    config = {
        "teacher": teacher, "student": student, "method": method, "protocol": protocol,
        "epochs": proto.epochs, "milestones": list(proto.milestones), "lr": base_lr,
        "momentum": proto.momentum, **({"nesterov": True} if proto.nesterov else {}),
        "weight_decay": proto.weight_decay, "batch_size": bs,
        "seed": int(seed), "weights": asdict(dist.weights),
        "options": resolved_options(method, options, dist.weights),
        "init_epochs": n_init, "init_lr": init_lr,
        "data": f"{data_name}:{_abs(train_ds.root)}", "num_classes": num_classes,
        "teacher_weights": _abs(teacher_weights) if runs_teacher else None,
        "teacher_vectors": str(Path(emb_path).resolve()) if emb_path else None,
        "teacher_layers": t_layers if t_layers else (list(dist.t_taps.keys()) or None),
        "student_layers": list(dist.s_taps.keys()),
    }
    params = list(dist.parameters())
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=proto.momentum, weight_decay=proto.weight_decay,
                                nesterov=proto.nesterov)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(proto.milestones),
                                                     gamma=proto.lr_decay)
    history: dict[str, list[float]] = {k: [] for k in (
        "epoch", "lr", "train_loss", "train_acc", "test_acc", "test_loss", "epoch_time", "eval_time")}
    history.update({f"train_{k}": [] for k in dist.part_names()})
    if n_init:
        history.update({"init_loss": [], "init_time": []})
    start_epoch, teacher_acc = 0, None

    if comm is not None:
        comm.barrier()     # rank 0 made the run directory; a checkpoint there is read by every rank
    if ckpt_path.exists():
        state = _load_checkpoint(ckpt_path)
        diff = _config_diff(state["config"], config)
        if diff:
            raise RunMismatchError(f"{rd.path} holds a distill run made with other arguments: {'; '.join(diff[:3])}; "
                                   "pass another --run or delete its checkpoint.pt")
        history, start_epoch, teacher_acc = _resume(ckpt_path, state, dist, optimizer, scheduler)
        if progress and start_epoch < proto.epochs:
            print(f"resuming {rd.path} after epoch {start_epoch}/{proto.epochs}", file=sys.stderr)
    resumed = state if ckpt_path.exists() else {}
    init_done = n_init if start_epoch > 0 else int(resumed.get("init_epoch", 0))
    if comm is not None:
        broadcast_state([dist.student, dist.criterion])   # built alike from the seed; rank 0's to be sure

    pin = dev.type == "cuda"
    if pin:
        torch.backends.cudnn.benchmark = True   # as the CRD code; CUDA runs are not bit-reproducible
    gen = torch.Generator()
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=bs, shuffle=sampler is None, sampler=sampler, num_workers=num_workers,
        collate_fn=_collate, pin_memory=pin, generator=gen if sampler is None else None, drop_last=False)
    test_part = test_ds
    if comm is not None:   # the test images are shared out; the counts are summed
        test_part = torch.utils.data.Subset(test_ds, range(*comm.shard(len(test_ds))))
    test_loader = torch.utils.data.DataLoader(
        test_part, batch_size=max(bs, 256), shuffle=False, num_workers=num_workers, collate_fn=_collate,
        pin_memory=pin)
    if teacher_model is not None and teacher_acc is None:
        teacher_acc, _ = evaluate(teacher_model, test_loader, dev, comm)

    def results(status: str) -> dict[str, Any]:
        acc = history["test_acc"]
        best = int(np.argmax(acc)) if acc else None
        return {
            "status": status, "run": str(rd.path), "config": config,
            "data": {"reader": train_ds.reader, "verified": train_ds.verified,
                     "n_train": len(train_ds), "n_test": len(test_ds)},
            "device": str(dev), "epochs_done": len(acc), "history": history,
            "test_acc": list(acc), "epoch_time": list(history["epoch_time"]),
            "final_acc": acc[-1] if acc else None,
            "best_acc": acc[best] if best is not None else None,
            "best_epoch": history["epoch"][best] if best is not None else None,
            "mean_epoch_time": float(np.mean(history["epoch_time"])) if acc else None,
            "teacher_acc": teacher_acc,
            "results_path": str(results_path), "checkpoint_path": str(ckpt_path),
            "weights_path": str(weights_path) if status == "complete" else None,
        }

    def checkpoint(epoch: int, init_optimizer: Any = None) -> None:
        if not main:      # every rank holds the same state: rank 0 writes it
            return
        _save_checkpoint(ckpt_path, {
            "config": config, "epoch": epoch, "model": dist.student.state_dict(),
            "criterion": dist.criterion.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "history": history, "teacher_acc": teacher_acc, "rng": _rng_state(),
            "init_epoch": n_init if init_optimizer is None else init_done,
            "init_optimizer": init_optimizer.state_dict() if init_optimizer is not None else None})
        _write_json(results_path, results("running"))

    if main:
        rd.update_meta("distill", {k: v for k, v in config.items()})
    sync = GradientSync(comm, params, dist.student.parameters()) if comm is not None else None
    with dist.hooked():
        if init_done < n_init:      # AB, FT, FSP: RepDistiller's initialisation stage (helper/pretrain.py)
            init_opt = torch.optim.SGD(dist.init_parameters(), lr=init_lr, momentum=proto.momentum,
                                       weight_decay=proto.weight_decay, nesterov=proto.nesterov)
            if resumed.get("init_optimizer"):
                init_opt.load_state_dict(resumed["init_optimizer"])
            for k in range(init_done, n_init):
                es = _epoch_seed(seed, -(k + 1))
                _seed_all(es)
                gen.manual_seed(es)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(-(k + 1))
                mean, secs = _init_epoch(dist, train_loader, init_opt, dev, bar, progress, f"init {k + 1}/{n_init}",
                                         comm)
                if not math.isfinite(mean):
                    _quiet_if_not_main(comm)
                    raise NeurosemError(f"the {method} initialisation loss became {mean} in init epoch {k + 1}: "
                                        "lower --lr or --init-epochs")
                history["init_loss"].append(mean)
                history["init_time"].append(secs)
                init_done = k + 1
                checkpoint(0, init_opt)
                if progress:
                    print(f"init {k + 1}/{n_init}: loss {mean:.4f} ({secs:.1f} s)", file=sys.stderr)
        for epoch in range(start_epoch, proto.epochs):
            es = _epoch_seed(seed, epoch)
            _seed_all(es)
            gen.manual_seed(es)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            dist.train()
            dist.criterion.set_epoch(epoch)
            names = ["loss"] + dist.part_names()
            acc_dtype = torch.float32 if dev.type == "mps" else torch.float64  # MPS has no float64
            acc_sums = torch.zeros(len(names) + 1, dtype=acc_dtype, device=dev)  # sums, then correct
            seen = 0
            lr_now = optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            # an explicit iterator: tqdm.auto would otherwise call iter() twice, drawing the shuffle
            # seed from `gen` twice (progress bars would change the results) and starting workers twice
            batches = iter(train_loader)
            for x, y, index in bar(batches, total=len(train_loader), desc=f"epoch {epoch + 1}/{proto.epochs}",
                                   enabled=progress, unit="batch"):
                # under torchrun: this rank's slice of the global batch (every rank read all of it)
                spread, x, y, index = Spread.split(comm, x, y, index)
                x = x.to(dev, non_blocking=True)
                y = y.to(dev, non_blocking=True)
                index = index.to(dev, non_blocking=True)
                loss, logits, parts = dist.step(x, y, index, spread)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if sync is not None:
                    sync()
                optimizer.step()
                n = int(y.shape[0])
                with torch.no_grad():   # accumulate on the device: no host sync per step
                    first = loss.detach() if spread is None else dist.unweighted(parts)
                    values = [first] + [parts[k] for k in names[1:]]
                    values.append((logits.detach().argmax(1) == y).sum() / n)
                    acc_sums += torch.stack([v.to(acc_dtype) for v in values]) * n
                seen += n
            if comm is not None:   # the ranks' sums: the global batch's
                acc_sums = torch.from_numpy(comm.sum(acc_sums.cpu().numpy()))
                seen = int(comm.sum(np.array([seen]))[0])
            totals = acc_sums.tolist()    # one sync per epoch
            sums = dict(zip(names, totals[:-1]))
            correct = int(round(totals[-1]))
            train_time = time.perf_counter() - t0
            scheduler.step()
            t1 = time.perf_counter()
            test_acc, test_loss = evaluate(dist.student, test_loader, dev, comm)
            eval_time = time.perf_counter() - t1
            if not math.isfinite(sums["loss"]):
                _quiet_if_not_main(comm)
                raise NeurosemError(f"the training loss became {sums['loss']} in epoch {epoch + 1}: lower --lr "
                                    f"or --beta (the checkpoint of epoch {epoch} is kept)")
            history["epoch"].append(epoch + 1)
            history["lr"].append(lr_now)
            history["train_loss"].append(sums["loss"] / seen)
            for k in dist.part_names():
                history[f"train_{k}"].append(sums[k] / seen)
            history["train_acc"].append(100.0 * correct / seen)
            history["test_acc"].append(test_acc)
            history["test_loss"].append(test_loss)
            history["epoch_time"].append(train_time)
            history["eval_time"].append(eval_time)
            checkpoint(epoch + 1)
            if progress:
                print(f"epoch {epoch + 1}/{proto.epochs}: loss {sums['loss'] / seen:.4f}, train "
                      f"{100.0 * correct / seen:.2f}%, test {test_acc:.2f}% ({train_time:.1f} s)", file=sys.stderr)

    out = results("complete")
    if main:
        torch.save(dist.student.state_dict(), weights_path)
        _write_json(results_path, out)
    if comm is not None:
        out["world_size"] = comm.size
        comm.barrier()     # the other ranks return when the files are there
    return out


def _quiet_if_not_main(comm: Any) -> None:
    """On ranks > 0 a failure every rank meets alike is reported by rank 0 (the CLI prints nothing)."""
    from neurosem.distributed import ReportedOnRankZero

    if comm is not None and not comm.main:
        raise ReportedOnRankZero("reported on rank 0")


def train_teacher(model: str, data: str, protocol: str = "crd", epochs: int | None = None, seed: int = 0,
                  device: str = "auto", run: str | Path | None = None, batch_size: int | None = None,
                  lr: float | None = None, num_workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Train zoo ``model`` alone with cross-entropy (``distill(method="ce")``; CRD's protocol by
    default, as RepDistiller's ``train_teacher.py``). The weights land in ``<run>/weights.pth``.

    Example:
        >>> train_teacher("resnet32x4", "cifar100:data/cifar")["weights_path"]  # doctest: +SKIP
        'runs/resnet32x4-ce-s0/weights.pth'
    """
    return distill(teacher=None, student=model, method="ce", data=data, protocol=protocol, epochs=epochs,
                   seed=seed, device=device, run=run, batch_size=batch_size, lr=lr,
                   num_workers=num_workers, progress=progress)
