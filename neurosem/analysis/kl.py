"""The KL metric of paper Fig. 4: how well the semantic vectors encode the dissection's semantics.

Targets: the dissection's IoU rows ``T: [C, L]`` of a layer (one IoU per Broden concept). With
``cos`` the cosine of two rows,

    P_T(j|i) = softmax_j cos(t_i, t_j) / τ        Q_S(j|i) = softmax_j cos(s_i, s_j) / τ
    KL_layer = (1/C) Σ_i KL(P_T(·|i) ‖ Q_S(·|i)) = (1/C) Σ_i Σ_j P_T(j|i) (log P_T(j|i) − log Q_S(j|i))

and the run's KL is the plain mean of the layers' KL. Conventions, the same as the embedding's
``similarity_probs`` (DESIGN.md "Neuron embedding"):

- the softmax runs over every j, the diagonal j = i included;
- rows are normalised as ``x / max(‖x‖, eps)`` (eps = 1e-12, as ``neurosem.embed``), so an all-zero row (a unit with IoU 0
  for every concept) has cosine 0 with every row, itself included: its P_T(·|i) is uniform;
- τ is the embedding's ``temperature`` (config of embedding.h5; 1 = the paper's formula).

Curves (:func:`kl_curves`): the KL of every saved snapshot of the embedding (the first snapshot is
the initialisation), (a) a random-initialisation baseline — the KL of random S with the embedding's
shape and initialisation (i.i.d. standard normal; cosines do not depend on the scale), averaged over
``n_random`` seeds — and (b) an upper bound — S with the same shape optimised directly on this KL
(full batch, float64 L-BFGS-B from a seeded random start and from the trained S; the lower KL is kept;
rows whose targets are all zero are held at the zero vector, which matches them exactly).

Example:
    >>> import numpy as np
    >>> T = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> round(kl_divergence(T, T), 12)
    0.0
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from neurosem.analysis._kl_math import (  # noqa: F401  (the math, re-exported)
    COS_EPS, _evaluator, _torch_kl_and_grad, cosine_matrix, default_workers, evaluation_device, kl_and_grad,
    kl_divergence, kl_per_snapshot, one_blas_thread, optimise_kl, random_baseline, random_init,
    similarity_log_probs, upper_bound, upper_bounds)
from neurosem.errors import NeurosemError, RunMismatchError


# --------------------------------------------------------------------------------------- the run
def _file_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def kl_curves(run: Any = None, n_random: int = 10, seed: int = 0, max_iter: int = 3000,
              warm_start: bool = True, write: bool = True, device: str = "auto",
              progress: bool = True, workers: int | None = None, cache: bool = True) -> dict[str, Any]:
    """The Fig. 4 numbers of a run; writes ``RUN/kl.json`` and ``RUN/kl.csv``.

    The upper bound (the optimisations, most of the time) is kept in
    ``RUN/.cache/kl-upper-bounds.json`` under a content hash of everything it depends on
    (:func:`upper_bound_key`): a second call with the same dissection, vectors and settings reads
    it back, any change computes it afresh (``cache=False``: always).

    Args:
        run: a run directory (``str``/``Path``/``RunDir``); ``None`` = the only run under ``runs/``.
        n_random: seeds averaged in the random baseline.
        seed: first seed of the baseline and seed of the upper bound's random start.
        max_iter: L-BFGS iterations of the upper-bound optimiser (per start).
        warm_start: also start the upper-bound optimiser from the trained S (keeps the lower KL).
        write: write kl.json and kl.csv.
        device: where the upper-bound optimiser evaluates the KL: ``auto`` (a CUDA GPU when there is
            one, else numpy on the CPU), ``cpu``, ``cuda``... The numbers do not depend on it
            beyond float64 rounding.
        progress: a progress bar over the upper bound's optimisations (stderr).
        workers: threads running those optimisations side by side (default: the CPU cores); the
            numbers do not depend on it.

    Returns:
        ``{"steps": [T], "step_unit", "temperature", "layers": {layer: {"embedding": [T], "final",
        "random": {"mean", "std", "values"}, "upper_bound": {...}, "n_units", "n_labels",
        "n_zero_targets"}}, "mean": {"embedding": [T], "final", "random": {"mean", "std"},
        "upper_bound"}, "final": {"embedding", "random", "random_std", "upper_bound"} (the means over
        layers of the trained S, the baseline and the bound), "skipped_layers", "inputs",
        "settings"}``; every KL is in nats.

    Example:
        >>> curves = kl_curves("runs/resnet18")            # doctest: +SKIP
        >>> curves["mean"]["embedding"][-1] < curves["mean"]["random"]["mean"]   # doctest: +SKIP
        True
    """
    from neurosem.analysis.query import load_run_dissection, load_run_embedding, run_dir

    rd = run_dir(run)
    emb = load_run_embedding(rd)
    dis = load_run_dissection(rd, required_for="kl")
    temperature = float(emb.config.get("temperature", 1.0) or 1.0)
    steps = [int(s) if float(s).is_integer() else float(s) for s in np.asarray(emb.snapshot_steps).tolist()]
    layers = [name for name in emb.layers if name in dis.layers]
    skipped = [name for name in emb.layers if name not in dis.layers]
    if not layers:
        raise NeurosemError(
            f"the dissection of {rd.path} has none of the embedded layers ({', '.join(emb.layers)}): "
            f"run `neurosem dissect --broden PATH --run {rd.path} --layers {','.join(emb.layers)}`")

    evaluate_on = evaluation_device(device)             # resolved once for every layer and start
    out_layers: dict[str, Any] = {}
    seeds_by_layer = []
    targets_by_layer, dims, warm_starts = {}, {}, {}
    for name in layers:
        targets = np.asarray(dis.iou(name), dtype=np.float64)
        snaps = np.asarray(emb.snapshots(name), dtype=np.float64)
        final = np.asarray(emb.vectors(name), dtype=np.float64)
        if targets.shape[0] != final.shape[0]:
            raise RunMismatchError(
                f"layer {name}: the dissection has {targets.shape[0]} units, the embedding {final.shape[0]}; "
                f"they come from different models: rerun `neurosem dissect` or `neurosem embed` on {rd.path}")
        if snaps.ndim != 3 or snaps.shape[1:] != final.shape or len(snaps) != len(steps):
            raise NeurosemError(
                f"embedding.h5 of {rd.path} is inconsistent for {name} (snapshots {snaps.shape}, S {final.shape}, "
                f"{len(steps)} steps): rerun `neurosem embed`")
        c, k = final.shape
        curve = kl_per_snapshot(targets, snaps, temperature)
        rand = random_baseline(targets, k, temperature, n_seeds=n_random, seed=seed)
        seeds_by_layer.append(rand)
        targets_by_layer[name], dims[name], warm_starts[name] = targets, k, final if warm_start else None
        out_layers[name] = {
            "embedding": curve.tolist(),
            "final": kl_divergence(targets, final, temperature),
            "random": {"mean": float(rand.mean()), "std": float(rand.std(ddof=1)) if len(rand) > 1 else 0.0,
                       "values": rand.tolist()},
            "upper_bound": None,                        # filled in below, all layers side by side
            "n_units": int(c), "dim": int(k), "n_labels": int(targets.shape[1]),
            "n_zero_targets": int(np.sum(~np.any(targets != 0, axis=1))),
        }
    keys = {name: upper_bound_key(targets_by_layer[name], dims[name], warm_starts[name], temperature, seed,
                                  max_iter, evaluate_on) for name in layers}
    cache_path = rd.path / ".cache" / "kl-upper-bounds.json"
    bounds = _read_bound_cache(cache_path, keys) if cache else {}
    todo = [name for name in layers if name not in bounds]
    if todo:
        bounds.update(upper_bounds({n: targets_by_layer[n] for n in todo}, {n: dims[n] for n in todo}, temperature,
                                   seed=seed, warm_starts={n: warm_starts[n] for n in todo}, max_iter=max_iter,
                                   device=evaluate_on, workers=workers, progress=progress))
        if cache and write:
            _write_bound_cache(cache_path, {n: (keys[n], bounds[n]) for n in layers})
    for name in layers:
        out_layers[name]["upper_bound"] = bounds[name]

    per_seed_mean = np.mean(np.stack(seeds_by_layer), axis=0)
    mean = {
        "embedding": np.mean([out_layers[n]["embedding"] for n in layers], axis=0).tolist(),
        "final": float(np.mean([out_layers[n]["final"] for n in layers])),
        "random": {"mean": float(per_seed_mean.mean()),
                   "std": float(per_seed_mean.std(ddof=1)) if len(per_seed_mean) > 1 else 0.0},
        "upper_bound": float(np.mean([out_layers[n]["upper_bound"]["kl"] for n in layers])),
    }
    trainer = emb.config.get("trainer", "fit")
    final = {"embedding": mean["final"], "random": mean["random"]["mean"], "random_std": mean["random"]["std"],
             "upper_bound": mean["upper_bound"]}
    result: dict[str, Any] = {
        "metric": "mean_i KL(P_T(.|i) || Q_S(.|i)), nats; P_T from dissection IoU rows, Q_S from semantic "
                  "vectors; softmax of cosine/temperature over all j (diagonal included)",
        "temperature": temperature,
        "steps": steps,
        "step_unit": "epoch" if trainer == "paper" else "step",
        "trainer": trainer,
        "layers": out_layers,
        "mean": mean,
        "final": final,
        "skipped_layers": skipped,
        "settings": {"n_random": n_random, "seed": seed, "max_iter": max_iter, "warm_start": warm_start,
                     "stop": "relative KL change <= 1e-6 over 10 iterations",
                     "random_init": "standard normal", "optimiser": "L-BFGS-B (scipy, float64, analytic gradient)"},
        "inputs": {"embedding": _file_stamp(rd.embedding), "dissection": _file_stamp(rd.dissection)},
    }
    if write:
        write_kl_files(rd.path, result)
    return result


def write_kl_files(folder: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``kl.json`` and ``kl.csv`` (one row per layer and step; layer ``mean`` = the average)."""
    folder = Path(folder)
    json_path, csv_path = folder / "kl.json", folder / "kl.csv"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(json_path)
    rows: list[list[Any]] = []
    for name, lay in list(result["layers"].items()) + [("mean", result["mean"])]:
        ub = lay["upper_bound"]["kl"] if isinstance(lay["upper_bound"], dict) else lay["upper_bound"]
        for step, value in zip(result["steps"], lay["embedding"]):
            rows.append([name, step, repr(float(value)), repr(lay["random"]["mean"]),
                         repr(lay["random"]["std"]), repr(float(ub))])
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", "step", "embedding", "random_mean", "random_std", "upper_bound"])
        writer.writerows(rows)
    tmp.replace(csv_path)
    return json_path, csv_path


#: Bumped when the upper bound's optimisation changes, so that cached bounds of the old one are not reused.
UPPER_BOUND_VERSION = 1


def upper_bound_key(targets: np.ndarray, dim: int, warm: "np.ndarray | None", temperature: float, seed: int,
                    max_iter: int, device: Any) -> str:
    """The content hash a layer's upper bound is cached under: sha256 of the version, the settings,
    the evaluation device's kind, the targets ``[C, L]`` and the warm start ``[C, K]`` as float64."""
    import hashlib

    kind = getattr(device, "type", str(device))
    h = hashlib.sha256(f"neurosem-kl-upper-v{UPPER_BOUND_VERSION}:{dim}:{float(temperature)!r}:{int(seed)}:"
                       f"{int(max_iter)}:{kind}:{np.shape(targets)}:{None if warm is None else np.shape(warm)}".encode())
    h.update(np.ascontiguousarray(targets, dtype=np.float64).tobytes())
    if warm is not None:
        h.update(np.ascontiguousarray(warm, dtype=np.float64).tobytes())
    return h.hexdigest()


def _read_bound_cache(path: Path, keys: dict[str, str]) -> dict[str, Any]:
    """The cached bounds whose key matches (an unreadable or foreign file: none)."""
    try:
        data = json.loads(path.read_text())
        return {name: dict(data[name]["bound"]) for name, key in keys.items()
                if isinstance(data.get(name), dict) and data[name].get("key") == key}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _write_bound_cache(path: Path, entries: dict[str, tuple[str, dict[str, Any]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({name: {"key": key, "bound": bound} for name, (key, bound) in entries.items()},
                              indent=1))
    tmp.replace(path)


def read_kl_json(run: Any) -> dict[str, Any] | None:
    """``RUN/kl.json`` when it exists and was computed from the run's current embedding and dissection."""
    from neurosem.analysis.query import run_dir

    rd = run_dir(run)
    path = rd.path / "kl.json"
    if not path.exists() or not rd.embedding.exists() or not rd.dissection.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    inputs = data.get("inputs", {})
    if inputs.get("embedding") != _file_stamp(rd.embedding) or inputs.get("dissection") != _file_stamp(rd.dissection):
        return None
    return data


def curves_for_plot(result: dict[str, Any], layers: Sequence[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``[(panel name, curves)]`` to draw: each layer, then ``mean`` when there are several layers."""
    names = list(result["layers"])
    if layers:
        unknown = [n for n in layers if n not in names and n != "mean"]
        if unknown:
            raise NeurosemError(f"no KL curve for layer {unknown[0]!r}: choose one of {', '.join(names)}, or mean")
        return [(n, result["mean"] if n == "mean" else result["layers"][n]) for n in layers]
    panels = [(n, result["layers"][n]) for n in names]
    if len(names) > 1:
        panels.append(("mean", result["mean"]))
    return panels


def format_kl_table(result: dict[str, Any]) -> str:
    """A terminal table: per layer the KL at the first and last snapshot, random and upper bound."""
    head = f"{'layer':<20} {'init':>8} {'final':>8} {'random':>16} {'upper bound':>12}"
    lines = [f"KL(P_IoU || Q_S), nats, temperature {result['temperature']:g}, "
             f"{len(result['steps'])} snapshots ({result['step_unit']} {result['steps'][0]}..{result['steps'][-1]})",
             head, "-" * len(head)]
    for name, lay in list(result["layers"].items()) + [("mean", result["mean"])]:
        ub = lay["upper_bound"]["kl"] if isinstance(lay["upper_bound"], dict) else lay["upper_bound"]
        rnd = f"{lay['random']['mean']:.4f} ± {lay['random']['std']:.4f}"
        lines.append(f"{name:<20} {lay['embedding'][0]:>8.4f} {lay['embedding'][-1]:>8.4f} {rnd:>16} {ub:>12.4f}")
    if result.get("skipped_layers"):
        lines.append(f"not dissected (no KL): {', '.join(result['skipped_layers'])}")
    return "\n".join(lines)
