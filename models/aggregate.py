"""Pluralistic objectives over a PAL head's outputs, in numpy: the reward of an explicit preference vector, the
mean over a population of users, the worst-off group (MaxMin), and scalarisations of the prototype reward vector
(linear and Tchebycheff, as Panacea trains with), plus k-means groups of users on the simplex.

Everything takes the scorer's user-independent outputs (`EncodedItems`: one encoder pass) and any number of
weight rows. The reward is not linear in the weights (PAL-B normalises the mixed prototype, PAL-A passes it
through an MLP), so the mean over users is computed per user, never as the reward of the mean weights. For PAL-B
each item reduces to K numbers and a KxK Gram matrix, so U users cost O(U K^2) per item, not O(U K D).

A hierarchical model (models/deviation.py) passes its items' deviation features V e(x) (N, R) as `deviation`; its
weight rows are then the users' R deviation weights, and a user's reward is the K=1 head's plus w . V e(x).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from models.head import HeadParams, prototype_rewards

# Users scored per block: bounds the (items x users) intermediate to a few MB whatever the population's size.
USER_BLOCK = 4096


def user_rewards(
    head: HeadParams,
    latent: np.ndarray,
    prototypes: np.ndarray | None,
    weights: np.ndarray,
    deviation: np.ndarray | None = None,
) -> np.ndarray:
    """Reward of every item under every weight row: latent (N, D), prototypes (N, K, D) or None, weights (U, K) ->
    (N, U). Equal to models.head.reward_b / reward_a applied per pair. With `deviation` (N, R): weights (U, R) are
    deviation weights, added to the K=1 head's reward."""
    w = np.asarray(weights, dtype=np.float64)
    if deviation is not None:
        base = user_rewards(head, latent, prototypes, np.ones((1, head.cfg.k)))
        return base + np.einsum("nr,ur->nu", deviation, w)
    if head.cfg.form == "B":
        assert prototypes is not None
        k = w.shape[1]
        b = np.einsum("nkd,nd->nk", prototypes, latent)  # g_k . z per item
        gram = np.einsum("nkd,njd->nkj", prototypes, prototypes).reshape(len(latent), k * k)
        # einsum, not `@`: these products have an inner size of K or K^2, and OpenBLAS, spreading them over threads
        # on busy cores, took 2-40 ms for (64, 3) x (3, 4096) where einsum's plain loop takes 0.3-0.5 ms
        # (measured side by side on the 2-core dev machine under load).
        num = np.einsum("nk,uk->nu", b, w)  # (N, U)
        # |sum_k w_k g_k|^2 = sum_kj w_k w_j (g_k . g_j)
        mix_sq = np.einsum("nk,uk->nu", gram, (w[:, :, None] * w[:, None, :]).reshape(len(w), k * k))
        z_norm = np.linalg.norm(latent, axis=-1)[:, None]
        den = np.maximum(z_norm * np.sqrt(np.maximum(mix_sq, 0.0)), 1e-8)
        return head.tau * num / den
    ideals = head.ideal_points(w)  # (U, D)
    # -|z - u|^2 = -|z|^2 - |u|^2 + 2 z.u
    return -(latent**2).sum(-1)[:, None] - (ideals**2).sum(-1)[None, :] + 2.0 * np.einsum("nd,ud->nu", latent, ideals)


def weight_blocks(weights: np.ndarray, block: int = USER_BLOCK) -> Iterator[np.ndarray]:
    for start in range(0, len(weights), block):
        yield weights[start : start + block]


def mean_reward(
    head: HeadParams,
    latent: np.ndarray,
    prototypes: np.ndarray | None,
    blocks: Iterable[np.ndarray],
    deviation: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Mean reward over every weight row of every block (streamed: one block in memory at a time): (N,), users."""
    total, count = np.zeros(len(latent)), 0
    for w in blocks:
        if len(w):
            total += user_rewards(head, latent, prototypes, w, deviation).sum(axis=1)
            count += len(w)
    if count == 0:
        raise ValueError("no users to average over")
    return total / count, count


def group_means(
    head: HeadParams,
    latent: np.ndarray,
    prototypes: np.ndarray | None,
    weights: np.ndarray,
    labels: np.ndarray,
    n_groups: int,
    deviation: np.ndarray | None = None,
) -> np.ndarray:
    """Each group's mean reward per item: (N, G). labels[u] in [0, G); every group must have a user."""
    sums, counts = np.zeros((len(latent), n_groups)), np.bincount(labels, minlength=n_groups)
    if (counts == 0).any():
        raise ValueError(f"groups {np.flatnonzero(counts == 0).tolist()} have no users")
    for start in range(0, len(weights), USER_BLOCK):
        r = user_rewards(head, latent, prototypes, weights[start : start + USER_BLOCK], deviation)
        onehot = np.eye(n_groups)[labels[start : start + USER_BLOCK]]  # (u, G)
        sums += np.einsum("nu,ug->ng", r, onehot)
    return sums / counts[None, :]


def maxmin_reward(group_rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MaxMin-RLHF's egalitarian reward: the worst-off group's reward per item, and which group that was."""
    return group_rewards.min(axis=1), group_rewards.argmin(axis=1)


def linear_scalarization(vector: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """sum_k lambda_k r_k over the prototype reward vector (N, K)."""
    return vector @ np.asarray(lam, dtype=np.float64)


def tchebycheff_scalarization(vector: np.ndarray, lam: np.ndarray, ideal: np.ndarray) -> np.ndarray:
    """Panacea's Tchebycheff scalarisation as a reward (higher is better): -max_k lambda_k (z_k - r_k)."""
    lam, ideal = np.asarray(lam, dtype=np.float64), np.asarray(ideal, dtype=np.float64)
    return -(lam[None, :] * (ideal[None, :] - vector)).max(axis=1)


def prototype_vector(head: HeadParams, latent: np.ndarray, prototypes: np.ndarray | None) -> np.ndarray:
    """The reward vector: each item's reward under each pure prototype (N, K)."""
    return prototype_rewards(head, latent, prototypes)


def check_simplex(values: Iterable[float], k: int, what: str, tol: float = 1e-4) -> np.ndarray:
    """K finite non-negative numbers summing to 1 (within tol); ValueError saying what is wrong otherwise."""
    w = np.asarray(list(values), dtype=np.float64)
    if w.shape != (k,):
        raise ValueError(f"{what} must have K={k} entries, got {w.size}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{what} must be finite and non-negative")
    if abs(w.sum() - 1.0) > tol:
        raise ValueError(f"{what} must sum to 1 (a point on the simplex), got {w.sum():.6g}")
    return w / w.sum()


def kmeans_groups(weights: np.ndarray, max_groups: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Groups of users by their weights: k-means (k-means++ starts) for every k in 2..max_groups, keeping the k with
    the best silhouette score on a sample of at most 2000 users; one group when fewer than 4 users or when no
    split reaches a silhouette of 0.5 (Kaufman and Rousseeuw's threshold of a "reasonable" structure: k-means
    splits even a single round blob with silhouettes of ~0.35). Returns (labels (U,), centers (G, K))."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) < 4:
        return np.zeros(len(w), dtype=int), w.mean(axis=0, keepdims=True) if len(w) else np.zeros((0, w.shape[1]))
    rng = np.random.default_rng(seed)
    sample = w if len(w) <= 2000 else w[rng.choice(len(w), 2000, replace=False)]
    best: tuple[float, np.ndarray] | None = None
    for k in range(2, min(max_groups, len(sample) - 1) + 1):
        centers = _kmeans(sample, k, rng)
        score = _silhouette(sample, _assign(sample, centers))
        if best is None or score > best[0]:
            best = (score, centers)
    if best is None or best[0] < 0.5:
        return np.zeros(len(w), dtype=int), w.mean(axis=0, keepdims=True)
    centers = best[1]
    labels = _assign(w, centers)
    # Refit the centres on everyone, dropping any that lost all users.
    keep = np.unique(labels)
    centers = np.stack([w[labels == g].mean(axis=0) for g in keep])
    return _assign(w, centers), centers


def _assign(w: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return ((w[:, None, :] - centers[None]) ** 2).sum(-1).argmin(axis=1)


def _kmeans(w: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    centers = [w[rng.integers(len(w))]]
    for _ in range(1, k):  # k-means++
        d = ((w[:, None, :] - np.stack(centers)[None]) ** 2).sum(-1).min(axis=1)
        centers.append(w[rng.choice(len(w), p=d / d.sum())] if d.sum() > 0 else w[rng.integers(len(w))])
    c = np.stack(centers)
    for _ in range(iters):
        labels = _assign(w, c)
        new = np.stack([w[labels == j].mean(axis=0) if (labels == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c


def _silhouette(w: np.ndarray, labels: np.ndarray) -> float:
    groups = np.unique(labels)
    if len(groups) < 2:
        return -1.0
    d = np.sqrt(((w[:, None, :] - w[None]) ** 2).sum(-1))
    a = np.zeros(len(w))
    b = np.full(len(w), np.inf)
    for g in groups:
        members = labels == g
        mean_d = d[:, members].sum(axis=1) / np.maximum(members.sum() - members.astype(int), 1)
        a = np.where(members, mean_d, a)
        b = np.where(members, b, np.minimum(b, d[:, members].mean(axis=1)))
    s = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
    return float(s.mean())
