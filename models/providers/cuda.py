"""onnxruntime's CUDA provider (the onnxruntime-gpu build): the fused graph, fp32 or fp16, big batches."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from models.providers.base import ExecutionProvider, ProviderError, native_session

if TYPE_CHECKING:
    import onnxruntime as ort


class CudaProvider(ExecutionProvider):
    name, label, ort_name = "cuda", "CUDA", "CUDAExecutionProvider"
    description = "cuda: CUDAExecutionProvider (onnxruntime-gpu) or fail at start"
    precisions = ("fp32", "fp16")
    # Tensor cores run fp16; fp32 does not use them.
    fast_first = ("fp16", "fp32")
    # A GPU wants big batches to fill its SMs.
    batch_tokens = 16384
    # Padding is nearly free next to a kernel launch.
    pad_tolerance = None

    def unavailable(self, precision: str) -> str | None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if self.ort_name not in available:
            return (
                f"provider='cuda' requested but this onnxruntime build has no {self.ort_name} (available: "
                f"{available}); install onnxruntime-gpu matching the CUDA runtime, or set the provider to 'cpu'"
            )
        return None

    def open(self, path: Path, precision: str, threads: int, spinning: bool) -> ort.InferenceSession:
        self.require(precision)
        try:
            session = native_session(path, [self.ort_name, "CPUExecutionProvider"], threads, spinning)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ProviderError(f"could not start {self.ort_name} for {path}: {e}") from e
        return self.active(session)


PROVIDER = CudaProvider()
