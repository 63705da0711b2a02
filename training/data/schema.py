"""One pairwise comparison per record (TRL's preference columns plus `user_id`) and the split structure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("seen_train", "seen_val", "seen_test", "unseen_pool", "unseen_test")


@dataclass(frozen=True)
class Comparison:
    user_id: str
    prompt: str
    chosen: str
    rejected: str


def write_jsonl(path: str | Path, comparisons: list[Comparison]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for c in comparisons:
            f.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[Comparison]:
    out: list[Comparison] = []
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("user_id", "prompt", "chosen", "rejected") if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing or non-string field(s) {missing}")
            out.append(Comparison(row["user_id"], row["prompt"], row["chosen"], row["rejected"]))
    return out


@dataclass
class PreferenceSplits:
    """Seen users' train/val/test comparisons and unseen users' few-shot pool and held-out test pairs.

    `seen_val` is for model selection (best epoch, prior strength); `seen_test` and `unseen_test` are only
    ever scored. Each unseen user's pool is ordered: the first n pairs are that user's n-shot data.
    """

    name: str
    seen_train: list[Comparison]
    seen_val: list[Comparison]
    seen_test: list[Comparison]
    unseen_pool: list[Comparison]
    unseen_test: list[Comparison]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def seen_users(self) -> list[str]:
        return sorted({c.user_id for c in self.seen_train})

    @property
    def unseen_users(self) -> list[str]:
        return sorted({c.user_id for c in self.unseen_pool} | {c.user_id for c in self.unseen_test})

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about its training data."""
        return {
            "name": self.name,
            **self.info,
            "n_seen_users": len(self.seen_users),
            "n_unseen_users": len(self.unseen_users),
            **{f"n_{s}": len(getattr(self, s)) for s in SPLITS},
        }

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            write_jsonl(directory / f"{s}.jsonl", getattr(self, s))
        (directory / "info.json").write_text(json.dumps({"name": self.name, "info": self.info}, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> PreferenceSplits:
        directory = Path(directory)
        meta = json.loads((directory / "info.json").read_text())
        parts = {s: read_jsonl(directory / f"{s}.jsonl") for s in SPLITS}
        return cls(name=meta["name"], info=meta.get("info", {}), **parts)


def by_user(comparisons: list[Comparison]) -> dict[str, list[Comparison]]:
    """Group comparisons per user, keeping their order (the few-shot order of a pool)."""
    out: dict[str, list[Comparison]] = {}
    for c in comparisons:
        out.setdefault(c.user_id, []).append(c)
    return out
