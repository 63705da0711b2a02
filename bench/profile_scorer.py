"""Where a scorer's time goes on the GRPO-like 64 x 8 workload: Python-side stages (py-spy samples) and, on OpenVINO,
the graph's own per-operation time (its PERF_COUNT counters).

    .venv/bin/python bench/profile_scorer.py                                  # openvino-runtime bf16, MiniLM
    .venv/bin/python bench/profile_scorer.py --provider cpu --precision fp32 --no-ops

Stages (the innermost pal-rm or library frame of each py-spy sample): tokenize (Tokenizer.encode_batch), cache and
dedup (hashing, LRU), batching and padding (sorting, building the id/mask arrays), graph (the session's run: the
encoder and head), output copies (np.array/astype of the graph's outputs), assemble (stacking rows, rewards),
other. OpenVINO counters: real time per operation type summed over every infer call of a workload pass, with the
kernel it ran (e.g. brgemm_avx512_bf16). A shared machine skews absolute times; the shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_gpu import make_workload  # noqa: E402

# First match wins, scanning a sample's frames from the innermost out.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("graph (encoder + head)", ("infer (", "run (onnxruntime", "_run (models/scorer.py")),
    ("output copies", ("run (models/providers/openvino_runtime.py",)),
    ("tokenize", ("encode_batch", "prepare (models/scorer.py")),
    ("batching and padding", ("_encode_ids", "_token_budget_batches", "_padded_widths")),
    ("cache and dedup", ("_digest", "_cache_key", "cache.py", "_clean")),
    ("assemble and rewards", ("_assemble", "_stack", "rewards (models/scorer.py", "reward_b", "run (models/scorer.py")),
]


def build_bundle(max_length: int) -> Path:
    from models.export import export_bundle
    from tests.scorer.factory import make_random_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="profile-"))
    export_bundle(make_random_checkpoint(tmp / "ckpt", form="B", max_length=max_length), tmp / "bundle")
    return tmp / "bundle"


def load(bundle: Path, provider: str, precision: str, threads: int, perf_count: bool):  # -> Scorer
    from models.providers.openvino import OpenVINOEngine
    from models.scorer import Scorer

    if perf_count:
        config = OpenVINOEngine.config

        def with_counters(precision: str, threads: int) -> dict[str, str]:
            return {**config(precision, threads), "PERF_COUNT": "YES"}

        OpenVINOEngine.config = staticmethod(with_counters)  # type: ignore[method-assign]
    return Scorer.load(bundle, provider=provider, precision=precision, intra_op_threads=threads)


def loop(args: argparse.Namespace) -> None:
    """The workload, cold cache, for `seconds` (what py-spy samples)."""
    bundle = args.bundle or build_bundle(args.max_length)
    scorer = load(bundle, args.provider, args.precision, args.threads, False)
    prompts, responses = make_workload(64, 8, seed=0)
    scorer.warmup()
    deadline, passes = time.perf_counter() + args.seconds, 0
    while time.perf_counter() < deadline:
        scorer.clear_cache()
        scorer.encode(prompts, responses)
        passes += 1
    print(f"{passes} passes", file=sys.stderr)


def python_stages(args: argparse.Namespace) -> dict[str, float]:
    """Share of py-spy samples per stage, of the workload loop run under py-spy in a child process."""
    out = Path(tempfile.mkdtemp(prefix="pyspy-")) / "raw.txt"
    spy = Path(sys.executable).with_name("py-spy")
    cmd = [str(spy), "record", "-f", "raw", "-r", "200", "-o", str(out), "--", sys.executable, __file__, "--loop",
           "--provider", args.provider, "--precision", args.precision, "--threads", str(args.threads),
           "--seconds", str(args.seconds), "--max-length", str(args.max_length)]  # fmt: skip
    if args.bundle:
        cmd += ["--bundle", str(args.bundle)]
    subprocess.run(cmd, check=True, capture_output=True)
    counts: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not any("encode (models/scorer.py" in f for f in frames):
            continue  # loading, warm-up, interpreter start
        counts[_stage(frames)] += int(n)
    total = sum(counts.values()) or 1
    return {stage: counts[stage] / total for stage in [s for s, _ in STAGES] + ["other"]}


def _stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "other"


def openvino_ops(args: argparse.Namespace, bundle: Path) -> tuple[dict[tuple[str, str], float], float, float]:
    """Per (operation type, kernel) real time summed over one workload pass; that sum and the pass's wall time."""
    from models.providers.openvino_runtime import RuntimeSession

    totals: collections.Counter[tuple[str, str]] = collections.Counter()
    run = RuntimeSession.run

    def counted(self, output_names, feed):  # noqa: ANN001, ANN202
        out = run(self, output_names, feed)
        for info in self._local.request.profiling_info:
            if info.status.name == "EXECUTED":
                totals[info.node_type, info.exec_type] += info.real_time.total_seconds()
        return out

    scorer = load(bundle, args.provider, args.precision, args.threads, True)
    prompts, responses = make_workload(64, 8, seed=0)
    scorer.warmup()
    scorer.clear_cache()
    scorer.encode(prompts, responses)  # shapes compiled
    RuntimeSession.run = counted  # type: ignore[method-assign]
    scorer.clear_cache()
    t0 = time.perf_counter()
    scorer.encode(prompts, responses)
    wall = time.perf_counter() - t0
    RuntimeSession.run = run  # type: ignore[method-assign]
    return dict(totals), sum(totals.values()), wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--provider", default="openvino-runtime")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seconds", type=float, default=20.0, help="py-spy sampling time")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--no-ops", action="store_true", help="skip OpenVINO's per-operation counters")
    ap.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.loop:
        loop(args)
        return 0
    args.bundle = args.bundle or build_bundle(args.max_length)
    print(f"{args.provider} / {args.precision}, {args.threads} threads, load {os.getloadavg()}")
    stages = python_stages(args)
    print("\nwall time of scorer.encode by stage (py-spy samples):")
    for stage, share in stages.items():
        print(f"  {stage:28s} {100 * share:5.1f}%")
    if not args.no_ops and args.provider == "openvino-runtime":
        ops, in_graph, wall = openvino_ops(args, args.bundle)
        print(f"\nOpenVINO per-operation time, one pass: {in_graph:.3f} s in the graph of {wall:.3f} s wall")
        by_type: collections.Counter[str] = collections.Counter()
        kernels: dict[str, set[str]] = collections.defaultdict(set)
        for (node_type, kernel), secs in ops.items():
            by_type[node_type] += secs
            kernels[node_type].add(kernel)
        for node_type, secs in by_type.most_common(12):
            print(f"  {node_type:24s} {100 * secs / in_graph:5.1f}%  {', '.join(sorted(kernels[node_type]))[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
