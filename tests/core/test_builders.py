"""Builders are seeded and deterministic; the real-data builders hold out statements and users properly."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data.paths import data_dir
from training.data.persona import PersonaParams, build_persona, group_personas
from training.data.polis import PolisParams, build_polis, conversations, topic
from training.data.schema import SPLITS, Comparison, PreferenceSplits, read_jsonl, write_jsonl
from training.data.simulated import SimulatedParams, build_simulated

TINY_SIM = dict(n_seen_users=6, n_unseen_users=3, train_pairs=20, val_pairs=5, test_pairs=5, pool_pairs=5)
TINY_PERSONA = dict(
    seen_users_per_group=2, unseen_users_per_group=1, train_pairs=10, val_pairs=4, test_pairs=4, pool_pairs=5
)

has_persona = (data_dir() / "anthropic-persona" / "persona").is_dir()
has_polis = bool(conversations())
needs_persona = pytest.mark.skipif(not has_persona, reason=f"persona data absent at {data_dir()} (set PAL_DATA_DIR)")
needs_polis = pytest.mark.skipif(not has_polis, reason=f"polis data absent at {data_dir()} (set PAL_DATA_DIR)")


def comparisons(s: PreferenceSplits) -> list[list[Comparison]]:
    return [getattr(s, name) for name in SPLITS]


def test_simulated_is_deterministic() -> None:
    a, b = build_simulated(SimulatedParams(seed=1, **TINY_SIM)), build_simulated(SimulatedParams(seed=1, **TINY_SIM))
    c = build_simulated(SimulatedParams(seed=2, **TINY_SIM))
    assert comparisons(a.splits) == comparisons(b.splits)
    assert comparisons(a.splits) != comparisons(c.splits)
    assert set(a.splits.seen_users).isdisjoint(a.splits.unseen_users)
    assert len(a.splits.seen_users) == 6 and len(a.splits.unseen_users) == 3


def test_simulated_labels_follow_ideal_points() -> None:
    d = build_simulated(SimulatedParams(seed=0, setting="mixture", **TINY_SIM))
    for c in d.splits.seen_train[:50]:
        ideal = d.user_weights[c.user_id] @ d.prototypes
        d_chosen = float(((d.item_vectors[c.chosen] - ideal) ** 2).sum())
        d_rejected = float(((d.item_vectors[c.rejected] - ideal) ** 2).sum())
        assert d_chosen < d_rejected


def test_jsonl_round_trip(tmp_path: Path) -> None:
    s = build_simulated(SimulatedParams(seed=0, **TINY_SIM)).splits
    s.save(tmp_path / "d")
    back = PreferenceSplits.load(tmp_path / "d")
    assert comparisons(back) == comparisons(s) and back.name == s.name
    write_jsonl(tmp_path / "x.jsonl", [Comparison("u", "p", "a", "b")])
    assert read_jsonl(tmp_path / "x.jsonl") == [Comparison("u", "p", "a", "b")]
    (tmp_path / "bad.jsonl").write_text('{"user_id": "u", "prompt": "p", "chosen": "a"}\n')
    with pytest.raises(ValueError, match="rejected"):
        read_jsonl(tmp_path / "bad.jsonl")


@needs_persona
def test_persona_builder() -> None:
    p = PersonaParams(seed=3, max_statements_per_persona=60, **TINY_PERSONA)
    a, b, c = build_persona(p), build_persona(p), build_persona(PersonaParams(seed=4, **TINY_PERSONA))
    assert comparisons(a) == comparisons(b) and comparisons(a) != comparisons(c)
    groups = group_personas(p)
    assert len(groups) == 3 and len({tuple(g) for g in groups}) == 3
    assert len(a.seen_users) == 6 and len(a.unseen_users) == 3
    assert set(a.seen_users).isdisjoint(a.unseen_users)
    # held-out pairs are made of statements never used for training or adaptation
    train_texts = {t for c in a.seen_train + a.unseen_pool for t in (c.chosen, c.rejected)}
    test_texts = {t for c in a.seen_test + a.unseen_test for t in (c.chosen, c.rejected)}
    assert train_texts.isdisjoint(test_texts)
    assert all(c.prompt == "Is the following statement something you would say?" for c in a.seen_train)
    # groups disagree: statements group 0 prefers are statements group 1 rejects
    chosen_by = {g: {c.chosen for c in a.seen_train if c.user_id.startswith(f"persona-g{g}")} for g in range(3)}
    rejected_by = {g: {c.rejected for c in a.seen_train if c.user_id.startswith(f"persona-g{g}")} for g in range(3)}
    assert chosen_by[0] & rejected_by[1] and chosen_by[1] & rejected_by[0]
    assert not chosen_by[0] & rejected_by[0]  # but a group is consistent with itself


@needs_persona
def test_persona_groups_disagree() -> None:
    # Every pair of default groups takes opposite sides of at least one persona axis.
    groups = group_personas(PersonaParams())
    for i in range(3):
        for j in range(i + 1, 3):
            assert len(set(groups[i]) ^ set(groups[j])) >= 2


@needs_polis
def test_polis_builder() -> None:
    conv = "canadian-electoral-reform" if "canadian-electoral-reform" in conversations() else conversations()[0]
    p = PolisParams(conversation=conv, seed=0, train_pairs=10, pool_pairs=10)
    a, b = build_polis(p), build_polis(p)
    c = build_polis(PolisParams(conversation=conv, seed=1, train_pairs=10, pool_pairs=10))
    assert comparisons(a) == comparisons(b) and comparisons(a) != comparisons(c)
    assert set(a.seen_users).isdisjoint(a.unseen_users) and a.unseen_users
    assert all(u.startswith(f"{conv}/") for u in a.seen_users + a.unseen_users)  # real participant ids
    assert all(c.chosen != c.rejected and c.prompt == topic(conv) for c in a.seen_train)
    train_texts = {t for c in a.seen_train + a.unseen_pool for t in (c.chosen, c.rejected)}
    test_texts = {t for c in a.seen_test + a.unseen_test for t in (c.chosen, c.rejected)}
    assert train_texts.isdisjoint(test_texts)
    assert max(len([c for c in a.seen_train if c.user_id == u]) for u in a.seen_users) <= 10


def test_polis_topic_from_name() -> None:
    assert topic("ssis.land-bank-farmland.2rumnecbeh.2021-08-01").startswith("Ssis: land bank farmland")


@needs_polis
def test_polis_pairs_holdout_keeps_pairs_disjoint() -> None:
    conv = conversations()[0]
    s = build_polis(PolisParams(conversation=conv, holdout="pairs", train_pairs=10, pool_pairs=10))
    key = lambda c: (c.user_id, c.chosen, c.rejected)  # noqa: E731
    train = {key(c) for c in s.seen_train}
    assert train and train.isdisjoint(map(key, s.seen_val)) and train.isdisjoint(map(key, s.seen_test))
    assert {key(c) for c in s.unseen_pool}.isdisjoint(map(key, s.unseen_test))
    assert set(s.seen_users).isdisjoint(s.unseen_users)
