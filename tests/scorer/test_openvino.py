"""The OpenVINO provider: the bundle's portable graph runs whole in OpenVINO, fp32 scores like the torch model, bf16
stays close to fp32, and every way it cannot start is a clear error at load."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from models import bundle as B
from models.bundle import BundleError
from models.providers import openvino as ov
from models.providers.openvino_runtime import runs_here as runtime_runs_here
from models.scorer import ProviderError, Scorer
from tests.scorer.factory import copy_bundle
from tests.scorer.test_parity import PROMPTS, RESPONSES, _torch_rewards, _user_weights

OPENVINO = ov.PROVIDER.ort_name
# What `auto` serves on when the plugin cannot: the next provider in models.providers.REGISTRY that runs here.
AFTER_PLUGIN = "OpenVINORuntime" if runtime_runs_here() else "CPUExecutionProvider"

if not ov.installed():
    pytest.skip(
        "onnxruntime-ep-openvino is not installed (pal-rm[serve] installs it on Linux x86_64)", allow_module_level=True
    )
# The plugin lists no device on some CPUs (none on an AMD EPYC, one on an Intel Xeon): those tests need one.
needs_device = pytest.mark.skipif(not ov.runs_here(), reason="the OpenVINO plugin lists no CPU device on this machine")

VOCABULARY = (
    "the model answer question data user value system reason evidence simple energy water light plant history "
    "science language code function error memory river city music story friend health market price time summary "
    "detail clear short long option choice better worse helpful honest safe risk"
)


def _texts(rng: np.random.Generator, n: int, low: int, high: int) -> list[str]:
    words = VOCABULARY.split()
    return [" ".join(rng.choice(words, size=int(rng.integers(low, high)))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def openvino(bundles: dict[str, Path]) -> dict[str, Scorer]:
    if not ov.runs_here():
        pytest.skip("the OpenVINO plugin lists no CPU device on this machine")
    return {form: Scorer.load(path, provider="openvino", intra_op_threads=1) for form, path in bundles.items()}


@pytest.mark.parametrize("form", ["A", "B"])
def test_fp32_rewards_match_torch_model(form: str, bundles: dict[str, Path], openvino: dict[str, Scorer]) -> None:
    scorer = openvino[form]
    assert scorer.provider == OPENVINO and scorer.precision == "fp32"
    enc = scorer.encode(PROMPTS, RESPONSES)
    checkpoint = bundles[form].parent / f"checkpoint-{form}"
    for w in _user_weights(scorer, len(PROMPTS)):
        w = np.ascontiguousarray(w)
        expected = _torch_rewards(checkpoint, PROMPTS, RESPONSES, w)
        assert np.abs(scorer.rewards(enc, w) - expected).max() < 1e-4


def test_truncation_flags_do_not_depend_on_the_provider(
    openvino: dict[str, Scorer], scorers: dict[str, Scorer]
) -> None:
    for form in ("A", "B"):
        flags = openvino[form].encode(PROMPTS, RESPONSES).truncated
        assert flags.tolist() == scorers[form].encode(PROMPTS, RESPONSES).truncated.tolist() and flags.any()


def test_bf16_stays_close_to_fp32_or_is_refused(bundles: dict[str, Path], openvino: dict[str, Scorer]) -> None:
    check_bf16_or_refused(bundles["B"], "openvino", ov.runs_bf16(), openvino["B"])


def check_bf16_or_refused(bundle: Path, provider: str, runs_bf16: bool, fp32: Scorer) -> None:
    """Where `provider` runs bf16 here, loading `bundle` in bf16 gives a bf16 scorer close to `fp32` (see
    check_bf16_close); elsewhere asking for bf16 is a ProviderError at load that names it."""
    if not runs_bf16:
        with pytest.raises(ProviderError, match="bf16"):
            Scorer.load(bundle, provider=provider, precision="bf16")
        return
    bf16 = Scorer.load(bundle, provider=provider, precision="bf16", intra_op_threads=1)
    assert bf16.precision == "bf16"
    check_bf16_close(fp32, bf16)


def check_bf16_close(fp32: Scorer, bf16: Scorer) -> None:
    """On GRPO-like groups (one prompt, eight responses of varied length, one user mixture per group), bf16 is not
    fp32 (the hint reached OpenVINO) and keeps what matters to RLHF: the ordering within a group, and an error
    small next to the rewards' spread."""
    rng = np.random.default_rng(0)
    groups, size = 12, 8
    prompts = [p for p in _texts(rng, groups, 5, 60) for _ in range(size)]
    responses = _texts(rng, groups * size, 3, 150)
    w = np.repeat(rng.dirichlet(np.ones(bf16.meta.pal.k), size=groups), size, axis=0)
    r32 = fp32.rewards(fp32.encode(prompts, responses), w)
    r16 = bf16.rewards(bf16.encode(prompts, responses), w)
    assert not np.array_equal(r16, r32), "bf16 ran at fp32: the precision hint did not reach OpenVINO"
    assert np.sqrt(np.mean((r16 - r32) ** 2)) < 0.05 * r32.std()
    i, j = np.triu_indices(size, 1)
    a, b = r32.reshape(groups, size), r16.reshape(groups, size)
    assert np.mean(np.sign(a[:, i] - a[:, j]) == np.sign(b[:, i] - b[:, j])) > 0.95


@needs_device
def test_auto_prefers_openvino_and_needs_the_portable_graph(bundles: dict[str, Path], tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA onnxruntime: auto picks CUDA")
    auto = Scorer.load(bundles["A"], provider="auto", intra_op_threads=1)
    assert auto.provider == OPENVINO and auto.max_batch_tokens == 2048 and auto.width_multiple == 16

    # A bundle exported before the portable graph existed: auto serves it on CPU, openvino refuses it.
    old = copy_bundle(bundles["A"], tmp_path / "old")
    meta = json.loads((old / B.CONFIG_FILE).read_text())
    del meta["graphs"]["portable"]
    (old / B.CONFIG_FILE).write_text(json.dumps(meta))
    (old / B.GRAPH_PORTABLE).unlink()
    B.seal(old)
    assert Scorer.load(old, provider="auto", intra_op_threads=1).provider == "CPUExecutionProvider"
    with pytest.raises(BundleError, match="portable"):
        Scorer.load(old, provider="openvino")


def test_auto_serves_on_cpu_when_openvino_does_not_start(
    bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise ProviderError("the OpenVINO CPU plugin failed to compile the graph")

    # As on a CPU the plugin lists, whose compile then fails.
    monkeypatch.setattr(ov.OpenVINOProvider, "unavailable", lambda self, precision: None)
    monkeypatch.setattr(ov.OpenVINOProvider, "open", broken)
    with caplog.at_level("WARNING", logger="models.scorer"):
        assert Scorer.load(bundles["A"], provider="auto", intra_op_threads=1).provider == AFTER_PLUGIN
    assert "OpenVINO provider not usable" in caplog.text
    # Asked for by name it stays an error; at bf16, auto has only OpenVINO's own runtime left to try.
    with pytest.raises(ProviderError, match="compile"):
        Scorer.load(bundles["A"], provider="openvino")
    if runtime_runs_here("bf16"):
        assert Scorer.load(bundles["A"], provider="auto", precision="bf16").provider == "OpenVINORuntime"
    else:
        with pytest.raises(ProviderError, match="compile"):
            Scorer.load(bundles["A"], provider="auto", precision="bf16")


def test_a_cpu_the_plugin_lists_no_device_for_is_refused_by_name_and_skipped_by_auto(
    bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_device() -> None:
        raise ProviderError("the OpenVINO plugin lists no CPU device on this machine")

    monkeypatch.setattr(ov, "cpu_device", no_device)  # what the plugin does on an AMD EPYC
    assert not ov.runs_here()
    assert Scorer.load(bundles["A"], provider="auto", intra_op_threads=1).provider == AFTER_PLUGIN
    with pytest.raises(ProviderError, match="no CPU device"):
        Scorer.load(bundles["A"], provider="openvino")


def test_bad_requests_fail_at_load(bundles: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="fp16"):
        Scorer.load(bundles["B"], provider="openvino", precision="fp16")
    if not ov.runs_here():
        return
    broken = copy_bundle(bundles["A"], tmp_path / "broken")
    (broken / B.GRAPH_PORTABLE).write_bytes(b"not an onnx graph")
    B.seal(broken)  # past the version check, to the provider's own refusal
    with pytest.raises(BundleError, match="not a loadable ONNX graph"):
        Scorer.load(broken, provider="openvino")


def test_concurrent_calls_agree_with_one_call(openvino: dict[str, Scorer]) -> None:
    check_threads_agree(openvino["B"])


def check_threads_agree(scorer: Scorer) -> None:
    """Four threads encoding interleaved quarters of a workload get what one call gets."""
    rng = np.random.default_rng(1)
    prompts, responses = _texts(rng, 64, 3, 40), _texts(rng, 64, 3, 90)
    scorer.clear_cache()
    expected = scorer.encode(prompts, responses).latent
    scorer.clear_cache()
    got: dict[int, np.ndarray] = {}

    def work(t: int) -> None:
        got[t] = scorer.encode(prompts[t::4], responses[t::4]).latent

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in range(4):
        np.testing.assert_allclose(got[t], expected[t::4], rtol=0, atol=1e-5)


def test_warmup_builds_one_row_at_every_width_a_batch_can_have(
    openvino: dict[str, Scorer], monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = openvino["B"]
    shapes: list[tuple[int, int]] = []
    run = scorer._run

    def recording(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        shapes.append(ids.shape)
        return run(ids, mask)

    monkeypatch.setattr(scorer, "_run", recording)
    scorer.warmup()
    max_length = scorer.meta.encoder.max_length
    assert {w for rows, w in shapes if rows == 1} >= set(range(16, max_length + 1, 16))
