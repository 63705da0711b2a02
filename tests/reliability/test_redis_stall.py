"""A Redis that stalls (slower than PAL_REDIS_TIMEOUT_S, then carries on) must not store an adapt twice.

The append (one Lua script) is not idempotent without a key: if the client times out and sends it again, the
stalled server runs both copies once it resumes. The answer may be 503 (the client could not know), but one
request's comparisons are stored at most once, and exactly once when the answer was 200; a request carrying an
Idempotency-Key, retried until it answers 200, is stored exactly once (that branch always runs).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from service.store import parse_comparisons
from tests.reliability.conftest import live_settings
from tests.reliability.procs import RedisServer
from tests.support import running_app

pytestmark = pytest.mark.anyio


async def test_a_stalled_redis_never_duplicates_an_adapt(bundle: Path, scorer, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as rs:
        settings = live_settings(bundle, rs.url, redis_timeout_s=0.5)
        async with running_app(settings, scorer) as c:
            warm = {"comparisons": [{"prompt": "warm", "chosen": "a", "rejected": "b"}]}
            assert (await c.post("/users/dup/adapt", json=warm)).status_code == 200
            rs.proc.send_signal(signal.SIGSTOP)
            try:
                # Two requests in the stall: a raw one (no key) and one with an Idempotency-Key, which is retried
                # below until it answers 200, so the exactly-once check always runs, whatever the first answers.
                once = {"comparisons": [{"prompt": "once", "chosen": "a", "rejected": "b"}]}
                keyed = {"comparisons": [{"prompt": "keyed", "chosen": "a", "rejected": "b"}]}
                key = {"Idempotency-Key": "stalled-1"}
                task = asyncio.ensure_future(c.post("/users/dup/adapt", json=once))
                keyed_task = asyncio.ensure_future(c.post("/users/dup/adapt", json=keyed, headers=key))
                await asyncio.sleep(0.8)  # past one command timeout, before a second one would expire
            finally:
                rs.proc.send_signal(signal.SIGCONT)
            r, first_keyed = await task, await keyed_task
            assert r.status_code in (200, 503), r.text
            assert first_keyed.status_code in (200, 503), first_keyed.text
            await asyncio.sleep(0.3)  # let a write the server had queued land
            answers = [first_keyed.status_code]
            retried = first_keyed
            for _ in range(10):  # what service.client does: the same key on every attempt
                if retried.status_code == 200:
                    break
                await asyncio.sleep(0.2)
                retried = await c.post("/users/dup/adapt", json=keyed, headers=key)
                answers.append(retried.status_code)
            assert retried.status_code == 200, answers
            raw, texts = rs.client().lrange("pal:u:{dup}:c", 0, -1), rs.client().hgetall("pal:u:{dup}:t")
            stored = [x.prompt for x in parse_comparisons(raw, texts)]
            assert stored.count("keyed") == 1, (answers, stored)  # exactly once: acknowledged, stored once
            assert stored.count("once") == 1 if r.status_code == 200 else stored.count("once") <= 1, stored
            assert int(rs.client().get("pal:u:{dup}:seq")) == len(stored)
            # Whatever the answers were, the user is consistent and adapts again once Redis answers.
            again = await c.post("/users/dup/adapt", json={"comparisons": [{"chosen": "c", "rejected": "d"}]})
            assert again.status_code == 200 and again.json()["n_fitted"] == len(stored) + 1
