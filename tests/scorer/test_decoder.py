"""Decoder-only backbones end to end: tiny random Qwen2- and Llama-style models built here (no hub) -> PAL checkpoint
with last-token pooling -> `pal export` (the Llama one with its weights in a .data file, as graphs over 2 GB are)
-> the scorer and /score, each within 1e-4 of the torch model; left padding in torch changes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from models.config import EncoderSpec, PALConfig
from models.scorer import Scorer
from tests.scorer.decoders import make_tiny_decoder
from tests.scorer.test_parity import PROMPTS, RESPONSES

MAX_LENGTH = 48  # the long texts of PROMPTS/RESPONSES get truncated


def _checkpoint(directory: Path, backbone: Path) -> Path:
    import torch

    from models.checkpoint import save_checkpoint
    from models.pal import PALModel

    spec = EncoderSpec(name_or_path=str(backbone), pooling="last", max_length=MAX_LENGTH)
    cfg = PALConfig(form="B", k=3, prompt_dim=64, item_dim=64, latent_dim=16, hidden_dim=32, n_hidden=1)
    model = PALModel(cfg, n_users=3, seed=0)
    with torch.no_grad():
        model.user_logits.add_(torch.randn(model.user_logits.shape, generator=torch.Generator().manual_seed(1)) * 2)
    save_checkpoint(directory, model, ["user-0", "user-1", "user-2"], spec)
    return directory


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    from training.cli import app

    style = request.param
    root = tmp_path_factory.mktemp(f"decoder-{style}")
    ckpt = _checkpoint(root / "checkpoint", make_tiny_decoder(root / "backbone", style))
    args = ["export", str(ckpt), str(root / "bundle"), "--fp16"]
    if style == "llama":
        args += ["--external-data-mb", "0"]  # weights in model.onnx.data, the layout of graphs past 2 GB
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return style, ckpt, root / "bundle"


def _torch_rewards(ckpt: Path, prompts: list[str], responses: list[str], w: np.ndarray, side: str) -> np.ndarray:
    import torch

    from models.checkpoint import load_model
    from models.encoder import PooledEncoder, load_tokenizer

    model, meta = load_model(ckpt)
    spec = meta.meta.encoder
    encoder = PooledEncoder(spec)
    tok = load_tokenizer(spec)
    tok.truncation_side, tok.padding_side = spec.truncation_side, side

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tok(texts, truncation=True, max_length=spec.max_length, padding=True, return_tensors="pt")
        return encoder(batch["input_ids"], batch["attention_mask"])

    with torch.no_grad():
        weights = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(w, (len(prompts), len(w))))).float()
        return model.head.reward(embed(prompts), embed(responses), weights).double().numpy()


def test_bundle_layout(exported: tuple[str, Path, Path]) -> None:
    style, _, bundle = exported
    scorer = Scorer.load(bundle, provider="cpu", intra_op_threads=1)
    assert scorer.meta.encoder.pooling == "last"
    assert scorer.meta.chat_template and ("<|im_start|>" in scorer.meta.chat_template) == (style == "qwen2")
    assert (bundle / "model.onnx.data").is_file() == (style == "llama")


@pytest.mark.parametrize("side", ["right", "left"])
def test_scorer_matches_torch(exported: tuple[str, Path, Path], side: str) -> None:
    _, ckpt, bundle = exported
    scorer = Scorer.load(bundle, provider="cpu", intra_op_threads=1)
    enc = scorer.encode(PROMPTS, RESPONSES)
    assert enc.truncated.any() and not enc.truncated.all()
    per_user = []
    for w in scorer.seen_users().values():
        got = scorer.rewards(enc, np.ascontiguousarray(np.broadcast_to(w, (len(PROMPTS), 3))))
        expected = _torch_rewards(ckpt, PROMPTS, RESPONSES, np.asarray(w), side)
        assert np.abs(got - expected).max() < 1e-4, (got, expected)
        per_user.append(got)
    assert np.std(per_user, axis=0).max() > 1e-3  # rewards depend on the user, so parity per user means something


def test_fp16_graph_is_close(exported: tuple[str, Path, Path]) -> None:
    _, _, bundle = exported
    s32 = Scorer.load(bundle, provider="cpu", intra_op_threads=1)
    s16 = Scorer.load(bundle, provider="cpu", precision="fp16", intra_op_threads=1)
    w = np.asarray(s32.meta.prior_weights)
    r32 = s32.rewards(s32.encode(PROMPTS, RESPONSES), w)
    r16 = s16.rewards(s16.encode(PROMPTS, RESPONSES), w)
    assert np.abs(r16 - r32).max() < 0.05 * max(1.0, np.abs(r32).max())


@pytest.mark.anyio
async def test_score_endpoint_matches_torch(exported: tuple[str, Path, Path], tmp_path: Path) -> None:
    from tests.support import cpu_settings, running_app

    _, ckpt, bundle = exported
    settings = cpu_settings(bundle, tmp_path / "redis")
    async with running_app(settings) as client:
        items = [{"prompt": p, "response": r, "user_id": "user-1"} for p, r in zip(PROMPTS, RESPONSES, strict=True)]
        resp = await client.post("/score", json={"items": items})
        assert resp.status_code == 200, resp.text
        got = np.array([r["reward"] for r in resp.json()["results"]])
        w = Scorer.load(bundle, provider="cpu", intra_op_threads=1).seen_users()["user-1"]
    expected = _torch_rewards(ckpt, PROMPTS, RESPONSES, np.asarray(w), "right")
    assert np.abs(got - expected).max() < 1e-4


def test_training_renders_messages_as_the_service_does(exported: tuple[str, Path, Path]) -> None:
    """A conversation in a training file becomes the text the service embeds for the same messages."""
    from models.bundle import read_meta
    from models.chat import ChatRenderer
    from models.checkpoint import read_checkpoint
    from training.pipeline import chat_renderer

    _, ckpt, bundle = exported
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    spec = read_checkpoint(ckpt).meta.encoder
    trained = chat_renderer(spec).prompt(messages)
    served = ChatRenderer(template=read_meta(bundle).chat_template).prompt(messages)
    assert trained == served and "What is the capital?" in trained and trained != messages[1]["content"]


def test_trained_on_chat_messages_then_exported_and_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pal train --data FILE --encoder <tiny Qwen2>` (pooling picked from the architecture, messages rendered with
    its ChatML template) -> `pal export` -> the scorer, given the same messages the service gets, matches torch."""
    import json

    from models.chat import ChatRenderer
    from models.checkpoint import read_checkpoint
    from training.cli import app

    monkeypatch.setenv("PAL_CACHE_DIR", str(tmp_path / "cache"))  # embeddings of a throwaway model
    backbone = make_tiny_decoder(tmp_path / "backbone", "qwen2")
    rows = []
    for u in range(6):
        for i in range(8):
            a, b = f"I like option {i}", f"I dislike option {i}"
            good, bad = (a, b) if u % 2 else (b, a)
            msgs = [{"role": "user", "content": f"Question {i}?"}]
            rows.append({"user_id": f"u{u}", "prompt": msgs, "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt, bundle = tmp_path / "ckpt", tmp_path / "bundle"
    for args in (["train", "--data", str(data), "--encoder", str(backbone), "--out", str(ckpt)],
                 ["export", str(ckpt), str(bundle)]):  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    meta = read_checkpoint(ckpt).meta
    assert meta.encoder.pooling == "last" and meta.training["data"]["chat_template"] is True
    trained_prompts = {json.loads(line)["prompt"] for line in (ckpt / "splits" / "seen_train.jsonl").open()}
    assert all(p.startswith("<|im_start|>user\nQuestion") for p in trained_prompts)

    scorer = Scorer.load(bundle, provider="cpu", intra_op_threads=1)
    chat = ChatRenderer(template=scorer.meta.chat_template)  # what the service renders message lists with
    prompts = [chat.prompt([{"role": "user", "content": f"Question {i}?"}]) for i in range(4)]
    assert set(prompts) <= trained_prompts
    responses = [f"I like option {i}" for i in range(4)]
    w = np.asarray(scorer.meta.prior_weights)
    got = scorer.rewards(scorer.encode(prompts, responses), w)
    expected = _torch_rewards(ckpt, prompts, responses, w, "left")
    assert np.abs(got - expected).max() < 1e-4


def test_pad_token_written_as_an_added_token_object(exported: tuple[str, Path, Path], tmp_path: Path) -> None:
    """Older transformers write pad_token as {"content": ...}; the scorer must still pad with that token's id."""
    import json

    from models import bundle as B
    from tests.scorer.factory import copy_bundle

    style, _, bundle = exported
    copy = copy_bundle(bundle, tmp_path / "bundle")
    config = copy / "tokenizer" / "tokenizer_config.json"
    meta = json.loads(config.read_text())
    token = meta["pad_token"]
    config.write_text(json.dumps({**meta, "pad_token": {"__type": "AddedToken", "content": token}}))
    B.seal(copy)  # an edit on purpose: the bundle's version covers its tokenizer files
    scorer = Scorer.load(copy, provider="cpu", intra_op_threads=1)
    assert scorer._pad_id == scorer._tokenizer.token_to_id(token)
    if style == "llama":  # EOS as pad, not id 0 (the fallback, which is BOS there)
        assert token == "<|end_of_text|>" and scorer._pad_id != 0


def test_saved_splits_retrain_with_a_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A splits folder (what `pal train --data FILE` saves, or `pal build-data` writes) trains on a decoder with
    last-token pooling picked from the architecture, keeping the split as saved."""
    from models.checkpoint import read_checkpoint
    from tests.core.test_userfile import synthetic_rows, write_jsonl
    from training.data.userfile import SplitParams, load_preference_splits
    from training.pipeline import RunOptions, train_one

    monkeypatch.setenv("PAL_CACHE_DIR", str(tmp_path / "cache"))
    backbone = make_tiny_decoder(tmp_path / "backbone", "llama")
    splits = load_preference_splits(write_jsonl(tmp_path / "p.jsonl", synthetic_rows(6, 10)), "user", SplitParams())
    splits.save(tmp_path / "splits")
    out = train_one("persona", tmp_path / "ckpt", RunOptions(k=2, encoder=str(backbone)), data=tmp_path / "splits")
    meta = read_checkpoint(out["checkpoint"]).meta
    assert meta.encoder.pooling == "last"
    assert meta.training["data"]["n_seen_train"] == len(splits.seen_train)
