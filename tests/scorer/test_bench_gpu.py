"""bench/bench_gpu.py: refuses to run without CUDA, and its measurement runs (here on the CPU provider, called
directly, so the GPU run is not its first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from training.data.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from bench import bench_gpu  # noqa: E402


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is there")
def test_refuses_without_cuda() -> None:
    run = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_gpu.py")], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 2
    assert "refusing to run" in run.stderr and "CUDAExecutionProvider" in run.stderr
    assert "items/s" not in run.stdout  # nothing measured, nothing printed that looks like a result


def test_measure_counts_items_tokens_and_flops(bundle_b: Path) -> None:
    prompts, responses = bench_gpu.make_workload(2, 3, seed=0)
    r = bench_gpu.measure(bundle_b, "fp32", prompts, responses, rounds=1, provider="cpu", peak=1.0)
    assert (r.items, r.texts, r.provider) == (6, 2 + 6, "CPUExecutionProvider")
    assert r.tokens > r.texts and r.items_per_s > 0 and r.tokens_per_s > r.items_per_s
    # MiniLM: 6 layers x (4 d^2 + 2 d 4d), d=384 -> 10.6M non-embedding parameters, 2 FLOPs each per token,
    # plus attention (a few % at these lengths).
    flops_per_token = r.tflops * 1e12 * r.seconds / r.tokens
    assert 2 * 10.6e6 < flops_per_token < 2 * 10.6e6 * 1.2
    assert r.pct_of_peak == pytest.approx(100 * r.tflops, rel=0.01)
    assert bench_gpu.peak_tflops("NVIDIA H100 PCIe")[0] == 756.0 and bench_gpu.peak_tflops("NVIDIA H200")[0] > 900
