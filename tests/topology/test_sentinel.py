"""The service behind Sentinel (master + replica + 3 sentinels): the master is SIGKILLed under a bounded adapt
load; the service must follow the failover by itself, and every acknowledged comparison must be on the new
master. Reports errors, the outage and acknowledged vs stored comparisons (printed; run with -s to see them).

With PAL_REDIS_MIN_REPLICAS=1 an adapt is acknowledged only once the replica holds it; with one replica that
also means no acknowledgement while the promoted master has no replica, so the killed master is restarted (as a
pod would be) and becomes the new master's replica.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.store import parse_comparisons
from tests.support import cpu_settings, running_app
from tests.topology.servers import SentinelSetup, wait_for

pytestmark = pytest.mark.anyio

WORKERS = 4  # concurrent clients, each adapting its own user one comparison at a time
BEFORE_S, AFTER_S = 1.5, 4.0  # load before the kill; load once adapts succeed again


async def _worker(
    c: httpx.AsyncClient, w: int, stop: asyncio.Event, log: list[tuple[float, str, bool]], accepted: list[str]
) -> None:
    """Adapts one comparison at a time; a refused one is retried with the same Idempotency-Key until it is
    acknowledged, as an RLHF loop does (so a retry of an append the primary has stores nothing twice)."""
    i = 0
    while not stop.is_set():
        prompt = f"w{w}-{i}"
        body = {"comparisons": [{"prompt": prompt, "chosen": "A calm old cat.", "rejected": "A loud parrot."}]}
        r = await c.post(f"/users/sentinel-{w}/adapt", json=body, headers={"Idempotency-Key": prompt})
        # 202: stored, its refit pending (Redis failed after the append): acknowledged all the same.
        acknowledged = r.status_code in (200, 202)
        log.append((time.monotonic(), prompt, acknowledged))
        if r.status_code == 202:
            accepted.append(prompt)
        if acknowledged:
            i += 1
        else:
            assert r.status_code == 503, r.text  # unavailable, never a 500
            await asyncio.sleep(0.05)


def _rejoined(topo: SentinelSetup) -> float:
    """When the restarted old master is attached to the new one as its replica."""
    want = len(topo.replica_ports)
    wait_for(lambda: topo.replicas_in_sync() >= want, 30, "the old master did not rejoin as a replica")
    return time.monotonic()


# (PAL_REDIS_MIN_REPLICAS, replicas): without WAIT; WAIT for the one replica (none left after a failover until
# the old master rejoins); WAIT for one of two replicas (one is left after a failover).
@pytest.mark.parametrize(
    ("min_replicas", "replicas"), [(0, 1), (1, 1), (1, 2)], ids=["no-wait", "wait-1-of-1", "wait-1-of-2"]
)
async def test_master_kill_under_load(
    tmp_path: Path, bundle_b: Path, scorer_b, min_replicas: int, replicas: int
) -> None:
    with SentinelSetup(tmp_path, replicas=replicas) as topo:
        settings = cpu_settings(
            bundle_b, redis_url=topo.url, redis_timeout_s=0.5, redis_min_replicas=min_replicas,
            redis_wait_timeout_ms=300
        )
        async with running_app(settings, scorer_b) as c:
            log: list[tuple[float, str, bool]] = []
            stop = asyncio.Event()
            accepted: list[str] = []  # answered 202: stored on the primary, its refit pending
            tasks = [asyncio.create_task(_worker(c, w, stop, log, accepted)) for w in range(WORKERS)]
            await asyncio.sleep(BEFORE_S)
            old = topo.master()
            killed_at = time.monotonic()
            await asyncio.to_thread(topo.kill_master)
            await asyncio.to_thread(wait_for, lambda: topo.master() != old, 30, "sentinels did not fail over")
            failed_over_at = time.monotonic()
            await asyncio.to_thread(topo.restart, old)
            rejoined = asyncio.create_task(asyncio.to_thread(_rejoined, topo))
            # Load goes on until adapts have succeeded again for AFTER_S (bounded: at most 30 s in all).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ok_after = [t for t, _, ok in log if ok and t > failed_over_at]
                if ok_after and time.monotonic() - ok_after[0] > AFTER_S:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*tasks)
            rejoined_at = await rejoined

        errors = [t for t, _, ok in log if not ok]
        ok_times = sorted(t for t, _, ok in log if ok)
        assert any(t > failed_over_at for t in ok_times), "no adapt succeeded after the failover"
        outage = max(b - a for a, b in zip(ok_times, ok_times[1:], strict=False))  # longest time without a success
        acked = {p for _, p, ok in log if ok}
        r = redis.Redis(host="127.0.0.1", port=topo.master())
        keys = [(f"pal:u:{{sentinel-{w}}}:c", f"pal:u:{{sentinel-{w}}}:t") for w in range(WORKERS)]
        rows = [x.prompt for c, t in keys for x in parse_comparisons(r.lrange(c, 0, -1), r.hgetall(t))]
        stored = set(rows)
        print(
            f"\n[sentinel min_replicas={min_replicas} replicas={replicas}] requests={len(log)} errors={len(errors)} "
            f"outage_s={outage:.2f} (after the kill: sentinels failed over at {failed_over_at - killed_at:.2f} s, "
            f"the old master was a replica again at {rejoined_at - killed_at:.2f} s) "
            f"acknowledged={len(acked)} stored={len(stored)} acknowledged_lost={len(acked - stored)} "
            f"stored_twice={len(rows) - len(stored)}"
        )
        # Adapts succeed before the kill and after the failover; nothing doubled. With WAIT nothing acknowledged is
        # missing. Without it, a write the primary acknowledged before its replica copied it is gone after a
        # failover (the documented trade-off, docs/DEPLOY.md): 202s answered as the master died are such writes;
        # the fitted ones (200), which took more round trips on the same master, must all be there.
        assert ok_times[0] < killed_at
        must_keep = acked if min_replicas else acked - set(accepted)
        print(f"  answered 202 (stored, fit pending)={len(accepted)}, of them lost={len(set(accepted) - stored)}")
        assert must_keep <= stored, f"acknowledged but lost: {sorted(must_keep - stored)[:10]}"
        assert len(rows) == len(stored)
