"""PAL head math: shapes, simplex weights, the reward formulas by hand, and torch == numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import PALConfig
from models.head import ComparisonFeatures, HeadParams, margins, prototype_rewards, reward_a, reward_b, softmax
from models.pal import PALModel, head_state, preference_loss


def numpy_head(model: PALModel) -> HeadParams:
    return HeadParams(model.head.cfg, {k: v.double().numpy() for k, v in head_state(model.head).items()})


@pytest.mark.parametrize("form", ["A", "B"])
def test_shapes_and_simplex(form: str) -> None:
    cfg = PALConfig(form=form, k=4, prompt_dim=6, item_dim=5, latent_dim=3, hidden_dim=7, n_hidden=1)
    model = PALModel(cfg, n_users=9, seed=1)
    w = model.user_weights()
    assert w.shape == (9, 4)
    assert torch.all(w >= 0) and torch.allclose(w.sum(-1), torch.ones(9))
    p, x, y = torch.randn(11, 6), torch.randn(11, 5), torch.randn(11, 5)
    users = torch.arange(11) % 9
    assert model.margin(p, x, y, users).shape == (11,)
    assert model.head.latent(x).shape == (11, 3)
    if form == "B":
        assert model.head.prompt_prototypes(p).shape == (11, 4, 3)
    else:
        assert model.head.ideal_points(w).shape == (9, 3)


def test_reward_b_matches_hand_computation() -> None:
    cfg = PALConfig(form="B", k=2, prompt_dim=3, item_dim=4, latent_dim=2, n_hidden=0, tau_init=5.0)
    head = PALModel(cfg, n_users=1).head
    p, x = torch.randn(1, 3), torch.randn(1, 4)
    w = torch.tensor([[0.3, 0.7]])
    z = x @ head.f.w0 + head.f.b0  # linear f
    g = torch.stack([p @ head.g.w0[j] + head.g.b0[j] for j in range(2)], dim=1)  # (1, 2, D)
    mix = 0.3 * g[:, 0] + 0.7 * g[:, 1]
    expected = 5.0 * (z * mix).sum() / (z.norm() * mix.norm())
    assert torch.allclose(head.reward(p, x, w), expected.reshape(1), atol=1e-5)


def test_reward_a_matches_hand_computation() -> None:
    cfg = PALConfig(form="A", k=3, prompt_dim=1, item_dim=4, latent_dim=4, n_hidden=0)
    head = PALModel(cfg, n_users=1).head
    x = torch.randn(2, 4)
    w = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    ideal = (w @ head.prototypes) @ head.f.w0 + head.f.b0
    z = x @ head.f.w0 + head.f.b0
    expected = -((z - ideal) ** 2).sum(-1)
    assert torch.allclose(head.reward(torch.zeros(2, 1), x, w), expected, atol=1e-5)


@pytest.mark.parametrize("form", ["A", "B"])
def test_torch_and_numpy_heads_agree(form: str) -> None:
    cfg = PALConfig(form=form, k=3, prompt_dim=8, item_dim=8, latent_dim=4, hidden_dim=16, n_hidden=2)
    model = PALModel(cfg, n_users=5, seed=3)
    params = numpy_head(model)
    rng = np.random.default_rng(0)
    p, x, y = (rng.normal(size=(6, 8)) for _ in range(3))
    w = softmax(rng.normal(size=3))
    t = lambda a: torch.from_numpy(a).float()  # noqa: E731
    wt = t(np.broadcast_to(w, (6, 3)).copy())
    torch_m = (model.head.reward(t(p), t(x), wt) - model.head.reward(t(p), t(y), wt)).detach().numpy()
    feats = ComparisonFeatures(
        chosen=params.f(x), rejected=params.f(y), prompt_prototypes=params.prompt_prototypes(p) if form == "B" else None
    )
    np.testing.assert_allclose(margins(params, feats, w), torch_m, rtol=1e-4, atol=1e-4)
    # pure prototypes: one-hot weights reproduce prototype_rewards
    lat = params.f(x)
    pr = prototype_rewards(params, lat, feats.prompt_prototypes)
    for j in range(3):
        onehot = np.broadcast_to(np.eye(3)[j], (6, 3))
        direct = (
            reward_b(lat, feats.prompt_prototypes, onehot, params.tau)
            if form == "B"
            else reward_a(lat, params.ideal_points(np.eye(3)[j][None])[0])
        )
        np.testing.assert_allclose(pr[:, j], direct, rtol=1e-6, atol=1e-9)


def test_tau_is_clamped_and_losses() -> None:
    cfg = PALConfig(form="B", k=2, prompt_dim=2, item_dim=2, latent_dim=2, tau_init=50.0, tau_max=60.0)
    head = PALModel(cfg, n_users=1).head
    with torch.no_grad():
        head.log_tau.fill_(10.0)
    assert float(head.tau.detach()) == pytest.approx(60.0)
    m = torch.tensor([2.0, -1.0])
    assert float(preference_loss(m)) == pytest.approx(float(np.mean(np.log1p(np.exp([-2.0, 1.0])))), rel=1e-6)
    assert float(preference_loss(m, "hinge", 1.0)) == pytest.approx((0.0 + 2.0) / 2)
    with pytest.raises(ValueError):
        preference_loss(m, "nope")
