"""Scorer throughput on a CUDA GPU: encoder-bound items/s and tokens/s, fp32 and fp16, for MiniLM and a ~0.5B
decoder, with the share of the GPU's peak FLOP rate reached. Refuses to run without CUDA (a CPU number here would
be mistaken for a GPU one).

    .venv/bin/python bench/bench_gpu.py                      # both models, fp32 + fp16, GRPO-like 64 x 8 workload
    .venv/bin/python bench/bench_gpu.py --models minilm --precisions fp16 --out runs/bench-gpu.json

Needs onnxruntime with the CUDA provider (onnxruntime-gpu, as in docker/scorer-gpu.Dockerfile) and the train extra
(torch, transformers) to build the bundles. Models (random weights: throughput does not depend on their values):

    minilm        a random PAL-B head on the packaged all-MiniLM-L6-v2 (22M parameters, fused BERT graph)
    qwen2-0.5b    a randomly initialised model of Qwen2-0.5B's shape (24 layers, d=896, GQA 14/2 heads, vocab
                  151,936: 494M parameters, so its fp32 graph keeps its weights in model.onnx.data), last-token
                  pooling, with a small byte-level BPE tokenizer built locally (tokens/s is what to compare)

Workload: P prompts x R responses of varied lengths, every text new to the scorer (cache cleared before each
round), the best of --rounds rounds counts. items/s counts (prompt, response) pairs; tokens/s counts real tokens
(what the GPU must process; padding excluded). FLOP bound: 2 x non-embedding parameters per token plus attention
(4 x layers x L x d per token of a length-L text), divided by the device's dense peak for that precision (table
below, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense peak TFLOP/s per device family: (fp16/bf16 tensor cores, tf32 tensor cores, fp32 CUDA cores).
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989.5, 494.7, 66.9),
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100": (989.5, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.1, 183.0, 91.6),
    "L4": (121.0, 60.0, 30.3),
    "A10": (125.0, 62.5, 31.2),
    "RTX 4090": (165.2, 82.6, 82.6),
    "T4": (65.0, 8.1, 8.1),
}
QWEN2_05B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
)  # fmt: skip


class NoCuda(RuntimeError):
    pass


def require_cuda() -> str:
    """The GPU's name; NoCuda unless onnxruntime has the CUDA provider and a GPU answers."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise NoCuda(
            "bench_gpu.py needs onnxruntime's CUDAExecutionProvider (install onnxruntime-gpu on a machine with an "
            f"NVIDIA GPU); this onnxruntime has {ort.get_available_providers()}"
        )
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NoCuda(f"no NVIDIA GPU answers (nvidia-smi: {e})") from e
    if out.returncode != 0 or not out.stdout.strip():
        raise NoCuda(f"no NVIDIA GPU answers (nvidia-smi: {out.stderr.strip() or out.returncode})")
    return out.stdout.strip().splitlines()[0]


def peak_tflops(device: str) -> tuple[float, float, float] | None:
    for name, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if name in device:
            return peaks
    return None


def make_workload(n_prompts: int, n_responses: int, seed: int) -> tuple[list[str], list[str]]:
    from bench.bench_scorer import make_workload as grpo

    prompts, responses, _ = grpo(n_prompts, n_responses, seed)
    return prompts, responses


# --- bundles --------------------------------------------------------------------------------------------------


def minilm_bundle(work: Path, max_length: int) -> Path:
    from models.export import export_bundle
    from tests.scorer.factory import make_random_checkpoint

    ckpt = make_random_checkpoint(work / "minilm-ckpt", form="B", k=3, max_length=max_length)
    export_bundle(ckpt, work / "minilm", fp16=True)
    return work / "minilm"


def qwen2_bundle(work: Path, max_length: int) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2Model

    from models.checkpoint import save_checkpoint
    from models.config import EncoderSpec, PALConfig
    from models.export import export_bundle
    from models.pal import PALModel
    from tests.scorer.decoders import _tokenizer

    backbone = work / "qwen2-0.5b-random"
    tokenizer = _tokenizer("qwen2", vocab_size=2048)
    torch.manual_seed(0)
    model = Qwen2Model(Qwen2Config(**QWEN2_05B, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    del model
    d = QWEN2_05B["hidden_size"]
    cfg = PALConfig(form="B", k=3, prompt_dim=d, item_dim=d, latent_dim=64, hidden_dim=256, n_hidden=1)
    spec = EncoderSpec(name_or_path=str(backbone), pooling="last", max_length=max_length)
    save_checkpoint(work / "qwen2-ckpt", PALModel(cfg, n_users=4, seed=0), [f"u{i}" for i in range(4)], spec)
    export_bundle(work / "qwen2-ckpt", work / "qwen2", fp16=True)
    return work / "qwen2"


BUNDLES = {"minilm": minilm_bundle, "qwen2-0.5b": qwen2_bundle}


# --- measurement ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    precision: str
    provider: str
    items: int
    texts: int
    tokens: int
    seconds: float
    items_per_s: float
    tokens_per_s: float
    tflops: float
    peak_tflops: float | None
    pct_of_peak: float | None
    note: str = ""


def model_flops(bundle: Path, lengths: list[int]) -> float:
    """Forward FLOPs for texts of these token lengths: 2 x non-embedding parameters per token + attention."""
    import onnx

    from models.bundle import read_meta

    meta = read_meta(bundle)
    graph = onnx.load(str(bundle / meta.graphs["fp32"]), load_external_data=False)
    params = embed = 0
    hidden = layers = 0
    for t in graph.graph.initializer:
        n = int(np.prod(t.dims))
        params += n
        if "embed" in t.name or "word_embeddings" in t.name or "position_embeddings" in t.name:
            embed += n
    cfg = json.loads((Path(_backbone_dir(meta)) / "config.json").read_text())
    hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    lengths_a = np.asarray(lengths, dtype=np.float64)
    return float(2.0 * (params - embed) * lengths_a.sum() + 4.0 * layers * hidden * (lengths_a**2).sum())


def _backbone_dir(meta) -> str:  # meta: models.bundle.BundleMeta
    from models.encoder import resolve_encoder_path

    return resolve_encoder_path(meta.encoder.name_or_path)


def measure(
    bundle: Path,
    precision: str,
    prompts: list[str],
    responses: list[str],
    rounds: int,
    provider: str = "cuda",
    peak: float | None = None,
    name: str = "",
) -> Result:
    """Best of `rounds` cold-cache scorer.encode calls over the whole workload."""
    from models.scorer import Scorer

    scorer = Scorer.load(bundle, provider=provider, precision=precision)
    unique = list(dict.fromkeys(prompts)) + list(dict.fromkeys(responses))
    lengths = scorer.count_tokens(unique)
    best = float("inf")
    scorer.encode(prompts[:8], responses[:8])  # session warm-up (CUDA graphs, cuDNN algorithm search)
    for _ in range(rounds):
        scorer.clear_cache()
        t0 = time.perf_counter()
        scorer.encode(prompts, responses)
        best = min(best, time.perf_counter() - t0)
    flops = model_flops(bundle, lengths)
    tflops = flops / best / 1e12
    return Result(
        model=name or bundle.name,
        precision=precision,
        provider=scorer.provider,
        items=len(prompts),
        texts=len(unique),
        tokens=int(sum(lengths)),
        seconds=round(best, 4),
        items_per_s=round(len(prompts) / best, 1),
        tokens_per_s=round(sum(lengths) / best, 1),
        tflops=round(tflops, 6),
        peak_tflops=peak,
        pct_of_peak=round(100 * tflops / peak, 1) if peak else None,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,qwen2-0.5b")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--peak-tflops", type=float, nargs=2, metavar=("FP32", "FP16"), help="override the table")
    ap.add_argument("--work", type=Path, help="where bundles are built (default: a temporary folder)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    try:
        device = require_cuda()
    except NoCuda as e:
        print(f"bench_gpu.py: refusing to run: {e}", file=sys.stderr)
        return 2
    peaks = peak_tflops(device)
    if args.peak_tflops:
        peak32, peak16 = args.peak_tflops
    elif peaks:
        peak32, peak16 = peaks[1], peaks[0]  # onnxruntime's CUDA provider runs fp32 MatMuls in TF32 by default
    else:
        peak32 = peak16 = None
        print(f"no peak FLOP rate known for {device!r}; pass --peak-tflops FP32 FP16 for the % column")
    prompts, responses = make_workload(args.prompts, args.responses, seed=0)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in args.models.split(","):
            t0 = time.perf_counter()
            bundle = work / ("qwen2" if model == "qwen2-0.5b" else model)
            if not (bundle / "config.json").is_file():
                bundle = BUNDLES[model](work, args.max_length)
            print(f"{model}: bundle ready in {time.perf_counter() - t0:.0f} s ({bundle})", flush=True)
            for precision in args.precisions.split(","):
                peak = peak16 if precision == "fp16" else peak32
                r = measure(bundle, precision, prompts, responses, args.rounds, "cuda", peak, model)
                results.append(r)
                print(
                    f"{model:>11} {precision}: {r.items_per_s:>9.1f} items/s {r.tokens_per_s:>11.0f} tokens/s "
                    f"{r.tflops:>7.2f} TFLOP/s = {r.pct_of_peak}% of {peak} ({r.provider})",
                    flush=True,
                )
    report = {"device": device, "workload": f"{args.prompts} prompts x {args.responses} responses",
              "results": [asdict(r) for r in results]}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
