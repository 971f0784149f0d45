"""Helpers for the analysis tests: write run directories in the layouts of docs/internals.md.

The embedding and dissection files are written here with h5py directly, in the layout that
``neurosem.embed.load_embedding`` and ``neurosem.dissect.report.load_dissection`` read (so these
tests need neither stage to run); activations go through ``neurosem.store.ActivationStore``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def write_embedding(run: Path, vectors: Mapping[str, np.ndarray], snapshots: Mapping[str, np.ndarray] | None = None,
                    steps: Sequence[int] | None = None, config: Mapping[str, Any] | None = None) -> Path:
    """``run/embedding.h5``: per layer ``S [C, K]`` and ``snapshots [T, C, K]``, root ``snapshot_steps``."""
    import h5py

    run.mkdir(parents=True, exist_ok=True)
    snapshots = dict(snapshots or {name: np.asarray(S)[None] for name, S in vectors.items()})
    n_snap = len(next(iter(snapshots.values())))
    steps = list(range(n_snap)) if steps is None else list(steps)
    cfg = {"dim": int(next(iter(vectors.values())).shape[1]), "trainer": "fit", "temperature": 1.0, "seed": 0,
           "layers": list(vectors)}
    cfg.update(config or {})
    path = run / "embedding.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "neurosem-embedding"
        f.attrs["version"] = 1
        f.attrs["config"] = json.dumps(cfg)
        f.attrs["model"] = "planted"
        f.attrs["layers"] = json.dumps(list(vectors))
        f.attrs["trainer"] = cfg["trainer"]
        f.attrs["final_loss"] = 0.0
        for name, S in vectors.items():
            g = f.create_group(f"layers/{name}")
            g["S"] = np.asarray(S, dtype=np.float32)
            g["snapshots"] = np.asarray(snapshots[name], dtype=np.float32)
            g["history_loss"] = np.zeros(len(steps))
        f["snapshot_steps"] = np.asarray(steps, dtype=np.int64)
        f["history/step"] = np.asarray(steps, dtype=np.int64)
        f["history/loss"] = np.zeros(len(steps))
    return path


def write_dissection(run: Path, iou: Mapping[str, np.ndarray], label_names: Sequence[str],
                     label_categories: Sequence[str], thresholds: Mapping[str, np.ndarray] | None = None,
                     iou_threshold: float = 0.04, label_size: Sequence[int] | None = None) -> Path:
    """``run/dissect.h5`` with best label = argmax of each IoU row (first on ties); ``label_size``
    ``(sh, sw)`` goes into ``args`` as the dissection records it."""
    import h5py

    run.mkdir(parents=True, exist_ok=True)
    str_dt = h5py.string_dtype("utf-8")
    categories = list(dict.fromkeys(label_categories))
    path = run / "dissect.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "neurosem-dissection"
        f.attrs["version"] = 1
        args = {"quantile": 0.005, "iou_threshold": iou_threshold, "layers": list(iou)}
        if label_size is not None:
            args["label_size"] = [int(s) for s in label_size]
        f.attrs["args"] = json.dumps(args)
        f.attrs["broden_fingerprint"] = "test"
        f["labels/number"] = np.arange(1, len(label_names) + 1)
        f.create_dataset("labels/name", data=list(label_names), dtype=str_dt)
        f.create_dataset("labels/category", data=list(label_categories), dtype=str_dt)
        f.create_dataset("categories", data=categories, dtype=str_dt)
        for name, m in iou.items():
            m = np.asarray(m, dtype=np.float32)
            g = f.create_group(f"layers/{name}")
            thr = thresholds[name] if thresholds and name in thresholds else np.full(m.shape[0], 0.5)
            g["threshold"] = np.asarray(thr, dtype=np.float32)
            g["iou"] = m
            best = np.argmax(m, axis=1)
            g["best_label"] = best.astype(np.int64)
            g["best_iou"] = m[np.arange(len(m)), best]
            g.create_dataset("best_category", data=[label_categories[b] for b in best], dtype=str_dt)
    return path


def write_activations(run: Path, acts: Mapping[str, np.ndarray], ids: Sequence[str],
                      provenance: Mapping[str, Any] | None = None, dtype: str = "float32") -> Path:
    """``run/activations.h5`` through the store (``acts[layer]: [N, C, H, W]``)."""
    from neurosem.store import ActivationStore

    run.mkdir(parents=True, exist_ok=True)
    path = run / "activations.h5"
    shapes = {name: tuple(a.shape[1:]) for name, a in acts.items()}
    n = len(ids)
    store = ActivationStore.create(path, shapes, n, provenance=dict(provenance or {}), dtype=dtype)
    try:
        store.append({name: np.asarray(a) for name, a in acts.items()}, list(ids))
        store.mark_complete()
    finally:
        store.close()
    return path


def write_meta(run: Path, **sections: Any) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps(sections))


def png_variance(path: Path) -> float:
    """Pixel variance of a PNG in grey levels (0..255): ~0 for a blank image."""
    from PIL import Image

    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float64).var())


def build_pipeline_run(root: Path, broden: Path, seed: int = 0) -> Path:
    """A run made by the real stages: record a random-weight 4-stage CNN (layer3: 32 units,
    layer4: 64 units) on a synthetic Broden set, dissect it, embed it (``fit`` trainer)."""
    import torch

    from neurosem.dissect import dissect
    from neurosem.embed import embed
    from neurosem.models import LoadedModel
    from neurosem.quickstart import tiny_cnn
    from neurosem.record import record

    torch.manual_seed(seed)
    model = tiny_cnn(num_classes=4, width=16).eval()
    lm = LoadedModel(model=model, spec="tiny_cnn", weights=f"random seed {seed}", mean=(0.5, 0.5, 0.5),
                     std=(0.25, 0.25, 0.25), input_size=(3, 64, 64), default_layers=["layer3", "layer4"])
    run = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny tensors: threads only add overhead on a shared machine
    try:
        record(lm, str(broden), run=str(run), layers=["layer3", "layer4"], device="cpu", progress=False)
        dissect(run=str(run), broden=str(broden), device="cpu", progress=False)
        embed(run=str(run), dim=16, seed=seed, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return run
