"""What Kubernetes reads from a pod: /livez (liveness, no Redis, no warm-up) and the autoscaler's metrics."""

from __future__ import annotations

import asyncio
import re

import pytest

from service.metrics import Metrics, MetricsMiddleware
from tests.support import cpu_settings, running_app

pytestmark = pytest.mark.anyio


def _sample(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def test_livez_and_autoscaling_metrics(tmp_path, bundle_b, scorer_b) -> None:
    settings = cpu_settings(bundle_b, tmp_path / "redis")
    async with running_app(settings, scorer_b) as c:
        assert (await c.get("/livez")).json() == {"status": "alive"}
        items = [{"prompt": "Which pet?", "response": f"A cat number {i}.", "user_id": "u"} for i in range(5)]
        assert (await c.post("/score", json={"items": items})).status_code == 200
        text = (await c.get("/metrics")).text
        assert _sample(text, "pal_queue_wait_seconds_count") >= 1
        assert _sample(text, "pal_encoder_busy_seconds_total") > 0
        assert _sample(text, "pal_http_in_flight") == 0  # the /metrics request itself is not counted


async def test_livez_fails_when_the_model_failed_to_load(tmp_path) -> None:
    settings = cpu_settings(tmp_path / "no-bundle", tmp_path / "redis")
    async with running_app(settings, wait_ready=False) as c:
        for _ in range(200):
            if c.app.state.load_error:
                break
            await asyncio.sleep(0.05)
        r = await c.get("/livez")
        assert r.status_code == 503 and "failed to load" in r.json()["status"]


async def test_in_flight_counts_requests_while_they_run() -> None:
    metrics, release, entered = Metrics(), asyncio.Event(), asyncio.Event()

    async def slow_app(scope, receive, send) -> None:
        entered.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = MetricsMiddleware(slow_app, metrics=lambda: metrics)

    async def call(path: str) -> None:
        scope = {"type": "http", "method": "POST", "path": path, "headers": []}

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        async def send(_: dict) -> None:
            return None

        await mw(scope, receive, send)

    task = asyncio.create_task(call("/score"))
    await entered.wait()
    assert metrics.in_flight._value.get() == 1
    probe = asyncio.create_task(call("/health"))
    await asyncio.sleep(0)
    assert metrics.in_flight._value.get() == 1  # probes are not counted
    release.set()
    await asyncio.gather(task, probe)
    assert metrics.in_flight._value.get() == 0
