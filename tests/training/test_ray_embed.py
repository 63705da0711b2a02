"""The embedding stage on Ray Data (training.ray_embed) on a local Ray (2 CPUs, no cluster): the shards it writes
are the single-process ones, and it embeds only the shards a cache still lacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import ray  # the `distributed` extra, which scripts/setup.sh installs: CI runs this test, never skips it

from training.data.paths import REPO_ROOT
from training.shards import build_cache, embed_shards, missing_shards, write_vectors


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_writes_the_single_process_shards(tmp_path: Path, prefs_file: Path, encoder_dir: Path, onnx_encoder,
                                              local_ray) -> None:  # fmt: skip
    from training.ray_embed import embed_with_ray

    local, distributed = tmp_path / "local", tmp_path / "ray"
    meta = build_cache(prefs_file, local, shard_rows=60)
    shutil.copytree(local, distributed)
    embed_shards(local, onnx_encoder.embed)
    # One shard already there (an earlier run): Ray embeds the others only and leaves it as it is.
    write_vectors(distributed, 0, np.load(local / "vectors" / "00000.npy"))
    before = (distributed / "vectors" / "00000.npy").stat().st_mtime_ns
    stats = embed_with_ray(distributed, encoder_dir, actors=2, provider="cpu", threads=1)
    n = meta["n_shards"]
    assert n >= 3 and stats["embedded"] == n - 1 and stats["reused"] == 1
    assert stats["rows"] == meta["n_texts"] - 60
    assert (distributed / "vectors" / "00000.npy").stat().st_mtime_ns == before
    assert missing_shards(distributed) == []
    for f in sorted((local / "vectors").glob("*.npy")):
        a, b = np.load(f), np.load(distributed / "vectors" / f.name)
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=1e-6, err_msg=f.name)
    assert embed_with_ray(distributed, encoder_dir)["embedded"] == 0  # nothing left: Ray is not even asked
