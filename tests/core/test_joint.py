"""`pal eval --preset polis-joint`: one model trained across every conversation, scored per conversation on the
same users and pairs as the per-conversation models."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from models.checkpoint import read_checkpoint
from tests.core.polis_fixture import write_conversation


def test_joint_model_is_trained_once_and_scored_per_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config_writes: Counter[Path]
) -> None:
    from training.data.polis import PolisParams, build_polis
    from training.pipeline import RunOptions, evaluate_preset

    data = tmp_path / "data"
    write_conversation(data, "dense-a", n_participants=50, n_statements=50, votes_per_participant=30, seed=1)
    write_conversation(data, "dense-b", n_participants=40, n_statements=50, votes_per_participant=30, seed=2)
    write_conversation(data, "tiny", n_participants=27, n_statements=40, votes_per_participant=3)
    monkeypatch.setenv("PAL_DATA_DIR", str(data))
    monkeypatch.setenv("PAL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "joint"
    evaluate_preset("polis-joint", out, RunOptions(k=2, shots=(1, 5)))
    report = json.loads((out / "report.json").read_text())
    assert [e["experiment"] for e in report["experiments"]] == ["polis/dense-a", "polis/dense-b"]
    assert [s["experiment"] for s in report["skipped"]] == ["polis/tiny"]
    joint = read_checkpoint(out / "k2")
    a, b = (build_polis(PolisParams(conversation=c)) for c in ("dense-a", "dense-b"))
    assert set(joint.user_ids) == set(a.seen_users) | set(b.seen_users)  # one model, every conversation's users
    for exp, splits in zip(report["experiments"], (a, b), strict=True):
        m = exp["models"]["2"]
        assert m["checkpoint"] == str(out / "k2")
        assert m["unseen_fewshot"]["1"]["n_users"] == len(splits.unseen_users)
        served = exp["models"]["served"]["served_selection"]["served_k"]
        assert read_checkpoint(out / exp["experiment"].replace("/", "_") / "served").meta.pal.k == served
    # Per conversation, a personal deviation on top of the one shared global model, chosen on that conversation's
    # seen users, written as that conversation's own hier checkpoint: the joint K=1 plus its deviation.
    hier_dirs = []
    for exp in report["experiments"]:
        hier, served = exp["models"]["hier"], exp["models"]["served"]
        assert hier["unseen_zero_shot_accuracy"] == exp["models"]["1"]["unseen_zero_shot_accuracy"]
        assert "lore" in exp["models"]
        form = served["served_selection"]["served_form"]
        assert form == ("hier" if "checkpoint" in hier else "pal")
        if "checkpoint" in hier:
            hier_dirs.append(Path(hier["checkpoint"]))
            assert hier_dirs[-1] == out / exp["experiment"].replace("/", "_") / "hier"
            ckpt = read_checkpoint(hier_dirs[-1])
            assert ckpt.deviation is not None and set(ckpt.user_ids) == set(joint.user_ids)
            assert (hier_dirs[-1] / "model.safetensors").read_bytes() == (out / "k1" / "model.safetensors").read_bytes()
    assert hier_dirs, "two opposed groups in each conversation: the deviation is kept somewhere"
    # Each checkpoint's config.json is written once; the joint K=1's twice: before the deviations are fitted on it,
    # and with every data set's numbers; the joint K's once, when those are known.
    served_dirs = [out / e["experiment"].replace("/", "_") / "served" for e in report["experiments"]]
    assert config_writes == {out / "k1": 2, **dict.fromkeys([out / "k2", *served_dirs, *hier_dirs], 1)}
    assert set(joint.meta.metrics["per_data_set"]) == {"polis/dense-a", "polis/dense-b"}
