"""Start-up without a full scan (issue 18): a replica of a new model version is ready without reading the users
stored under the old one, a user it has not fitted is refitted on their first /score (and scored with the new
fit), replicas reading one user at once fit them once, and the optional background walk of all users is done once
by the replicas between them, not once per replica."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

import service.users
from service.store import Comparison, UserStore
from tests.reliability.procs import RedisServer
from tests.support import cpu_settings, running_app
from tests.topology.servers import _binary

pytestmark = pytest.mark.anyio

CMPS = [
    Comparison("Which pet?", "A calm old cat.", "A loud parrot."),
    Comparison("Which drink?", "Green tea.", "Sugary soda."),
    Comparison("Which trip?", "A quiet cabin.", "A crowded resort."),
]


async def _store_old_users(url: str, users: list[str]) -> None:
    """Users with comparisons stored under another model version (what a deploy finds in Redis)."""
    client = aioredis.Redis.from_url(url)
    try:
        store = UserStore(client, "pal", max_comparisons=100)
        for u in users:
            await store.append_comparisons(u, CMPS)
    finally:
        await client.aclose()


@contextmanager
def _monitor(port: int, log: Path) -> Iterator[Path]:
    """Every command the server runs, as MONITOR prints it, into `log`."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([_binary("redis-cli"), "-p", str(port), "monitor"], stdout=out)
        try:
            yield log
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _count_fits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every fit computed by any replica in this process (they share the module)."""
    calls: list[int] = []
    real = service.users.fit_user

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(service.users, "fit_user", counting)
    return calls


async def test_a_replica_is_ready_without_reading_stored_users_and_refits_one_on_first_score(
    tmp_path: Path, bundle_a: Path, scorer_a
) -> None:
    users = [f"old-{i}" for i in range(200)]
    with RedisServer(tmp_path / "redis") as server:
        await _store_old_users(server.url, users)
        settings = cpu_settings(bundle_a, redis_url=server.url, migrate_in_background=False)
        with _monitor(server.port, tmp_path / "monitor.log") as log:
            await asyncio.sleep(0.5)  # redis-cli is connected
            async with running_app(settings, scorer_a) as c:
                assert (await c.get("/health")).status_code == 200
                item = {"prompt": "Which pet?", "response": "A sleepy dog.", "user_id": "old-7"}
                r = (await c.post("/score", json={"items": [item]})).json()
                assert r["results"][0]["personalized"] is True
                view = (await c.get("/users/old-7")).json()
                assert view["model_version"] == scorer_a.meta.version and view["source"] == "adapt"
                assert view["n_fitted"] == len(CMPS)
                enc = scorer_a.encode([item["prompt"]], [item["response"]])
                expected = scorer_a.rewards(enc, np.asarray(view["weights"])[None])[0]
                assert r["results"][0]["reward"] == pytest.approx(float(expected), rel=1e-6)
            await asyncio.sleep(0.5)  # MONITOR's last lines are out
        commands = log.read_text(errors="replace").splitlines()
    touched = {m for line in commands for m in re.findall(r"pal:u:\{(old-\d+)\}", line)}
    assert touched == {"old-7"}, sorted(touched)[:10]  # the one user read, none of the 199 others
    assert not [line for line in commands if '"SCAN"' in line.upper() or '"KEYS"' in line.upper()]


async def test_two_replicas_reading_one_unfitted_user_fit_them_once(
    tmp_path: Path, bundle_a: Path, scorer_a, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        await _store_old_users(server.url, ["shared"])
        settings = cpu_settings(bundle_a, redis_url=server.url, migrate_in_background=False)
        fits = _count_fits(monkeypatch)
        async with running_app(settings, scorer_a) as one, running_app(settings, scorer_a) as two:
            assert server.client().hget("pal:u:{shared}:w", scorer_a.meta.version) is None  # not fitted at start
            item = {"prompt": "Which drink?", "response": "Water.", "user_id": "shared"}
            answers = await asyncio.gather(
                *(c.post("/score", json={"items": [item]}) for c in (one, two, one, two))
            )
            results = [a.json()["results"][0] for a in answers]
            assert all(x["personalized"] for x in results), results
            assert len({x["reward"] for x in results}) == 1
            assert len(fits) == 1  # one replica fitted, the other waited for its fit


async def test_the_background_walk_is_done_once_by_the_replicas_between_them(
    tmp_path: Path, bundle_a: Path, scorer_a, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = [f"walk-{i}" for i in range(30)]
    with RedisServer(tmp_path / "redis") as server:
        await _store_old_users(server.url, users)
        settings = cpu_settings(bundle_a, redis_url=server.url, retry_after_s=1)
        fits = _count_fits(monkeypatch)
        async with AsyncExitStack() as stack:
            apps = [await stack.enter_async_context(running_app(settings, scorer_a, wait_ready=False)) for _ in "ab"]
            for _ in range(1200):
                if all(c.app.state.engine and c.app.state.engine.startup.done.is_set() for c in apps):
                    break
                await asyncio.sleep(0.05)
            else:
                raise TimeoutError([c.app.state.engine.migration for c in apps if c.app.state.engine])
            states = [c.app.state.engine.migration for c in apps]
            assert sorted(s["refitted"] for s in states) == [0, len(users)], states  # one walked, one waited
            assert len(fits) == len(users)  # each user fitted once in all
            r = server.client()
            version = scorer_a.meta.version
            assert all(r.hget(f"pal:u:{{{u}}}:w", version) is not None for u in users)
            assert r.hgetall(f"pal:{{sweep}}:{version}") == {b"all": b"done"}


async def test_a_walk_left_by_a_dead_replica_is_waited_for_then_taken_over_where_it_stopped(
    tmp_path: Path, bundle_a: Path, scorer_a, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica walked one page of users and holds the shard's lease: this one waits (fits nobody), and once
    that lease is gone (its holder died) goes on from the saved cursor, not from the start."""
    users = [f"left-{i}" for i in range(250)]
    with RedisServer(tmp_path / "redis") as server:
        await _store_old_users(server.url, users)
        r = server.client()
        version = scorer_a.meta.version
        cursor, keys = r.scan(0, match="pal:u:{*}:c", count=100)  # the page the dead replica walked
        assert cursor != 0 and keys
        walked = {k.decode().split("{")[1].split("}")[0] for k in keys}
        r.hset(f"pal:{{sweep}}:{version}", "all", cursor)
        r.set(f"pal:{{sweep}}:{version}:lease:all", "dead-replica", ex=120)
        fits = _count_fits(monkeypatch)
        settings = cpu_settings(bundle_a, redis_url=server.url, retry_after_s=1)
        async with running_app(settings, scorer_a, wait_ready=False) as c:
            state = lambda: c.app.state.engine.migration if c.app.state.engine else {}  # noqa: E731
            for _ in range(600):
                if str(state().get("state", "")).startswith("waiting for another replica"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise TimeoutError(state())
            assert fits == [] and (await c.get("/health")).status_code == 200  # serving, walking nothing
            r.delete(f"pal:{{sweep}}:{version}:lease:all")  # the holder died: its lease expired
            for _ in range(1200):
                if c.app.state.engine.startup.done.is_set():
                    break
                await asyncio.sleep(0.05)
            else:
                raise TimeoutError(state())
            assert state()["refitted"] == len(users) - len(walked) == len(fits)
            assert all(r.hget(f"pal:u:{{{u}}}:w", version) is None for u in walked)  # not walked twice
            assert all(r.hget(f"pal:u:{{{u}}}:w", version) is not None for u in set(users) - walked)
            assert r.hgetall(f"pal:{{sweep}}:{version}") == {b"all": b"done"}


async def test_get_user_does_not_hang_on_a_dead_replicas_refit_lease(
    tmp_path: Path, bundle_a: Path, scorer_a
) -> None:
    """GET /users/{id} answers after PAL_REFIT_ON_READ_WAIT_S of another replica's lease, fitting the user itself,
    instead of waiting for the lease to expire (120 s)."""
    with RedisServer(tmp_path / "redis") as server:
        await _store_old_users(server.url, ["stuck"])
        server.client().set("pal:u:{stuck}:refit", "dead-replica", ex=120)
        settings = cpu_settings(
            bundle_a, redis_url=server.url, migrate_in_background=False, refit_on_read_wait_s=0.5
        )
        async with running_app(settings, scorer_a) as c:
            view = (await c.get("/users/stuck")).json()
            assert view["model_version"] == scorer_a.meta.version and view["n_fitted"] == len(CMPS)
            assert server.client().get("pal:u:{stuck}:refit") == b"dead-replica"  # answered within the lease
