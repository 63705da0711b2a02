"""Few-shot adaptation of unseen users with models.head.fit_user: the numpy code the service's /adapt runs.

Features come from the checkpoint's HeadParams on the cached embeddings; the prior is the checkpoint's
prior_weights (mean seen-user weights). The prior strength is picked on seen users' validation pairs
(fit on their first n training pairs, score on their val pairs), never on unseen users' test pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from models.head import ComparisonFeatures, HeadParams, fit_user, margins
from training.encoded import EncodedComparisons
from training.train import accuracy_of_margins

SHOTS = (1, 2, 5, 10, 20, 50)
PRIOR_STRENGTHS = (0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass(frozen=True)
class FeatureTable:
    """Latents of every unique item (and prompt prototypes of every unique prompt) of one encoded split."""

    enc: EncodedComparisons
    latents: np.ndarray  # (I, D)
    prompt_protos: np.ndarray | None  # (P, K, D), PAL-B only

    @classmethod
    def build(cls, head: HeadParams, enc: EncodedComparisons) -> FeatureTable:
        latents = head.f(enc.item_vecs.astype(np.float64))
        protos = head.prompt_prototypes(enc.prompt_vecs.astype(np.float64)) if head.cfg.form == "B" else None
        return cls(enc, latents, protos)

    def features(self, rows: np.ndarray) -> ComparisonFeatures:
        e = self.enc
        return ComparisonFeatures(
            chosen=self.latents[e.chosen_idx[rows]],
            rejected=self.latents[e.rejected_idx[rows]],
            prompt_prototypes=None if self.prompt_protos is None else self.prompt_protos[e.prompt_idx[rows]],
        )


def fewshot_curve(
    head: HeadParams,
    prior_weights: np.ndarray,
    pool: EncodedComparisons,
    test: EncodedComparisons,
    shots: Sequence[int] = SHOTS,
    prior_strength: float = 1.0,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Mean per-user accuracy on each user's test pairs after fitting on the first n pairs of its pool.

    A user whose pool is shorter than n is fitted on its whole pool (`n_users_with_full_shots` counts those
    with n real shots). Users weigh equally, whatever their number of test pairs.
    """
    pool_t, test_t = FeatureTable.build(head, pool), FeatureTable.build(head, test)
    pool_rows, test_rows = pool.user_rows(), test.user_rows()
    users = sorted(u for u in test_rows if u in pool_rows)
    out: dict[str, dict[str, float]] = {}
    for n in tqdm(shots, desc="few-shot", disable=not progress):
        accs, full = [], 0
        for u in users:
            rows = pool_rows[u][:n]
            full += len(pool_rows[u]) >= n
            fit = fit_user(head, pool_t.features(rows), prior_weights, prior_strength=prior_strength)
            accs.append(accuracy_of_margins(margins(head, test_t.features(test_rows[u]), fit.weights)))
        out[str(n)] = {"accuracy": float(np.mean(accs)), "n_users": len(users), "n_users_with_full_shots": full}
    return out


def zero_shot_accuracy(head: HeadParams, prior_weights: np.ndarray, test: EncodedComparisons) -> float:
    """Accuracy of the population prior itself (no adaptation), averaged per user."""
    t = FeatureTable.build(head, test)
    return float(
        np.mean(
            [
                accuracy_of_margins(margins(head, t.features(r), np.asarray(prior_weights, dtype=np.float64)))
                for r in test.user_rows().values()
            ]
        )
    )


def _validation_users(
    seen_train: EncodedComparisons, seen_val: EncodedComparisons, max_users: int
) -> tuple[EncodedComparisons, EncodedComparisons]:
    """Up to max_users seen users (a fixed draw): their train pairs in a fixed shuffled order (so the first n
    are not special) as the few-shot pools, their val pairs as the test pairs."""
    rows = seen_train.user_rows()
    users = sorted(u for u in seen_val.user_rows() if u in rows)
    users = [users[i] for i in np.random.default_rng(0).permutation(len(users))[:max_users]]
    pool_idx = np.concatenate([np.random.default_rng(i).permutation(rows[u]) for i, u in enumerate(users)])
    val_idx = np.concatenate([seen_val.user_rows()[u] for u in users])
    # A few users' rows: as arrays even when the split's table is memory-mapped (training.shards).
    return seen_train.rows(pool_idx).in_memory(), seen_val.rows(val_idx).in_memory()


def validation_fewshot_score(
    head: HeadParams,
    prior_weights: np.ndarray,
    seen_train: EncodedComparisons,
    seen_val: EncodedComparisons,
    prior_strength: float,
    shots: Sequence[int] = (1, 5, 20),
    max_users: int = 30,
) -> float:
    """Mean few-shot accuracy of seen users on their validation pairs (any K; K=1 has nothing to fit, so this
    is the global model's accuracy on the same users and pairs: the comparison the served model is chosen on)."""
    pool, val = _validation_users(seen_train, seen_val, max_users)
    curve = fewshot_curve(head, prior_weights, pool, val, shots, prior_strength, progress=False)
    return float(np.mean([v["accuracy"] for v in curve.values()]))


def select_prior_strength(
    head: HeadParams,
    prior_weights: np.ndarray,
    seen_train: EncodedComparisons,
    seen_val: EncodedComparisons,
    shots: Sequence[int] = (1, 5, 20),
    grid: Sequence[float] = PRIOR_STRENGTHS,
    max_users: int = 30,
) -> tuple[float, dict[str, float]]:
    """The grid value with the best mean few-shot accuracy on seen users' validation pairs."""
    if head.cfg.k == 1:
        return 1.0, {}  # one prototype: the weights are fixed at 1, the prior has nothing to do
    pool, val = _validation_users(seen_train, seen_val, max_users)
    scores = {}
    for s in grid:
        curve = fewshot_curve(head, prior_weights, pool, val, shots, s, progress=False)
        scores[str(s)] = float(np.mean([v["accuracy"] for v in curve.values()]))
    best = max(grid, key=lambda s: (scores[str(s)], -abs(np.log(s))))
    return float(best), scores
