"""Scorer throughput on a GRPO-like workload, side by side with torch baselines using the same encoder and head.

    .venv/bin/python bench/bench_scorer.py                       # random head on MiniLM, CPU, 64 prompts x 8
    .venv/bin/python bench/bench_scorer.py --provider cuda --fp16 --naive-items 0

Workload: P prompts x R responses (seeded, realistic varied lengths: prompts 8-150 words, responses log-normal
around 60 words, a few past max_length), each prompt group scored for one random user mixture. Every method
computes the same rewards (checked: max |diff| printed). Methods:

    scorer          models.scorer.Scorer (ONNX Runtime, fused graph), cache cleared before each run, so the
                    only reuse is the in-call dedup of the 8x repeated prompts
    scorer (warm)   the same step again with a warm cache (an RLHF step re-scoring texts it has seen)
    torch naive     per item: tokenize + encode the prompt and the response, one forward pass each (timed on
                    --naive-items items spread evenly over the workload: its rate does not depend on the count;
                    in the same interleaved rounds, best round counts, like every other method)
    torch batched   torch eager, batches of --torch-batch items in arrival order, padded to the longest row
    torch batched + dedup/sort   the scorer's own batching (dedup, length sort, token budget) in torch:
                    isolates what the ONNX graph itself buys

Prints items/s per method, ratios against the scorer, and p50/p99 latency of per-group calls and of encoder
batches. All methods run in interleaved rounds (best round counts), so other load on the machine hits them alike;
absolute numbers still want a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCABULARY = (
    "the model reward policy answer question data training user value system result example because however "
    "people should would could think first second finally explain step reason careful evidence simple complex "
    "energy water light plant history science language code function return error memory network server river "
    "mountain city music story character friend family health doctor market price cost time year month week "
    "summary detail clear short long option choice prefer better worse kind helpful honest safe risk"
)


def make_workload(n_prompts: int, n_responses: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(seed)

    def text(n_words: int) -> str:
        words = rng.choice(VOCABULARY.split(), size=max(1, n_words))
        return " ".join(words).capitalize() + "."

    prompts, responses = [], []
    for _ in range(n_prompts):
        prompt = text(int(rng.integers(8, 150))) + " What do you think?"
        for _ in range(n_responses):
            prompts.append(prompt)
            responses.append(text(int(np.clip(rng.lognormal(np.log(60), 0.8), 3, 400))))
    return prompts, responses, rng.dirichlet(np.ones(3), size=n_prompts)


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to score with (default: export --checkpoint)")
    ap.add_argument("--checkpoint", type=Path, help="checkpoint (default: a random PAL-B head on MiniLM)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256, help="for the default random checkpoint")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--fp16", action="store_true", help="score with the fp16 graph (exported if needed)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads, ORT and torch")
    ap.add_argument("--spinning", action="store_true", help="ORT threads spin within a run (PAL_INTRA_OP_SPINNING)")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="default: the scorer's for the provider")
    ap.add_argument("--torch-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best round counts")
    ap.add_argument("--naive-items", type=int, default=64, help="items timed in the per-item loop (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-device", help="device of the torch baselines (default: cuda when scoring on CUDA)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from models.checkpoint import load_model
    from models.encoder import PooledEncoder, load_tokenizer
    from models.export import export_bundle
    from models.scorer import Scorer
    from tests.scorer.factory import make_random_checkpoint

    if args.bundle is not None and args.checkpoint is None:
        # The torch baselines need the checkpoint the bundle was exported from, or they score another model.
        raise SystemExit("--bundle needs --checkpoint (the checkpoint it was exported from)")
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scorer-"))
    checkpoint = args.checkpoint or make_random_checkpoint(tmp / "checkpoint", form="B", max_length=args.max_length)
    bundle = args.bundle
    if bundle is None:
        bundle = tmp / "bundle"
        report = export_bundle(checkpoint, bundle, fp16=args.fp16)
        print(f"exported {bundle} in {report.seconds}s, fusions {report.fusions}")

    scorer = Scorer.load(
        bundle, provider=args.provider, fp16=args.fp16, intra_op_threads=args.threads, spinning=args.spinning,
        max_batch_tokens=args.max_batch_tokens,
    )
    cfg, spec = scorer.meta.pal, scorer.meta.encoder
    prompts, responses, group_w = make_workload(args.prompts, args.responses, args.seed)
    if cfg.k != group_w.shape[1]:
        group_w = np.random.default_rng(args.seed).dirichlet(np.ones(cfg.k), size=args.prompts)
    weights = np.repeat(group_w, args.responses, axis=0)
    n = len(prompts)
    tokens = scorer.count_tokens(responses)
    print(
        f"workload: {args.prompts} prompts x {args.responses} responses = {n} items, PAL-{cfg.form} K={cfg.k}, "
        f"max_length {spec.max_length}, response tokens p50 {int(np.median(tokens))} max {max(tokens)}, "
        f"{int(scorer.encode(prompts, responses).truncated.sum())} items truncated"
    )
    print(
        f"provider {scorer.provider}, {args.threads} threads (spinning={args.spinning}), fp16={args.fp16}, "
        f"batch budget {scorer.max_batch_tokens} tokens, pad tolerance {scorer.pad_tolerance}, "
        f"torch {torch.__version__}"
    )

    scorer.warmup()
    batch_latencies: list[float] = []
    run = scorer._run

    def timed_run(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = run(ids, mask)
        batch_latencies.append(time.perf_counter() - t0)
        return out

    scorer._run = timed_run  # type: ignore[method-assign]  # per-batch latency, bench only

    def score_cold() -> np.ndarray:
        scorer.clear_cache()
        return scorer.rewards(scorer.encode(prompts, responses), weights)

    def score_warm() -> np.ndarray:
        return scorer.rewards(scorer.encode(prompts, responses), weights)

    group_lat = []
    scorer.clear_cache()
    for g in range(args.prompts):
        sl = slice(g * args.responses, (g + 1) * args.responses)
        t0 = time.perf_counter()
        scorer.rewards(scorer.encode(prompts[sl], responses[sl]), weights[sl])
        group_lat.append(time.perf_counter() - t0)
    batch_latencies.clear()  # per-batch latency below: the full-step runs only

    # ---- torch baselines: same encoder weights, same tokenization, same head
    model, _ = load_model(checkpoint)
    head = model.head.eval()
    on_gpu = scorer.provider == "CUDAExecutionProvider" and torch.cuda.is_available()
    device = torch.device(args.torch_device or ("cuda" if on_gpu else "cpu"))
    head.to(device)
    encoder = PooledEncoder(spec, attn_implementation="eager").eval().to(device)
    print(f"torch baselines on {device}")
    tok = load_tokenizer(spec)
    tok.truncation_side = spec.truncation_side

    def embed(texts: list[str]) -> torch.Tensor:
        b = tok(texts, truncation=True, max_length=spec.max_length, padding=True, return_tensors="pt")
        return encoder(b["input_ids"].to(device), b["attention_mask"].to(device))

    def reward(p_emb: torch.Tensor, x_emb: torch.Tensor, w: np.ndarray) -> np.ndarray:
        return head.reward(p_emb, x_emb, torch.from_numpy(w).float().to(device)).double().cpu().numpy()

    def items(p: list[str], x: list[str]) -> tuple[list[str], list[str]]:
        # PAL-A embeds the pair text only; the prompt slot is ignored by the head.
        if cfg.form == "A":
            from models.config import pair_text

            pairs = [pair_text(a, b) for a, b in zip(p, x, strict=True)]
            return pairs, pairs
        return p, x

    @torch.inference_mode()
    def torch_naive(idx: np.ndarray) -> np.ndarray:
        out = np.empty(len(idx))
        for j, i in enumerate(idx):
            p, x = items([prompts[i]], [responses[i]])
            out[j] = reward(embed(p), embed(x), weights[i : i + 1])[0]
        return out

    @torch.inference_mode()
    def torch_batched() -> np.ndarray:
        out = []
        for s in range(0, n, args.torch_batch):
            p, x = items(prompts[s : s + args.torch_batch], responses[s : s + args.torch_batch])
            out.append(reward(embed(p), embed(x), weights[s : s + args.torch_batch]))
        return np.concatenate(out)

    @torch.inference_mode()
    def torch_dedup() -> np.ndarray:
        from models.scorer import _token_budget_batches

        p_all, x_all = items(prompts, responses)
        uniq = list(dict.fromkeys(p_all + x_all))
        lengths = np.array([len(ids) for ids in tok(uniq, truncation=True, max_length=spec.max_length)["input_ids"]])
        order = np.argsort(-lengths, kind="stable")
        emb: dict[str, torch.Tensor] = {}
        for batch in _token_budget_batches(lengths[order], scorer.max_batch_tokens, scorer.pad_tolerance):
            texts = [uniq[j] for j in order[batch]]
            emb.update(zip(texts, embed(texts), strict=True))
        return reward(torch.stack([emb[t] for t in p_all]), torch.stack([emb[t] for t in x_all]), weights)

    # Rounds interleave the methods so that load from other processes hits them alike; best round counts.
    everything = np.arange(n)
    # The per-item loop runs on items spread evenly over the workload, so every prompt length is represented.
    naive_idx = np.linspace(0, n - 1, min(n, args.naive_items)).round().astype(int)
    methods: dict[str, tuple[Callable[[], np.ndarray], np.ndarray]] = {
        "scorer": (score_cold, everything),
        "torch batched eager": (torch_batched, everything),
        "torch batched + dedup/sort": (torch_dedup, everything),
    }
    if args.naive_items:
        methods["torch naive per-item"] = (lambda: torch_naive(naive_idx), naive_idx)
    best: dict[str, float] = {name: float("inf") for name in methods}
    outputs: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        for name, (fn, _) in methods.items():
            secs, outputs[name] = timed(fn)
            best[name] = min(best[name], secs)
        rates = ", ".join(f"{k} {len(methods[k][1]) / v:.1f} items/s" for k, v in best.items())
        print(f"round {r + 1} (best so far): {rates}", flush=True)
    rows = [(name, len(idx), best[name], outputs[name], idx) for name, (_, idx) in methods.items()]
    secs, out = timed(score_warm)
    rows.insert(1, ("scorer (warm cache)", n, secs, out, everything))
    ref = outputs["torch batched eager"]
    header = ("method", "items", "seconds", "items/s", "scorer speed-up", "max|r - torch|")
    print("\n{:30s} {:>6s} {:>9s} {:>9s} {:>16s} {:>15s}".format(*header))
    scorer_rate = n / best["scorer"]
    for name, count, secs, r, idx in rows:
        rate = count / secs
        diff = np.abs(r - ref[idx]).max()
        print(f"{name:30s} {count:6d} {secs:9.3f} {rate:9.1f} {scorer_rate / rate:15.2f}x {diff:15.2e}")
    gl = np.array(group_lat) * 1e3
    bl = np.array(batch_latencies) * 1e3
    print(
        f"latency per {args.responses}-item group call (cold cache): p50 {np.percentile(gl, 50):.1f} ms, "
        f"p99 {np.percentile(gl, 99):.1f} ms"
    )
    print(
        f"latency per encoder batch (<= {scorer.max_batch_tokens} padded tokens, {len(bl)} batches): "
        f"p50 {np.percentile(bl, 50):.1f} ms, p99 {np.percentile(bl, 99):.1f} ms"
    )


if __name__ == "__main__":
    main()
