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

from neurosem._progress import progress as _progress
from neurosem.errors import NeurosemError, RunMismatchError

#: Norm floor of the cosines: the embedding's (``neurosem.embed.EPS``), so both treat zero rows alike.
COS_EPS = 1e-12


# --------------------------------------------------------------------------------------- the math
def cosine_matrix(x: np.ndarray, eps: float = COS_EPS) -> np.ndarray:
    """Pairwise cosines of the rows of ``x: [C, D]`` -> ``[C, C]`` (float64).

    Rows are divided by ``max(‖x_i‖, eps)``, so an all-zero row has cosine 0 with every row.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a [C, D] matrix, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    xn = x / np.maximum(norms, eps)[:, None]
    return xn @ xn.T


def similarity_log_probs(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``log softmax_j cos(x_i, x_j) / τ`` for ``x: [C, D]`` -> ``[C, C]`` (rows sum to 1 in prob)."""
    from scipy.special import log_softmax

    if not temperature > 0:
        raise NeurosemError(f"temperature must be > 0, got {temperature}")
    return log_softmax(cosine_matrix(x) / float(temperature), axis=1)


def kl_divergence(targets: np.ndarray, vectors: np.ndarray, temperature: float = 1.0) -> float:
    """``mean_i KL(P_T(·|i) ‖ Q_S(·|i))`` for ``targets: [C, L]`` and ``vectors: [C, K]``.

    Example:
        >>> T = np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> kl_divergence(T, np.array([[1.0, 0.0], [1.0, 0.0]])) > 0
        True
    """
    targets = np.asarray(targets)
    vectors = np.asarray(vectors)
    if targets.shape[0] != vectors.shape[0]:
        raise ValueError(f"targets have {targets.shape[0]} rows, vectors {vectors.shape[0]}")
    log_p = similarity_log_probs(targets, temperature)
    log_q = similarity_log_probs(vectors, temperature)
    p = np.exp(log_p)
    return float(np.mean(np.sum(p * (log_p - log_q), axis=1)))


def kl_per_snapshot(targets: np.ndarray, snapshots: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """KL of each snapshot ``snapshots: [T, C, K]`` against ``targets: [C, L]`` -> ``[T]``."""
    from scipy.special import log_softmax

    log_p = similarity_log_probs(targets, temperature)
    p = np.exp(log_p)
    neg_entropy = float(np.mean(np.sum(p * log_p, axis=1)))
    out = np.empty(len(snapshots), dtype=np.float64)
    for t, s in enumerate(snapshots):
        log_q = log_softmax(cosine_matrix(s) / float(temperature), axis=1)
        out[t] = neg_entropy - float(np.mean(np.sum(p * log_q, axis=1)))
    return out


def random_init(n_units: int, dim: int, seed: int) -> np.ndarray:
    """The embedding's random initialisation: i.i.d. standard normal ``[C, K]`` (float64)."""
    return np.random.default_rng(seed).standard_normal((n_units, dim))


def random_baseline(targets: np.ndarray, dim: int, temperature: float = 1.0, n_seeds: int = 10,
                    seed: int = 0) -> np.ndarray:
    """KL of ``n_seeds`` random initialisations ``[C, dim]`` (seeds ``seed .. seed+n_seeds-1``) -> ``[n_seeds]``."""
    if n_seeds < 1:
        raise NeurosemError(f"n_random must be >= 1, got {n_seeds}")
    c = int(np.asarray(targets).shape[0])
    return np.array([kl_divergence(targets, random_init(c, dim, seed + r), temperature)
                     for r in range(n_seeds)])


def kl_and_grad(S: np.ndarray, log_p: np.ndarray, temperature: float = 1.0,
                p: np.ndarray | None = None, neg_entropy: float | None = None) -> tuple[float, np.ndarray]:
    """``mean_i KL(P(·|i) ‖ Q_S(·|i))`` and its gradient with respect to ``S: [C, K]`` (float64).

    ``log_p: [C, C]`` are the target log-probabilities (``p = exp(log_p)`` and ``neg_entropy =
    mean_i Σ_j p log p`` may be passed precomputed). With ``Z = cos(S)/τ`` the row-wise softmax gives
    ``∂KL/∂Z = (Q − P)/C``; through ``Z = Ŝ Ŝᵀ/τ`` and ``ŝ_i = s_i/‖s_i‖`` this is
    ``∂KL/∂s_i = (g_i − (g_i·ŝ_i) ŝ_i)/‖s_i‖`` with ``g = (G + Gᵀ) Ŝ / τ``.
    """
    c = S.shape[0]
    if p is None:
        p = np.exp(log_p)
    if neg_entropy is None:
        neg_entropy = float(np.sum(p * log_p) / c)
    norms = np.maximum(np.linalg.norm(S, axis=1), COS_EPS)
    Sn = S / norms[:, None]
    Z = Sn @ Sn.T / temperature
    Z -= Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    total = E.sum(axis=1, keepdims=True)
    log_q = Z - np.log(total)
    value = neg_entropy - float(np.sum(p * log_q) / c)
    G = (E / total - p) / c
    g = (G + G.T) @ Sn / temperature
    grad = (g - np.sum(g * Sn, axis=1, keepdims=True) * Sn) / norms[:, None]
    return value, grad


def _torch_kl_and_grad(device: Any, log_p: np.ndarray, temperature: float) -> Any:
    """:func:`kl_and_grad` evaluated with torch on ``device`` (float64): ``S [C, K] -> (kl, grad)``."""
    import torch

    lp = torch.as_tensor(log_p, dtype=torch.float64, device=device)
    p = lp.exp()
    c = lp.shape[0]
    neg_entropy = float((p * lp).sum()) / c

    def evaluate(S: np.ndarray) -> tuple[float, np.ndarray]:
        s = torch.as_tensor(S, dtype=torch.float64, device=device)
        norms = s.norm(dim=1).clamp_min(COS_EPS)
        sn = s / norms[:, None]
        log_q = torch.log_softmax(sn @ sn.T / temperature, dim=1)
        value = neg_entropy - float((p * log_q).sum()) / c
        G = (log_q.exp() - p) / c
        g = (G + G.T) @ sn / temperature
        grad = (g - (g * sn).sum(1, keepdim=True) * sn) / norms[:, None]
        return value, grad.cpu().numpy()

    return evaluate


def _evaluator(log_p: np.ndarray, temperature: float, device: str) -> Any:
    """``S -> (kl, grad)``: numpy on the CPU (``device="cpu"``), torch on a CUDA device."""
    if device != "cpu":
        from neurosem._device import resolve_device

        dev = resolve_device(device)
        if dev.type not in ("cpu", "mps"):
            return _torch_kl_and_grad(dev, log_p, temperature)
    p = np.exp(log_p)
    neg_entropy = float(np.sum(p * log_p) / log_p.shape[0])
    return lambda S: kl_and_grad(S, log_p, temperature, p, neg_entropy)


def optimise_kl(targets: np.ndarray, dim: int, temperature: float = 1.0, seed: int = 0,
                init: np.ndarray | None = None, max_iter: int = 3000, rtol: float = 1e-6,
                window: int = 10, device: str = "cpu") -> tuple[float, np.ndarray]:
    """Minimise ``KL(P_T ‖ Q_S)`` over ``S: [C, dim]`` directly (full batch, float64 L-BFGS-B).

    Starts from ``init`` when given, else from :func:`random_init` with ``seed``; deterministic.
    Stops at a vanishing gradient, after ``max_iter`` iterations, or when the KL fell by at most
    ``rtol`` (relative) over the last ``window`` iterations. ``device``: ``"cpu"`` evaluates with
    numpy; ``"auto"``/``"cuda"`` evaluates the KL and its gradient with torch on the GPU when there
    is one (the optimiser itself is scipy's, on the CPU).
    Rows of S whose target row is all zero are held at 0: a zero vector has cosine 0 with every
    vector, exactly as its zero target row, so those rows of Q equal the rows of P_T (uniform) and
    the cosines with them match too — the best any S can do for them.
    Returns ``(kl, S)`` — the KL recomputed for the returned S (the best S seen, never worse than
    the start).
    """
    from scipy.optimize import minimize

    targets = np.asarray(targets, dtype=np.float64)
    c = targets.shape[0]
    start = random_init(c, dim, seed) if init is None else np.asarray(init, dtype=np.float64).copy()
    if start.shape != (c, dim):
        raise ValueError(f"init has shape {start.shape}, expected {(c, dim)}")
    live = np.any(targets != 0, axis=1)
    start[~live] = 0.0
    best = kl_divergence(targets, start, temperature)
    if not live.any() or best <= 0.0:
        return best, start
    evaluate = _evaluator(similarity_log_probs(targets, temperature), temperature, device)
    scale = 1.0 / best          # optimise KL / KL(start): the tolerances become relative

    def full(x: np.ndarray) -> np.ndarray:
        S = np.zeros((c, dim))
        S[live] = x.reshape(-1, dim)
        return S

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = evaluate(full(x))
        return value * scale, grad[live].ravel() * scale

    seen: list[float] = []

    def stop_when_flat(intermediate_result: Any) -> None:
        seen.append(float(intermediate_result.fun))
        if len(seen) > window and seen[-window - 1] - seen[-1] <= rtol * abs(seen[-1]):
            raise StopIteration

    res = minimize(fun, start[live].ravel(), jac=True, method="L-BFGS-B", callback=stop_when_flat,
                   options={"maxiter": int(max_iter), "maxcor": 30, "ftol": 1e-15, "gtol": 1e-12})
    cand = full(res.x)
    value = kl_divergence(targets, cand, temperature)
    if np.isfinite(value) and value < best:
        return float(value), cand
    return float(best), start


def upper_bound(targets: np.ndarray, dim: int, temperature: float = 1.0, seed: int = 0,
                warm_start: np.ndarray | None = None, max_iter: int = 3000, device: str = "cpu") -> dict[str, Any]:
    """The upper bound of Fig. 4: the lowest KL found by optimising S directly.

    Runs :func:`optimise_kl` from a seeded random start and, when ``warm_start`` is given (the
    trained S), from it too; keeps the lower. Returns ``{"kl", "kl_random_start", "kl_warm_start",
    "start"}``.
    """
    kl_rand, _ = optimise_kl(targets, dim, temperature, seed=seed, max_iter=max_iter, device=device)
    out: dict[str, Any] = {"kl": kl_rand, "kl_random_start": kl_rand, "kl_warm_start": None,
                           "start": "random"}
    if warm_start is not None:
        kl_warm, _ = optimise_kl(targets, dim, temperature, init=warm_start, max_iter=max_iter, device=device)
        out["kl_warm_start"] = kl_warm
        if kl_warm < kl_rand:
            out.update(kl=kl_warm, start="embedding")
    return out


# --------------------------------------------------------------------------------------- the run
def _file_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def kl_curves(run: Any = None, n_random: int = 10, seed: int = 0, max_iter: int = 3000,
              warm_start: bool = True, write: bool = True, device: str = "auto",
              progress: bool = True) -> dict[str, Any]:
    """The Fig. 4 numbers of a run; writes ``RUN/kl.json`` and ``RUN/kl.csv``.

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
        progress: a progress bar over the layers (stderr).

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

    out_layers: dict[str, Any] = {}
    seeds_by_layer = []
    for name in _progress(layers, total=len(layers), desc="kl", enabled=progress, unit="layer"):
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
        ub = upper_bound(targets, k, temperature, seed=seed, max_iter=max_iter,
                         warm_start=final if warm_start else None, device=device)
        out_layers[name] = {
            "embedding": curve.tolist(),
            "final": kl_divergence(targets, final, temperature),
            "random": {"mean": float(rand.mean()), "std": float(rand.std(ddof=1)) if len(rand) > 1 else 0.0,
                       "values": rand.tolist()},
            "upper_bound": ub,
            "n_units": int(c), "dim": int(k), "n_labels": int(targets.shape[1]),
            "n_zero_targets": int(np.sum(~np.any(targets != 0, axis=1))),
        }

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


def kl_report(run: Any = None, layer: str | None = None, as_json: bool = False,
              formats: Sequence[str] = ("pdf", "png", "svg"), dpi: int = 300, progress: bool = True) -> str:
    """``neurosem kl``: compute the curves, write kl.json, kl.csv and ``figures/kl_curves.*``.

    Returns the text to print: the table and the written files, or the JSON with ``as_json``.

    Example:
        >>> print(kl_report("runs/resnet18"))     # doctest: +SKIP
    """
    from neurosem.analysis.figures import kl_figure
    from neurosem.analysis._plotstyle import save_figure
    from neurosem.analysis.query import load_run_dissection, load_run_embedding, run_dir

    rd = run_dir(run)
    if layer and layer != "mean":  # refused before anything is computed or written
        dissected = load_run_dissection(rd, required_for="kl").layers
        names = [n for n in load_run_embedding(rd).layers if n in dissected]
        if layer not in names:
            raise NeurosemError(f"no KL curve for layer {layer!r}: choose one of {', '.join(names)}, or mean")
    result = kl_curves(rd, progress=progress)
    fig = kl_figure(result, layers=[layer] if layer else None)
    paths = save_figure(fig, rd.figures / "kl_curves", formats, dpi=dpi)
    if as_json:
        return json.dumps(result, indent=2)
    files = [rd.path / "kl.json", rd.path / "kl.csv", *paths]
    return format_kl_table(result) + "\nwrote: " + ", ".join(str(p) for p in files)
