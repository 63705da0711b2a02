"""OpenVINO as an onnxruntime plugin provider (`onnxruntime-ep-openvino`) on the CPU: fp32, and bf16 on CPUs with
bf16 units (AMX, AVX512-BF16), on the bundle's portable (unfused) graph.

OpenVINO cannot run onnxruntime's fused com.microsoft operators: given the fused graph it hands them back to the
CPU provider and ran 2x slower in bf16 than on the portable graph. The plugin does not list a device on every
CPU: on the AMD EPYC development machine of 2026-12-01 it listed none (an Intel Xeon listed one), so whether it
runs is asked of the plugin itself, not inferred from it being installed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from models.bundle import BundleError
from models.providers.base import ExecutionProvider, ProviderError

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

_PLUGIN = "onnxruntime_ep_openvino"


class OpenVINOEngine(ExecutionProvider):
    """What every way of running OpenVINO on the CPU shares: precisions, the portable graph, batching."""

    precisions = ("fp32", "bf16")
    # bf16 ran 1.7x fp32 on an AVX512-BF16 EPYC and 3.3x on an AMX Xeon (bench/bench_scorer.py).
    fast_first = ("bf16", "fp32")
    # bf16 kernels (AMX tiles) gained ~10% from 1024 to 2048 tokens; fp32 ones are flat from 1024 to 4096.
    batch_tokens = 2048
    pad_tolerance = 8
    # OpenVINO builds kernels per input shape the first time it sees one (10-35 ms, bf16 the most) and caches them.
    # Widths padded to a multiple of 16 make shapes recur 16x sooner: single-item bf16 calls on fresh texts ran
    # 52 -> 102 items/s cold and ~10% faster warm.
    width_multiple = 16

    def graph(self, precision: str) -> str:
        return "portable"

    @staticmethod
    def config(precision: str, threads: int) -> dict[str, str]:
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        return config


class OpenVINOProvider(OpenVINOEngine):
    name, label, ort_name = "openvino", "OpenVINO", "OpenVINOExecutionProvider"
    description = "openvino: the OpenVINO plugin on a CPU it lists as a device, or fail at start"

    def unavailable(self, precision: str) -> str | None:
        if not installed():
            return (
                "provider='openvino' needs the onnxruntime-ep-openvino package; it installs with pal-rm[serve] on "
                "Linux x86_64, or set the provider to 'cpu'"
            )
        try:
            device = cpu_device()
        except ProviderError as e:
            return str(e)
        if precision == "bf16" and "BF16" not in _capabilities(device):
            return (
                "precision 'bf16' needs a CPU with bf16 units (AMX or AVX512-BF16); OpenVINO reports "
                f"{_capabilities(device)}"
            )
        return None

    def open(self, path: Path, precision: str, threads: int, spinning: bool) -> ort.InferenceSession:
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf

        self.require(precision)
        config = self.config(precision, threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # no node runs on onnxruntime's own pool; OpenVINO has its threads (TBB)
        # A node OpenVINO cannot run would otherwise go to the CPU provider with only a log line; refuse instead.
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        opts.add_provider_for_devices([cpu_device()], {"load_config": json.dumps({"CPU": config})})
        try:
            session = ort.InferenceSession(str(path), sess_options=opts)
        except (InvalidProtobuf, InvalidGraph) as e:
            raise BundleError(f"{path} is not a loadable ONNX graph: {e}") from e
        except Exception as e:  # onnxruntime raises its own exception types
            raise ProviderError(f"could not start {self.ort_name} for {path}: {e}") from e
        return self.active(session)


PROVIDER = OpenVINOProvider()


def installed() -> bool:
    """The onnxruntime-ep-openvino plugin can be imported (pal-rm[serve] installs it on Linux x86_64)."""
    return importlib.util.find_spec(_PLUGIN) is not None


def runs_here(precision: str = "fp32") -> bool:
    """The plugin is installed and lists this machine's CPU as a device (and, for bf16, its bf16 units)."""
    return PROVIDER.unavailable(precision) is None


def runs_bf16() -> bool:
    """OpenVINO's CPU device has bf16 units (AMX or AVX512-BF16), so precision 'bf16' can run."""
    return runs_here("bf16")


def _capabilities(device: ort.OrtEpDevice) -> list[str]:
    return device.ep_metadata.get("OPTIMIZATION_CAPABILITIES", "").split()


@functools.cache
def cpu_device() -> ort.OrtEpDevice:
    """OpenVINO's CPU device, registering the plugin library with onnxruntime on first use (once per process:
    registering it again under another name would list every device twice)."""
    import onnxruntime as ort

    try:
        plugin = importlib.import_module(_PLUGIN)
    except ImportError as e:
        raise ProviderError(
            f"provider='openvino' needs the onnxruntime-ep-openvino package ({e}); it installs with pal-rm[serve] "
            "on Linux x86_64, or set the provider to 'cpu'"
        ) from e
    name = plugin.get_ep_name()
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        try:
            ort.register_execution_provider_library("openvino", plugin.get_library_path())
        except Exception as e:  # another thread registered it first: the devices below are then listed
            log.debug("OpenVINO plugin registration: %s", e)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name and d.ep_metadata.get("ov_device") == "CPU"]
    if not devices:
        listed = sorted({d.ep_name for d in ort.get_ep_devices()})
        raise ProviderError(
            f"the OpenVINO plugin lists no CPU device on this machine (devices listed: {listed}); serve with "
            "provider 'cpu' or 'auto'"
        )
    return devices[0]
