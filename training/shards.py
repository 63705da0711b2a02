"""Training data past one machine's memory: a preference file streamed into an on-disk cache of unique texts,
their embeddings in shards, and per-split index arrays, so the head trains from memory-mapped rows.

Layout of a cache directory (`build_cache` writes all but vectors/, `embed_shards` or training.ray_embed those):

    meta.json             written last: source file, sha256, split, shard size, text count, users; the cache is
                          complete when it exists (a killed build starts over, it is the cheap stage)
    texts/00000.parquet   the unique texts (by content hash) in first-seen order, `shard_rows` per shard
    vectors/00000.npy     the embeddings of texts/00000.parquet (float32 or float16); written to a temporary name
                          and renamed, so a shard file that exists is whole: a killed embedding run resumes there
    index/<split>.npy     (n, 4) int64: prompt row, chosen row, rejected row, user code, in exactly the order
                          training.data.userfile.make_splits gives the same file (same splits, same training)

Memory while building grows only with the number of unique texts (one dict entry per text hash, ~100 bytes)
and users, never with the texts or their vectors: the file is read twice as a stream (validation and row counts
per user, then rows), and the index arrays are written into memory-mapped files at their final positions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from models.chat import ChatRenderer
from training.data.fetch import sha256_file
from training.data.schema import SPLITS
from training.data.userfile import (
    SPLIT_PARTS,
    ErrorReport,
    PreferenceFileError,
    SplitParams,
    check_plan,
    file_format,
    split_plan,
    validated_rows,
)
from training.encoded import EncodedComparisons

META_FILE = "meta.json"
FORMAT = "pal-rm-stream-cache/1"
SHARD_ROWS = 65536
PART_OF = dict(zip(SPLITS, SPLIT_PARTS, strict=True))  # seen_train -> train, ...


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def shard_name(i: int) -> str:
    return f"{i:05d}"


def read_meta(cache: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((cache / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


class _TextTable:
    """Unique texts by content hash -> row id; texts go to parquet shards as they fill, never all in memory."""

    def __init__(self, directory: Path, shard_rows: int) -> None:
        self.directory = directory
        self.shard_rows = shard_rows
        self.rows: dict[bytes, int] = {}
        self.pending: list[str] = []
        self.shards = 0

    def row(self, text: str) -> int:
        key = text_digest(text)
        found = self.rows.get(key)
        if found is None:
            found = self.rows[key] = len(self.rows)
            self.pending.append(text)
            if len(self.pending) == self.shard_rows:
                self.flush()
        return found

    def flush(self) -> None:
        if not self.pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": self.pending}), self.directory / f"{shard_name(self.shards)}.parquet")
        self.shards += 1
        self.pending = []


def cache_key(
    path: Path, user_column: str, params: SplitParams, shard_rows: int, renderer: ChatRenderer, encoder: str
) -> dict:
    """What the cache depends on (texts and index: the file and split; vectors: the encoder): the same key reuses a
    finished cache."""
    return {
        "format": FORMAT,
        "encoder": encoder,
        "source": str(path),
        "sha256": sha256_file(path),
        "user_column": user_column,
        "split": asdict(params),
        "shard_rows": shard_rows,
        "chat_template": renderer.template or None,
    }


def build_cache(
    path: str | Path,
    cache: str | Path,
    user_column: str = "user_id",
    params: SplitParams | None = None,
    renderer: ChatRenderer | None = None,
    shard_rows: int = SHARD_ROWS,
    encoder: str = "",
    replace: bool = False,
) -> dict[str, Any]:
    """Stream the file into `cache` (texts and index; see the module doc) unless a complete cache of the same file,
    split and encoder (`encoder`: its EncoderSpec as JSON) is there; returns its meta. A complete cache of something
    else is replaced if `replace`, else refused. Raises PreferenceFileError listing bad rows as file:line, as
    `pal train --data FILE` does, before anything is written."""
    path, cache = Path(path), Path(cache)
    if not path.is_file():
        raise PreferenceFileError(f"{path}: no such file")
    file_format(path)
    params, renderer = params or SplitParams(), renderer or ChatRenderer()
    key = cache_key(path, user_column, params, shard_rows, renderer, encoder)
    meta = read_meta(cache)
    if meta is not None and all(meta.get(k) == v for k, v in key.items()):
        return meta
    if meta is not None and replace:
        (cache / META_FILE).unlink()
    elif meta is not None:
        raise PreferenceFileError(
            f"{cache} holds a cache of {meta.get('source')} (sha256 {str(meta.get('sha256'))[:12]}; another file, "
            "split, shard size or encoder); remove it or choose another cache directory"
        )
    # Pass 1: validate every row (all errors at once, as the in-memory reader) and count rows per user.
    counts: dict[str, int] = {}
    report, n = ErrorReport(), 0
    for where, row in validated_rows(path, user_column, renderer):
        if isinstance(row, str):
            report.add(where, row)
        else:
            counts[row.user_id] = counts.get(row.user_id, 0) + 1
            n += 1
    report.raise_if_any()
    if not n:
        raise PreferenceFileError(f"{path}: no comparisons")
    plan = split_plan(counts, params)
    check_plan(plan, n, str(path))
    users = sorted(counts)
    code = {u: i for i, u in enumerate(users)}
    # Each user's k-th row (file order) -> (part, position in that part): make_splits' order exactly.
    sizes, dest = plan.sizes(), {}
    offsets = dict.fromkeys(SPLIT_PARTS, 0)
    for u in plan.seen + plan.unseen:
        part_of = np.zeros(counts[u], dtype=np.int8)
        position = np.zeros(counts[u], dtype=np.int64)
        for part, pos in plan.parts[u]:
            part_of[pos] = SPLIT_PARTS.index(part)
            position[pos] = offsets[part] + np.arange(len(pos))
            offsets[part] += len(pos)
        dest[u] = (part_of, position)
    n_seen = len(plan.seen)
    del plan

    for sub in ("texts", "index", "vectors"):  # an unfinished earlier build of this cache: start over
        shutil.rmtree(cache / sub, ignore_errors=True)
        (cache / sub).mkdir(parents=True)
    index = {
        part: np.lib.format.open_memmap(cache / "index" / f"{split}.npy", "w+", np.int64, (sizes[part], 4))
        for split, part in PART_OF.items()
    }
    # Pass 2: rows to text ids, written at their final positions.
    texts = _TextTable(cache / "texts", shard_rows)
    seen_so_far = dict.fromkeys(users, 0)
    for _, row in validated_rows(path, user_column, renderer):
        assert not isinstance(row, str), "the file changed between the two passes"
        k = seen_so_far[row.user_id]
        seen_so_far[row.user_id] = k + 1
        part_of, position = dest[row.user_id]
        index[SPLIT_PARTS[part_of[k]]][position[k]] = (
            texts.row(row.prompt), texts.row(row.chosen), texts.row(row.rejected), code[row.user_id]
        )
    texts.flush()
    for arr in index.values():
        arr.flush()
    meta = {
        **key,
        "format_name": file_format(path),
        "rows": n,
        "n_texts": len(texts.rows),
        "n_shards": texts.shards,
        "users": users,
        "seen_users": n_seen,
        "sizes": {split: sizes[part] for split, part in PART_OF.items()},
    }
    _write_json(cache / META_FILE, meta)
    return meta


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


# --- embedding ------------------------------------------------------------------------------------------------------


def shard_texts(cache: Path, i: int) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(cache / "texts" / f"{shard_name(i)}.parquet").column("text").to_pylist()


def write_vectors(cache: Path, i: int, vectors: np.ndarray, dtype: str = "float32") -> None:
    """One shard's embeddings, atomically (temporary file, then rename): an existing shard file is whole."""
    final = cache / "vectors" / f"{shard_name(i)}.npy"
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, np.ascontiguousarray(vectors, dtype=dtype))
    tmp.replace(final)


def missing_shards(cache: Path) -> list[int]:
    meta = read_meta(cache)
    if meta is None:
        raise FileNotFoundError(f"{cache} is not a complete training cache (no {META_FILE}); build it first")
    return [i for i in range(meta["n_shards"]) if not (cache / "vectors" / f"{shard_name(i)}.npy").is_file()]


def embed_shards(
    cache: str | Path,
    embed: Callable[[Sequence[str]], np.ndarray],
    dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Embed every shard that has no vectors file yet (a killed run resumes at the first unfinished shard)."""
    cache = Path(cache)
    todo = missing_shards(cache)
    total = read_meta(cache)["n_shards"]  # type: ignore[index]
    for done, i in enumerate(todo, 1):
        write_vectors(cache, i, embed(shard_texts(cache, i)), dtype)
        if progress:
            progress(done, len(todo))
    return {"shards": total, "embedded": len(todo), "reused": total - len(todo)}


# --- reading for training ---------------------------------------------------------------------------------------------


class ShardedVectors:
    """The embedding table over memory-mapped shard files: `table[rows]` gathers rows (float32) without loading
    the table; pages the OS reads for it are file cache it can drop, not the process's own memory."""

    def __init__(self, cache: str | Path) -> None:
        cache = Path(cache)
        missing = missing_shards(cache)
        if missing:
            raise FileNotFoundError(
                f"{cache}: {len(missing)} of its text shards have no embeddings yet (first: {shard_name(missing[0])}); "
                "run the embedding stage first"
            )
        meta = read_meta(cache)
        self.shard_rows = int(meta["shard_rows"])  # type: ignore[index]
        self.shards = [np.load(p, mmap_mode="r") for p in sorted((cache / "vectors").glob("*.npy"))]
        self.dim = int(self.shards[0].shape[1]) if self.shards else 0
        self.n = sum(len(s) for s in self.shards)
        self.dtype = self.shards[0].dtype if self.shards else np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        shard, offset = np.divmod(rows, self.shard_rows)
        for s in np.unique(shard):
            hit = shard == s
            out[hit] = self.shards[s][offset[hit]]
        return out


class CodedUsers(Sequence[str]):
    """User ids of n comparisons as int codes into one list of names (not n Python strings)."""

    def __init__(self, codes: np.ndarray, names: list[str]) -> None:
        self.codes = codes
        self.names = names

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.names[c] for c in self.codes[i]]
        return self.names[self.codes[i]]

    def __iter__(self) -> Iterator[str]:
        names = self.names
        for c in self.codes.tolist():
            yield names[c]


def load_splits(cache: str | Path) -> dict[str, EncodedComparisons]:
    """Each split as EncodedComparisons over the shared memory-mapped table (train_pal gathers rows per batch)."""
    cache = Path(cache)
    meta = read_meta(cache)
    table = ShardedVectors(cache)
    out = {}
    for split in SPLITS:
        idx = np.load(cache / "index" / f"{split}.npy", mmap_mode="r")
        out[split] = EncodedComparisons(
            CodedUsers(np.asarray(idx[:, 3]), meta["users"]),  # type: ignore[index]
            table, table, np.asarray(idx[:, 0]), np.asarray(idx[:, 1]), np.asarray(idx[:, 2]),
        )
    return out
