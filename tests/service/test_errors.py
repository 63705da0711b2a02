"""Every error path answers a clear 4xx/503 JSON {"detail": "..."}; bad input never reaches a 500."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from service.config import Settings
from tests.support import running_app

pytestmark = pytest.mark.anyio

ITEM = {"prompt": "p", "response": "r"}
CMP = {"prompt": "p", "chosen": "c", "rejected": "r"}


def _detail(r) -> str:
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


BAD_REQUESTS = [
    # (method, path, json body, status, words the message must contain)
    ("post", "/score", {"items": []}, 422, "items"),
    ("post", "/score", {}, 422, "items"),
    ("post", "/score", {"items": [{"prompt": "p", "response": ""}]}, 422, "items.0.response"),
    ("post", "/score", {"items": [{"prompt": "p"}]}, 422, "response"),
    ("post", "/score", {"items": [{"prompt": 3, "response": "r"}]}, 422, "prompt"),
    # Any string of 1..512 characters is a user id (#15); spaces, braces and globs are stored under encoded keys.
    ("post", "/score", {"items": [{**ITEM, "user_id": ""}]}, 422, "user_id"),
    ("post", "/score", {"items": [{**ITEM, "user_id": "u" * 513}]}, 422, "user_id"),
    ("post", "/score", {"items": [{**ITEM, "user_id": 7}]}, 422, "user_id"),
    ("post", "/score", {"items": [{**ITEM, "extra": 1}]}, 422, "extra"),
    ("post", "/score", {"items": [{"prompt": "p", "response": "x" * 101}]}, 422, "PAL_MAX_TEXT_CHARS"),
    ("post", "/score", {"items": [{"prompt": "x" * 101, "response": "r"}]}, 422, "items[0].prompt"),
    ("post", "/score", {"items": [ITEM] * 9}, 413, "PAL_MAX_ITEMS_PER_REQUEST"),
    ("post", "/score", {"items": [ITEM], "return_prototypes": "maybe"}, 422, "return_prototypes"),
    ("post", "/users/u/adapt", {"comparisons": []}, 422, "comparisons"),
    ("post", "/users/u/adapt", {"comparisons": [{**CMP, "chosen": ""}]}, 422, "chosen"),
    ("post", "/users/u/adapt", {"comparisons": [{**CMP, "rejected": "y" * 101}]}, 422, "comparisons[0].rejected"),
    ("post", "/users/u/adapt", {"comparisons": [CMP] * 5}, 413, "PAL_MAX_COMPARISONS_PER_REQUEST"),
    ("post", "/users/" + "u" * 513 + "/adapt", {"comparisons": [CMP]}, 422, "user_id"),
    ("get", "/users/a%7Bb%7D", None, 404, "a{b}"),
    ("get", "/users/nobody", None, 404, "nobody"),
    ("delete", "/users/nobody", None, 404, "nobody"),
    ("delete", "/users/a*", None, 404, "a*"),
    ("get", "/nowhere", None, 404, "Not Found"),
    ("put", "/score", {"items": [ITEM]}, 405, "Method Not Allowed"),
]


@pytest.fixture
def limited(settings: Settings) -> Settings:
    settings.max_text_chars = 100
    settings.max_items_per_request = 8
    settings.max_comparisons_per_request = 4
    return settings


async def test_bad_requests_get_clear_4xx(limited, scorer_b) -> None:
    async with running_app(limited, scorer_b) as c:
        for method, path, body, status, words in BAD_REQUESTS:
            r = await c.request(method, path, json=body)
            assert r.status_code == status, (method, path, body, r.status_code, r.text)
            assert words in _detail(r), (path, body, r.text)
        # Malformed JSON and wrong content types are 422, not 500.
        for content in (b"{not json", b"[1, 2]", b"null", b'"items"', b"\xff\xfe"):
            r = await c.post("/score", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (content, r.text)
            _detail(r)
        # Nothing was stored by the refused adapts.
        assert await c.app.state.redis.client.keys("*:u:{u}:*") == []


async def test_body_too_large_is_413_before_parsing(limited, scorer_b) -> None:
    limited.max_body_bytes = 2048
    async with running_app(limited, scorer_b) as c:
        r = await c.post("/score", json={"items": [{"prompt": "p", "response": "x" * 4000}]})
        assert r.status_code == 413 and "PAL_MAX_BODY_BYTES" in _detail(r)


async def test_auth_required_on_scoring_and_mutating_routes(settings, scorer_b) -> None:
    settings.api_key = "s3cret"
    async with running_app(settings, scorer_b) as c:
        calls = [
            ("post", "/score", {"items": [ITEM]}),
            ("post", "/users/u/adapt", {"comparisons": [CMP]}),
            ("get", "/users/u", None),
            ("delete", "/users/u", None),
        ]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            for method, path, body in calls:
                r = await c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["WWW-Authenticate"] == "Bearer" and "bearer token" in _detail(r)
        ok = {"Authorization": "Bearer s3cret"}
        assert (await c.post("/score", json={"items": [ITEM]}, headers=ok)).status_code == 200
        assert (await c.post("/users/u/adapt", json={"comparisons": [CMP]}, headers=ok)).status_code == 200
        assert (await c.get("/users/u", headers=ok)).status_code == 200
        for path in ("/health", "/info", "/metrics"):
            assert (await c.get(path)).status_code == 200


async def test_queue_full_is_429_with_retry_after(settings, scorer_b) -> None:
    # The first batch waits 200 ms for company; 20 concurrent requests arrive meanwhile and 2 fit in the queue.
    settings.max_queue = 2
    settings.max_wait_ms = 200
    settings.retry_after_s = 3
    async with running_app(settings, scorer_b) as c:
        rs = await asyncio.gather(
            *(c.post("/score", json={"items": [{"prompt": "p", "response": f"r{i}"}]}) for i in range(20))
        )
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and codes.count(429) >= 10 and set(codes) == {200, 429}, codes
        full = next(r for r in rs if r.status_code == 429)
        assert full.headers["Retry-After"] == "3" and "PAL_MAX_QUEUE" in _detail(full)
        # A request larger than the whole queue can never fit.
        r = await c.post("/score", json={"items": [ITEM] * 3})
        assert r.status_code == 429
        text = (await c.get("/metrics")).text
        n_full = codes.count(429) + 1
        assert f"pal_queue_full_total {float(n_full)}" in text


async def test_health_503_and_routes_503_when_the_model_fails_to_load(settings, tmp_path) -> None:
    settings.bundle_dir = tmp_path / "no-such-bundle"
    async with running_app(settings, scorer=None, wait_ready=False) as c:
        await c.app.state.startup  # the load fails in the background; the app stays up to say why
        h = await c.get("/health")
        assert h.status_code == 503 and h.json()["warm"] is False and "failed to load" in h.json()["status"]
        r = await c.post("/score", json={"items": [ITEM]})
        assert r.status_code == 503 and r.headers["Retry-After"] and "not loaded" in _detail(r)
        assert (await c.get("/info")).status_code == 503


async def test_redis_down_scores_with_cached_weights_or_prior_and_adapt_is_503(settings, scorer_b) -> None:
    settings.redis_timeout_s = 0.5
    async with running_app(settings, scorer_b) as c:
        await c.post("/users/cached/adapt", json={"comparisons": [CMP] * 2})
        items = [{**ITEM, "user_id": "cached"}, {**ITEM, "user_id": "stranger"}, ITEM]
        before = (await c.post("/score", json={"items": items})).json()["results"]
        os.kill(c.app.state.redis.embedded.pid, signal.SIGKILL)  # the real server dies
        await asyncio.sleep(0.2)
        r = await c.post("/score", json={"items": items})
        assert r.status_code == 200, r.text
        after = r.json()["results"]
        assert [x["personalized"] for x in after] == [True, False, False]
        assert [x["reward"] for x in after] == pytest.approx([x["reward"] for x in before])
        # While the breaker is open, later requests do not touch Redis and still answer.
        again = await c.post("/score", json={"items": items})
        assert [x["personalized"] for x in again.json()["results"]] == [True, False, False]
        r = await c.post("/users/cached/adapt", json={"comparisons": [CMP]})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "unavailable" in _detail(r)
        assert (await c.get("/users/cached")).status_code == 503
        assert (await c.delete("/users/cached")).status_code == 503
        h = await c.get("/health")
        assert h.status_code == 200 and h.json()["redis"].startswith("unreachable")
        assert 'pal_redis_errors_total{op="adapt"} 1.0' in (await c.get("/metrics")).text


async def test_health_is_503_while_loading_then_200(settings) -> None:
    # No preloaded scorer: the app loads the bundle in the background and must say so until it is warm.
    async with running_app(settings, scorer=None, wait_ready=False) as c:
        first = await c.get("/health")
        assert first.status_code == 503 and first.json()["status"] == "loading" and first.json()["warm"] is False
        assert (await c.post("/score", json={"items": [ITEM]})).status_code == 503
        await asyncio.wait_for(asyncio.shield(c.app.state.startup), timeout=120)
        assert (await c.get("/health")).status_code == 200
        assert (await c.post("/score", json={"items": [ITEM]})).status_code == 200


async def test_client_disconnect_drops_its_queued_work(settings, scorer_b) -> None:
    # Drive the ASGI app by hand: the client sends its request, then hangs up while the item waits for a batch.
    settings.max_wait_ms = 300
    async with running_app(settings, scorer_b) as c:
        body = json.dumps({"items": [{"prompt": "p", "response": "never encoded"}]}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        hung_up = asyncio.Event()
        sent: list[dict] = []

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await hung_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/score", "raw_path": b"/score", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000), "server": ("pal", 80),
        }
        call = asyncio.create_task(c.app(scope, receive, send))
        await asyncio.sleep(0.1)
        assert c.app.state.engine.batcher.queue_depth == 1
        hung_up.set()
        await call
        await asyncio.sleep(0.4)  # past max_wait: the worker would have encoded it by now
        assert c.app.state.engine.batcher.queue_depth == 0
        assert "pal_batch_items_count 0.0" in (await c.get("/metrics")).text
        assert sent[0]["status"] == 499


async def test_the_guard_refuses_with_the_service_errors() -> None:
    # The guard answers before routing, but through the same hierarchy and errors.error_response as the app.
    from service import errors
    from service.guard import check_json

    for body, kind in (
        (b'{"a": 1, "a": 2}', errors.Invalid),
        (b'{"a": NaN}', errors.Invalid),
        (b"[[[[[[[[[[[[]]]]]]]]]]]]", errors.TooLarge),  # 13 values
        (b"[1, 2, 3, 4, 5, 6]", errors.TooLarge),  # a list past max_list
    ):
        with pytest.raises(kind):
            check_json(body, max_values=10, max_list=5)
