"""The KL of paper Fig. 4 and its direct minimisation (the upper bound), on numpy (torch on a GPU).

See :mod:`neurosem.analysis.kl` for the definitions and conventions; that module re-exports every
name here and computes the numbers of a run.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from neurosem._progress import progress as _progress
from neurosem.errors import NeurosemError

#: Norm floor of the cosines: the embedding's (``neurosem.embed.EPS``), so both treat zero rows alike.
COS_EPS = 1e-12


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
                p: np.ndarray | None = None, neg_entropy: float | None = None,
                work: "tuple[np.ndarray, np.ndarray, np.ndarray] | None" = None) -> tuple[float, np.ndarray]:
    """``mean_i KL(P(·|i) ‖ Q_S(·|i))`` and its gradient with respect to ``S: [C, K]`` (float64).

    ``log_p: [C, C]`` are the target log-probabilities (``p = exp(log_p)`` and ``neg_entropy =
    mean_i Σ_j p log p`` may be passed precomputed). With ``Z = cos(S)/τ`` the row-wise softmax gives
    ``∂KL/∂Z = (Q − P)/C``; through ``Z = Ŝ Ŝᵀ/τ`` and ``ŝ_i = s_i/‖s_i‖`` this is
    ``∂KL/∂s_i = (g_i − (g_i·ŝ_i) ŝ_i)/‖s_i‖`` with ``g = (G + Gᵀ) Ŝ / τ``.

    ``work``: three float64 ``[C, C]`` buffers reused across calls (an optimiser calls this hundreds
    of times; fresh ``[C, C]`` temporaries are page-faulted in on every call, which cost 3x the
    arithmetic at C = 512). The arithmetic is the same operation by operation, so the result is the
    same to the bit with or without them.
    """
    c = S.shape[0]
    if p is None:
        p = np.exp(log_p)
    if neg_entropy is None:
        neg_entropy = float(np.sum(p * log_p) / c)
    Z, E, W = work if work is not None else (np.empty((c, c)), np.empty((c, c)), np.empty((c, c)))
    norms = np.maximum(np.linalg.norm(S, axis=1), COS_EPS)
    Sn = S / norms[:, None]
    np.matmul(Sn, Sn.T, out=Z)
    if temperature != 1.0:
        Z /= temperature
    Z -= Z.max(axis=1, keepdims=True)
    np.exp(Z, out=E)
    total = E.sum(axis=1, keepdims=True)
    Z -= np.log(total)                                  # log Q
    value = neg_entropy - float(np.sum(np.multiply(p, Z, out=W)) / c)
    E /= total                                          # Q
    E -= p
    E /= c                                              # G = (Q - P) / C
    g = np.add(E, E.T, out=W) @ Sn
    if temperature != 1.0:
        g /= temperature
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


def evaluation_device(device: Any = "auto") -> Any:
    """Where the upper bound evaluates the KL: ``None`` (numpy on the CPU) or a CUDA ``torch.device``.

    ``cpu``, ``mps`` (no float64) and ``auto`` without a GPU give ``None``; ``auto`` on a Linux
    machine with no GPU driver decides so without importing torch (:func:`neurosem._device.gpu_driver_visible`).
    A ``torch.device`` or a spec naming a missing GPU goes through :func:`neurosem._device.resolve_device`
    (cached; a missing GPU is a one-line error).
    """
    from neurosem._device import gpu_driver_visible, resolve_device

    if device is None:
        return None
    if isinstance(device, str):
        spec = device.strip().lower()
        if spec in ("cpu", "mps") or (spec == "auto" and not gpu_driver_visible()):
            return None
    dev = resolve_device(device)
    return None if dev.type in ("cpu", "mps") else dev


def _evaluator(log_p: np.ndarray, temperature: float, device: Any) -> Any:
    """``S -> (kl, grad)``: numpy on the CPU (reusing its ``[C, C]`` buffers), torch on a CUDA device."""
    dev = evaluation_device(device)
    if dev is not None:
        return _torch_kl_and_grad(dev, log_p, temperature)
    p = np.exp(log_p)
    c = log_p.shape[0]
    neg_entropy = float(np.sum(p * log_p) / c)
    work = (np.empty((c, c)), np.empty((c, c)), np.empty((c, c)))
    return lambda S: kl_and_grad(S, log_p, temperature, p, neg_entropy, work)


def optimise_kl(targets: np.ndarray, dim: int, temperature: float = 1.0, seed: int = 0,
                init: np.ndarray | None = None, max_iter: int = 3000, rtol: float = 1e-6,
                window: int = 10, device: Any = "cpu") -> tuple[float, np.ndarray]:
    """Minimise ``KL(P_T ‖ Q_S)`` over ``S: [C, dim]`` directly (full batch, float64 L-BFGS-B).

    Starts from ``init`` when given, else from :func:`random_init` with ``seed``; deterministic.
    Stops at a vanishing gradient, after ``max_iter`` iterations, or when the KL fell by at most
    ``rtol`` (relative) over the last ``window`` iterations. ``device``: ``"cpu"`` (or ``None``)
    evaluates with numpy; ``"auto"``/``"cuda"``/a ``torch.device`` evaluates the KL and its gradient
    with torch on the GPU when there is one (:func:`evaluation_device`; the optimiser itself is
    scipy's, on the CPU).
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

    with one_blas_thread():
        res = minimize(fun, start[live].ravel(), jac=True, method="L-BFGS-B", callback=stop_when_flat,
                       options={"maxiter": int(max_iter), "maxcor": 30, "ftol": 1e-15, "gtol": 1e-12})
    cand = full(res.x)
    value = kl_divergence(targets, cand, temperature)
    if np.isfinite(value) and value < best:
        return float(value), cand
    return float(best), start


def one_blas_thread() -> Any:
    """A context in which numpy's and scipy's BLAS run one thread (restored on exit).

    The optimiser's products are [C, 16] x [16, C] and [C, C] x [C, 16]: too small to gain from
    BLAS threads, which spin and wait for each other on a busy machine (measured 3-6x slower at
    C = 512 on 2 shared cores). :func:`upper_bounds` runs optimisations side by side instead. The
    products give the same bits with any number of BLAS threads.
    """
    import scipy.optimize  # noqa: F401  (loads scipy's BLAS first, so the limit reaches it too)
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def default_workers() -> int:
    """The CPU cores this process may use (the optimisations of :func:`upper_bounds` run side by side)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                              # not on Linux
        return max(1, os.cpu_count() or 1)


def upper_bound(targets: np.ndarray, dim: int, temperature: float = 1.0, seed: int = 0,
                warm_start: np.ndarray | None = None, max_iter: int = 3000, device: Any = "cpu",
                workers: int = 1) -> dict[str, Any]:
    """The upper bound of Fig. 4: the lowest KL found by optimising S directly.

    Runs :func:`optimise_kl` from a seeded random start and, when ``warm_start`` is given (the
    trained S), from it too; keeps the lower. Returns ``{"kl", "kl_random_start", "kl_warm_start",
    "start"}``.
    """
    return upper_bounds({"": targets}, {"": dim}, temperature, seed=seed, warm_starts={"": warm_start},
                        max_iter=max_iter, device=device, workers=workers)[""]


def upper_bounds(targets: "dict[str, np.ndarray]", dims: "dict[str, int]", temperature: float = 1.0,
                 seed: int = 0, warm_starts: "dict[str, np.ndarray | None] | None" = None,
                 max_iter: int = 3000, device: Any = "cpu", workers: int | None = None,
                 progress: bool = False) -> dict[str, dict[str, Any]]:
    """:func:`upper_bound` of every layer ``{name: targets [C, L]}`` with ``{name: K}``, side by side.

    The optimisations (one per layer and start) run in ``workers`` threads (default: the CPU
    cores; numpy and scipy release the GIL), the largest layers first. Each is deterministic and
    independent of the others, so the result does not depend on ``workers``. ``device`` is resolved
    once (:func:`evaluation_device`).

    Example:
        >>> T = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> upper_bounds({"l": T}, {"l": 2})["l"]["kl"] < 1e-6
        True
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    warm_starts = warm_starts or {}
    dev = evaluation_device(device)
    jobs = [(name, warm) for name in targets for warm in (False, True)
            if not warm or warm_starts.get(name) is not None]
    jobs.sort(key=lambda job: -np.asarray(targets[job[0]]).shape[0])

    def run(job: tuple[str, bool]) -> float:
        name, warm = job
        return optimise_kl(targets[name], dims[name], temperature, seed=seed, max_iter=max_iter, device=dev,
                           init=warm_starts[name] if warm else None)[0]

    n_workers = min(len(jobs), default_workers() if workers is None else max(1, int(workers)))
    found: dict[tuple[str, bool], float] = {}
    with one_blas_thread():
        if n_workers <= 1:
            for job in _progress(jobs, desc="kl upper bound", enabled=progress, unit="start"):
                found[job] = run(job)
        else:
            with ThreadPoolExecutor(n_workers) as pool:
                futures = {pool.submit(run, job): job for job in jobs}
                for done in _progress(as_completed(futures), total=len(jobs), desc="kl upper bound",
                                      enabled=progress, unit="start"):
                    found[futures[done]] = done.result()
    out: dict[str, dict[str, Any]] = {}
    for name in targets:
        kl_rand = found[(name, False)]
        res: dict[str, Any] = {"kl": kl_rand, "kl_random_start": kl_rand, "kl_warm_start": None,
                               "start": "random"}
        if (name, True) in found:
            kl_warm = found[(name, True)]
            res["kl_warm_start"] = kl_warm
            if kl_warm < kl_rand:
                res.update(kl=kl_warm, start="embedding")
        out[name] = res
    return out
