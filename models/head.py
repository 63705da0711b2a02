"""The PAL head in numpy: rewards for any user mixture and MAP fitting of one user's simplex weights.

This is the serving-side twin of `models.pal` (no torch). It is also what the offline few-shot evaluation
uses, so the accuracy reported by `pal eval` is the accuracy of the code that `/adapt` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from scipy.optimize import minimize

from models.config import PALConfig

_SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def _gelu_grad(x: np.ndarray) -> np.ndarray:
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
    t = np.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x**2)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class HeadParams:
    """Shared parameters of a PAL head as float64 numpy arrays (float64 keeps the fitter's gradients exact)."""

    cfg: PALConfig
    arrays: dict[str, np.ndarray]

    @classmethod
    def from_file(cls, cfg: PALConfig, path: str | Path) -> HeadParams:
        return cls(cfg, {k: v.astype(np.float64) for k, v in load_file(str(path)).items()})

    @property
    def n_layers(self) -> int:
        return self.cfg.n_hidden + 1

    @property
    def tau(self) -> float:
        return float(self.arrays["tau"][0])

    def f(self, x: np.ndarray) -> np.ndarray:
        return self._mlp(x)[0]

    def _mlp(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """f(x) plus the pre-activations the backward pass needs."""
        pre: list[np.ndarray] = []
        for i in range(self.n_layers):
            x = x @ self.arrays[f"f.w{i}"] + self.arrays[f"f.b{i}"]
            if i < self.n_layers - 1:
                pre.append(x)
                x = _gelu(x)
        return x, pre

    def _mlp_vjp(self, pre: list[np.ndarray], grad_out: np.ndarray) -> np.ndarray:
        g = grad_out
        for i in reversed(range(self.n_layers)):
            g = g @ self.arrays[f"f.w{i}"].T
            if i > 0:
                g = g * _gelu_grad(pre[i - 1])
        return g

    def prompt_prototypes(self, prompt: np.ndarray) -> np.ndarray:
        """PAL-B: (B, prompt_dim) -> (B, K, D)."""
        h = np.einsum("bi,kio->bko", prompt, self.arrays["g.w0"]) + self.arrays["g.b0"]
        for i in range(1, self.n_layers):
            h = np.einsum("bki,kio->bko", _gelu(h), self.arrays[f"g.w{i}"]) + self.arrays[f"g.b{i}"]
        return h

    def ideal_points(self, weights: np.ndarray) -> np.ndarray:
        """PAL-A: f(sum_k w_k p_k): (N, K) -> (N, D)."""
        return self.f(weights @ self.arrays["prototypes"])


def reward_b(latent: np.ndarray, prototypes: np.ndarray, weights: np.ndarray, tau: float) -> np.ndarray:
    """PAL-B reward: latent (N, D), prompt prototypes (N, K, D), weights (N, K) -> (N,)."""
    mix = np.einsum("nk,nkd->nd", weights, prototypes)
    num = (latent * mix).sum(-1)
    den = np.maximum(np.linalg.norm(latent, axis=-1) * np.linalg.norm(mix, axis=-1), 1e-8)
    return tau * num / den


def reward_a(latent: np.ndarray, ideal: np.ndarray) -> np.ndarray:
    """PAL-A reward: -||z - u||^2 for latent (N, D) and the user's ideal point (N, D) or (D,)."""
    return -((latent - ideal) ** 2).sum(-1)


def prototype_rewards(head: HeadParams, latent: np.ndarray, prototypes: np.ndarray | None) -> np.ndarray:
    """Reward of each item under each pure prototype (one-hot weights): (N, K)."""
    k = head.cfg.k
    eye = np.eye(k)
    if head.cfg.form == "B":
        assert prototypes is not None
        return np.stack(
            [
                reward_b(latent, prototypes, np.broadcast_to(eye[j], (len(latent), k)), head.tau)
                for j in range(k)
            ],
            axis=1,
        )
    ideals = head.ideal_points(eye)  # (K, D)
    return -((latent[:, None, :] - ideals[None]) ** 2).sum(-1)


@dataclass(frozen=True)
class ComparisonFeatures:
    """Everything the fitter needs about a user's comparisons, already through the encoder.

    PAL-B: chosen/rejected latents f(e(x)) (n, D) and the prompt prototypes g_k(e(p)) (n, K, D).
    PAL-A: chosen/rejected latents f(e(p, x)) (n, D); `prompt_prototypes` is None.
    A hierarchical model (models/deviation.py) also has `deviation`: V e(chosen) - V e(rejected), (n, R).
    """

    chosen: np.ndarray
    rejected: np.ndarray
    prompt_prototypes: np.ndarray | None = None
    deviation: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.chosen)


@dataclass(frozen=True)
class FitResult:
    logits: np.ndarray
    weights: np.ndarray
    accuracy: float  # fraction of the fitted comparisons the fitted weights rank correctly
    confidence: float  # 1 - mean posterior std of the weights under a Laplace approximation, in [0, 1]
    n: int


def margins(head: HeadParams, feats: ComparisonFeatures, weights: np.ndarray) -> np.ndarray:
    """r(chosen) - r(rejected) for one user's weights (K,)."""
    n = len(feats)
    if head.cfg.form == "B":
        w = np.broadcast_to(weights, (n, head.cfg.k))
        return reward_b(feats.chosen, feats.prompt_prototypes, w, head.tau) - reward_b(
            feats.rejected, feats.prompt_prototypes, w, head.tau
        )
    u = head.ideal_points(weights[None])[0]
    return reward_a(feats.chosen, u) - reward_a(feats.rejected, u)


def _objective(
    theta: np.ndarray, head: HeadParams, feats: ComparisonFeatures, prior_logits: np.ndarray, strength: float
) -> tuple[float, np.ndarray]:
    """Negative log posterior of the logits and its gradient (sum of BTL losses + Gaussian prior)."""
    w = softmax(theta)
    if head.cfg.form == "B":
        tau = head.tau
        protos = feats.prompt_prototypes
        mix = np.einsum("k,nkd->nd", w, protos)
        mix_norm = np.maximum(np.linalg.norm(mix, axis=-1, keepdims=True), 1e-8)
        grads_m = np.zeros_like(mix)
        m = np.zeros(len(feats))
        parts = []
        for z in (feats.chosen, feats.rejected):
            z_norm = np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
            cos = ((z * mix).sum(-1, keepdims=True)) / (z_norm * mix_norm)
            # d cos / d mix = (z/|z| - cos * mix/|mix|) / |mix|
            parts.append((tau * cos[:, 0], tau * (z / z_norm - cos * mix / mix_norm) / mix_norm))
        m = parts[0][0] - parts[1][0]
        dl_dm = -sigmoid(-m)  # d softplus(-m) / dm
        grads_m = dl_dm[:, None] * (parts[0][1] - parts[1][1])
        grad_w = np.einsum("nd,nkd->k", grads_m, protos)
    else:
        v = w @ head.arrays["prototypes"]
        u, pre = head._mlp(v[None])
        u = u[0]
        # r_c - r_r = |z_r|^2 - |z_c|^2 + 2 u.(z_c - z_r): linear in u.
        diff = feats.chosen - feats.rejected
        m = (feats.rejected**2).sum(-1) - (feats.chosen**2).sum(-1) + 2 * diff @ u
        dl_dm = -sigmoid(-m)
        grad_u = 2 * (dl_dm[:, None] * diff).sum(0)
        grad_v = head._mlp_vjp(pre, grad_u[None])[0]
        grad_w = head.arrays["prototypes"] @ grad_v
    loss = float(np.logaddexp(0.0, -m).sum())
    # softmax Jacobian: dw/dtheta = diag(w) - w w^T
    grad_theta = w * (grad_w - (w * grad_w).sum())
    delta = theta - prior_logits
    loss += 0.5 * strength * float(delta @ delta)
    grad_theta = grad_theta + strength * delta
    return loss, grad_theta


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function (tanh form)."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def fit_user(
    head: HeadParams,
    feats: ComparisonFeatures,
    prior_weights: np.ndarray,
    prior_strength: float = 1.0,
    max_iter: int = 100,
) -> FitResult:
    """MAP estimate of one user's simplex logits, everything else frozen.

    Starts at the population prior (log of the mean seen-user weights) and keeps a Gaussian prior there,
    so one or two comparisons move the user only a little. L-BFGS from a fixed start: deterministic.
    """
    prior_logits = np.log(np.clip(np.asarray(prior_weights, dtype=np.float64), 1e-6, None))
    prior_logits = prior_logits - prior_logits.mean()
    if len(feats) == 0:
        w = softmax(prior_logits)
        return FitResult(prior_logits, w, float("nan"), 0.0, 0)
    res = minimize(
        _objective,
        prior_logits.copy(),
        args=(head, feats, prior_logits, prior_strength),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": 1e-6},
    )
    theta = res.x
    w = softmax(theta)
    acc = float((margins(head, feats, w) > 0).mean())
    return FitResult(theta, w, acc, _confidence(head, feats, theta, prior_logits, prior_strength), len(feats))


def _confidence(
    head: HeadParams, feats: ComparisonFeatures, theta: np.ndarray, prior_logits: np.ndarray, strength: float
) -> float:
    """Laplace approximation: finite-difference Hessian of the posterior at the MAP, mapped to the simplex.

    Returns 1 - mean posterior std of the weights, scaled so the prior alone gives 0 and a sharply
    determined fit approaches 1. K is small, so K+1 gradient evaluations are cheap.
    """
    k = len(theta)
    eps = 1e-4
    g0 = _objective(theta, head, feats, prior_logits, strength)[1]
    hess = np.empty((k, k))
    for j in range(k):
        t = theta.copy()
        t[j] += eps
        hess[:, j] = (_objective(t, head, feats, prior_logits, strength)[1] - g0) / eps
    hess = 0.5 * (hess + hess.T) + 1e-9 * np.eye(k)
    w = softmax(theta)
    jac = np.diag(w) - np.outer(w, w)
    prior_cov_w = jac @ jac.T / strength
    try:
        cov_w = jac @ np.linalg.inv(hess) @ jac.T
    except np.linalg.LinAlgError:
        return 0.0
    prior_std = float(np.sqrt(np.clip(np.diag(prior_cov_w), 0, None)).mean())
    post_std = float(np.sqrt(np.clip(np.diag(cov_w), 0, None)).mean())
    if prior_std <= 0:
        return 1.0
    return float(np.clip(1.0 - post_std / prior_std, 0.0, 1.0))
