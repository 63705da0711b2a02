"""The served model form: K > 1 warm-started from the global K=1 model starts exactly at the global reward, and
`pal eval` serves K > 1 only where validation data says it beats K=1, else the K=1 checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import read_checkpoint, save_checkpoint
from models.config import EncoderSpec, PALConfig
from models.pal import PALModel
from training.evaluate import choose_served
from training.train import warm_start


@pytest.mark.parametrize("form", ["A", "B"])
def test_warm_start_from_k1_gives_the_global_reward_for_every_mixture(form: str) -> None:
    cfg1 = PALConfig(form=form, k=1, prompt_dim=5, item_dim=6, latent_dim=4, hidden_dim=8, n_hidden=1)
    global_model, model = PALModel(cfg1, n_users=2, seed=0), PALModel(cfg1.model_copy(update={"k": 3}), 4, seed=1)
    warm_start(model, global_model, noise=0.0, seed=0)
    gen = torch.Generator().manual_seed(0)
    prompt, item = torch.randn(10, 5, generator=gen), torch.randn(10, 6, generator=gen)
    weights = torch.softmax(torch.randn(10, 3, generator=gen), -1)
    with torch.no_grad():
        expected = global_model.head.reward(prompt, item, torch.ones(10, 1))
        torch.testing.assert_close(model.head.reward(prompt, item, weights), expected)
        warm_start(model, global_model, noise=0.05, seed=0)  # noise breaks the tie between prototypes
        assert not torch.allclose(model.head.reward(prompt, item, weights), expected)


def _checkpoint(path: Path, k: int) -> str:
    cfg = PALConfig(form="B", k=k, prompt_dim=5, item_dim=6, latent_dim=4, hidden_dim=8, n_hidden=1)
    save_checkpoint(path, PALModel(cfg, n_users=2), ["a", "b"], EncoderSpec())
    return str(path)


def _models(tmp_path: Path, k3_seen: float, k3_fewshot: float) -> dict[str, dict]:
    return {
        "1": {
            "checkpoint": _checkpoint(tmp_path / "k1", 1),
            "seen_val_accuracy": 0.62,
            "seen_val_fewshot_accuracy": 0.6,
        },
        "3": {
            "checkpoint": _checkpoint(tmp_path / "k3", 3),
            "seen_val_accuracy": k3_seen,
            "seen_val_fewshot_accuracy": k3_fewshot,
        },
    }


@pytest.mark.parametrize(
    ("k3_seen", "k3_fewshot", "served_k"),
    [(0.70, 0.65, 3), (0.70, 0.59, 1), (0.61, 0.65, 1), (0.62, 0.6, 1)],  # better on both, worse on one, tie
)
def test_served_model_is_k_only_where_it_beats_k1_on_validation(
    tmp_path: Path, k3_seen: float, k3_fewshot: float, served_k: int
) -> None:
    models = _models(tmp_path, k3_seen, k3_fewshot)
    served = choose_served(models, tmp_path)
    assert served["served_selection"]["served_k"] == served_k
    ckpt = read_checkpoint(tmp_path / "served")  # a normal checkpoint: `pal export` and the service take it as is
    assert ckpt.meta.pal.k == served_k
    assert ckpt.meta.version == read_checkpoint(models[str(served_k)]["checkpoint"]).meta.version
    assert ckpt.meta.metrics["served_selection"]["served_k"] == served_k
    assert np.isclose(sum(ckpt.meta.prior_weights), 1.0)


def _hier_checkpoint(tmp_path: Path, best_epoch: int) -> tuple[str, dict]:
    """A kept (or not) hier model of a K=1 checkpoint on two opposed groups, as `pal eval` measures and writes it."""
    from tests.core.test_hierarchical import D, two_groups
    from training.hierarchical import measure_deviation, served_hier_checkpoint

    cfg = PALConfig(form="B", k=1, prompt_dim=1, item_dim=D, latent_dim=4, hidden_dim=8, n_hidden=1)
    save_checkpoint(tmp_path / "k1", PALModel(cfg, n_users=2), ["a0", "b0"], EncoderSpec())
    _, encs = two_groups()
    head = read_checkpoint(tmp_path / "k1").head_params
    measured, model = measure_deviation(head, encs, use_global=True, shots=(5,))
    assert measured["best_epoch"] > 0  # the groups disagree along a direction the global model cannot see
    if best_epoch == 0:  # as measure_deviation reports a deviation it did not keep
        measured = {**measured, "best_epoch": 0}
    written = served_hier_checkpoint(tmp_path / "k1", model, measured, tmp_path / "hier")
    if written is not None:
        measured["checkpoint"] = str(written)
    return str(tmp_path / "k1"), measured


def test_served_model_is_hier_where_its_deviation_was_kept(tmp_path: Path) -> None:
    k1, hier = _hier_checkpoint(tmp_path, best_epoch=5)
    ckpt = read_checkpoint(hier["checkpoint"])  # the K=1 head plus the trained deviation, its own version
    assert ckpt.deviation is not None and ckpt.meta.deviation_rank == 2 and ckpt.meta.pal.k == 1
    assert ckpt.deviation.basis.shape == (2, 8) and ckpt.meta.version != read_checkpoint(k1).meta.version
    np.testing.assert_allclose(1 / np.sqrt(ckpt.deviation.precision), hier["prior_sigma"], rtol=1e-5)
    models = {"1": {"checkpoint": k1, "seen_val_accuracy": 0.6, "seen_val_fewshot_accuracy": 0.6}, "hier": hier}
    models["3"] = {
        "checkpoint": _checkpoint(tmp_path / "k3", 3),
        "seen_val_accuracy": 0.9,
        "seen_val_fewshot_accuracy": 0.9,
    }
    served = choose_served(models, tmp_path)
    assert served["served_selection"]["served_form"] == "hier" and served["served_selection"]["served_k"] == 1
    out = read_checkpoint(tmp_path / "served")
    assert out.meta.version == ckpt.meta.version and out.meta.metrics["served_selection"]["served_form"] == "hier"
    np.testing.assert_array_equal(out.deviation.basis, ckpt.deviation.basis)


def test_hier_whose_deviation_was_not_kept_is_not_written_nor_served(tmp_path: Path) -> None:
    k1, hier = _hier_checkpoint(tmp_path, best_epoch=0)
    assert "checkpoint" not in hier and not (tmp_path / "hier").exists()
    models = {"1": {"checkpoint": k1, "seen_val_accuracy": 0.6, "seen_val_fewshot_accuracy": 0.6}, "hier": hier}
    # A K=3 the single validation pool prefers does not overrule hier's cross-validated answer (the global model).
    k3 = {"checkpoint": _checkpoint(tmp_path / "k3", 3), "seen_val_accuracy": 0.9, "seen_val_fewshot_accuracy": 0.9}
    served = choose_served({**models, "3": k3}, tmp_path)
    assert served["served_selection"]["served_form"] == "pal" and served["served_selection"]["served_k"] == 1
    assert read_checkpoint(tmp_path / "served").deviation is None
    assert read_checkpoint(tmp_path / "served").meta.pal.k == 1


def test_fit_hier_is_the_eval_fitter_and_its_confidence_grows_with_comparisons() -> None:
    """/adapt's fit_hier on encoded comparisons gives the weights `pal eval` fits (DeviationModel.fit) on the same
    pairs; its confidence is 0 at the prior and grows with the comparisons."""
    from models.deviation import Deviation, fit_hier
    from models.head import ComparisonFeatures
    from tests.core.test_hierarchical import two_groups
    from training.hierarchical import Pairs, train_deviation

    head, encs = two_groups()
    p = {s: Pairs.build(head, e, True) for s, e in encs.items()}
    model = train_deviation(p["seen_train"], p["seen_val"], use_global=True)
    dev = Deviation(model.basis, model.prior_mean, model.precision, np.zeros((0, len(model.prior_mean))))
    pool = encs["unseen_pool"]
    rows = pool.user_rows()["au0"]
    e = pool.item_vecs
    confidences = []
    for n in (0, 2, 20):
        r = rows[:n]
        chosen, rejected = e[pool.chosen_idx[r]], e[pool.rejected_idx[r]]
        protos = head.prompt_prototypes(pool.prompt_vecs[pool.prompt_idx[r]])
        feats = ComparisonFeatures(head.f(chosen), head.f(rejected), protos, (chosen - rejected) @ model.basis.T)
        fit = fit_hier(head, dev, feats, model.prior_mean)
        np.testing.assert_allclose(fit.weights, model.fit(p["unseen_pool"], r), rtol=1e-9, atol=1e-12)
        confidences.append(fit.confidence)
    assert confidences[0] == 0.0 and 0.0 < confidences[1] < confidences[2] < 1.0
