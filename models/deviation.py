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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from models.head import ComparisonFeatures, FitResult, HeadParams, margins, sigmoid

# A served hierarchical model's deviation (Deviation below), beside the K=1 head in a checkpoint or a bundle.
DEVIATION_FILE = "deviation.safetensors"

_MIN_VAR = 1e-6  # a basis direction no seen user moved along: its prior pins new users to the mean (finite)


def empirical_bayes_precision(weights: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Per-direction prior precision 1 / E[(w - mean)^2] over seen users' weights (U, K): always finite."""
    w = np.asarray(weights, dtype=np.float64)
    var = ((w - np.asarray(mean, dtype=np.float64)) ** 2).mean(0) if len(w) else np.zeros(w.shape[1])
    return 1.0 / (var + _MIN_VAR)


def _loss_curvature(g: np.ndarray, b: np.ndarray, w: np.ndarray, prec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At weights w: p = sigmoid(-(g + B w)) (each pair's loss gradient is -p times its margin's) and the Hessian of
    fit_deviation's objective, B' diag(p (1 - p)) B + diag(precision): the Newton step's and the Laplace
    approximation's curvature."""
    p = sigmoid(-(g + b @ w))
    return p, (b.T * (p * (1 - p))) @ b + np.diag(prec)


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
        p, hess = _loss_curvature(g, b, w, prec)
        grad = -(b.T @ p) + prec * (w - mean)
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


def posterior_confidence(
    global_margins: np.ndarray, basis_margins: np.ndarray, weights: np.ndarray, precision: np.ndarray
) -> float:
    """1 - mean posterior std / mean prior std of the weights under the Laplace approximation at the MAP `weights`
    (the Newton Hessian of fit_deviation's objective, K x K): 0 with no comparisons, towards 1 as they pin the
    weights down. The same meaning as models.head.FitResult.confidence for PAL's simplex weights."""
    w = np.asarray(weights, dtype=np.float64)
    prec = np.asarray(precision, dtype=np.float64) * np.ones_like(w)
    b = np.asarray(basis_margins, dtype=np.float64).reshape(len(global_margins), len(w))
    _, hess = _loss_curvature(np.asarray(global_margins, dtype=np.float64), b, w, prec)
    try:
        post_std = np.sqrt(np.clip(np.diag(np.linalg.inv(hess)), 0.0, None)).mean()
    except np.linalg.LinAlgError:
        return 0.0
    prior_std = np.sqrt(1.0 / prec).mean()
    return float(np.clip(1.0 - post_std / prior_std, 0.0, 1.0))


_KEY_BYTES = 8  # statement_key's 16 hex digits


@dataclass(frozen=True)
class Deviation:
    """What a served hierarchical model adds to its K=1 head: the basis, the prior and the seen users' weights
    (rows in the order of the checkpoint's user ids), and optionally a per-statement table: statements known at
    training time (their statement_key, as 8 bytes) with their own vectors c_x, so that b(p, x) = V e(x) + c_x (0 for
    any other statement). Stored as DEVIATION_FILE beside the head."""

    basis: np.ndarray  # (R, d) float64
    prior_mean: np.ndarray  # (R,)
    precision: np.ndarray  # (R,) > 0
    user_weights: np.ndarray  # (n_users, R)
    item_keys: np.ndarray = field(default_factory=lambda: np.zeros((0, _KEY_BYTES), dtype=np.uint8))  # (n_items, 8)
    item_vectors: np.ndarray | None = None  # (n_items, R); None: no table

    @classmethod
    def with_items(
        cls,
        basis: np.ndarray,
        prior_mean: np.ndarray,
        precision: np.ndarray,
        user_weights: np.ndarray,
        items: dict[str, np.ndarray],
    ) -> Deviation:
        """A deviation whose per-statement table is `items` (statement_key -> c_x (R,)); an empty dict: none."""
        keys = sorted(items)
        if not keys:
            return cls(basis, prior_mean, precision, user_weights)
        raw = np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), dtype=np.uint8).reshape(len(keys), _KEY_BYTES)
        return cls(basis, prior_mean, precision, user_weights, raw.copy(), np.stack([items[k] for k in keys]))

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @cached_property
    def _rows(self) -> dict[str, int]:
        return {bytes(k).hex(): i for i, k in enumerate(self.item_keys)}

    def item_offsets(self, prompts: list[str], items: list[str]) -> np.ndarray | None:
        """c_x of each (prompt, item) (n, R): its row of the per-statement table, 0 where training did not know
        the statement; None without a table."""
        if self.item_vectors is None:
            return None
        out = np.zeros((len(items), self.rank))
        for i, (p, x) in enumerate(zip(prompts, items, strict=True)):
            row = self._rows.get(statement_key(p, x))
            if row is not None:
                out[i] = self.item_vectors[row]
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """As written to DEVIATION_FILE (float32, as the graph computes)."""
        out = {
            "basis": self.basis.astype(np.float32),
            "prior_mean": self.prior_mean.astype(np.float32),
            "precision": self.precision.astype(np.float32),
            "user_weights": self.user_weights.astype(np.float32),
        }
        if self.item_vectors is not None:
            out["item_keys"] = self.item_keys.astype(np.uint8)
            out["item_vectors"] = self.item_vectors.astype(np.float32)
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / DEVIATION_FILE
        save_file(self.arrays(), str(path))
        return path

    @classmethod
    def read(cls, directory: str | Path, rank: int, dim: int, n_users: int, error: type[ValueError]) -> Deviation:
        """Load and check DEVIATION_FILE against the rank the config declares, the item dimension d of the head
        and the number of seen users; `error` (CheckpointError, BundleError) says what is wrong."""
        path = Path(directory) / DEVIATION_FILE
        if not path.is_file():
            raise error(f"{Path(directory)} declares a deviation (rank {rank}) but has no {DEVIATION_FILE}")
        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise error(f"{path} is not a readable safetensors file: {e}") from e
        expected = {"basis": (rank, dim), "prior_mean": (rank,), "precision": (rank,), "user_weights": (n_users, rank)}
        n_items = len(arrays["item_keys"]) if "item_keys" in arrays else None
        if n_items is not None:
            expected |= {"item_keys": (n_items, _KEY_BYTES), "item_vectors": (n_items, rank)}
        elif "item_vectors" in arrays:
            raise error(f"{path} has item_vectors but no item_keys")
        for name, shape in expected.items():
            if name not in arrays:
                raise error(f"{path} lacks {name!r}")
            if tuple(arrays[name].shape) != shape:
                raise error(
                    f"{path}: {name} has shape {tuple(arrays[name].shape)}, expected {shape} (deviation rank "
                    f"{rank}, item dimension {dim}, {n_users} seen users)"
                )
            if not np.isfinite(arrays[name]).all():
                raise error(f"{path}: {name} holds NaN or inf")
        if (arrays["precision"] <= 0).any():
            raise error(f"{path}: precision must be positive")
        floats = [arrays[n].astype(np.float64) for n in ("basis", "prior_mean", "precision", "user_weights")]
        if n_items is None:
            return cls(*floats)
        keys = arrays["item_keys"]
        if keys.dtype != np.uint8 or len(np.unique(keys, axis=0)) != n_items:
            raise error(f"{path}: item_keys must be distinct 8-byte statement keys (uint8)")
        return cls(*floats, keys, arrays["item_vectors"].astype(np.float64))


def fit_hier(
    head: HeadParams, deviation: Deviation, feats: ComparisonFeatures, prior_mean: np.ndarray
) -> FitResult:
    """One user's deviation weights from encoded comparisons (what /adapt runs): the global margins of the K=1
    head and the basis margins, through fit_deviation (the fitter `pal eval` measures). `weights` and `logits`
    both hold the unconstrained weights."""
    if feats.deviation is None:
        raise ValueError("hierarchical fitting needs the comparisons' deviation features")
    if len(feats) == 0:
        w = np.asarray(prior_mean, dtype=np.float64).copy()
        return FitResult(w, w, float("nan"), 0.0, 0)
    g = margins(head, feats, np.ones(head.cfg.k))
    b = feats.deviation
    w = fit_deviation(g, b, prior_mean, deviation.precision)
    acc = float((g + b @ w > 0).mean())
    return FitResult(w, w, acc, posterior_confidence(g, b, w, deviation.precision), len(feats))
