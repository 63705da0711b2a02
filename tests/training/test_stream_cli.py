"""`pal train --data FILE --stream` end to end: cache, ONNX embedding, training from the memory-mapped cache, a
checkpoint that `pal export` accepts; a second run reuses every embedded shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.checkpoint import read_checkpoint
from models.config import EncoderSpec
from training.cli import app
from training.embed import encoder_key


def run_train(args: list[str]) -> dict:
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


@pytest.mark.slow
def test_stream_trains_a_checkpoint_and_reuses_the_cache(tmp_path: Path, prefs_file: Path, encoder_dir: Path,
                                                         monkeypatch) -> None:  # fmt: skip
    monkeypatch.setenv("PAL_CACHE_DIR", str(tmp_path / "cache"))
    # The session's export, where the pipeline looks for it (saves exporting MiniLM a second time).
    shutil.copytree(encoder_dir, tmp_path / "cache" / encoder_key(EncoderSpec()) / "onnx")
    args = ["--data", str(prefs_file), "--stream", "--k", "2", "--provider", "cpu"]
    first = run_train([*args, "--out", str(tmp_path / "ckpt")])
    assert first["data"]["streamed"] and first["data"]["rows"] == 14 * 24
    assert first["embedding"]["embedded"] == first["embedding"]["shards"] >= 1
    assert first["seen_test_accuracy"] > 0.8
    ckpt = read_checkpoint(tmp_path / "ckpt")
    assert ckpt.meta.encoder == EncoderSpec() and ckpt.meta.pal.k == 2
    assert len(ckpt.user_ids) == first["data"]["n_seen_users"] > 0
    again = run_train([*args, "--out", str(tmp_path / "ckpt2")])
    assert again["embedding"]["embedded"] == 0 and again["embedding"]["reused"] == first["embedding"]["shards"]
    assert again["cache"] == first["cache"] and again["val_accuracy"] == first["val_accuracy"]


def test_stream_needs_a_data_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--stream", "--out", str(tmp_path / "ckpt")])
    assert result.exit_code == 1
    assert "--stream needs --data FILE" in result.output
