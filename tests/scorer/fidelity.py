"""Bundles carrying a validation sample whose decisions bf16 keeps all of (clear pairs) or visibly not (near ties),
for the tests of the precision chosen by measured fidelity (models/precision.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models import bundle as B
from models import validation_sample
from models.scorer import Scorer
from models.validation_sample import ValidationPair
from tests.scorer.factory import copy_bundle

PROMPT = "Write one sentence."
USER = "user-0"
_SUBJECTS = ["The cat", "A river", "My neighbour", "The old train", "This recipe", "Our team", "The museum",
             "A small bird", "The city council", "That song"]  # fmt: skip
_VERBS = ["sleeps near", "flows past", "talks about", "waits for"]
_OBJECTS = ["the window", "a quiet valley", "the morning news", "an empty station", "fresh basil"]
RESPONSES = [f"{s} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS]  # 200 sentences


def ranked_responses(scorer: Scorer) -> list[str]:
    """RESPONSES by USER's fp32 reward, lowest first."""
    enc = scorer.encode([PROMPT] * len(RESPONSES), RESPONSES)
    rewards = scorer.rewards(enc, scorer.seen_users()[USER])
    return [RESPONSES[i] for i in np.argsort(rewards)]


def near_ties(scorer: Scorer) -> list[ValidationPair]:
    """Each response against the next one up in reward: gaps of ~1/200 of the range, below bf16's rounding."""
    ranked = ranked_responses(scorer)
    return [ValidationPair(USER, PROMPT, hi, lo) for lo, hi in zip(ranked, ranked[1:], strict=False)]


def clear_pairs(scorer: Scorer, n: int = 60) -> list[ValidationPair]:
    """The best responses against the worst: gaps of most of the range, which no rounding flips."""
    ranked = ranked_responses(scorer)
    return [ValidationPair(USER, PROMPT, ranked[-1 - i], ranked[i]) for i in range(n)]


def with_sample(bundle: Path, dest: Path, pairs: list[ValidationPair]) -> Path:
    """A copy of `bundle` carrying `pairs` as its validation sample, re-sealed (a new version)."""
    copy_bundle(bundle, dest)
    validation_sample.write(dest, pairs)
    B.seal(dest)
    return dest
