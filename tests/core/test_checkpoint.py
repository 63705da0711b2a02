"""Checkpoint round trip, version stability, and CheckpointError on damaged directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from models.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint, update_metrics
from models.config import EncoderSpec, PALConfig
from models.pal import PALModel

CFG = PALConfig(form="B", k=3, prompt_dim=8, item_dim=8, latent_dim=4, hidden_dim=16, n_hidden=1)
USERS = ["alice", "bob", "carol", "dave"]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[PALModel, Path]:
    model = PALModel(CFG, n_users=len(USERS), seed=7)
    save_checkpoint(tmp_path / "ck", model, USERS, EncoderSpec(), training={"data": "unit"}, metrics={"acc": 0.5})
    return model, tmp_path / "ck"


def test_round_trip(saved: tuple[PALModel, Path]) -> None:
    model, path = saved
    ckpt = read_checkpoint(path)
    assert ckpt.user_ids == USERS
    assert ckpt.meta.pal == CFG and ckpt.meta.training == {"data": "unit"}
    np.testing.assert_allclose(ckpt.user_logits, model.user_logits.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(ckpt.meta.prior_weights, model.user_weights().mean(0).detach().numpy(), atol=1e-6)
    loaded, _ = load_model(path)
    p, x, y = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    u = torch.tensor([0, 1, 2, 3, 0])
    assert torch.allclose(loaded.margin(p, x, y, u), model.margin(p, x, y, u), atol=1e-5)


def test_version_is_a_stable_content_hash(saved: tuple[PALModel, Path], tmp_path: Path) -> None:
    model, path = saved
    v1 = read_checkpoint(path).meta.version
    assert v1.startswith("pal-")
    save_checkpoint(tmp_path / "again", model, USERS, EncoderSpec(), training={"other": 1})
    assert read_checkpoint(tmp_path / "again").meta.version == v1  # same weights and users -> same version
    update_metrics(path, {"seen_test_accuracy": 0.9})
    after = read_checkpoint(path)
    assert after.meta.version == v1 and after.meta.metrics["seen_test_accuracy"] == 0.9
    with torch.no_grad():
        model.user_logits[0, 0] += 1.0
    save_checkpoint(tmp_path / "changed", model, USERS, EncoderSpec())
    assert read_checkpoint(tmp_path / "changed").meta.version != v1


def _damage(path: Path, how: str) -> None:
    if how == "missing-model":
        (path / "model.safetensors").unlink()
    elif how == "truncated-model":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "bad-json":
        (path / "config.json").write_text("{not json")
    elif how == "wrong-shape":
        head = load_file(str(path / "model.safetensors"))
        head["f.w0"] = np.zeros((3, 3), np.float32)
        save_file(head, str(path / "model.safetensors"))
    elif how == "nan":
        head = load_file(str(path / "model.safetensors"))
        head["f.b0"][0] = np.nan
        save_file(head, str(path / "model.safetensors"))
    elif how == "tampered-logits":
        save_file({"logits": np.zeros((len(USERS), 3), np.float32)}, str(path / "users.safetensors"))
    elif how == "user-count":
        (path / "users.json").write_text(json.dumps(USERS[:2]))
    elif how == "format":
        meta = json.loads((path / "config.json").read_text())
        meta["format"] = "something-else/9"
        (path / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "how",
    ["missing-model", "truncated-model", "bad-json", "wrong-shape", "nan", "tampered-logits", "user-count", "format"],
)
def test_damaged_checkpoint_raises_checkpoint_error(saved: tuple[PALModel, Path], tmp_path: Path, how: str) -> None:
    _, path = saved
    broken = tmp_path / f"broken-{how}"
    shutil.copytree(path, broken)
    _damage(broken, how)
    with pytest.raises(CheckpointError):
        read_checkpoint(broken)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "nope")
