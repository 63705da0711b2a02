"""OpenVINO's own runtime (the `openvino` package) on the CPU, without onnxruntime: fp32, and bf16 on CPUs with bf16
units, on the bundle's portable graph.

Why a second OpenVINO provider: the onnxruntime plugin (`openvino.py`) lists no device on an AMD EPYC (2026-12-01),
while OpenVINO's runtime runs there and reports BF16 (AVX512-BF16). Side by side in one run on that 2-core EPYC
(MiniLM, 16 x 64 tokens, both sessions on 2 threads, a loaded machine): onnxruntime's CPU provider 22 texts/s,
this runtime 47 (fp32, rewards within 4e-7) and 88 (bf16, 0.8% of the output's range). `auto` tries the plugin
first (it is what ran on Intel Xeons), then this, then onnxruntime's CPU provider.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import BundleError
from models.providers.base import ProviderError
from models.providers.openvino import OpenVINOEngine


@dataclass(frozen=True)
class _Input:
    name: str


class RuntimeSession:
    """The slice of onnxruntime's InferenceSession the scorer uses, over an OpenVINO compiled model.

    An OpenVINO infer request is not thread-safe and the scorer is (several threads may encode at once): each
    thread gets its own request on the shared compiled model."""

    PROVIDER = "OpenVINORuntime"

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._local = threading.local()
        self._inputs = [_Input(port.get_any_name()) for port in compiled.inputs]

    def get_providers(self) -> list[str]:
        return [self.PROVIDER]

    def get_inputs(self) -> list[_Input]:
        return self._inputs

    def run(self, output_names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        results = request.infer(dict(feed))
        # Copies: the request reuses its output tensors on the next call.
        return [np.array(results[self._compiled.output(name)]) for name in output_names]


class OpenVINORuntimeProvider(OpenVINOEngine):
    name, label, ort_name = "openvino-runtime", "OpenVINO runtime", RuntimeSession.PROVIDER
    description = "openvino-runtime: OpenVINO's own runtime on the CPU (runs where the plugin lists no device)"

    def unavailable(self, precision: str) -> str | None:
        if importlib.util.find_spec("openvino") is None:
            return "provider='openvino-runtime' needs the openvino package (installed with pal-rm[serve])"
        if precision == "bf16" and "BF16" not in _capabilities():
            found = _capabilities()
            return f"precision 'bf16' needs a CPU with bf16 units (AMX or AVX512-BF16); OpenVINO reports {found}"
        return None

    def open(self, path: Path, precision: str, threads: int, spinning: bool) -> RuntimeSession:
        import openvino as ov

        self.require(precision)
        core = _core()
        try:
            model = core.read_model(str(path))
        except Exception as e:  # OpenVINO raises RuntimeError for anything it cannot parse
            raise BundleError(f"{path} is not a loadable ONNX graph: {e}") from e
        try:
            compiled = core.compile_model(model, "CPU", self.config(precision, threads))
        except Exception as e:
            raise ProviderError(f"OpenVINO {ov.__version__} could not compile {path} for the CPU: {e}") from e
        return RuntimeSession(compiled)


PROVIDER = OpenVINORuntimeProvider()


@functools.cache
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def _capabilities() -> list[str]:
    return list(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def runs_here(precision: str = "fp32") -> bool:
    return PROVIDER.unavailable(precision) is None
