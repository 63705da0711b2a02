"""A conversation too small to split is reported and skipped; the other conversations are still evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.core.polis_fixture import write_conversation
from training.data.polis import PolisParams, build_polis


@pytest.fixture()
def polis_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    # 27 participants, 40 statements, 3 votes each: most splits come out empty.
    write_conversation(data, "tiny", n_participants=27, n_statements=40, votes_per_participant=3)
    write_conversation(data, "dense", n_participants=60, n_statements=60, votes_per_participant=40, seed=1)
    monkeypatch.setenv("PAL_DATA_DIR", str(data))
    monkeypatch.setenv("PAL_CACHE_DIR", str(tmp_path / "cache"))
    return data


def test_split_problems_names_the_empty_splits(polis_dir: Path) -> None:
    from training.evaluate import split_problems

    tiny = build_polis(PolisParams(conversation="tiny"))
    problems = split_problems(tiny)
    assert problems and any("unseen" in p for p in problems), problems
    assert split_problems(build_polis(PolisParams(conversation="dense"))) == []


def test_eval_skips_a_conversation_too_small_to_split(polis_dir: Path, tmp_path: Path) -> None:
    from training.pipeline import RunOptions, evaluate_preset

    out = tmp_path / "eval"
    evaluate_preset("polis", out, RunOptions(k=2, shots=(1, 5)))
    report = json.loads((out / "report.json").read_text())
    assert [e["experiment"] for e in report["experiments"]] == ["polis/dense"]
    assert [s["experiment"] for s in report["skipped"]] == ["polis/tiny"]
    assert report["skipped"][0]["reasons"] and all(isinstance(r, str) for r in report["skipped"][0]["reasons"])
    dense = report["experiments"][0]["models"]
    assert set(dense) == {"1", "2", "served", "hier", "lore"} and 0.0 <= dense["2"]["seen_test_accuracy"] <= 1.0
    assert report["summary"]["2"]["unseen_fewshot_accuracy"]["5"] == dense["2"]["unseen_fewshot"]["5"]["accuracy"]
