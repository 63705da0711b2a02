"""The bundle scores exactly like the torch model it was exported from (fp32, CPU), truncation included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.config import pair_text
from models.scorer import Scorer
from tests.scorer.conftest import MAX_LENGTH

LONG = "The committee reviewed every clause of the proposal in detail before the vote. " * 12
PROMPTS = [
    "How do I bake sourdough bread?",
    "How do I bake sourdough bread?",
    LONG + "So what is the final question?",
    "",
    "Explique la photosynthèse en deux phrases, s'il vous plaît ✨",
    "Short.",
]
RESPONSES = [
    "Mix flour, water and starter, let it rise overnight, then bake hot.",
    "Buy bread.",
    "Yes.",
    "An answer to an empty prompt.",
    "Les plantes captent la lumière et fabriquent du sucre.",
    LONG + "In conclusion, the proposal passed.",
]


def _hf_tokenizer(spec):
    from models.encoder import load_tokenizer

    tok = load_tokenizer(spec)
    tok.truncation_side = spec.truncation_side  # as training embeds: the bundle's EncoderSpec decides
    return tok


def _torch_rewards(checkpoint: Path, prompts: list[str], responses: list[str], weights: np.ndarray) -> np.ndarray:
    import torch

    from models.checkpoint import load_model
    from models.encoder import PooledEncoder

    model, ckpt = load_model(checkpoint)
    spec = ckpt.meta.encoder
    encoder = PooledEncoder(spec, attn_implementation="eager")
    tok = _hf_tokenizer(spec)

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tok(texts, truncation=True, max_length=spec.max_length, padding=True, return_tensors="pt")
        return encoder(batch["input_ids"], batch["attention_mask"])

    with torch.no_grad():
        w = torch.from_numpy(weights).float()
        if ckpt.meta.pal.form == "B":
            r = model.head.reward(embed(prompts), embed(responses), w)
        else:
            pairs = embed([pair_text(p, x) for p, x in zip(prompts, responses, strict=True)])
            r = model.head.reward(pairs, pairs, w)
    return r.double().numpy()


def _user_weights(scorer: Scorer, n_items: int) -> list[np.ndarray]:
    """Every seen user plus a few random mixtures, one weight row per item."""
    rng = np.random.default_rng(0)
    users = [np.broadcast_to(w, (n_items, scorer.meta.pal.k)) for w in scorer.seen_users().values()]
    users.append(rng.dirichlet(np.ones(scorer.meta.pal.k), size=n_items))  # a different mixture per item
    return users


@pytest.mark.parametrize("form", ["A", "B"])
def test_rewards_match_torch_model(form: str, bundles: dict[str, Path], scorers: dict[str, Scorer]) -> None:
    scorer = scorers[form]
    enc = scorer.encode(PROMPTS, RESPONSES)
    checkpoint = bundles[form].parent / f"checkpoint-{form}"
    for w in _user_weights(scorer, len(PROMPTS)):
        w = np.ascontiguousarray(w)
        expected = _torch_rewards(checkpoint, PROMPTS, RESPONSES, w)
        got = scorer.rewards(enc, w)
        assert got.shape == (len(PROMPTS),)
        assert np.abs(got - expected).max() < 1e-4, (got, expected)
    # Rewards must depend on the user: otherwise parity across users would prove nothing.
    per_user = np.stack([scorer.rewards(enc, np.ascontiguousarray(w)) for w in _user_weights(scorer, len(PROMPTS))])
    assert per_user.std(0).max() > 1e-3


@pytest.mark.parametrize("form", ["A", "B"])
def test_tokenization_and_truncation_flags_match_hf(form: str, scorers: dict[str, Scorer]) -> None:
    scorer = scorers[form]
    spec = scorer.meta.encoder
    tok = _hf_tokenizer(spec)
    texts = PROMPTS + RESPONSES + [pair_text(p, x) for p, x in zip(PROMPTS, RESPONSES, strict=True)]
    hf_ids = tok(texts, truncation=True, max_length=spec.max_length)["input_ids"]
    assert scorer.token_ids(texts) == hf_ids
    assert scorer.count_tokens(texts) == [len(ids) for ids in hf_ids]

    full = [len(ids) > MAX_LENGTH for ids in tok(texts)["input_ids"]]
    n = len(PROMPTS)
    pairs_of_flags = zip(full[:n], full[n : 2 * n], strict=True)
    expected = [p or x for p, x in pairs_of_flags] if form == "B" else full[2 * n :]
    assert scorer.encode(PROMPTS, RESPONSES).truncated.tolist() == expected
    assert any(expected) and not all(expected)


def test_left_truncation_keeps_the_end(scorers: dict[str, Scorer]) -> None:
    """Default truncation drops the start: two long responses differing only at the start encode identically."""
    scorer = scorers["B"]
    enc = scorer.encode(["q", "q"], ["Alpha beta gamma. " + LONG, "Something else entirely. " + LONG])
    assert enc.truncated.all()
    np.testing.assert_array_equal(enc.latent[0], enc.latent[1])


def test_fp16_graph_is_close_to_fp32(bundles: dict[str, Path], scorers: dict[str, Scorer]) -> None:
    fp16 = Scorer.load(bundles["B"], provider="cpu", precision="fp16", intra_op_threads=1)
    w = np.full(fp16.meta.pal.k, 1 / fp16.meta.pal.k)
    r16 = fp16.rewards(fp16.encode(PROMPTS, RESPONSES), w)
    r32 = scorers["B"].rewards(scorers["B"].encode(PROMPTS, RESPONSES), w)
    assert np.abs(r16 - r32).max() < 0.05 * max(1.0, np.abs(r32).max())
