"""Heterogeneous preferences from Anthropic's persona statements (the PAL paper's Persona set).

Personas come in opposing pairs ("axes"), e.g. politically-liberal vs politically-conservative. A user
group is a set of personas, one side of every axis. A comparison puts a statement that one side of an axis
would say against one that the other side would say; a user prefers the statement of its group's persona.
Groups differ on some axes and agree on none by construction of the defaults, so they genuinely disagree:
a single (K=1) reward model cannot fit all groups at once.

Statements are split into train / val / test pools first, so held-out pairs are made of unseen statements.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from training.data.paths import data_dir, require
from training.data.schema import Comparison, PreferenceSplits

PERSONA_PROMPT = "Is the following statement something you would say?"

DEFAULT_AXES: tuple[tuple[str, str], ...] = (
    ("politically-liberal", "politically-conservative"),
    ("subscribes-to-Atheism", "subscribes-to-Christianity"),
    ("risk-seeking", "risk-averse"),
)
# Each group takes side 0 or 1 of every axis. Every two default groups disagree on two of the three axes.
DEFAULT_SIDES: tuple[tuple[int, ...], ...] = ((0, 0, 0), (1, 1, 0), (0, 1, 1))


@dataclass(frozen=True)
class PersonaParams:
    k_star: int = 3
    axes: tuple[tuple[str, str], ...] = DEFAULT_AXES
    sides: tuple[tuple[int, ...], ...] | None = None  # None: DEFAULT_SIDES for 3 axes, else seeded patterns
    seen_users_per_group: int = 10
    unseen_users_per_group: int = 5
    train_pairs: int = 100
    val_pairs: int = 20
    test_pairs: int = 40
    pool_pairs: int = 50
    unseen_test_pairs: int = 40
    max_statements_per_persona: int = 300
    split_fractions: tuple[float, float] = (0.7, 0.15)  # train, val; test gets the rest
    min_label_confidence: float = 0.9
    flip_prob: float = 0.0
    seed: int = 0


def group_sides(p: PersonaParams) -> list[tuple[int, ...]]:
    if p.sides is not None:
        sides = [tuple(s) for s in p.sides]
    elif p.axes == DEFAULT_AXES and p.k_star <= len(DEFAULT_SIDES):
        sides = list(DEFAULT_SIDES)
    else:
        m = len(p.axes)
        patterns = [tuple((i >> j) & 1 for j in range(m)) for i in range(2**m)]
        order = np.random.default_rng(p.seed).permutation(len(patterns))
        sides = [patterns[i] for i in order]
    if len(set(sides[: p.k_star])) < p.k_star:
        raise ValueError(f"need {p.k_star} distinct groups but {len(p.axes)} axes give only {len(set(sides))}")
    return sides[: p.k_star]


def group_personas(p: PersonaParams) -> list[list[str]]:
    return [[axis[s] for axis, s in zip(p.axes, side, strict=True)] for side in group_sides(p)]


def _yes_statements(name: str, min_conf: float) -> list[str]:
    path = require(data_dir() / "anthropic-persona" / "persona" / f"{name}.jsonl", f"persona file {name!r}")
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["answer_matching_behavior"].strip() == "Yes" and row["label_confidence"] >= min_conf:
                out.append(row["statement"].strip())
    return out


def _statement_pools(p: PersonaParams, rng: np.random.Generator) -> dict[str, list[list[str]]]:
    """persona -> [train, val, test] statement lists; statements found in two files are dropped."""
    names = [n for axis in p.axes for n in axis]
    raw = {n: _yes_statements(n, p.min_label_confidence) for n in names}
    counts: dict[str, int] = {}
    for stmts in raw.values():
        for s in set(stmts):
            counts[s] = counts.get(s, 0) + 1
    pools = {}
    for n in names:
        stmts = sorted({s for s in raw[n] if counts[s] == 1})
        stmts = [stmts[i] for i in rng.permutation(len(stmts))][: p.max_statements_per_persona]
        a = int(len(stmts) * p.split_fractions[0])
        b = a + int(len(stmts) * p.split_fractions[1])
        pools[n] = [stmts[:a], stmts[a:b], stmts[b:]]
    return pools


def build_persona(p: PersonaParams = PersonaParams()) -> PreferenceSplits:
    rng = np.random.default_rng(p.seed)
    pools = _statement_pools(p, rng)
    sides = group_sides(p)

    def pairs(uid: str, side: tuple[int, ...], part: int, n: int) -> list[Comparison]:
        out = []
        for _ in range(n):
            a = int(rng.integers(len(p.axes)))
            mine, other = p.axes[a][side[a]], p.axes[a][1 - side[a]]
            chosen = pools[mine][part][rng.integers(len(pools[mine][part]))]
            rejected = pools[other][part][rng.integers(len(pools[other][part]))]
            if p.flip_prob > 0 and rng.random() < p.flip_prob:
                chosen, rejected = rejected, chosen
            out.append(Comparison(uid, PERSONA_PROMPT, chosen, rejected))
        return out

    info = {"builder": "persona", "params": asdict(p), "groups": group_personas(p)}
    splits = PreferenceSplits("persona", [], [], [], [], [], info)
    users_per_group = p.seen_users_per_group + p.unseen_users_per_group
    for g, side in enumerate(sides):
        for j in range(users_per_group):
            if j < p.seen_users_per_group:
                uid = f"persona-g{g}-seen-{j:03d}"
                splits.seen_train += pairs(uid, side, 0, p.train_pairs)
                splits.seen_val += pairs(uid, side, 1, p.val_pairs)
                splits.seen_test += pairs(uid, side, 2, p.test_pairs)
            else:
                uid = f"persona-g{g}-unseen-{j:03d}"
                splits.unseen_pool += pairs(uid, side, 0, p.pool_pairs)
                splits.unseen_test += pairs(uid, side, 2, p.unseen_test_pairs)
    return splits
