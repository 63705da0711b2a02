"""Small end-to-end runs: simulated training beats the K=1 baseline clearly, the eval report is written, the
embedding cache is reused, and the small persona model the product demo uses is accurate on unseen users."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import read_checkpoint
from models.config import EncoderSpec
from training.data.paths import data_dir
from training.evaluate import EvalPlan, run_preset
from training.fewshot import PRIOR_STRENGTHS
from training.presets import simulated
from training.train import TrainConfig

SHOTS = (1, 5, 20)


@pytest.fixture(scope="module")
def sim_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    exp = simulated(
        seed=0, n_seen_users=15, n_unseen_users=9, train_pairs=100, val_pairs=30, test_pairs=30, unseen_test_pairs=50
    )
    exp.train = TrainConfig(epochs=60, lr=3e-2, user_lr=0.5, batch_size=128, weight_decay=0.0, patience=15)
    out = tmp_path_factory.mktemp("sim")
    return run_preset([exp], out, EvalPlan(ks=(1, 3), shots=SHOTS, prior_strength=0.3, progress=False)), out


def test_simulated_k3_beats_homogeneous_baseline(sim_report: tuple[dict, Path]) -> None:
    report, _ = sim_report
    k1, k3 = report["summary"]["1"], report["summary"]["3"]
    assert k3["seen_test_accuracy"] >= 0.9
    assert k1["seen_test_accuracy"] <= 0.85
    assert k3["unseen_fewshot_accuracy"]["20"] >= 0.88
    assert k3["unseen_fewshot_accuracy"]["20"] > k3["unseen_fewshot_accuracy"]["1"]
    for n in SHOTS:  # population prior: adapting never costs much against the single global model
        assert k3["unseen_fewshot_accuracy"][str(n)] >= k1["unseen_fewshot_accuracy"][str(n)] - 0.03


def test_eval_writes_report_plot_and_checkpoints(sim_report: tuple[dict, Path]) -> None:
    report, out = sim_report
    assert json.loads((out / "report.json").read_text())["summary"] == report["summary"]
    assert (out / "fewshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = read_checkpoint(out / "k3")
    assert ckpt.meta.encoder.kind == "table" and ckpt.meta.pal.k == 3 and len(ckpt.user_ids) == 15
    assert ckpt.meta.metrics["seen_test_accuracy"] == report["summary"]["3"]["seen_test_accuracy"]
    assert ckpt.meta.training["data"]["n_seen_users"] == 15
    # Training itself records the validated few-shot prior strength: the value the service fits users with.
    assert ckpt.meta.prior_strength in PRIOR_STRENGTHS
    scores = ckpt.meta.metrics["prior_strength_val_scores"]
    assert scores[str(ckpt.meta.prior_strength)] == max(scores.values())
    # the population prior is the mean of the seen users' weights
    np.testing.assert_allclose(ckpt.meta.prior_weights, np.mean(list(ckpt.user_weights().values()), 0), atol=1e-5)


def test_embedding_cache_is_reused(tmp_path: Path) -> None:
    from training.embed import CachedEncoder

    texts = ["a short one", "another, somewhat longer, sentence about voting", "a short one"]
    first = CachedEncoder(EncoderSpec(), cache_dir=tmp_path)
    v = first.embed(texts)
    assert v.shape == (3, 384) and np.allclose(v[0], v[2])
    assert first._tokenizer.truncation_side == "left"
    second = CachedEncoder(EncoderSpec(), cache_dir=tmp_path)
    np.testing.assert_array_equal(second.embed(texts), v)
    assert second._model is None  # served from disk, the encoder was never loaded
    other = CachedEncoder(EncoderSpec(pooling="cls"), cache_dir=tmp_path)
    assert other.dir != first.dir  # a different pooling never reuses vectors


@pytest.mark.skipif(
    not (data_dir() / "anthropic-persona" / "persona").is_dir(), reason=f"persona data absent at {data_dir()}"
)
def test_small_persona_model_adapts_to_unseen_users(tmp_path: Path) -> None:
    from models.head import fit_user, margins
    from training.embed import CachedEncoder
    from training.encoded import encode
    from training.fewshot import FeatureTable
    from training.pipeline import train_small_persona, unseen_user_comparisons
    from training.train import accuracy_of_margins

    ckpt_dir = train_small_persona(tmp_path / "persona")
    ckpt = read_checkpoint(ckpt_dir)
    assert ckpt.meta.metrics["seen_test_accuracy"] >= 0.9
    users = unseen_user_comparisons()
    assert users and set(users).isdisjoint(ckpt.user_ids)
    emb = CachedEncoder(ckpt.meta.encoder)
    head = ckpt.head_params
    accs = []
    for pool, test in users.values():
        fit = fit_user(
            head,
            FeatureTable.build(head, encode(pool[:10], emb, "B")).features(np.arange(10)),
            np.asarray(ckpt.meta.prior_weights),
            prior_strength=ckpt.meta.prior_strength,
        )
        t = FeatureTable.build(head, encode(test, emb, "B"))
        accs.append(accuracy_of_margins(margins(head, t.features(np.arange(len(test))), fit.weights)))
    assert np.mean(accs) >= 0.85


def test_prior_strength_is_picked_on_seen_validation(sim_report: tuple[dict, Path]) -> None:
    from training.evaluate import encode_splits
    from training.fewshot import select_prior_strength

    _, out = sim_report
    exp = simulated(
        seed=0, n_seen_users=15, n_unseen_users=9, train_pairs=100, val_pairs=30, test_pairs=30, unseen_test_pairs=50
    )
    encs = encode_splits(exp)
    ckpt = read_checkpoint(out / "k3")
    best, scores = select_prior_strength(
        ckpt.head_params, np.asarray(ckpt.meta.prior_weights), encs["seen_train"], encs["seen_val"], (1, 5), (0.1, 10.0)
    )
    assert set(scores) == {"0.1", "10.0"} and all(0.5 < v <= 1.0 for v in scores.values())
    assert scores[str(best)] == max(scores.values())
