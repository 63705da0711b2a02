"""Training's scaling law: wall time per stage and peak memory at 10k, 100k and 1M comparisons (synthetic, every
text unique), the in-memory path (`pal train --data FILE`) beside the streamed one (`--stream`).

    .venv/bin/python bench/bench_train_scale.py [--sizes 10000,100000,1000000] [--out bench/results/train_scale.json]

Each configuration runs in its own process, which reports its peak RSS (getrusage) and, per stage, the peak of its
anonymous memory (RssAnon: the process's own arrays) and of file-backed pages (RssFile: memory-mapped files, page
cache the kernel can drop), sampled every 20 ms.

The stages run for real at every size except the encoder: embedding ~2M texts with MiniLM on 2 shared cores would
take hours, so both paths get deterministic pseudo-embeddings (384 float32 from the text's hash), through their real
caches: the in-memory path's `CachedEncoder` (its dict of rows and its stacked table), the streamed path's
`embed_shards` (shard files). The real encoder's throughput is measured separately on a sample (torch, as
`CachedEncoder` embeds, and the ONNX encoder the streamed path uses), and the embedding hours at each size are
extrapolated from it, labelled as such. The head trains for one epoch (the schedule runs up to 40).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 384
WORDS = [
    "river", "stone", "quiet", "lamp", "orange", "market", "winter", "garden", "signal", "paper", "copper",
    "violin", "harbor", "meadow", "engine", "silver", "thunder", "pocket", "ladder", "canvas", "feather", "planet",
    "marble", "shadow", "kettle", "forest", "mirror", "candle", "bridge", "tunnel",
]


# --- data -----------------------------------------------------------------------------------------------------------


def write_synthetic(path: Path, n: int, seed: int = 0) -> None:
    """n comparisons of n/50 users; 1,000 prompts shared, every response unique (~2n distinct texts)."""
    rng = np.random.default_rng(seed)
    words = np.asarray(WORDS)
    with path.open("w") as f:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            picks = words[rng.integers(len(words), size=(m, 2, 12))]
            for j in range(m):
                i = start + j
                row = {
                    "user_id": f"user-{i % max(1, n // 50):06d}",
                    "prompt": f"Question {i % 1000}: which of these would you rather read about?",
                    "chosen": f"{i}a " + " ".join(picks[j, 0]),
                    "rejected": f"{i}b " + " ".join(picks[j, 1]),
                }
                f.write(json.dumps(row) + "\n")


def pseudo_embed(texts: Sequence[str]) -> np.ndarray:
    """Deterministic stand-in vectors (a function of the text alone), computed vectorised in batches of 4096 (as an
    encoder batches): splitmix64 of the text's hash and the column."""
    return np.concatenate([_pseudo(texts[s : s + 4096]) for s in range(0, len(texts), 4096)] or [np.zeros((0, DIM))])


def _pseudo(texts: Sequence[str]) -> np.ndarray:
    seeds = np.frombuffer(b"".join(hashlib.blake2b(t.encode(), digest_size=8).digest() for t in texts), np.uint64)
    x = seeds[:, None] + np.arange(1, DIM + 1, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return ((x >> np.uint64(40)).astype(np.float32) / float(1 << 24) - 0.5).astype(np.float32)


# --- measuring ------------------------------------------------------------------------------------------------------


class Sampler:
    """Peak RssAnon / RssFile of this process per stage, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = {"anon": 0, "file": 0}
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line[3:7].lower()] = int(line.split()[1]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for k, v in self.now().items():
                self.peak[k] = max(self.peak[k], v)

    def stage(self, stages: dict[str, Any], name: str, fn, *args, **kwargs):
        self.peak = self.now()
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        for k, v in self.now().items():
            self.peak[k] = max(self.peak[k], v)
        stages[name] = {"seconds": round(seconds, 2), "peak_anon_mb": _mb(self.peak["anon"]),
                        "peak_file_mb": _mb(self.peak["file"])}  # fmt: skip
        return result


def _mb(b: float) -> float:
    return round(b / 2**20, 1)


# --- the two paths (each in a child process) -----------------------------------------------------------------------


def run_in_memory(data: Path, work: Path) -> dict[str, Any]:
    from models.config import PALConfig
    from training.data.schema import SPLITS
    from training.data.userfile import load_preference_splits
    from training.embed import CachedEncoder
    from training.encoded import encode
    from training.presets import TEXT_HEAD
    from training.train import TrainConfig, train_pal

    class PseudoCachedEncoder(CachedEncoder):
        """CachedEncoder (its row dict, its shard file, its stacking) with pseudo-embeddings for the model."""

        def _encode(self, texts: list[str]) -> np.ndarray:
            return pseudo_embed(texts)

    s, stages = Sampler(), {}
    splits = s.stage(stages, "read+split", load_preference_splits, data)
    emb = PseudoCachedEncoder(cache_dir=work / "embeddings")
    encs = s.stage(stages, "embed (pseudo)+index", lambda: {
        n: encode(getattr(splits, n), emb, "B") for n in SPLITS})  # fmt: skip
    cfg = PALConfig(k=3, prompt_dim=DIM, item_dim=DIM, **TEXT_HEAD)
    s.stage(stages, "train 1 epoch", train_pal, cfg, encs["seen_train"], encs["seen_val"], TrainConfig(epochs=1),
            progress=False)  # fmt: skip
    return {"stages": stages, "n_train": len(encs["seen_train"])}


def run_streamed(data: Path, work: Path) -> dict[str, Any]:
    from models.config import PALConfig
    from training.presets import TEXT_HEAD
    from training.shards import build_cache, embed_shards, load_splits
    from training.train import TrainConfig, train_pal

    s, stages = Sampler(), {}
    cache = work / "stream"
    meta = s.stage(stages, "read+split", build_cache, data, cache)
    s.stage(stages, "embed (pseudo)+index", embed_shards, cache, pseudo_embed)
    encs = load_splits(cache)
    cfg = PALConfig(k=3, prompt_dim=DIM, item_dim=DIM, **TEXT_HEAD)
    s.stage(stages, "train 1 epoch", train_pal, cfg, encs["seen_train"], encs["seen_val"], TrainConfig(epochs=1),
            progress=False)  # fmt: skip
    disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    return {"stages": stages, "n_train": len(encs["seen_train"]), "n_texts": meta["n_texts"], "cache_mb": _mb(disk)}


def encoder_throughput(n: int, threads: int) -> dict[str, Any]:
    """texts/s of the real MiniLM on n synthetic texts: torch (CachedEncoder's path) and the ONNX encoder (CPU)."""
    import torch

    from models.config import EncoderSpec
    from models.embedder import OnnxEncoder
    from training.embed import CachedEncoder
    from training.stream import encoder_graph_dir

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample.jsonl"
        write_synthetic(path, n // 2, seed=1)
        texts = [t for line in path.read_text().splitlines() for t in (json.loads(line)["chosen"],
                 json.loads(line)["rejected"])]  # fmt: skip
        enc = CachedEncoder(EncoderSpec(), cache_dir=tmp)
        enc._encode(texts[:16])  # load the model outside the timing
        t0 = time.perf_counter()
        enc._encode(texts)
        torch_rate = len(texts) / (time.perf_counter() - t0)
        onnx = OnnxEncoder(encoder_graph_dir(EncoderSpec()), "cpu", threads)
        onnx.embed(texts[:16])
        t0 = time.perf_counter()
        onnx.embed(texts)
        onnx_rate = len(texts) / (time.perf_counter() - t0)
    return {"texts": len(texts), "threads": threads, "torch_texts_per_s": round(torch_rate, 1),
            "onnx_cpu_texts_per_s": round(onnx_rate, 1)}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    if args.child == "encoder":
        out = encoder_throughput(args.sample, args.threads)
    else:
        out = (run_in_memory if args.child == "memory" else run_streamed)(Path(args.data), Path(args.work))
    out["peak_rss_mb"] = _mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(kind: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{kind} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_scale.json")
    p.add_argument("--sample", type=int, default=512, help="texts for the real encoder's throughput")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paths", default="memory,stream")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    report: dict[str, Any] = {"note": "2 shared cores under contention from other work: times are indicative; "
                              "memory is not affected", "sizes": {}}  # fmt: skip
    report["encoder"] = run_child("encoder", ["--sample", str(args.sample), "--threads", str(args.threads)])
    print(json.dumps(report["encoder"]), flush=True)
    base = Path(tempfile.mkdtemp(prefix="pal-bench-scale-"))
    try:
        for n in (int(x) for x in args.sizes.split(",")):
            data = base / f"synthetic-{n}.jsonl"
            t0 = time.perf_counter()
            write_synthetic(data, n)
            row: dict[str, Any] = {"file_mb": _mb(data.stat().st_size), "generate_s": round(time.perf_counter() - t0)}
            for kind in args.paths.split(","):
                work = base / f"{kind}-{n}"
                row[kind] = run_child(kind, ["--data", str(data), "--work", str(work)])
                shutil.rmtree(work, ignore_errors=True)
                print(n, kind, json.dumps(row[kind]), flush=True)
            texts = row.get("stream", {}).get("n_texts") or 2 * n
            row["embedding_hours_extrapolated"] = {
                "texts": texts,
                "torch": round(texts / report["encoder"]["torch_texts_per_s"] / 3600, 2),
                "onnx_cpu": round(texts / report["encoder"]["onnx_cpu_texts_per_s"] / 3600, 2),
            }
            report["sizes"][str(n)] = row
            data.unlink()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
