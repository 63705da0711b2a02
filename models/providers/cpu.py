"""onnxruntime's own CPU provider: runs everywhere, on the bundle's fused graph (fp32, or the fp16 graph)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from models.bundle import BundleError
from models.providers.base import ExecutionProvider, native_session

if TYPE_CHECKING:
    import onnxruntime as ort


class CpuProvider(ExecutionProvider):
    name, label, ort_name = "cpu", "CPU", "CPUExecutionProvider"
    description = "cpu: onnxruntime's CPU provider (always available)"
    precisions = ("fp32", "fp16")
    # fp16 is not a candidate for the measured choice: it ran 0.93x fp32 here (docs/SCORER.md); it is there to check
    # the fp16 graph, not to be faster.
    fast_first = ("fp32",)
    # Batches that keep the activations in cache win (bench: 1024 tokens ran 1.4x faster than 16384 on 2 cores).
    batch_tokens = 1024
    # A run costs a fixed ~1.5 ms (about 8 tokens' worth, 1 thread) and every padded token costs as much as a real
    # one, so mixing lengths loses.
    pad_tolerance = 8

    def open(self, path: Path, precision: str, threads: int, spinning: bool) -> ort.InferenceSession:
        try:
            return native_session(path, [self.ort_name], threads, spinning)
        except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            raise BundleError(f"{path} is not a loadable ONNX graph: {e}") from e


PROVIDER = CpuProvider()
