"""Text embeddings, computed once and cached on disk.

The cache lives in $PAL_CACHE_DIR (default <repo>/.cache/embeddings)/<encoder-key>/ as shards: each shard is
`<name>.npy` (float32 rows) + `<name>.json` (the sha256 of each row's text). The encoder key hashes every
EncoderSpec field that changes a vector, so a different pooling or token budget never reuses stale rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from tqdm.auto import tqdm

from models.config import EncoderSpec
from training.data.paths import REPO_ROOT

Role = Literal["prompt", "item"]


class Embedder(Protocol):
    spec: EncoderSpec

    def embed(self, texts: Sequence[str], role: Role = "item") -> np.ndarray: ...


def cache_root() -> Path:
    return Path(os.environ.get("PAL_CACHE_DIR") or REPO_ROOT / ".cache" / "embeddings")


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encoder_key(spec: EncoderSpec) -> str:
    digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]
    return f"{Path(spec.name_or_path).name}-{digest}"


class TableEmbedder:
    """A fixed vector table (simulated data). Prompts all map to one constant vector of `prompt_dim` ones."""

    def __init__(self, vectors: dict[str, np.ndarray], prompt_dim: int = 1, name: str = "table") -> None:
        self.vectors = vectors
        self.prompt_dim = prompt_dim
        self.spec = EncoderSpec(kind="table", name_or_path=name)

    def embed(self, texts: Sequence[str], role: Role = "item") -> np.ndarray:
        if role == "prompt":
            return np.ones((len(texts), self.prompt_dim), dtype=np.float32)
        missing = [t for t in texts if t not in self.vectors]
        if missing:
            raise KeyError(f"{len(missing)} texts have no vector in the table, e.g. {missing[0]!r}")
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


class CachedEncoder:
    """A transformers encoder (models.encoder.PooledEncoder) behind the disk cache; loads the model only on a miss."""

    def __init__(self, spec: EncoderSpec | None = None, cache_dir: str | Path | None = None, batch_size: int = 64):
        self.spec = spec or EncoderSpec()
        self.dir = Path(cache_dir or cache_root()) / encoder_key(self.spec)
        self.batch_size = batch_size
        self._rows: dict[str, np.ndarray] = {}
        self._loaded = False
        self._model = None
        self._tokenizer = None

    def _load_cache(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self.dir.is_dir():
            return
        for keys_file in sorted(self.dir.glob("*.json")):
            vecs_file = keys_file.with_suffix(".npy")
            if not vecs_file.is_file():
                continue  # a shard still being written by another process
            keys = json.loads(keys_file.read_text())
            vecs = np.load(vecs_file)
            if len(keys) == len(vecs):
                self._rows.update(zip(keys, vecs, strict=True))

    def _encode(self, texts: list[str]) -> np.ndarray:
        import torch

        from models.encoder import PooledEncoder, load_tokenizer

        if self._model is None:
            self._tokenizer = load_tokenizer(self.spec)
            self._tokenizer.truncation_side = self.spec.truncation_side
            self._model = PooledEncoder(self.spec)
        # Longest first, so each batch pads to similar lengths and memory peaks at the start.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self._model.dim), dtype=np.float32)
        with torch.inference_mode():
            for s in tqdm(range(0, len(order), self.batch_size), desc=f"embed {len(texts)} texts", unit="batch"):
                idx = order[s : s + self.batch_size]
                tok = self._tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.spec.max_length,
                    return_tensors="pt",
                )
                out[idx] = self._model(tok["input_ids"], tok["attention_mask"]).float().numpy()
        return out

    def embed(self, texts: Sequence[str], role: Role = "item") -> np.ndarray:
        """Vectors of `texts` in order (role is irrelevant: prompts and items share one encoder)."""
        self._load_cache()
        keys = [text_key(t) for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in self._rows}.items())
        if todo:
            vecs = self._encode([t for _, t in todo])
            new_keys = [k for k, _ in todo]
            self._rows.update(zip(new_keys, vecs, strict=True))
            self._write_shard(new_keys, vecs)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._rows[k] for k in keys])

    def _write_shard(self, keys: list[str], vecs: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        # vectors first, keys last (atomically): a reader only trusts shards whose key file exists.
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        with tmp.open("wb") as f:
            np.save(f, vecs.astype(np.float32))
        tmp.replace(self.dir / f"{name}.npy")
        tmp.write_text(json.dumps(keys))
        tmp.replace(self.dir / f"{name}.json")
