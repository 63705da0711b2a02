"""Synthetic preference rows for training tests: two groups of users that disagree on every pair."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Draws one comparison from the generator: (prompt, first, second). Group 0 chooses `first`, group 1 `second`.
Draw = Callable[[np.random.Generator], tuple[str, str, str]]


def disagreeing_rows(
    n_users: int, pairs: int, seed: int, draw: Draw, user_field: str, user_name: Callable[[int], str]
) -> list[dict]:
    """`pairs` comparisons per user, users alternating between group 0 and group 1, in TRL's columns with the user
    first; one generator seeded with `seed` drives every draw, so the same arguments give the same rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        group = u % 2
        for _ in range(pairs):
            prompt, first, second = draw(rng)
            chosen, rejected = (first, second) if group == 0 else (second, first)
            rows.append({user_field: user_name(u), "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
