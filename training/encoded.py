"""Comparisons turned into embedding arrays: unique vectors plus per-comparison row indices.

PAL-B embeds prompts and responses separately; PAL-A embeds pair_text(prompt, response) as the item and
has no prompt input (a zero-width prompt array). Each unique text is embedded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.config import Form, pair_text
from training.data.schema import Comparison
from training.embed import Embedder


@dataclass(frozen=True)
class EncodedComparisons:
    users: Sequence[str]  # user id of each comparison
    # (P, prompt_dim) unique prompt embeddings and (I, item_dim) unique item (PAL-B) or pair (PAL-A) embeddings:
    # arrays, or a memory-mapped table that gathers rows on indexing (training.shards.ShardedVectors)
    prompt_vecs: np.ndarray
    item_vecs: np.ndarray
    prompt_idx: np.ndarray  # (n,) rows of prompt_vecs
    chosen_idx: np.ndarray  # (n,) rows of item_vecs
    rejected_idx: np.ndarray  # (n,)

    def __len__(self) -> int:
        return len(self.users)

    def rows(self, idx: np.ndarray | list[int]) -> EncodedComparisons:
        idx = np.asarray(idx, dtype=np.int64)
        return EncodedComparisons(
            [self.users[i] for i in idx],
            self.prompt_vecs,
            self.item_vecs,
            self.prompt_idx[idx],
            self.chosen_idx[idx],
            self.rejected_idx[idx],
        )

    def in_memory(self) -> EncodedComparisons:
        """Itself when its tables are arrays; else a copy holding only the rows its comparisons use, as arrays (for
        code that maps a whole table, e.g. few-shot feature tables, on a sample of a large memory-mapped split)."""
        if isinstance(self.item_vecs, np.ndarray) and isinstance(self.prompt_vecs, np.ndarray):
            return self
        prompts, prompt_idx = np.unique(self.prompt_idx, return_inverse=True)
        items, inverse = np.unique(np.concatenate([self.chosen_idx, self.rejected_idx]), return_inverse=True)
        n = len(self)
        return EncodedComparisons(
            list(self.users), self.prompt_vecs[prompts], self.item_vecs[items], prompt_idx.reshape(-1),
            inverse[:n], inverse[n:],
        )

    def user_rows(self) -> dict[str, np.ndarray]:
        """user -> indices of that user's comparisons, in order."""
        return rows_by_user(self.users)


def rows_by_user(users: Sequence[str]) -> dict[str, np.ndarray]:
    """user -> the indices of `users` that name them, in order."""
    out: dict[str, list[int]] = {}
    for i, u in enumerate(users):
        out.setdefault(u, []).append(i)
    return {u: np.asarray(v, dtype=np.int64) for u, v in out.items()}


def _index(texts: list[str]) -> tuple[list[str], np.ndarray]:
    unique = sorted(set(texts))
    pos = {t: i for i, t in enumerate(unique)}
    return unique, np.asarray([pos[t] for t in texts], dtype=np.int64)


def encode(comparisons: list[Comparison], embedder: Embedder, form: Form) -> EncodedComparisons:
    n = len(comparisons)
    if form == "B":
        prompts, prompt_idx = _index([c.prompt for c in comparisons])
        prompt_vecs = embedder.embed(prompts, role="prompt") if prompts else np.zeros((0, 1), np.float32)
        items, idx = _index([c.chosen for c in comparisons] + [c.rejected for c in comparisons])
    else:
        prompt_vecs, prompt_idx = np.zeros((1, 0), np.float32), np.zeros(n, dtype=np.int64)
        items, idx = _index(
            [pair_text(c.prompt, c.chosen) for c in comparisons]
            + [pair_text(c.prompt, c.rejected) for c in comparisons]
        )
    item_vecs = embedder.embed(items, role="item") if items else np.zeros((0, 1), np.float32)
    return EncodedComparisons([c.user_id for c in comparisons], prompt_vecs, item_vecs, prompt_idx, idx[:n], idx[n:])
