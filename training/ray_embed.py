"""The embedding stage on a Ray cluster (Ray Data), for when one machine embeds too slowly: the cache's text shards
go through `map_batches` on a pool of actors, each holding the ONNX encoder (models.embedder; CUDA on a GPU node),
and each shard's vectors are written exactly as the single-process `training.shards.embed_shards` writes them. Shards
already embedded are skipped, so a cluster run resumes a local one and the other way round.

The cache directory must be on storage every node sees at the same path (NFS, a mounted bucket): actors read
`texts/NNNNN.parquet` and write `vectors/NNNNN.npy` there. Needs the `distributed` extra
(`pip install "pal-rm[distributed]"`).

    python -m training.ray_embed CACHE_DIR --data FILE --actors 8 --gpus-per-actor 1 --address auto
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from models.config import DEFAULT_ENCODER
from training.data.paths import REPO_ROOT
from training.shards import missing_shards, read_meta, shard_texts, write_vectors


class ShardEmbedder:
    """A Ray Data actor: loads the encoder once, then embeds whole shards (one row of the dataset = one shard id)."""

    def __init__(self, cache: str, encoder_dir: str, provider: str, threads: int, dtype: str) -> None:
        from models.embedder import OnnxEncoder

        self.cache = Path(cache)
        self.encoder = OnnxEncoder(encoder_dir, provider, threads)
        self.dtype = dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for shard in batch["shard"].tolist():
            texts = shard_texts(self.cache, shard)
            write_vectors(self.cache, shard, self.encoder.embed(texts), self.dtype)
            rows.append(len(texts))
        return {"shard": batch["shard"], "rows": np.asarray(rows, dtype=np.int64)}


def embed_with_ray(
    cache: str | Path,
    encoder_dir: str | Path,
    actors: int = 1,
    provider: str = "auto",
    threads: int = 1,
    gpus_per_actor: float = 0.0,
    dtype: str = "float32",
    address: str | None = None,
) -> dict[str, Any]:
    """Embed the cache's missing shards on Ray (a running cluster at `address`, else a local one); returns counts."""
    import ray

    cache, encoder_dir = Path(cache).resolve(), Path(encoder_dir).resolve()
    todo = missing_shards(cache)
    total = int(read_meta(cache)["n_shards"])  # type: ignore[index]
    if not todo:
        return {"shards": total, "embedded": 0, "reused": total}
    if not ray.is_initialized():
        # Workers import this package: from the installed copy on a cluster, from this checkout locally.
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}, include_dashboard=False)
    done = (
        ray.data.from_items([{"shard": i} for i in todo])
        .map_batches(
            ShardEmbedder,
            fn_constructor_args=(str(cache), str(encoder_dir), provider, threads, dtype),
            batch_size=1,  # one shard per call: a failed call loses one shard, and finished shards stay
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=threads,
            num_gpus=gpus_per_actor,
        )
        .take_all()
    )
    rows = int(sum(d["rows"] for d in done))
    return {"shards": total, "embedded": len(done), "reused": total - len(done), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path, help="the cache directory (as `pal train --stream --cache-dir`)")
    parser.add_argument("--data", type=Path, default=None, help="build the cache from this file first (on this node)")
    parser.add_argument("--seed", type=int, default=0, help="--data: the split seed (as `pal train --seed`)")
    parser.add_argument("--user-column", default="user_id", help="--data: the column naming the user")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="--data: HF id or local path of the encoder")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (and Ray CPUs) per actor")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--provider", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--address", default=None, help="Ray cluster address (`auto` on a cluster node)")
    args = parser.parse_args(argv)
    from models.config import EncoderSpec
    from training.pipeline import encoder_spec
    from training.stream import encoder_graph_dir, prepare_cache

    if args.data is not None:
        prepare_cache(args.data, encoder_spec(args.encoder), args.seed, args.user_column, args.cache, embed=False)
    meta = read_meta(args.cache)
    if meta is None:
        raise SystemExit(f"{args.cache} is not a complete training cache; pass --data FILE to build it")
    encoder_dir = encoder_graph_dir(EncoderSpec.model_validate_json(meta["encoder"]))
    stats = embed_with_ray(
        args.cache, encoder_dir, args.actors, args.provider, args.threads, args.gpus_per_actor, address=args.address
    )
    print(json.dumps(stats, indent=2))

if __name__ == "__main__":
    main()
