"""models.head.fit_user recovers a known user's mixture, stays near the prior on little data, is deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from models.config import PALConfig
from models.head import ComparisonFeatures, HeadParams, fit_user, margins

K, D = 3, 8


def known_head(form: str, rng: np.random.Generator) -> HeadParams:
    """Linear f = 3*I; PAL-A prototypes random; PAL-B prompt prototypes fixed directions (g = bias only)."""
    cfg = PALConfig(form=form, k=K, prompt_dim=1, item_dim=D, latent_dim=D, n_hidden=0)
    arrays = {"f.w0": 3.0 * np.eye(D), "f.b0": np.zeros(D)}
    if form == "A":
        arrays["prototypes"] = rng.normal(0, 1 / np.sqrt(D), size=(K, D))
    else:
        arrays["g.w0"] = np.zeros((K, 1, D))
        arrays["g.b0"] = rng.normal(size=(K, D))
        arrays["log_tau"] = np.array(np.log(5.0))
        arrays["tau"] = np.array([5.0])
    return HeadParams(cfg, arrays)


def sample_user(head: HeadParams, w: np.ndarray, n: int, rng: np.random.Generator) -> ComparisonFeatures:
    """n comparisons whose labels are drawn from the BTL model of the known head with weights w."""
    a, b = (head.f(rng.normal(0, 1 / np.sqrt(D), size=(n, D))) for _ in range(2))
    protos = head.prompt_prototypes(np.ones((n, 1))) if head.cfg.form == "B" else None
    m = margins(head, ComparisonFeatures(a, b, protos), w)
    a_wins = rng.random(n) < 1 / (1 + np.exp(-m))
    chosen, rejected = np.where(a_wins[:, None], a, b), np.where(a_wins[:, None], b, a)
    return ComparisonFeatures(chosen, rejected, protos)


@pytest.mark.parametrize("form", ["A", "B"])
@pytest.mark.parametrize("true_w", [[0.7, 0.2, 0.1], [0.05, 0.15, 0.8]])
def test_fit_user_recovers_known_mixture(form: str, true_w: list[float]) -> None:
    rng = np.random.default_rng(0)
    head = known_head(form, rng)
    w = np.asarray(true_w)
    feats = sample_user(head, w, 3000, rng)
    fit = fit_user(head, feats, prior_weights=np.full(K, 1 / K), prior_strength=0.01, max_iter=300)
    assert np.abs(fit.weights - w).sum() < 0.15, (fit.weights, w)
    assert fit.n == 3000 and 0.0 <= fit.confidence <= 1.0
    # a lot of data pins the user down far better than two comparisons do
    few = fit_user(head, ComparisonFeatures(feats.chosen[:2], feats.rejected[:2], _head2(feats)), np.full(K, 1 / K))
    assert fit.confidence > few.confidence


def _head2(feats: ComparisonFeatures) -> np.ndarray | None:
    return None if feats.prompt_prototypes is None else feats.prompt_prototypes[:2]


def test_one_comparison_stays_near_the_prior_and_fit_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    head = known_head("A", rng)
    prior = np.array([0.5, 0.3, 0.2])
    feats = sample_user(head, np.array([0.0, 0.0, 1.0]), 1, rng)
    fit = fit_user(head, feats, prior, prior_strength=1.0)
    assert np.abs(fit.weights - prior).sum() < 0.5
    again = fit_user(head, feats, prior, prior_strength=1.0)
    np.testing.assert_array_equal(fit.logits, again.logits)
    empty = fit_user(head, ComparisonFeatures(feats.chosen[:0], feats.rejected[:0]), prior)
    np.testing.assert_allclose(empty.weights, prior, atol=1e-9)
