"""The streamed training path (training.shards, models.embedder): a preference file read as a stream into a cache of
unique texts, split index arrays and sharded embeddings, and the head trained from memory-mapped rows, giving what
the in-memory path gives on the same file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import EncoderSpec, PALConfig
from tests.training.conftest import preference_rows, write_rows
from training.data.schema import SPLITS, Comparison
from training.data.userfile import PreferenceFileError, load_preference_splits
from training.encoded import encode
from training.presets import TEXT_HEAD
from training.shards import ShardedVectors, build_cache, embed_shards, load_splits, missing_shards, shard_texts
from training.train import TrainConfig, train_pal


def cache_texts(cache: Path) -> list[str]:
    meta = json.loads((cache / "meta.json").read_text())
    return [t for i in range(meta["n_shards"]) for t in shard_texts(cache, i)]


def cache_comparisons(cache: Path, split: str) -> list[Comparison]:
    texts, meta = cache_texts(cache), json.loads((cache / "meta.json").read_text())
    idx = np.load(cache / "index" / f"{split}.npy")
    return [Comparison(meta["users"][u], texts[p], texts[c], texts[r]) for p, c, r, u in idx]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_cache_holds_the_in_memory_splits_in_their_order(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"prefs{suffix}", preference_rows())
    meta = build_cache(path, tmp_path / "cache", shard_rows=50)
    expected = load_preference_splits(path)
    for split in SPLITS:
        assert cache_comparisons(tmp_path / "cache", split) == getattr(expected, split), split
    texts = cache_texts(tmp_path / "cache")
    assert len(texts) == len(set(texts)) == meta["n_texts"]  # each text once
    assert meta["n_shards"] == -(-len(texts) // 50) > 2


def test_bad_rows_are_listed_as_file_lines_and_nothing_is_written(tmp_path: Path) -> None:
    rows = preference_rows()
    rows[3] = {**rows[3], "chosen": ""}
    rows[10] = {**rows[10], "user_id": None}
    path = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PreferenceFileError) as e:
        build_cache(path, tmp_path / "cache")
    assert f"{path}:4: 'chosen' is missing or empty" in str(e.value)
    assert f"{path}:11: user column 'user_id' is missing" in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_parquet_is_read_in_record_batches_with_row_numbers_kept(tmp_path: Path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    from training.data import userfile

    def whole_file(*args, **kwargs):
        raise AssertionError("the whole Parquet file was read into memory")

    monkeypatch.setattr(pq, "read_table", whole_file)
    monkeypatch.setattr(userfile, "PARQUET_BATCH_ROWS", 7)
    rows = preference_rows()
    rows[19] = {**rows[19], "rejected": rows[19]["chosen"]}
    path = write_rows(tmp_path / "bad.parquet", rows)
    with pytest.raises(PreferenceFileError, match=r"bad.parquet:row 20: 'chosen' and 'rejected' are the same"):
        build_cache(path, tmp_path / "cache")


def test_killed_embedding_resumes_at_the_first_unfinished_shard(tmp_path: Path, prefs_file: Path, onnx_encoder) -> None:
    cache = tmp_path / "cache"
    meta = build_cache(prefs_file, cache, shard_rows=40)
    calls: list[int] = []

    def dies_on_third(texts: Sequence[str]) -> np.ndarray:
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while embedding the third shard
        calls.append(len(texts))
        return onnx_encoder.embed(texts)

    with pytest.raises(KeyboardInterrupt):
        embed_shards(cache, dies_on_third)
    assert missing_shards(cache) == list(range(2, meta["n_shards"]))
    assert not list((cache / "vectors").glob(".*"))  # no half-written shard left behind
    resumed: list[int] = []
    stats = embed_shards(cache, lambda t: resumed.append(len(t)) or onnx_encoder.embed(t))
    assert stats == {"shards": meta["n_shards"], "embedded": meta["n_shards"] - 2, "reused": 2}
    assert len(resumed) == meta["n_shards"] - 2
    # Sharding changes nothing but float noise: the table equals the texts embedded in one call.
    table = ShardedVectors(cache)
    np.testing.assert_allclose(table[np.arange(len(table))], onnx_encoder.embed(cache_texts(cache)), atol=2e-5)


class Lookup:
    """An Embedder answering from a fixed text -> vector table (the cache's own vectors)."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.spec = EncoderSpec()

    def embed(self, texts: Sequence[str], role: str = "item") -> np.ndarray:
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def test_training_from_the_cache_equals_training_in_memory(tmp_path: Path, prefs_file: Path, onnx_encoder) -> None:
    cache = tmp_path / "cache"
    build_cache(prefs_file, cache, shard_rows=30)  # many shards: every batch gathers across several
    embed_shards(cache, onnx_encoder.embed)
    streamed = load_splits(cache)
    table = ShardedVectors(cache)
    vectors = dict(zip(cache_texts(cache), table[np.arange(len(table))], strict=True))
    splits = load_preference_splits(prefs_file)
    in_memory = {s: encode(getattr(splits, s), Lookup(vectors), "B") for s in ("seen_train", "seen_val")}
    cfg = PALConfig(k=2, prompt_dim=384, item_dim=384, **TEXT_HEAD)
    tc = TrainConfig(epochs=20, batch_size=32, seed=3)
    a = train_pal(cfg, in_memory["seen_train"], in_memory["seen_val"], tc, progress=False)
    b = train_pal(cfg, streamed["seen_train"], streamed["seen_val"], tc, progress=False)
    assert a.user_ids == b.user_ids
    assert a.history == b.history and a.best_epoch == b.best_epoch
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert b.val_accuracy > 0.8  # the two groups' preferences are learnt, not just reproduced


def test_onnx_encoder_matches_the_torch_encoder(onnx_encoder) -> None:
    from models.encoder import PooledEncoder, load_tokenizer

    texts = ["", "short", "a longer text about mountains and winter, " * 8, "end " * 400]
    spec = onnx_encoder.spec
    tokenizer = load_tokenizer(spec)
    tokenizer.truncation_side = spec.truncation_side
    tok = tokenizer(texts, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")
    with torch.no_grad():
        reference = PooledEncoder(spec)(tok["input_ids"], tok["attention_mask"]).numpy()
    got = onnx_encoder.embed(texts)
    assert got.shape == (4, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference, atol=1e-4)
