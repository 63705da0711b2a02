"""Dedup, cache and token-budget batching change the work done, never the results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.scorer import Scorer, _padded_widths, _token_budget_batches

# A GRPO-like group: 3 prompts x 4 responses, varied lengths, one response shared across prompts.
_GROUP_PROMPTS = ["Name a prime.", "Summarise the plot of Hamlet in detail. " * 3, "Why is the sky blue?"]
PROMPTS = [p for p in _GROUP_PROMPTS for _ in range(4)]
RESPONSES = [f"Answer {i}: " + "words " * (3 + 7 * i) for i in range(11)] + ["Answer 0: " + "words " * 3]


def _same(a, b) -> None:
    np.testing.assert_allclose(a.latent, b.latent, atol=1e-5, rtol=0)
    if a.prompt_prototypes is not None:
        np.testing.assert_allclose(a.prompt_prototypes, b.prompt_prototypes, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(a.truncated, b.truncated)


@pytest.mark.parametrize("form", ["A", "B"])
def test_dedup_and_cache_hits(form: str, bundles: dict[str, Path]) -> None:
    scorer = Scorer.load(bundles[form], provider="cpu", intra_op_threads=1)
    first = scorer.encode(PROMPTS, RESPONSES)
    stats = scorer.cache_stats()
    pairs = set(zip(PROMPTS, RESPONSES, strict=True))
    distinct = len(set(PROMPTS)) + len(set(RESPONSES)) if form == "B" else len(pairs)
    assert stats["misses"] == distinct and stats["hits"] == 0
    assert stats["encoded"] == (len(set(PROMPTS) | set(RESPONSES)) if form == "B" else distinct)
    assert stats["deduplicated"] == (2 * len(PROMPTS) if form == "B" else len(PROMPTS)) - distinct

    second = scorer.encode(PROMPTS, RESPONSES)
    after = scorer.cache_stats()
    assert after["hits"] == distinct and after["misses"] == distinct and after["encoded"] == stats["encoded"]
    _same(first, second)
    np.testing.assert_array_equal(first.latent, second.latent)  # cached values are returned as computed

    uncached = Scorer.load(bundles[form], provider="cpu", intra_op_threads=1, cache_size=0)
    _same(uncached.encode(PROMPTS, RESPONSES), first)
    assert uncached.cache_stats()["size"] == 0
    # Encoding items one at a time (no dedup, batches of one) gives the same outputs as the grouped call.
    singles = [uncached.encode([p], [r]) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    np.testing.assert_allclose(np.concatenate([s.latent for s in singles]), first.latent, atol=1e-5, rtol=0)


def test_cache_is_lru_and_bounded(bundles: dict[str, Path]) -> None:
    scorer = Scorer.load(bundles["A"], provider="cpu", intra_op_threads=1, cache_size=2)
    scorer.encode(["p"] * 3, ["a", "b", "c"])
    assert scorer.cache_stats()["size"] == 2
    scorer.encode(["p"], ["c"])  # most recent: still cached
    assert scorer.cache_stats()["hits"] == 1
    scorer.encode(["p"], ["a"])  # evicted first
    assert scorer.cache_stats()["hits"] == 1


@pytest.mark.parametrize("form", ["A", "B"])
def test_forget_drops_exactly_those_pairs(form: str, bundles: dict[str, Path]) -> None:
    scorer = Scorer.load(bundles[form], provider="cpu", intra_op_threads=1)
    scorer.encode(PROMPTS, RESPONSES)
    size = scorer.cache_stats()["size"]
    # PAL-B caches a prompt and a response entry per pair, PAL-A one entry per joined pair.
    assert scorer.forget([PROMPTS[0]], [RESPONSES[0]]) == (2 if form == "B" else 1)
    assert scorer.forget([PROMPTS[0]], [RESPONSES[0]]) == 0
    assert scorer.cache_stats()["size"] == size - (2 if form == "B" else 1)
    misses = scorer.cache_stats()["misses"]
    scorer.encode(PROMPTS, RESPONSES)  # only the forgotten entries are encoded again
    assert scorer.cache_stats()["misses"] - misses == (2 if form == "B" else 1)


@pytest.mark.parametrize(("budget", "tolerance"), [(32, None), (100, None), (300, None), (16384, 0), (16384, 8)])
def test_results_do_not_depend_on_the_token_budget(
    budget: int, tolerance: int | None, bundles: dict[str, Path], scorers
) -> None:
    small = Scorer.load(
        bundles["B"], provider="cpu", intra_op_threads=1, max_batch_tokens=budget, pad_tolerance=tolerance
    )
    got = small.encode(PROMPTS, RESPONSES)
    _same(got, scorers["B"].encode(PROMPTS, RESPONSES))
    assert small.cache_stats()["batches"] > 1  # the budget or the tolerance really split the work


def test_widths_rounded_up_change_shapes_not_results(bundles: dict[str, Path], scorers) -> None:
    rounded = Scorer.load(bundles["B"], provider="cpu", intra_op_threads=1)
    rounded.width_multiple = 16  # OpenVINO's default, here on the CPU provider so it runs everywhere
    widths: list[int] = []
    run = rounded._run
    rounded._run = lambda ids, mask: widths.append(ids.shape[1]) or run(ids, mask)  # type: ignore[method-assign]
    _same(rounded.encode(PROMPTS, RESPONSES), scorers["B"].encode(PROMPTS, RESPONSES))
    max_length = rounded.meta.encoder.max_length
    assert widths and all(w % 16 == 0 or w == max_length for w in widths), widths


def test_padded_widths_round_up_but_never_past_max_length() -> None:
    lengths = np.array([1, 15, 16, 17, 120, 126, 127, 130])
    np.testing.assert_array_equal(_padded_widths(lengths, 16, 127), [16, 16, 16, 32, 127, 127, 127, 130])
    np.testing.assert_array_equal(_padded_widths(lengths, 1, 127), lengths)


def test_spinning_threads_change_speed_not_results(bundles: dict[str, Path], scorers) -> None:
    spinning = Scorer.load(bundles["B"], provider="cpu", intra_op_threads=2, spinning=True)
    _same(spinning.encode(PROMPTS, RESPONSES), scorers["B"].encode(PROMPTS, RESPONSES))


def test_cpu_scorer_defaults_to_small_batches_of_similar_lengths(scorers) -> None:
    assert scorers["B"].max_batch_tokens == 1024 and scorers["B"].pad_tolerance == 8


def test_token_budget_batches_respect_the_budget() -> None:
    rng = np.random.default_rng(1)
    lengths = np.sort(rng.integers(3, 257, size=500))[::-1]
    for budget in (1, 64, 1000, 16384):
        batches = _token_budget_batches(lengths, budget)
        np.testing.assert_array_equal(np.concatenate(batches), np.arange(len(lengths)))
        for b in batches:
            assert len(b) == 1 or len(b) * lengths[b].max() <= budget


@pytest.mark.parametrize("tolerance", [0, 3, 8, 40])
def test_pad_tolerance_bounds_the_padding_of_every_row(tolerance: int) -> None:
    rng = np.random.default_rng(2)
    lengths = np.sort(rng.integers(3, 257, size=500))[::-1]
    batches = _token_budget_batches(lengths, 4096, tolerance)
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(len(lengths)))
    for b in batches:
        assert lengths[b].max() - lengths[b].min() <= tolerance
        assert len(b) == 1 or len(b) * lengths[b].max() <= 4096
    # Maximal: the next batch's first row would have broken the tolerance or the budget of the one before.
    for prev, nxt in zip(batches, batches[1:], strict=False):
        width = lengths[prev[0]]
        assert width - lengths[nxt[0]] > tolerance or (len(prev) + 1) * width > 4096


def test_rewards_broadcast_and_validate(scorers) -> None:
    scorer = scorers["B"]
    enc = scorer.encode(PROMPTS[:3], RESPONSES[:3])
    w = np.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(scorer.rewards(enc, w), scorer.rewards(enc, np.tile(w, (3, 1))))
    protos = scorer.prototype_rewards(enc)
    assert protos.shape == (3, 3)
    np.testing.assert_allclose(protos[:, 1], scorer.rewards(enc, np.array([0.0, 1.0, 0.0])))
    with pytest.raises(ValueError, match="shape"):
        scorer.rewards(enc, np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="NaN"):
        scorer.rewards(enc, np.array([np.nan, 0.5, 0.5]))
    with pytest.raises(ValueError, match="prompts"):
        scorer.encode(["a"], ["b", "c"])
    with pytest.raises(TypeError):
        scorer.encode([None], ["b"])  # type: ignore[list-item]


def test_empty_and_odd_inputs(scorers) -> None:
    for scorer in scorers.values():
        enc = scorer.encode([], [])
        assert len(enc) == 0 and scorer.rewards(enc, np.zeros((0, 3))).shape == (0,)
        odd = scorer.encode(["", "bad \ud800 surrogate"], ["", "x"])
        assert np.isfinite(odd.latent).all()


@pytest.mark.parametrize("form", ["A", "B"])
def test_features_feed_the_fitter(form: str, scorers) -> None:
    from models.head import fit_user, margins

    scorer = scorers[form]
    prompts, chosen, rejected = PROMPTS[:4], RESPONSES[:4], RESPONSES[4:8]
    feats = scorer.features(prompts, chosen, rejected)
    assert len(feats) == 4
    w = np.array(scorer.meta.prior_weights)
    enc_c, enc_r = scorer.encode(prompts, chosen), scorer.encode(prompts, rejected)
    np.testing.assert_allclose(margins(scorer.head, feats, w), scorer.rewards(enc_c, w) - scorer.rewards(enc_r, w))
    assert fit_user(scorer.head, feats, w).n == 4


def test_concurrent_encodes_agree(bundles: dict[str, Path], scorers) -> None:
    """Many threads sharing one scorer (as the service does) get the same outputs as one thread alone."""
    from concurrent.futures import ThreadPoolExecutor

    scorer = Scorer.load(bundles["B"], provider="cpu", intra_op_threads=1, max_batch_tokens=256, cache_size=8)
    expected = scorers["B"].encode(PROMPTS, RESPONSES)
    slices = [slice(i, i + 4) for i in range(0, len(PROMPTS), 2)] * 2
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda s: (s, scorer.encode(PROMPTS[s], RESPONSES[s])), slices))
    for s, enc in outs:
        np.testing.assert_allclose(enc.latent, expected.latent[s], atol=1e-5, rtol=0)
        np.testing.assert_allclose(enc.prompt_prototypes, expected.prompt_prototypes[s], atol=1e-5, rtol=0)
    assert scorer.cache_stats()["size"] <= 8
