"""How close pal-rm gets to this CPU's limit: the theoretical FLOP peak (cores x clock x FLOP/cycle), the peak a plain
matrix multiply of the workload's shapes reaches (torch and OpenVINO, fp32 and bf16), and pal-rm's rate on the
GRPO-like 64 x 8 workload as a share of each, side by side in one run.

    .venv/bin/python bench/roofline.py                        # every pal-rm CPU setup that runs here
    .venv/bin/python bench/roofline.py --ghz 3.7 --scorers openvino-runtime:bf16

FLOPs counted (bench/bench_gpu.py's model_flops): 2 x non-embedding parameters per real token plus attention
(4 x layers x L x d per token of a length-L text), over the distinct texts the scorer encodes (the 64 prompts once,
the 512 responses): ~22 MFLOP per token on MiniLM. Padding is not counted: it is work the scorer chose to do.

Theoretical peak per core and cycle (assumptions, printed with the result; --ghz and --flops-per-cycle override):
    fp32  AVX-512 FMA: 2 FMA pipes x 16 lanes x 2 = 64 FLOP (Intel Xeon, AMD Zen 5 with its full 512-bit datapath);
          Zen 4 runs 512-bit FMAs on 256-bit units: 32
    bf16  AMX (amx_bf16): 1024 FLOP (one TMUL tile op per 16 cycles on 16x32 x 32x16 bf16 tiles)
          AVX512-BF16 (VDPBF16PS, 32 bf16 pairs -> 16 fp32 sums, 64 FLOP, 2 per cycle): 128; Zen 4: 64
The clock is /proc/cpuinfo's "cpu MHz"; a VM reports the nominal TSC rate while the cores boost higher, so when a
plain matmul beats the peak at that clock, the peaks are raised to the clock that matmul implies (a lower bound:
the real peak may be higher still); --ghz sets the clock instead. Shared machine: read the ratios of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_gpu import make_workload, model_flops  # noqa: E402


@dataclass(frozen=True)
class Cpu:
    model: str
    family: int
    cores: int
    ghz: float
    flags: frozenset[str]

    @property
    def zen4(self) -> bool:
        return "AMD" in self.model and self.family == 0x19

    def flops_per_cycle(self, precision: str) -> tuple[int, str]:
        """FLOP per cycle per core at this precision, and the assumption behind it."""
        if precision == "bf16":
            if "amx_bf16" in self.flags:
                return 1024, "AMX bf16 tiles: 1024 FLOP/cycle/core"
            if "avx512_bf16" in self.flags:
                if self.zen4:
                    return 64, "AVX512-BF16 on Zen 4 (512-bit ops on 256-bit units): 64 FLOP/cycle/core"
                return 128, "AVX512-BF16 VDPBF16PS, 2/cycle x 64 FLOP (full 512-bit datapath): 128 FLOP/cycle/core"
            return 0, "no bf16 units"
        if "avx512f" in self.flags:
            if self.zen4:
                return 32, "AVX-512 FMA on Zen 4 (2 x 256-bit FMA): 32 FLOP/cycle/core"
            return 64, "AVX-512 FMA, 2 pipes x 16 fp32 lanes x 2: 64 FLOP/cycle/core"
        return 32, "AVX2 FMA, 2 pipes x 8 lanes x 2: 32 FLOP/cycle/core"

    def peak_gflops(self, precision: str, override: float | None = None) -> float:
        per_cycle = override if override is not None else self.flops_per_cycle(precision)[0]
        return self.cores * self.ghz * per_cycle


def read_cpu(ghz: float | None) -> Cpu:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return Cpu(
        model=fields.get("model name", "unknown"),
        family=int(fields.get("cpu family", "0") or 0),
        cores=cores,
        ghz=ghz or float(fields.get("cpu MHz", "0") or 0) / 1000,
        flags=frozenset(fields.get("flags", "").split()),
    )


# --- plain matrix multiplies of the encoder's shapes ------------------------------------------------------------


def layer_shapes(hidden: int, ffn: int) -> list[tuple[int, int]]:
    """(in, out) of one encoder layer's weight multiplies: Q, K, V, attention output, FFN up, FFN down."""
    return [(hidden, hidden)] * 4 + [(hidden, ffn), (ffn, hidden)]


def torch_matmul_gflops(tokens: int, shapes: list[tuple[int, int]], precision: str, seconds: float) -> float:
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    xs = {k: torch.randn(tokens, k, dtype=dtype) for k, _ in shapes}
    ws = [torch.randn(k, n, dtype=dtype) for k, n in shapes]
    flops = sum(2 * tokens * k * n for k, n in shapes)

    def once() -> None:
        for (k, _), w in zip(shapes, ws, strict=True):
            torch.matmul(xs[k], w)

    return _rate(once, flops, seconds)


def openvino_matmul_gflops(tokens: int, shapes: list[tuple[int, int]], precision: str, seconds: float) -> float:
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    params, outputs = [], []
    for k, n in shapes:
        x = ops.parameter([tokens, k], ov.Type.f32)
        params.append(x)
        outputs.append(ops.matmul(x, ops.constant(rng.standard_normal((k, n)).astype(np.float32)), False, False))
    hint = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(ov.Model(outputs, params), "CPU", hint)
    request = compiled.create_infer_request()
    feed = [rng.standard_normal((tokens, k)).astype(np.float32) for k, _ in shapes]
    flops = sum(2 * tokens * k * n for k, n in shapes)
    return _rate(lambda: request.infer(feed), flops, seconds)


def _rate(fn, flops: float, seconds: float) -> float:
    """Best GFLOP/s of repeated calls within `seconds` (after a warm-up call)."""
    fn()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


# --- pal-rm on the workload -------------------------------------------------------------------------------------


def default_scorers() -> list[tuple[str, str]]:
    from models.providers.openvino_runtime import runs_here

    setups = [("cpu", "fp32")]
    if runs_here():
        setups.append(("openvino-runtime", "fp32"))
        if runs_here("bf16"):
            setups.append(("openvino-runtime", "bf16"))
    return setups


def encoder_dims(bundle: Path) -> tuple[int, int, int]:
    """hidden size, FFN size and layers of the bundle's encoder (its HF config.json)."""
    import json

    from models.bundle import read_meta
    from models.encoder import resolve_encoder_path

    cfg = json.loads((Path(resolve_encoder_path(read_meta(bundle).encoder.name_or_path)) / "config.json").read_text())
    return int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="default: a random PAL-B head on MiniLM, exported here")
    ap.add_argument("--scorers", help="PROVIDER:PRECISION,... (default: cpu:fp32 + openvino-runtime fp32/bf16)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the pal-rm setups; best counts")
    ap.add_argument("--matmul-tokens", type=int, default=2048, help="rows of the plain matmuls (a batch's tokens)")
    ap.add_argument("--matmul-seconds", type=float, default=3.0)
    ap.add_argument("--ghz", type=float, help="clock for the theoretical peak (default: /proc/cpuinfo)")
    ap.add_argument("--flops-per-cycle", type=float, nargs=2, metavar=("FP32", "BF16"), help="override the table")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tempfile

    import torch

    from models.scorer import Scorer

    cpu = read_cpu(args.ghz)
    threads = cpu.cores
    torch.set_num_threads(threads)
    print(f"CPU: {cpu.model}, family {cpu.family:#x}, {cpu.cores} cores at {cpu.ghz:.2f} GHz, load {os.getloadavg()}")
    peaks = {}
    for i, precision in enumerate(("fp32", "bf16")):
        override = args.flops_per_cycle[i] if args.flops_per_cycle else None
        per_cycle, why = cpu.flops_per_cycle(precision)
        peaks[precision] = cpu.peak_gflops(precision, override)
        print(f"  theoretical {precision} peak {peaks[precision]:8.1f} GFLOP/s = {cpu.cores} x {cpu.ghz:.2f} GHz x "
              f"{override or per_cycle} ({why if override is None else 'given'})")  # fmt: skip

    bundle = args.bundle
    if bundle is None:
        from models.export import export_bundle
        from tests.scorer.factory import make_random_checkpoint

        tmp = Path(tempfile.mkdtemp(prefix="roofline-"))
        export_bundle(make_random_checkpoint(tmp / "ckpt", form="B", max_length=args.max_length), tmp / "bundle")
        bundle = tmp / "bundle"
    hidden, ffn, layers = encoder_dims(bundle)
    shapes = layer_shapes(hidden, ffn)
    achieved: dict[tuple[str, str], float] = {}
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and peaks["bf16"] == 0:
            continue
        achieved["torch", precision] = torch_matmul_gflops(args.matmul_tokens, shapes, precision, args.matmul_seconds)
        with contextlib.suppress(ImportError):  # OpenVINO is an optional extra
            achieved["openvino", precision] = openvino_matmul_gflops(
                args.matmul_tokens, shapes, precision, args.matmul_seconds
            )
    print(f"\nplain matmuls of one layer's shapes ({args.matmul_tokens} x {shapes}), {threads} threads:")
    for (lib, precision), g in achieved.items():
        print(f"  {lib:9s} {precision}: {g:8.1f} GFLOP/s = {100 * g / peaks[precision]:5.1f}% of the {precision} peak")
    # A VM reports the nominal clock; a matmul beating the peak at that clock shows the cores boost above it. The
    # peak is then taken at the clock that matmul implies (a lower bound of the real one), not left below it.
    implied = max((g / peaks[x] * cpu.ghz for (_, x), g in achieved.items() if peaks[x]), default=cpu.ghz)
    if implied > cpu.ghz and args.ghz is None:
        peaks = {x: p * implied / cpu.ghz for x, p in peaks.items()}
        print(
            f"  -> the cores run at >= {implied:.2f} GHz (the best matmul at 100% of the peak), not the "
            f"{cpu.ghz:.2f} GHz reported; peaks below: fp32 {peaks['fp32']:.1f}, bf16 {peaks['bf16']:.1f} GFLOP/s"
        )

    setups = [tuple(s.split(":")) for s in args.scorers.split(",")] if args.scorers else default_scorers()
    prompts, responses = make_workload(args.prompts, args.responses, seed=0)
    scorers = {
        (p, x): Scorer.load(bundle, provider=p, precision=x, intra_op_threads=threads) for p, x in setups
    }
    first = next(iter(scorers.values()))
    unique = list(dict.fromkeys(prompts)) + list(dict.fromkeys(responses))
    lengths = first.count_tokens(unique)
    flops = model_flops(bundle, lengths)
    print(
        f"\nworkload: {len(prompts)} items, {len(unique)} distinct texts, {sum(lengths)} real tokens, "
        f"{flops / 1e9:.1f} GFLOP ({flops / sum(lengths) / 1e6:.1f} MFLOP per token; {layers} layers, d={hidden})"
    )
    best = {key: float("inf") for key in scorers}
    for scorer in scorers.values():
        scorer.warmup()
    for _ in range(args.rounds):
        for key, scorer in scorers.items():
            scorer.clear_cache()
            t0 = time.perf_counter()
            scorer.encode(prompts, responses)
            best[key] = min(best[key], time.perf_counter() - t0)
    header = ("pal-rm setup", "texts/s", "tokens/s", "GFLOP/s", "% theor. peak", "% torch matmul", "% OV matmul")
    print("\n{:28s} {:>8s} {:>9s} {:>8s} {:>13s} {:>14s} {:>11s}".format(*header))
    for (provider, precision), secs in best.items():
        g = flops / secs / 1e9
        torch_mm, ov_mm = achieved.get(("torch", precision)), achieved.get(("openvino", precision))
        print(
            f"{provider + ' / ' + precision:28s} {len(unique) / secs:8.1f} {sum(lengths) / secs:9.0f} {g:8.1f} "
            f"{100 * g / peaks[precision]:12.1f}% "
            f"{'-' if torch_mm is None else f'{100 * g / torch_mm:.1f}%':>14s} "
            f"{'-' if ov_mm is None else f'{100 * g / ov_mm:.1f}%':>11s}"
        )
    print(f"\n(load average at the end: {os.getloadavg()}; shared machine: compare rows of this run, not runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
