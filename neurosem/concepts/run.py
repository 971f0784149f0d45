"""``train_concepts()``: a run's activations + its dissection + a Broden set -> concepts.h5 and CSVs.

The dissection gives the thresholds that binarise the unit maps (and the best single unit's
masks); when the run has none for the layers asked for, :func:`neurosem.dissect.dissect` makes it
first (recording the activations when a model is given). Every concept that occurs in both the
train and the val split (or the seeded hold-out) gets a vector.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import numpy as np

from neurosem.concepts.data import candidate_concepts, image_splits, label_statistics, split_masks
from neurosem.concepts.train import TrainConfig
from neurosem.errors import DataError, NeurosemError


def _as_list(values: Any) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = values.split(",")
    out = [v.strip() for v in values if v and v.strip()]
    return out or None


def _existing_dissection(rd: Any, ds: Any, model: Any, layers: list[str] | None) -> Any:
    """The run's dissection; None when it is missing, of another Broden set, or lacks a layer (and
    then the activations are there or ``model`` can record them)."""
    from neurosem.dissect import load_dissection

    if rd.dissection.exists():
        dis = load_dissection(rd.dissection)
        same = dis.broden_fingerprint == ds.fingerprint() or dis.args.get("broden_fingerprint") == ds.fingerprint()
        if same and all(name in dis.layers for name in (layers or dis.layers)):
            return dis
    if model is None and not rd.activations.exists():
        raise NeurosemError(f"no activations in {rd.path}: pass the model to record them on the Broden images "
                            f"(`neurosem concepts MODEL --broden {ds.root} --run {rd.path}`)")
    return None


def train_concepts(run: Any = None, broden: Any = None, model: Any = None, layers: Any = None,
                   concepts: Any = None, categories: Any = None, epochs: int = 20, lr: float = 0.05,
                   input: str = "binary", batch_size: int = 64, seed: int = 0, device: str = "auto",
                   progress: bool = True, label_cache: Any = None, figures: bool = True,
                   weights: str = "default") -> Any:
    """Train a concept vector per Broden concept for each layer; write ``concepts.h5``, the CSVs and
    the global views (:mod:`neurosem.concepts.views`).

    Args:
        run: the run directory (default ``runs/<model>``, or the only run).
        broden: the Broden directory.
        model: a model spec or :class:`~neurosem.models.LoadedModel`; needed only when the run has
            no activations yet (they are recorded), and for the class-concept view.
        layers: layers (default: every layer of the dissection).
        concepts: concept names (default: all that occur in both splits).
        categories: Broden categories (default: all).
        epochs, lr, batch_size, seed: the training (Adam).
        input: ``binary`` (the unit maps thresholded at the dissection thresholds) or ``raw``.
        device: ``auto``, ``cpu``, ``cuda``...
        label_cache: the label cache root (default: the dissection's), or ``"none"``.
        figures: draw the global views' figures (PDF, PNG).
        weights: the weights of a ``model`` given by its spec (see :func:`neurosem.models.load_model`).

    Returns:
        The :class:`~neurosem.concepts.io.ConceptVectors` written, with ``outputs`` and ``timings``
        (None on ranks > 0 under ``torchrun``: a missing dissection is made across the ranks, then
        rank 0 alone trains and writes while the others wait, so the files are one process's).

    Example:
        >>> cv = train_concepts("runs/resnet18", broden="data/broden1_224", layers="layer4")  # doctest: +SKIP
    """
    from neurosem.data.broden import BrodenDataset
    from neurosem.dissect import dissect
    from neurosem.distributed import current, on_rank_zero, together
    from neurosem.run import resolve_run

    comm = current()  # under torchrun: a missing dissection across the ranks, then rank 0 alone trains and writes
    with together(comm):
        cfg = TrainConfig(epochs=int(epochs), lr=float(lr), batch_size=int(batch_size), input=str(input),
                          seed=int(seed))
        cfg.check()
        if broden is None or str(broden) == "":
            raise NeurosemError("concept vectors need the Broden directory: pass --broden PATH (e.g. data/broden1_224)")
        layers, names, cats = _as_list(layers), _as_list(concepts), _as_list(categories)
        ds = BrodenDataset(broden, categories=cats, with_labels=True)
        chosen = candidate_concepts(ds, names)
        if isinstance(model, str):
            from neurosem.models import load_model

            model = load_model(model, weights)
        rd = resolve_run(run, getattr(model, "spec", model))
    t0 = time.perf_counter()
    if comm is not None:
        comm.check_shared_dir(rd.path)
        comm.check_same("concepts", {"run": str(rd.path), "broden": str(broden), "layers": layers, "concepts": names,
                                     "model": str(getattr(model, "spec", model)), "categories": cats,
                                     **dataclasses.asdict(cfg), "label_cache": str(label_cache),
                                     "figures": figures, "weights": weights, "device": str(device)})
        progress = progress and comm.main
    with together(comm):
        dis = _existing_dissection(rd, ds, model, layers)
    if dis is None:
        if progress:
            print(f"concepts need the dissection thresholds of {rd.path}: dissecting first", file=sys.stderr)
        dis = dissect(run=rd, broden=ds.root, model=model, layers=layers, device=device, batch_size=cfg.batch_size,
                      progress=progress, report=False, label_cache=label_cache)
    return on_rank_zero(lambda: _train(rd, ds, dis, chosen, names, layers, cfg, model, device, progress, label_cache,
                                       figures, t0), comm)


def _train(rd: Any, ds: Any, dis: Any, chosen: Any, names: list[str] | None, layers: list[str] | None,
           cfg: TrainConfig, model: Any, device: str, progress: bool, label_cache: Any, figures: bool,
           t0: float) -> Any:
    """The training and the files of :func:`train_concepts`, given the dissection (rank 0 alone under torchrun)."""
    from neurosem._device import resolve_device
    from neurosem.concepts.io import load_concepts, write_concepts, write_layer_csv
    from neurosem.concepts.train import train_layers
    from neurosem.dissect.passes import LabelSource
    from neurosem.store import ActivationStore

    timings: dict[str, float] = {}
    layers = layers or list(dis.layers)
    for name in layers:
        dis.threshold(name)      # a layer the dissection lacks: one line naming its layers
    with rd.lock("concepts"), ActivationStore.open(rd.activations) as store:
        if not store.complete:
            raise NeurosemError(f"{rd.activations} is incomplete ({store.n_done} images): resume it with "
                                f"`neurosem record MODEL --data {ds.root} --run {rd.path}`")
        for name in layers:
            store.shape(name)
        n = store.n_done
        if list(store.image_ids) != ds.image_ids[:n]:
            raise DataError(f"{rd.activations} does not hold the images of {ds.root} in index.csv order; record "
                            f"them with `neurosem record MODEL --data {ds.root} --run {rd.path} --force`")
        if dis.args.get("store_id") not in (None, store.store_id):
            raise NeurosemError(f"{rd.dissection} was made from other activations than {rd.activations}; "
                                f"rerun `neurosem dissect --broden {ds.root} --run {rd.path}`")
        train, val, how = split_masks(image_splits(ds), n, seed=cfg.seed)
        if label_cache is not None and str(label_cache) == "none":
            labels = LabelSource(ds, None)
        else:
            from neurosem.data.label_cache import open_label_cache

            labels = LabelSource(ds, open_label_cache(ds, label_cache, progress=progress))
        t1 = time.perf_counter()
        st = label_statistics(labels, chosen, {"train": train, "val": val}, ds.n_labels, cfg.batch_size)
        keep = (st["train"] > 0) & (st["val"] > 0)
        if not keep.any():
            raise NeurosemError(f"no concept{' of ' + ', '.join(names) if names else ''} occurs in both the train and "
                                f"the val images of {ds.root} ({how}); choose other concepts or more images")
        dropped = [chosen.names[i] for i in np.flatnonzero(~keep)]
        if names and dropped:
            print(f"note: {', '.join(dropped)} occur in only one split and get no vector", file=sys.stderr)
        chosen_k = chosen.subset(keep)
        s = ds.seg_size[0] * ds.seg_size[1]
        n_train = int(train.sum())
        per_image = np.where(chosen_k.pixel, s, 1)
        alpha = 1.0 - st["train"][keep] / (n_train * per_image)
        timings["labels"] = time.perf_counter() - t1
        thresholds = {name: (dis.threshold(name), dis.threshold(name, exact=True)) for name in layers}
        t1 = time.perf_counter()
        results = train_layers(store, layers, labels, chosen_k, alpha, thresholds, train, val, cfg,
                               resolve_device(device), progress)
        timings["train"] = time.perf_counter() - t1
        timings["epochs"] = results[layers[0]].epoch_seconds
        args = {"layers": layers, "broden": str(ds.root), "broden_fingerprint": ds.fingerprint(),
                "categories": list(ds.categories), "store_id": store.store_id, "n_images": n,
                "split": how, "n_train": n_train, "n_val": int(val.sum()), "epochs": cfg.epochs, "lr": cfg.lr,
                "batch_size": cfg.batch_size, "input": cfg.input, "seed": cfg.seed,
                "label_size": list(ds.seg_size), "image_size": list(ds.image_size),
                "provenance": {k: store.provenance.get(k) for k in ("model", "weights", "weights_arg", "transform")}}
        out_path = write_concepts(rd.path / "concepts.h5", args, chosen_k, results)
    cv = load_concepts(out_path)
    outputs: dict[str, Any] = {"h5": str(out_path),
                               "csv": [str(write_layer_csv(rd.path / "concepts" / f"{name}.csv", cv, name))
                                       for name in cv.layers]}
    from neurosem.concepts.views import write_views

    outputs.update(write_views(rd, cv, model=model, figures=figures))
    timings["total"] = time.perf_counter() - t0
    rd.update_meta("concepts", args)
    cv.outputs, cv.timings = outputs, timings
    return cv


def summary_lines(cv: Any) -> list[str]:
    """What ``neurosem concepts`` prints: per layer and category, the mean vector vs best-unit score
    and how many concepts need more than one unit."""
    lines = [f"concept vectors: {cv.path} ({len(cv.concepts)} concepts, input {cv.args['input']}, "
             f"{cv.args['epochs']} epochs; val: {cv.args['n_val']} images, {cv.args['split']})"]
    cats = list(dict.fromkeys(cv.concepts.categories))
    for name in cv.layers:
        r = cv.layer(name)
        lines.append(f"  {name}: category    n  vector  best unit  vector>unit  median units_90   "
                     "(means on val: IoU; scene/texture: AP)")
        for c in cats:
            sel = np.array([x == c for x in cv.concepts.categories])
            lines.append(f"    {c:<10} {int(sel.sum()):>3}  {r.score[sel].mean():.3f}   {r.unit_score[sel].mean():.3f}"
                         f"      {int((r.score[sel] > r.unit_score[sel]).sum()):>3}/{int(sel.sum()):<3}"
                         f"     {np.median(r.units_90[sel]):>5.1f} of {r.W.shape[1]}")
    for key, p in getattr(cv, "outputs", {}).items():
        lines.append(f"  {key}: {', '.join(map(str, p)) if isinstance(p, (list, tuple)) else p}")
    return lines
