"""Real people's preferences from Polis conversations: a statement a participant agreed with is preferred
over one they disagreed with; the prompt is the conversation's topic.

Two hold-out modes. "statements" (default, the strict one): each conversation's (unmoderated) statements are
split into train / val / test pools, so every held-out pair is made of statements the model never trained on
(a reward model must score new responses). "pairs": a participant's pairs are split, statements are shared
across splits (other participants' votes on a test statement are in training: collaborative filtering).
Whole participants are held out as unseen users in both modes: their few-shot pool and their test pairs are
disjoint (by statement pool, or by pair).
"""

from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from training.data.paths import data_dir, require
from training.data.schema import Comparison, PreferenceSplits


@dataclass(frozen=True)
class PolisParams:
    conversation: str = "canadian-electoral-reform"
    holdout: Literal["statements", "pairs"] = "statements"
    unseen_fraction: float = 0.2
    split_fractions: tuple[float, float] = (0.7, 0.15)  # statements: train, val; test gets the rest
    train_pairs: int = 30  # per seen participant, at most
    val_pairs: int = 20
    test_pairs: int = 20
    pool_pairs: int = 50  # per unseen participant, at most
    unseen_test_pairs: int = 20
    seed: int = 0


def conversations() -> list[str]:
    root = data_dir() / "polis"
    return sorted(d.name for d in root.iterdir() if (d / "participants-votes.csv").is_file()) if root.is_dir() else []


def topic(conversation: str) -> str:
    """The conversation's description in the upstream README if it has one, else a title from its name."""
    readme = data_dir() / "polis" / "UPSTREAM_README.md"
    parts = set(conversation.split("."))
    if readme.is_file():
        for m in re.finditer(r"^\* \*\*([^*]+)\*\*:\s*(.+)$", readme.read_text(encoding="utf-8"), re.M):
            if set(m.group(1).split(".")) <= parts:
                text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", m.group(2)).strip()
                return text.split(". ")[0].rstrip(".") + "."
    # Drop Polis' random ids and dates: "ssis.land-bank-farmland.2rumnecbeh.2021-08-01" -> "Ssis: land bank farmland"
    ids = re.compile(r"^(\d{4}-\d{2}-\d{2}|(?=.*\d)[a-z0-9]{6,})$")
    words = [p.replace("-", " ") for p in conversation.split(".") if not ids.match(p)] or [conversation]
    return words[0].capitalize() + (": " + ", ".join(words[1:]) if words[1:] else "")


def _comments(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8", newline="") as f:
        return {r["comment-id"]: r["comment-body"].strip() for r in csv.DictReader(f) if r["moderated"] != "-1"}


def _votes(path: Path) -> dict[str, dict[str, int]]:
    """participant -> {comment id: +1 / -1} (passes and missing votes dropped)."""
    out: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        cols = [(i, h) for i, h in enumerate(header) if h.isdigit()]
        for row in reader:
            votes = {cid: int(row[i]) for i, cid in cols if i < len(row) and row[i] in ("1", "-1")}
            if votes:
                out[row[0]] = votes
    return out


def _pairs(
    uid: str, prompt: str, votes: dict[str, int], pool: set[str], text: dict[str, str], n: int, rng: np.random.Generator
) -> list[Comparison]:
    """n distinct (agreed, disagreed) pairs of the user within `pool`, seeded; all of them if there are fewer.

    Pairs are drawn by index into the agreed x disagreed grid: heavy voters have tens of thousands of pairs."""
    agreed = sorted(c for c, v in votes.items() if v == 1 and c in pool)
    disagreed = sorted(c for c, v in votes.items() if v == -1 and c in pool)
    total = len(agreed) * len(disagreed)
    picks = rng.choice(total, size=min(n, total), replace=False) if total else []
    return [
        Comparison(uid, prompt, text[agreed[i // len(disagreed)]], text[disagreed[i % len(disagreed)]]) for i in picks
    ]


def _user_splits(
    uid: str,
    prompt: str,
    votes: dict[str, int],
    pools: list[set[str]],
    text: dict[str, str],
    sizes: list[int],
    holdout: str,
    rng: np.random.Generator,
) -> list[list[Comparison]]:
    """One user's comparisons for consecutive splits of the given sizes (at most)."""
    if holdout == "pairs":
        everything = _pairs(uid, prompt, votes, pools[0] | pools[-1], text, sum(sizes), rng)
        out, start = [], 0
        for n in sizes:
            out.append(everything[start : start + n])
            start += len(out[-1])
        return out
    return [_pairs(uid, prompt, votes, pool, text, n, rng) for pool, n in zip(pools, sizes, strict=True)]


def build_polis(p: PolisParams = PolisParams()) -> PreferenceSplits:
    folder = require(data_dir() / "polis" / p.conversation, f"polis conversation {p.conversation!r}")
    text = _comments(folder / "comments.csv")
    votes = _votes(folder / "participants-votes.csv")
    rng = np.random.default_rng(p.seed)
    cids = sorted(text, key=int)
    cids = [cids[i] for i in rng.permutation(len(cids))]
    a = int(len(cids) * p.split_fractions[0])
    b = a + int(len(cids) * p.split_fractions[1])
    train_c, val_c, test_c = set(cids[:a]), set(cids[a:b]), set(cids[b:])
    if p.holdout == "pairs":
        train_c = val_c = test_c = set(cids)
    prompt = topic(p.conversation)
    parts: dict[str, list[Comparison]] = {s: [] for s in ("train", "val", "test", "pool", "utest")}
    participants = sorted(votes, key=int)
    unseen = {participants[i] for i in rng.permutation(len(participants))[: int(len(participants) * p.unseen_fraction)]}
    for pid in participants:
        uid = f"{p.conversation}/{pid}"  # the real participant id, namespaced by conversation
        v = votes[pid]
        if pid in unseen:
            pool, test = _user_splits(
                uid, prompt, v, [train_c, test_c], text, [p.pool_pairs, p.unseen_test_pairs], p.holdout, rng
            )
            if pool and test:  # an unseen user needs something to adapt on and something to score
                parts["pool"] += pool
                parts["utest"] += test
        else:
            train, val, test = _user_splits(
                uid,
                prompt,
                v,
                [train_c, val_c, test_c],
                text,
                [p.train_pairs, p.val_pairs, p.test_pairs],
                p.holdout,
                rng,
            )
            if train:
                parts["train"] += train
                parts["val"] += val
                parts["test"] += test
    return PreferenceSplits(
        name=f"polis/{p.conversation}" + ("" if p.holdout == "statements" else f"/{p.holdout}"),
        seen_train=parts["train"],
        seen_val=parts["val"],
        seen_test=parts["test"],
        unseen_pool=parts["pool"],
        unseen_test=parts["utest"],
        info={"builder": "polis", "params": asdict(p), "topic": prompt},
    )
