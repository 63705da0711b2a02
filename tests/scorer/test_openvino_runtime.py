"""OpenVINO's own runtime as a provider (models/providers/openvino_runtime.py): fp32 scores like the torch model,
bf16 stays close to fp32, threads share one compiled model safely, and `auto` picks it where the onnxruntime
plugin lists no device (an AMD EPYC)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models import bundle as B
from models.bundle import BundleError
from models.providers import openvino as ep
from models.providers import openvino_runtime as rt
from models.scorer import Scorer
from tests.scorer.factory import copy_bundle
from tests.scorer.test_openvino import check_bf16_or_refused, check_threads_agree
from tests.scorer.test_parity import PROMPTS, RESPONSES, _torch_rewards, _user_weights

if not rt.runs_here():
    pytest.skip(f"OpenVINO's runtime does not run here: {rt.PROVIDER.unavailable('fp32')}", allow_module_level=True)


@pytest.fixture(scope="module")
def runtime(bundles: dict[str, Path]) -> dict[str, Scorer]:
    return {form: Scorer.load(path, provider="openvino-runtime", intra_op_threads=1) for form, path in bundles.items()}


@pytest.mark.parametrize("form", ["A", "B"])
def test_fp32_rewards_match_torch_model(form: str, bundles: dict[str, Path], runtime: dict[str, Scorer]) -> None:
    scorer = runtime[form]
    assert (scorer.provider, scorer.precision, scorer.width_multiple) == ("OpenVINORuntime", "fp32", 16)
    enc = scorer.encode(PROMPTS, RESPONSES)
    checkpoint = bundles[form].parent / f"checkpoint-{form}"
    for w in _user_weights(scorer, len(PROMPTS)):
        w = np.ascontiguousarray(w)
        assert np.abs(scorer.rewards(enc, w) - _torch_rewards(checkpoint, PROMPTS, RESPONSES, w)).max() < 1e-4
    on_cpu = Scorer.load(bundles[form], provider="cpu").encode(PROMPTS, RESPONSES)
    assert enc.truncated.tolist() == on_cpu.truncated.tolist()


def test_bf16_stays_close_to_fp32_or_is_refused(bundles: dict[str, Path], runtime: dict[str, Scorer]) -> None:
    check_bf16_or_refused(bundles["B"], "openvino-runtime", rt.runs_here("bf16"), runtime["B"])


def test_threads_share_the_compiled_model_safely(runtime: dict[str, Scorer]) -> None:
    check_threads_agree(runtime["B"])  # each thread its own infer request on the one compiled model


def test_auto_picks_it_where_the_plugin_lists_no_device(
    bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA onnxruntime: auto picks CUDA")
    monkeypatch.setattr(ep.OpenVINOProvider, "unavailable", lambda self, precision: "lists no CPU device")
    assert Scorer.load(bundles["A"], provider="auto", intra_op_threads=1).provider == "OpenVINORuntime"
    broken = copy_bundle(bundles["A"], tmp_path / "broken")
    (broken / B.GRAPH_PORTABLE).unlink()
    (broken / B.GRAPH_PORTABLE).write_bytes(b"not an onnx graph")
    B.seal(broken)  # past the version check, to the runtime's own refusal
    with pytest.raises(BundleError, match="not a loadable ONNX graph"):
        Scorer.load(broken, provider="openvino-runtime")
