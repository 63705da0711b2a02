"""`pal eval --seeds`: one run per seed, then per conversation the mean and a 95% t-interval over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.core.polis_fixture import write_conversation
from training.seeds import t_interval


def test_t_interval_over_seeds() -> None:
    ci = t_interval([0.6, 0.7, 0.8])
    half = 4.302652729911275 * 0.1 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert ci["mean"] == pytest.approx(0.7) and ci["n"] == 3
    assert ci["lo"] == pytest.approx(0.7 - half) and ci["hi"] == pytest.approx(0.7 + half)
    one = t_interval([0.65])
    assert one["lo"] == one["hi"] == one["mean"] == 0.65


def test_eval_with_several_seeds_reports_intervals_per_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.cli import app

    data = tmp_path / "data"
    write_conversation(data, "dense", n_participants=60, n_statements=60, votes_per_participant=40, seed=1)
    write_conversation(data, "tiny", n_participants=27, n_statements=40, votes_per_participant=3)
    monkeypatch.setenv("PAL_DATA_DIR", str(data))
    monkeypatch.setenv("PAL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    args = ["eval", "--preset", "polis", "--k", "2", "--seeds", "0,1", "--shots", "1,5", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1]
    for s in (0, 1):  # every seed keeps its own full report, on the Polis presets' encoder unless told otherwise
        run = json.loads((out / f"seed{s}" / "report.json").read_text())["experiments"][0]
        assert run["experiment"] == "polis/dense" and run["encoder"]["name_or_path"] == "all-mpnet-base-v2"
    conv = report["conversations"]["polis/dense"]
    seen = conv["2"]["seen"]
    assert seen["n"] == 2 and seen["lo"] <= seen["mean"] <= seen["hi"]
    assert seen["mean"] == pytest.approx(np.mean(seen["values"]))
    # the paired difference to K=1, seed by seed
    diff = conv["2"]["minus_k1"]["unseen@5"]
    k1, k2 = conv["1"]["unseen@5"]["values"], conv["2"]["unseen@5"]["values"]
    np.testing.assert_allclose(diff["values"], np.subtract(k2, k1))
    assert set(report["summary"]) == {"1", "2", "served", "hier", "lore"} and report["summary"]["2"]["seen"]["n"] == 2
    # the hierarchical model at zero shots is the global model: same zero-shot accuracy as K=1, seed by seed
    assert conv["hier"]["zero_shot"]["values"] == conv["1"]["zero_shot"]["values"]
    assert [s["experiment"] for s in report["skipped"]["0"]] == ["polis/tiny"]
    assert (out / "fewshot.png").read_bytes()[:4] == b"\x89PNG"
    served = conv["served"]
    # per seed: the served K, or "hier" where validation kept the hierarchical model's deviation
    assert len(served["served_k_per_seed"]) == 2 and set(served["served_k_per_seed"]) <= {1, 2, "hier"}
    gain = served["gain@5"]["values"]  # adaptation's own gain, paired with the same run's zero-shot accuracy
    np.testing.assert_allclose(gain, np.subtract(served["unseen@5"]["values"], served["zero_shot"]["values"]))

    from training.tables import conversation_table, summary_table

    table = conversation_table(report, n=5)
    assert table.count("\n") == 2 and "| dense |" in table
    assert summary_table(report).splitlines()[2].startswith("| K=1 | ")


def test_presets_read_their_own_encoder_unless_one_is_named() -> None:
    from models.config import DEFAULT_ENCODER
    from training.presets import preset_encoder

    assert preset_encoder("polis") == preset_encoder("polis-pairs-joint") == "all-mpnet-base-v2"
    assert preset_encoder("persona") == DEFAULT_ENCODER == "all-MiniLM-L6-v2"
