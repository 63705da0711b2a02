"""The service serves on the provider and precision it is configured with (PAL_PROVIDER, PAL_PRECISION), says so
in /info, and scores like the parity-tested CPU scorer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.providers.openvino import runs_bf16 as openvino_runs_bf16
from models.providers.openvino import runs_here as openvino_runs_here
from models.providers.openvino_runtime import runs_here as runtime_runs_here
from service.config import Settings
from tests.support import cpu_settings, running_app

pytestmark = pytest.mark.anyio

PROMPTS = ["Say hi", "Plan a weekend.", "Explain photosynthesis briefly."]
RESPONSES = ["Hello there!", "A long hike, then a slow dinner with friends.", "Plants turn light into sugar."]


# (PAL_PROVIDER, what /info reports, whether it runs here, whether it runs bf16 here)
OPENVINO_PROVIDERS = {
    "openvino": ("OpenVINOExecutionProvider", openvino_runs_here(), openvino_runs_bf16()),
    "openvino-runtime": ("OpenVINORuntime", runtime_runs_here(), runtime_runs_here("bf16")),
}


@pytest.mark.parametrize("provider", list(OPENVINO_PROVIDERS))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
async def test_service_serves_on_openvino_as_configured(
    provider: str, precision: str, tmp_path: Path, bundle_b: Path, scorer_b
) -> None:
    reported, runs, runs_bf16 = OPENVINO_PROVIDERS[provider]
    if not runs:
        pytest.skip(f"{provider} does not run on this machine")
    settings = Settings(
        bundle_dir=bundle_b, redis_data_dir=tmp_path / "redis", provider=provider, precision=precision,
        intra_op_threads=1,
    )
    if precision == "bf16" and not runs_bf16:
        with pytest.raises(RuntimeError, match="bf16"):  # the load error, reported instead of serving at fp32
            async with running_app(settings):
                pass
        return
    async with running_app(settings) as c:
        info = (await c.get("/info")).json()
        assert (info["provider"], info["precision"]) == (reported, precision)
        items = [
            {"prompt": p, "response": r, "user_id": u}
            for p, r in zip(PROMPTS, RESPONSES, strict=True)
            for u in ("user-1", None)
        ]
        r = await c.post("/score", json={"items": items})
        assert r.status_code == 200, r.text
        got = np.array([x["reward"] for x in r.json()["results"]])
    enc = scorer_b.encode([it["prompt"] for it in items], [it["response"] for it in items])
    seen, prior = scorer_b.seen_users()["user-1"], np.asarray(scorer_b.meta.prior_weights)
    expected = scorer_b.rewards(enc, np.stack([seen if it["user_id"] else prior for it in items]))
    # fp32 is the parity-tested path; bf16 rounds inputs to 8 mantissa bits (docs/SCORER.md measures its error).
    tolerance = 1e-4 if precision == "fp32" else 0.05 * max(np.abs(expected).max(), 1.0)
    assert np.abs(got - expected).max() < tolerance, (got, expected)


@pytest.mark.parametrize(
    ("precision", "served", "source"), [("auto", "fp32", "measured"), ("bf16", "bf16", "override")]
)
async def test_info_reports_the_precision_chosen_by_measured_fidelity(
    precision: str, served: str, source: str, tmp_path: Path, bundle_b: Path, scorer_b
) -> None:
    from tests.scorer.fidelity import near_ties, with_sample

    if not runtime_runs_here("bf16"):
        pytest.skip("OpenVINO's runtime runs no bf16 here")
    bundle = with_sample(bundle_b, tmp_path / "bundle", near_ties(scorer_b))
    settings = Settings(
        bundle_dir=bundle, redis_data_dir=tmp_path / "redis", provider="openvino-runtime", precision=precision,
        precision_min_agreement=1.0, precision_cache_dir=tmp_path / "precision", intra_op_threads=1,
    )
    async with running_app(settings) as c:
        info = (await c.get("/info")).json()
        r = await c.post("/score", json={"items": [{"prompt": PROMPTS[0], "response": RESPONSES[0]}]})
        assert r.status_code == 200, r.text
    choice = info["precision_choice"]
    assert (info["precision"], choice["precision"], choice["source"]) == (served, served, source)
    assert choice["min_agreement"] == 1.0 and choice["reason"]
    if source == "measured":
        assert 0 < choice["agreement"]["bf16"] < 1.0 and choice["agreement"]["fp32"] == 1.0
        assert list((tmp_path / "precision").glob("*.json")), "the measurement was not cached"


async def test_info_says_why_the_cpu_provider_serves_fp32(tmp_path: Path, bundle_b: Path) -> None:
    async with running_app(cpu_settings(bundle_b, tmp_path / "redis")) as c:
        info = (await c.get("/info")).json()
    assert (info["precision"], info["precision_choice"]["source"]) == ("fp32", "only")
