"""Exact t-SNE and PCA in numpy for the semantic map (no scikit-learn import: 1.3-2 s saved per run).

:func:`tsne` follows scikit-learn's ``TSNE(method="exact", init="pca", learning_rate="auto")``
(van der Maaten & Hinton 2008): per-row Gaussian affinities on the given distances with the
bandwidth found by bisection to the perplexity, symmetrised ``P``; Student-t ``Q`` in 2-D; gradient
descent with momentum and per-coordinate gains, 250 iterations at early exaggeration 12 and
momentum 0.5, then momentum 0.8 up to ``max_iter``, each stage stopping early as scikit-learn's;
the learning rate ``max(N / 48, 50)``; the start is the data's first two principal components
scaled to a standard deviation of 1e-4. Unlike scikit-learn's exact method the iterations run in
float32 (4x faster here than float64) and the gradient omits the 2.2e-16 floor on ``Q`` (it never
binds off the diagonal). The gradient is exact (every pair): the maps have at most a few thousand
units; the 512 of a ResNet18 block take 1.3-2 s for the 1,000 iterations on this machine's CPU.
The tests compare the result's KL and trustworthiness with scikit-learn's.

Example:
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((60, 5))
    >>> tsne(cosine_distances(X), pca_2d(X))[0].shape
    (60, 2)
"""
from __future__ import annotations

import numpy as np

#: ``np.finfo(float).eps``: the floor of P and Q (scikit-learn's MACHINE_EPSILON).
EPS = float(np.finfo(np.float64).eps)
EARLY_EXAGGERATION = 12.0
EXPLORATION_ITER = 250
CHECK_EVERY = 50


def cosine_distances(X: np.ndarray) -> np.ndarray:
    """``1 − cos`` of the rows of ``X: [N, K]`` as ``[N, N]`` float64, clipped to [0, 2], diagonal 0."""
    X = np.asarray(X, dtype=np.float64)
    Xn = X / np.maximum(np.linalg.norm(X, axis=1), 1e-12)[:, None]
    D = np.clip(1.0 - Xn @ Xn.T, 0.0, 2.0)
    np.fill_diagonal(D, 0.0)
    return D


def pca_2d(X: np.ndarray) -> np.ndarray:
    """The projection of ``X: [N, K]`` on its first two principal components ``[N, 2]``.

    Signs as scikit-learn's ``PCA``: the largest-magnitude loading of each component is positive.
    """
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(axis=0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    Vt = Vt[:2]
    signs = np.sign(Vt[np.arange(len(Vt)), np.argmax(np.abs(Vt), axis=1)])
    signs[signs == 0] = 1.0
    return Xc @ (Vt * signs[:, None]).T


def conditional_affinities(D: np.ndarray, perplexity: float, tol: float = 1e-5, steps: int = 100) -> np.ndarray:
    """``P(j|i)`` of ``D: [N, N]`` (``exp(−β_i D_ij)``, j ≠ i, rows summing to 1) with each β_i
    bisected until the row's entropy is ``log(perplexity)`` within ``tol`` (nats), all rows at once."""
    D = np.asarray(D, dtype=np.float64)
    n = len(D)
    off = ~np.eye(n, dtype=bool)
    target = np.log(perplexity)
    beta = np.ones(n)
    lo = np.full(n, -np.inf)
    hi = np.full(n, np.inf)
    active = np.ones(n, dtype=bool)
    P = np.zeros_like(D)
    for _ in range(steps):
        rows = np.flatnonzero(active)
        if not len(rows):
            break
        d = D[rows]
        p = np.exp(-d * beta[rows, None]) * off[rows]
        s = np.maximum(p.sum(axis=1), EPS)
        p /= s[:, None]
        entropy = np.log(s) + beta[rows] * (d * p).sum(axis=1)
        diff = entropy - target
        P[rows] = p
        done = np.abs(diff) <= tol
        up, down = (diff > 0) & ~done, (diff <= 0) & ~done
        r_up, r_down = rows[up], rows[down]
        lo[r_up] = beta[r_up]
        beta[r_up] = np.where(np.isinf(hi[r_up]), beta[r_up] * 2.0, (beta[r_up] + hi[r_up]) / 2.0)
        hi[r_down] = beta[r_down]
        beta[r_down] = np.where(np.isinf(lo[r_down]), beta[r_down] / 2.0, (beta[r_down] + lo[r_down]) / 2.0)
        active[rows[done]] = False
    return P


def joint_affinities(D: np.ndarray, perplexity: float) -> np.ndarray:
    """Symmetric ``P: [N, N]`` summing to 1 (off-diagonal floored at :data:`EPS`, diagonal 0)."""
    Pc = conditional_affinities(D, perplexity)
    P = Pc + Pc.T
    P = np.maximum(P / max(float(P.sum()), EPS), EPS)
    np.fill_diagonal(P, 0.0)
    return P


def kl_of(P: np.ndarray, Y: np.ndarray) -> float:
    """``KL(P ‖ Q(Y))`` in nats, ``Q`` the Student-t affinities of ``Y: [N, 2]`` (pairs i ≠ j)."""
    Y = np.asarray(Y, dtype=np.float64)
    sq = (Y * Y).sum(axis=1)
    num = 1.0 / (1.0 + np.maximum(sq[:, None] + sq[None, :] - 2.0 * Y @ Y.T, 0.0))
    np.fill_diagonal(num, 0.0)
    Q = np.maximum(num / num.sum(), EPS)
    off = ~np.eye(len(Y), dtype=bool)
    return float((P[off] * np.log(np.maximum(P[off], EPS) / Q[off])).sum())


def tsne(D: np.ndarray, init: np.ndarray, perplexity: float = 30.0, max_iter: int = 1000,
         n_iter_without_progress: int = 300, min_grad_norm: float = 1e-7) -> tuple[np.ndarray, float]:
    """Exact t-SNE of the distances ``D: [N, N]`` into 2-D; returns ``(Y: [N, 2] float64, KL in nats)``.

    ``init: [N, 2]`` is the start (e.g. :func:`pca_2d` of the data), scaled so that its first
    coordinate has standard deviation 1e-4. Deterministic: no random numbers are drawn. As in
    scikit-learn, each stage stops early when its gradient norm falls to ``min_grad_norm`` or its
    KL has not improved for ``n_iter_without_progress`` iterations (checked every 50), and the
    second stage starts afresh (no momentum, gains 1) after the first's last iteration.
    """
    D = np.asarray(D, dtype=np.float64)
    n = len(D)
    Y = np.asarray(init, dtype=np.float64)
    Y = (Y / max(float(np.std(Y[:, 0])), 1e-300) * 1e-4).astype(np.float32)
    P = joint_affinities(D, perplexity).astype(np.float32)
    lr = float(max(n / EARLY_EXAGGERATION / 4.0, 50.0))
    work = (np.empty((n, n), dtype=np.float32), np.empty((n, n), dtype=np.float32))
    it = _descend(Y, P * np.float32(EARLY_EXAGGERATION), 0, EXPLORATION_ITER, 0.5, lr, EXPLORATION_ITER,
                  min_grad_norm, work)
    if max_iter > EXPLORATION_ITER:
        _descend(Y, P, it + 1, max_iter, 0.8, lr, n_iter_without_progress, min_grad_norm, work)
    Y64 = Y.astype(np.float64)
    return Y64, kl_of(P.astype(np.float64), Y64)


def _descend(Y: np.ndarray, P: np.ndarray, start: int, stop: int, momentum: float, lr: float,
             without_progress: int, min_grad_norm: float, work: tuple[np.ndarray, np.ndarray]) -> int:
    """Gradient descent with momentum and gains on ``Y: [N, 2]`` (updated in place) for iterations
    ``start..stop-1``; returns the last iteration run. ``work``: two ``[N, N]`` float32 buffers."""
    num, W = work
    n = len(Y)
    diag = np.arange(n)
    update = np.zeros_like(Y)
    gains = np.ones_like(Y)
    mom, rate = np.float32(momentum), np.float32(lr)
    best_error, best_iter = np.inf, start
    i = start
    for i in range(start, stop):
        sq = (Y * Y).sum(axis=1)
        np.matmul(Y, Y.T * np.float32(-2.0), out=num)
        num += (sq + np.float32(1.0))[:, None]
        num += sq[None, :]
        np.maximum(num, np.float32(1.0), out=num)       # 1 + |y_i - y_j|^2 (>= 1 despite rounding)
        np.reciprocal(num, out=num)
        num[diag, diag] = 0.0
        scale = np.float32(1.0 / float(num.sum()))      # Q = num * scale
        check = (i + 1) % CHECK_EVERY == 0
        error = _kl_from_q(P, num * scale) if check else 0.0   # the KL at the Y of this gradient
        # (p_ij - q_ij) (1 + d_ij)^-1; off the diagonal q_ij > 1e-10 here, far above scikit-learn's
        # floor of 2.2e-16 on Q, so the floor is not applied in the gradient
        np.multiply(num, scale, out=W)
        np.subtract(P, W, out=W)
        W *= num
        grad = 4.0 * (W.sum(axis=1)[:, None] * Y - W @ Y)
        inc = update * grad < 0.0
        gains[inc] += 0.2
        gains[~inc] *= 0.8
        np.clip(gains, 0.01, np.inf, out=gains)
        grad *= gains
        update = mom * update - rate * grad
        Y += update
        if check:
            if error < best_error:
                best_error, best_iter = error, i
            elif i - best_iter > without_progress:
                break
            if float(np.linalg.norm(grad)) <= min_grad_norm:
                break
    return i


def _kl_from_q(P: np.ndarray, Q: np.ndarray) -> float:
    """``Σ_ij P log(P / Q)`` over the pairs where ``P > 0`` (the diagonal of P is 0)."""
    mask = P > 0
    p = P[mask].astype(np.float64)
    return float((p * (np.log(p) - np.log(np.maximum(Q[mask].astype(np.float64), EPS)))).sum())
