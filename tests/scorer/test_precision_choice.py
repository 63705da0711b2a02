"""The served precision is chosen by measured fidelity (models/precision.py): the fastest precision the provider
offers that keeps enough of the bundle's own validation decisions, fp32 otherwise; an explicit precision overrides;
the measurement is cached; a bundle without a sample serves fp32 and says why. bf16 runs on OpenVINO's runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import bundle as B
from models import validation_sample
from models.bundle import BundleError
from models.export import export_bundle
from models.precision import choose
from models.providers import openvino_runtime as rt
from models.scorer import ProviderError, Scorer
from tests.scorer.factory import copy_bundle
from tests.scorer.fidelity import clear_pairs, near_ties, with_sample

RUNTIME = "openvino-runtime"
needs_bf16 = pytest.mark.skipif(not rt.runs_here("bf16"), reason="OpenVINO's runtime runs no bf16 here")


class Loads:
    """Scorer.load on one thread, counting what was loaded."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.loaded: list[str] = []

    def __call__(self, provider: str, precision: str) -> Scorer:
        self.loaded.append(precision)
        return Scorer.load(self.bundle, provider=provider, precision=precision, intra_op_threads=1)


@pytest.fixture(scope="module")
def near(bundle_b: Path, scorer_b: Scorer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_sample(bundle_b, tmp_path_factory.mktemp("near") / "b", near_ties(scorer_b))


@pytest.fixture(scope="module")
def clear(bundle_b: Path, scorer_b: Scorer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_sample(bundle_b, tmp_path_factory.mktemp("clear") / "b", clear_pairs(scorer_b))


@needs_bf16
def test_bf16_short_of_the_threshold_serves_fp32(near: Path, tmp_path: Path) -> None:
    scorer, choice = choose(near, RUNTIME, Loads(near), min_agreement=1.0, cache_dir=tmp_path)
    assert choice.agreement["bf16"] < 1.0, "near ties should flip under bf16 rounding"
    assert (scorer.precision, choice.precision, choice.source) == ("fp32", "fp32", "measured")
    assert choice.agreement["fp32"] == 1.0 and choice.pairs == len(validation_sample.read(near) or [])
    assert "bf16 keeps" in choice.reason


@needs_bf16
def test_bf16_that_keeps_the_decisions_is_served(clear: Path, tmp_path: Path) -> None:
    scorer, choice = choose(clear, RUNTIME, Loads(clear), cache_dir=tmp_path)
    assert choice.agreement["bf16"] >= 0.995
    assert (scorer.precision, choice.precision, choice.source) == ("bf16", "bf16", "measured")
    assert scorer.provider == "OpenVINORuntime"


@needs_bf16
def test_measurement_is_cached_per_bundle_version_and_provider(near: Path, clear: Path, tmp_path: Path) -> None:
    _, first = choose(near, RUNTIME, Loads(near), min_agreement=1.0, cache_dir=tmp_path)
    loads = Loads(near)
    # A restart with a lower threshold: the cached agreement decides, nothing is measured again.
    scorer, again = choose(near, RUNTIME, loads, min_agreement=0.5, cache_dir=tmp_path)
    assert again.source == "cached" and again.agreement == first.agreement
    assert scorer.precision == "bf16" and loads.loaded == ["fp32", "bf16"]
    # Another bundle version is measured for itself.
    assert choose(clear, RUNTIME, Loads(clear), cache_dir=tmp_path)[1].source == "measured"


@needs_bf16
def test_named_precision_overrides_the_measurement(near: Path, tmp_path: Path) -> None:
    loads = Loads(near)
    scorer, choice = choose(near, RUNTIME, loads, requested="bf16", min_agreement=1.0, cache_dir=tmp_path)
    assert (scorer.precision, choice.source, loads.loaded) == ("bf16", "override", ["bf16"])
    assert "PAL_PRECISION=bf16" in choice.reason


def test_bundle_without_a_sample_serves_fp32_and_says_so(bundle_b: Path, tmp_path: Path) -> None:
    if not rt.runs_here("bf16"):
        pytest.skip("OpenVINO's runtime runs no bf16 here")
    scorer, choice = choose(bundle_b, RUNTIME, Loads(bundle_b), cache_dir=tmp_path)
    assert (scorer.precision, choice.source) == ("fp32", "no-sample")
    assert "no validation sample" in choice.reason and "bf16" in choice.reason
    assert not list(tmp_path.iterdir())


def test_provider_with_nothing_faster_serves_fp32(near: Path, tmp_path: Path) -> None:
    scorer, choice = choose(near, "cpu", Loads(near), cache_dir=tmp_path)
    assert (scorer.precision, choice.source, choice.agreement) == ("fp32", "only", {"fp32": 1.0})


def test_export_carries_a_sample_into_the_bundle_version(bundle_b: Path, tmp_path: Path) -> None:
    checkpoint = bundle_b.parent / "checkpoint-B"
    rows = tmp_path / "seen_val.jsonl"
    rows.write_text(
        "".join(
            f'{{"user_id": "user-{i % 4}", "prompt": "p{i}", "chosen": "c{i}", "rejected": "r{i}"}}\n'
            for i in range(300)
        )
    )
    report = export_bundle(checkpoint, tmp_path / "bundle", validation=tmp_path)
    out = Path(report.bundle)
    pairs = validation_sample.read(out) or []
    assert len(pairs) == validation_sample.MAX_PAIRS and len({p.prompt for p in pairs}) == len(pairs)
    assert B.VALIDATION_FILE in B.read_meta(out).digests
    assert report.version != B.read_meta(bundle_b).version
    # The sample is content: a bundle whose sample changed after export is refused like any other changed file.
    damaged = copy_bundle(out, tmp_path / "damaged")
    validation_sample.write(damaged, pairs[:3])
    with pytest.raises(BundleError, match="validation.json"):
        Scorer.load(damaged, provider="cpu", intra_op_threads=1)


@needs_bf16
def test_precision_that_fails_to_start_leaves_fp32_serving(clear: Path, tmp_path: Path) -> None:
    class Bf16Fails(Loads):
        def __call__(self, provider: str, precision: str) -> Scorer:
            if precision == "bf16":
                raise ProviderError("OpenVINO could not compile the bf16 graph")
            return super().__call__(provider, precision)

    scorer, choice = choose(clear, RUNTIME, Bf16Fails(clear), cache_dir=tmp_path)
    assert (scorer.precision, choice.precision) == ("fp32", "fp32")
    assert "bf16 did not start" in choice.reason and "bf16" not in choice.agreement
