"""A user's own preference data: one JSONL, CSV or Parquet file of pairwise comparisons in TRL's preference
columns (`prompt`, `chosen`, `rejected`) plus a user column, turned into PAL's seen/unseen splits.

Each of `prompt`, `chosen`, `rejected` is a string or a list of chat messages ({"role", "content"}); `prompt` may
be absent (TRL's implicit-prompt form: `chosen` and `rejected` are whole conversations, the prompt is the
messages they share). Messages become text with models.chat.ChatRenderer and the encoder's chat template, the
renderer the service uses for messages, so a conversation trains and scores as the same text. In CSV a message
list is a JSON array in the cell.

Every bad row is reported as `file:line: what is wrong` (Parquet: `file:row N`), all of them at once (up to a
limit), before anything is embedded or trained.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.chat import ChatFormatError, ChatRenderer
from training.data.fetch import sha256_file
from training.data.schema import Comparison, PreferenceSplits, by_user

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MAX_REPORTED_ERRORS = 20
PARQUET_BATCH_ROWS = 8192


class PreferenceFileError(ValueError):
    """The file cannot be read as preference data; the message lists every bad row as file:line."""


@dataclass(frozen=True)
class SplitParams:
    """How one file becomes PAL splits. Users and pairs are shuffled with `seed`, so the same file and seed give
    the same splits on any machine."""

    unseen_fraction: float = 0.2  # of users, held out entirely: few-shot pool + test pairs
    val_fraction: float = 0.1  # of each seen user's pairs: model selection (epoch, prior strength)
    test_fraction: float = 0.2  # of each seen user's pairs: held-out pairs, only ever scored
    pool_fraction: float = 0.5  # of each unseen user's pairs: the few-shot pool (the rest is its test)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("unseen_fraction", "val_fraction", "test_fraction", "pool_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave pairs to train on")


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PreferenceFileError(f"{path}: unknown format {path.suffix!r}; expected .jsonl, .csv or .parquet")
    return fmt


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs; a row that is not even an object comes through as an error string."""
    fmt = file_format(path)
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{line_no}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{line_no}", f"not valid JSON ({e.msg})"
    elif fmt == "csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            _ = reader.fieldnames  # reads the header, which may span lines
            start = reader.line_num + 1
            for row in reader:
                yield f"{path}:{start}", row  # the line the record starts on (a quoted cell may hold newlines)
                start = reader.line_num + 1
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - pyarrow is in the train extra
            raise PreferenceFileError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
        # Record batches: memory holds one batch, not the file (training.shards streams files of any size).
        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                i += 1
                yield f"{path}:row {i}", row


def _as_messages(value: Any) -> Any:
    """CSV cells hold message lists as JSON arrays; anything else stays as it is."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(m, Mapping) and "role" in m for m in parsed):
            return parsed
    return value


def _is_messages(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _texts(row: Mapping[str, Any], renderer: ChatRenderer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as the texts the encoder sees; raises ValueError saying what is wrong."""
    prompt = _as_messages(row.get("prompt"))
    chosen, rejected = _as_messages(row.get("chosen")), _as_messages(row.get("rejected"))
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None or value == "":
            raise ValueError(f"'{name}' is missing or empty")
        if not isinstance(value, str) and not _is_messages(value) and not isinstance(value, Mapping):
            raise ValueError(f"'{name}' must be a string or a list of messages, got {type(value).__name__}")
    if prompt is None and _is_messages(chosen) and _is_messages(rejected):
        # Implicit prompt (TRL): the messages both conversations start with.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = list(chosen[:n]), list(chosen[n:]), list(rejected[n:])
    if prompt is not None and not isinstance(prompt, str) and not _is_messages(prompt):
        raise ValueError(f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    try:
        p = renderer.prompt_any(prompt) if prompt is not None else ""
        c, r = renderer.response_any(chosen), renderer.response_any(rejected)
    except (ChatFormatError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(str(e)) from e
    if not c or not r:
        raise ValueError("'chosen' or 'rejected' is empty once rendered")
    if c == r:
        raise ValueError("'chosen' and 'rejected' are the same text: the row states no preference")
    return p, c, r


def validated_rows(
    path: str | Path, user_column: str = "user_id", renderer: ChatRenderer | None = None
) -> Iterator[tuple[str, Comparison | str]]:
    """(location, Comparison) for each good row and (location, what is wrong) for each bad one, in file order,
    reading the file as a stream (one line, or one Parquet record batch, at a time)."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceFileError(f"{path}: no such file")
    renderer = renderer or ChatRenderer()
    for where, row in _rows(path):
        try:
            if isinstance(row, str):
                raise ValueError(row)
            if not isinstance(row, Mapping):
                raise ValueError(f"a row must be an object with columns, got {type(row).__name__}")
            user = row.get(user_column)
            if isinstance(user, bool) or not isinstance(user, str | int) or str(user).strip() == "":
                raise ValueError(f"user column {user_column!r} is missing or empty (set another with --user-column)")
            yield where, Comparison(str(user).strip(), *_texts(row, renderer))
        except ValueError as e:
            yield where, str(e)


class ErrorReport:
    """Collects bad rows and raises one PreferenceFileError listing the first MAX_REPORTED_ERRORS of them."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.count = 0

    def add(self, where: str, error: str) -> None:
        self.count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(f"{where}: {error}")

    def raise_if_any(self) -> None:
        if self.errors:
            more = f"\n... and {self.count - len(self.errors)} more" if self.count > len(self.errors) else ""
            raise PreferenceFileError(f"{self.count} invalid row(s):\n" + "\n".join(self.errors) + more)


def read_preference_file(
    path: str | Path, user_column: str = "user_id", renderer: ChatRenderer | None = None
) -> list[Comparison]:
    """Every row of the file as a Comparison, in file order; raises PreferenceFileError listing bad rows."""
    out: list[Comparison] = []
    report = ErrorReport()
    for where, row in validated_rows(path, user_column, renderer):
        if isinstance(row, str):
            report.add(where, row)
        else:
            out.append(row)
    report.raise_if_any()
    if not out:
        raise PreferenceFileError(f"{path}: no comparisons")
    return out


SPLIT_PARTS = ("train", "val", "test", "pool", "utest")  # seen_train, seen_val, seen_test, unseen_pool, unseen_test


@dataclass(frozen=True)
class SplitPlan:
    """Where each user's rows go, computed from row counts alone (so a file streamed twice splits exactly as the
    same file read into a list): `parts[user]` is [(part, positions)], positions index the user's rows in file
    order, in the order they enter that part. Users enter each part in sorted order."""

    seen: list[str]
    unseen: list[str]
    parts: dict[str, list[tuple[str, np.ndarray]]]

    def sizes(self) -> dict[str, int]:
        out = dict.fromkeys(SPLIT_PARTS, 0)
        for entries in self.parts.values():
            for part, pos in entries:
                out[part] += len(pos)
        return out


def _cut(n: int, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle range(n) and cut into len(fractions) + 1 parts; the last part gets the rest."""
    order = rng.permutation(n)
    parts, start = [], 0
    for f in fractions:
        k = int(round(f * n))
        parts.append(order[start : start + k])
        start += k
    parts.append(order[start:])
    return parts


def split_plan(counts: Mapping[str, int], p: SplitParams) -> SplitPlan:
    """Seen/unseen users and their pairs, reproducibly from `p.seed` (users sorted first, so file order of users
    does not matter; each user's pairs keep no order beyond the seeded shuffle)."""
    ids = sorted(counts)
    rng = np.random.default_rng(p.seed)
    n_unseen = int(round(p.unseen_fraction * len(ids)))
    if p.unseen_fraction > 0 and len(ids) >= 2:
        n_unseen = min(max(n_unseen, 1), len(ids) - 1)  # at least one of each when there are two users
    order = [ids[i] for i in rng.permutation(len(ids))]
    unseen, seen = sorted(order[:n_unseen]), sorted(order[n_unseen:])
    parts: dict[str, list[tuple[str, np.ndarray]]] = {}
    for u in seen:
        val, test, train = _cut(counts[u], (p.val_fraction, p.test_fraction), rng)
        if not len(train):  # a user with one or two pairs: train on them rather than drop the user
            train, val, test = np.arange(counts[u]), val[:0], test[:0]
        parts[u] = [("train", train), ("val", val), ("test", test)]
    for u in unseen:
        pool, utest = _cut(counts[u], (p.pool_fraction,), rng)
        parts[u] = [("pool", pool), ("utest", utest)]
    return SplitPlan(seen, unseen, parts)


def check_plan(plan: SplitPlan, n_comparisons: int, source: str) -> None:
    if not plan.sizes()["val"]:
        raise PreferenceFileError(
            f"{source}: too few comparisons per user for a validation split "
            f"({n_comparisons} comparisons, {len(plan.seen) + len(plan.unseen)} users); add data or raise the "
            "validation fraction"
        )


def make_splits(comparisons: list[Comparison], p: SplitParams, name: str, info: dict[str, Any]) -> PreferenceSplits:
    """The comparisons cut by split_plan."""
    users = by_user(comparisons)
    plan = split_plan({u: len(rows) for u, rows in users.items()}, p)
    check_plan(plan, len(comparisons), info.get("source", name))
    parts: dict[str, list[Comparison]] = {s: [] for s in SPLIT_PARTS}
    for u in plan.seen + plan.unseen:
        rows = users[u]
        for part, pos in plan.parts[u]:
            parts[part] += [rows[i] for i in pos]
    return PreferenceSplits(
        name=name,
        seen_train=parts["train"],
        seen_val=parts["val"],
        seen_test=parts["test"],
        unseen_pool=parts["pool"],
        unseen_test=parts["utest"],
        info={**info, "builder": "file", "split": asdict(p)},
    )


def load_preference_splits(
    path: str | Path,
    user_column: str = "user_id",
    params: SplitParams | None = None,
    renderer: ChatRenderer | None = None,
) -> PreferenceSplits:
    """read_preference_file + make_splits, recording the file's sha256 so a checkpoint names its exact data."""
    path = Path(path)
    comparisons = read_preference_file(path, user_column, renderer)
    info = {
        "source": str(path),
        "sha256": sha256_file(path),
        "format": file_format(path),
        "user_column": user_column,
        "rows": len(comparisons),
        "chat_template": bool(renderer and renderer.template),
    }
    return make_splits(comparisons, params or SplitParams(), path.stem, info)
