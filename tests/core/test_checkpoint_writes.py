"""`pal train` and `pal eval` write each checkpoint's config.json once, complete: version, validated prior
strength and every metric (a reader never sees a half-recorded checkpoint, and there is one writer)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from models.checkpoint import read_checkpoint
from training.evaluate import EvalPlan, run_preset
from training.presets import simulated
from training.train import TrainConfig


def test_pal_train_writes_the_config_once(tmp_path: Path, config_writes: Counter[Path]) -> None:
    from training.pipeline import RunOptions, train_one

    out = train_one("simulated", tmp_path / "ckpt", RunOptions(k=2))
    assert config_writes == {tmp_path / "ckpt": 1}
    meta = read_checkpoint(out["checkpoint"]).meta  # version verified against the weights
    assert meta.prior_strength is not None
    assert meta.metrics["seen_test_accuracy"] == out["seen_test_accuracy"]
    assert {"seen_val_accuracy", "prior_strength_val_scores", "seen_val_fewshot_accuracy"} <= set(meta.metrics)


def test_pal_eval_writes_each_config_once(tmp_path: Path, config_writes: Counter[Path]) -> None:
    exp = simulated(seed=0, n_seen_users=8, n_unseen_users=4, train_pairs=40, val_pairs=10, test_pairs=10)
    exp.train = TrainConfig(epochs=5, lr=3e-2, user_lr=0.5, batch_size=128, weight_decay=0.0)
    run_preset([exp], tmp_path, EvalPlan(ks=(1, 2), shots=(1, 5), progress=False))
    assert config_writes == {tmp_path / "k1": 1, tmp_path / "k2": 1, tmp_path / "served": 1}
    for name in ("k1", "k2"):
        meta = read_checkpoint(tmp_path / name).meta
        assert meta.prior_strength is not None and "unseen_fewshot" in meta.metrics
    served = read_checkpoint(tmp_path / "served").meta
    chosen = read_checkpoint(tmp_path / f"k{served.metrics['served_selection']['served_k']}").meta
    assert served.version == chosen.version
    assert {**served.metrics, "served_selection": None} == {**chosen.metrics, "served_selection": None}
