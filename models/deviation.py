"""A hierarchical reward: the global reward plus a low-rank personal deviation, and its one few-shot fitter.

    r_u(p, x) = g(p, x) + sum_k w_uk b_k(x),   b_k(x) = basis[k] . e(x),   w_u ~ N(prior_mean, diag(1 / precision))

g is the global (K=1) PAL reward, e(x) the frozen item embedding, `basis` (K, d) a learned low-rank deviation
basis. With prior_mean = 0 a user with no comparisons gets exactly the global reward, and each comparison moves
the weights only as far as the (Gaussian) prior lets the data move them: a MAP logistic regression, convex, fitted
by Newton's method from the prior mean (deterministic). LoRe is the same fitter without the global term
(global margins 0) and a prior centred on the seen users' mean weights.

The precision comes from empirical Bayes: the spread of the seen users' fitted weights around the prior mean.
"""

from __future__ import annotations

import hashlib

import numpy as np

from models.head import sigmoid

_MIN_VAR = 1e-6  # a basis direction no seen user moved along: its prior pins new users to the mean (finite)


def empirical_bayes_precision(weights: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Per-direction prior precision 1 / E[(w - mean)^2] over seen users' weights (U, K): always finite."""
    w = np.asarray(weights, dtype=np.float64)
    var = ((w - np.asarray(mean, dtype=np.float64)) ** 2).mean(0) if len(w) else np.zeros(w.shape[1])
    return 1.0 / (var + _MIN_VAR)


def fit_deviation(
    global_margins: np.ndarray,
    basis_margins: np.ndarray,
    prior_mean: np.ndarray,
    precision: np.ndarray,
    max_iter: int = 50,
    tol: float = 1e-9,
) -> np.ndarray:
    """MAP weights (K,) of one user from n comparisons.

    global_margins (n,): g(chosen) - g(rejected); basis_margins (n, K): b(chosen) - b(rejected). Minimises
    sum softplus(-(g + B w)) + 0.5 sum precision (w - prior_mean)^2 by damped Newton steps (K is small).
    Zero comparisons give the prior mean exactly.
    """
    mean = np.asarray(prior_mean, dtype=np.float64)
    prec = np.asarray(precision, dtype=np.float64) * np.ones_like(mean)
    b = np.asarray(basis_margins, dtype=np.float64).reshape(len(global_margins), len(mean))
    g = np.asarray(global_margins, dtype=np.float64)
    w = mean.copy()
    if len(g) == 0:
        return w

    def objective(v: np.ndarray) -> float:
        d = v - mean
        return float(np.logaddexp(0.0, -(g + b @ v)).sum() + 0.5 * (prec * d * d).sum())

    f = objective(w)
    for _ in range(max_iter):
        m = g + b @ w
        p = sigmoid(-m)  # d softplus(-m) / dm = -p
        grad = -(b.T @ p) + prec * (w - mean)
        hess = (b.T * (p * (1 - p))) @ b + np.diag(prec)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:  # backtracking: the objective is convex, a short enough Newton step always descends
            cand = w - t * step
            fc = objective(cand)
            if fc <= f:
                break
            t *= 0.5
        else:
            break
        done = f - fc < tol * max(1.0, abs(f))
        w, f = cand, fc
        if done:
            break
    return w


def statement_key(prompt: str, item: str) -> str:
    """The key of a statement (an item under its prompt) in a per-statement deviation table: 16 hex digits of the
    sha256 of prompt and text, so a server can look a scored item up without storing the texts."""
    return hashlib.sha256(f"{prompt}\x1f{item}".encode()).hexdigest()[:16]
