"""A small sample of the checkpoint's own validation comparisons, carried by the checkpoint and the bundle.

Training writes it beside the checkpoint (`validation.json`), `pal export` copies it into the bundle (where it is a
content file: part of the version), and the scorer measures on it how many decisions each precision keeps
(models/precision.py). The format is JSON: {"comparisons": [{"user_id", "prompt", "chosen", "rejected"}, ...]}.
numpy-free and torch-free, so the serving side reads it as cheaply as the rest of the bundle.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "validation.json"
# Enough decisions to tell 99.5% from 98% (a 256-pair sample resolves ~0.4%), few enough that measuring one
# precision costs a few seconds on 2 cores.
MAX_PAIRS = 256


class ValidationSampleError(ValueError):
    """A validation sample that is not the JSON this module writes."""


@dataclass(frozen=True)
class ValidationPair:
    user_id: str
    prompt: str
    chosen: str
    rejected: str


def sample(comparisons: Iterable[object], n: int = MAX_PAIRS, seed: int = 0) -> list[ValidationPair]:
    """Up to n comparisons (anything with user_id, prompt, chosen and rejected attributes), drawn reproducibly."""
    pairs = [ValidationPair(c.user_id, c.prompt, c.chosen, c.rejected) for c in comparisons]  # type: ignore[attr-defined]
    if len(pairs) > n:
        pairs = random.Random(seed).sample(pairs, n)
    return pairs


def write(directory: str | Path, pairs: list[ValidationPair]) -> Path:
    path = Path(directory) / FILE
    path.write_text(json.dumps({"comparisons": [asdict(p) for p in pairs]}, ensure_ascii=False))
    return path


def load(path: str | Path) -> list[ValidationPair]:
    """Comparisons to sample from, for `pal export --validation`: a sample file, a directory holding one (a
    checkpoint, a bundle) or the seen_val.jsonl of splits written by training, or a JSONL file of comparisons."""
    path = Path(path)
    if path.is_dir():
        if (path / FILE).is_file():
            return read(path) or []
        path = path / "seen_val.jsonl"
    if path.name == FILE:
        return read(path.parent) or []
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [ValidationPair(r["user_id"], r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = "JSONL of user_id/prompt/chosen/rejected"
        raise ValidationSampleError(f"{path} holds no comparisons ({what}): {e}") from e


def read(directory: str | Path) -> list[ValidationPair] | None:
    """The sample in `directory`, or None when it has none; ValidationSampleError when it is malformed."""
    path = Path(directory) / FILE
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["comparisons"]
        pairs = [ValidationPair(**{k: row[k] for k in ("user_id", "prompt", "chosen", "rejected")}) for row in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValidationSampleError(f"{path} is not a validation sample: {e}") from e
    if not all(isinstance(v, str) for p in pairs for v in asdict(p).values()):
        raise ValidationSampleError(f"{path}: every user_id, prompt, chosen and rejected must be a string")
    return pairs
