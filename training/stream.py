"""`pal train --data FILE --stream`: training on a file of any size with memory that does not grow with it.

Three stages, each resumable from disk: the file streamed into a cache of unique texts and split index arrays
(training.shards.build_cache), the texts embedded shard by shard with the ONNX encoder (models.embedder: CUDA when
present, else the CPU; or on a Ray cluster, training.ray_embed), and the head trained from memory-mapped rows. The
splits, and so the trained model, are the ones the in-memory `pal train --data FILE` makes from the same file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from models.config import EncoderSpec
from training.data.schema import SPLITS
from training.data.userfile import SplitParams
from training.embed import cache_root, encoder_key
from training.pipeline import chat_renderer, train_checkpoint
from training.presets import Experiment, _text_pal, schedule
from training.shards import build_cache, embed_shards, load_splits


@dataclass(frozen=True)
class CacheSplits:
    """What a checkpoint records about its data (PreferenceSplits.describe's fields), from a cache's meta."""

    meta: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        m = self.meta
        info = {k: m[k] for k in ("source", "sha256", "user_column", "rows", "split")}
        return {
            "name": Path(m["source"]).stem,
            **info,
            "format": m["format_name"],
            "builder": "file",
            "streamed": True,
            "n_seen_users": m["seen_users"],
            "n_unseen_users": len(m["users"]) - m["seen_users"],
            **{f"n_{s}": m["sizes"][s] for s in SPLITS},
        }


def default_cache_dir(path: Path, spec: EncoderSpec) -> Path:
    """$PAL_CACHE_DIR/stream/<file stem>-<hash of its absolute path and the encoder>."""
    name = hashlib.sha256(f"{path.resolve()}\n{encoder_key(spec)}".encode()).hexdigest()[:12]
    return cache_root() / "stream" / f"{path.stem}-{name}"


def encoder_graph_dir(spec: EncoderSpec) -> Path:
    """The ONNX export of the encoder (once per encoder spec, beside its embedding cache)."""
    from models.export import export_encoder

    return export_encoder(spec, cache_root() / encoder_key(spec) / "onnx")


def prepare_cache(
    path: Path,
    spec: EncoderSpec,
    seed: int = 0,
    user_column: str = "user_id",
    cache_dir: Path | None = None,
    provider: str = "auto",
    embed: bool = True,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Stages 1 and 2: the cache for this file, split and encoder, with every shard embedded (unless `embed` is off,
    for an embedding run elsewhere: training.ray_embed)."""
    from models.embedder import OnnxEncoder

    cache = cache_dir or default_cache_dir(path, spec)
    meta = build_cache(
        path, cache, user_column, SplitParams(seed=seed), chat_renderer(spec), encoder=spec.model_dump_json(),
        replace=cache_dir is None,
    )
    if embed:
        encoder = OnnxEncoder(encoder_graph_dir(spec), provider)
        bar = tqdm(total=meta["n_shards"], desc=f"embed ({encoder.provider})", unit="shard", disable=not progress)
        stats = embed_shards(cache, encoder.embed, progress=lambda done, todo: bar.update(1))
        bar.close()
        meta = {**meta, "embedding": {**stats, "provider": encoder.provider}}
    return cache, meta


def train_stream(
    path: Path,
    out: Path,
    spec: EncoderSpec,
    k: int = 3,
    seed: int = 0,
    user_column: str = "user_id",
    cache_dir: Path | None = None,
    provider: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """`pal train --data FILE --stream`: cache, embed, train from the memory-mapped cache, save the checkpoint."""
    from models.embedder import OnnxEncoder

    cache, meta = prepare_cache(path, spec, seed, user_column, cache_dir, provider, progress=progress)
    emb = OnnxEncoder(encoder_graph_dir(spec), "cpu", threads=1)  # only for the head's dimensions and spec
    splits = CacheSplits(meta)
    exp = Experiment(splits.describe()["name"], splits, emb, _text_pal(emb, k), schedule("file", seed))  # type: ignore[arg-type]
    info = {"cache": str(cache), "data": {k: v for k, v in splits.describe().items() if k != "split"},
            "embedding": meta.get("embedding")}  # fmt: skip
    return train_checkpoint(exp, k, load_splits(cache), out, lambda: info)
