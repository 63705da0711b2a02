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
    # every checkpoint's config.json written once, the joint ones after every data set's numbers are known
    served_dirs = [out / e["experiment"].replace("/", "_") / "served" for e in report["experiments"]]
    assert config_writes == dict.fromkeys([out / "k1", out / "k2", *served_dirs], 1)
    assert set(joint.meta.metrics["per_data_set"]) == {"polis/dense-a", "polis/dense-b"}
