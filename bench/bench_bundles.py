"""What an encoder costs to serve: the same scorer workload on several bundles, side by side in one run.

    .venv/bin/python bench/bench_bundles.py BUNDLE [BUNDLE ...] [--threads 2] [--prompts 64] [--responses 8]

e.g. a persona bundle on all-MiniLM-L6-v2 next to a Polis bundle on all-mpnet-base-v2 (the Polis presets'
encoder). Each bundle scores bench_scorer's GRPO-like workload (P prompts x R responses, cold cache, every user at
the bundle's prior) on --provider at --precision (default cpu, fp32; `pal serve`'s own default is auto). The
bundles run in interleaved rounds so that load from other processes hits them alike, and the best round counts.
Prints items/s, the ratio to the first bundle, and the ONNX graph size.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_scorer import make_workload, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best round counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--provider", default="cpu", help="cpu | openvino | openvino-runtime | cuda | auto")
    ap.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from models.scorer import Scorer

    prompts, responses, _ = make_workload(args.prompts, args.responses, args.seed)
    scorers = {str(b): Scorer.load(b, args.provider, args.precision, args.threads) for b in args.bundles}
    print(f"workload: {len(prompts)} items ({args.prompts} prompts x {args.responses}), {args.threads} threads, "
          f"{args.provider}/{args.precision}")
    for name, s in scorers.items():
        s.warmup()
        size = (Path(name) / "model.onnx").stat().st_size / 1e6
        print(f"{name}: {s.meta.encoder.name_or_path}, {size:.0f} MB graph, on {s.provider}")

    def cold(s: Scorer) -> np.ndarray:
        s.clear_cache()
        return s.rewards(s.encode(prompts, responses), np.tile(s.prior, (len(prompts), 1)))

    best = dict.fromkeys(scorers, float("inf"))
    for r in range(args.repeats):
        for name, s in scorers.items():
            best[name] = min(best[name], timed(lambda s=s: cold(s))[0])
        print(f"round {r + 1}: " + ", ".join(f"{len(prompts) / v:.1f}" for v in best.values()) + " items/s")
    base = len(prompts) / next(iter(best.values()))
    print(f"\n{'bundle':60s} {'encoder':24s} {'items/s':>8s} {'vs first':>9s}")
    for name, secs in best.items():
        rate = len(prompts) / secs
        print(f"{name[-60:]:60s} {scorers[name].meta.encoder.name_or_path[-24:]:24s} {rate:8.1f} {rate / base:9.2f}")


if __name__ == "__main__":
    main()
