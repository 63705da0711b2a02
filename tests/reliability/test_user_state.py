"""User state under races and pressure: a DELETE is final even while a refit of the deleted data runs, a 429 means
nothing was stored (a stored adapt the encoder cannot refit now answers 202 and is refitted later), and a user's
state is bounded (bytes per user, optional retention).

Real service in-process, real Redis (embedded), real MiniLM bundle. Where a race needs one precise interleaving,
the test holds a real call at that point (an asyncio/threading event around the real method) instead of hoping
for the timing.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from models.head import fit_user
from service.config import Settings
from tests.support import cpu_settings, running_app

pytestmark = pytest.mark.anyio


def _settings(bundle: Path, tmp_path: Path, **overrides: object) -> Settings:
    return cpu_settings(bundle, tmp_path / "redis", **overrides)


def _cmp(tag: str) -> dict[str, str]:
    return {"prompt": f"question {tag}", "chosen": f"a kind, careful answer {tag}", "rejected": f"a rude one {tag}"}


async def _wait_for(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


async def test_a_fit_computed_from_deleted_comparisons_is_never_stored_or_served(bundle, scorer, tmp_path) -> None:
    """Adapt 40 comparisons; DELETE while that refit runs; adapt 1 new comparison. The new user state is fitted on
    that one comparison only, and the old refit's answer says the user was deleted."""
    async with running_app(_settings(bundle, tmp_path), scorer) as c:
        store, engine = c.app.state.store, c.app.state.engine
        reached, release = asyncio.Event(), asyncio.Event()
        real_put = store.put_fit_if_newer

        async def held_put(version, user, fit):  # the refit of the 40 has fitted and is about to store its fit
            if fit.n_fitted == 40:
                reached.set()
                await release.wait()
            return await real_put(version, user, fit)

        store.put_fit_if_newer = held_put
        old = asyncio.ensure_future(
            c.post("/users/ghost/adapt", json={"comparisons": [_cmp(f"old {i}") for i in range(40)]})
        )
        await asyncio.wait_for(reached.wait(), 120)
        deleted = await c.delete("/users/ghost")
        assert deleted.status_code == 200, deleted.text
        new = asyncio.ensure_future(c.post("/users/ghost/adapt", json={"comparisons": [_cmp("new")]}))

        async def new_stored() -> bool:
            return (await store.count_comparisons("ghost"))[1] == 1

        await _wait_for(new_stored, "the new comparison was not stored")  # it now waits for the old refit
        release.set()
        old_r, new_r = await old, await new

        assert old_r.status_code == 409 and "deleted" in old_r.json()["detail"], old_r.text
        assert new_r.status_code == 200, new_r.text
        body = new_r.json()
        assert body["n_comparisons"] == 1 and body["n_fitted"] == 1, body
        feats = scorer.features(["question new"], ["a kind, careful answer new"], ["a rude one new"])
        expected = fit_user(scorer.head, feats, engine.prior, engine.prior_strength).weights
        assert body["weights"] == pytest.approx(expected.tolist(), abs=1e-6)
        stored = await store.get_fit(engine.version, "ghost")
        assert stored is not None and stored.n_fitted == 1 and stored.weights == body["weights"]
        # Served: scoring uses the new weights, and the next adapt refits (no stale seq blocks it).
        assert (await c.get("/users/ghost")).json()["n_fitted"] == 1
        more = await c.post("/users/ghost/adapt", json={"comparisons": [_cmp("more")]})
        assert more.status_code == 200 and more.json()["n_fitted"] == 2, more.text


async def test_429_means_nothing_stored_and_a_stored_adapt_is_202_then_refitted(bundle, scorer, tmp_path) -> None:
    """The encoder is held busy and its queue (PAL_MAX_QUEUE=8) filled: an adapt refused with 429 stored nothing; an
    adapt stored just before the queue filled answers 202 `fitted: false`, and is refitted once the queue drains."""
    async with running_app(_settings(bundle, tmp_path, max_queue=8), scorer) as c:
        store, engine = c.app.state.store, c.app.state.engine
        batcher = engine.batcher
        assert (await c.post("/users/warm/adapt", json={"comparisons": [_cmp("warm")]})).status_code == 200

        entered, gate = threading.Event(), threading.Event()
        real_run = batcher._encoder.run

        class HeldEncoder:  # the encoder thread is busy until the gate opens
            prepare = batcher._encoder.prepare

            @staticmethod
            def run(jobs):
                if any(job.pending for job in jobs):
                    entered.set()
                    gate.wait(120)
                return real_run(jobs)

        batcher._encoder = HeldEncoder()
        fillers: list[asyncio.Future] = []
        try:
            busy = asyncio.ensure_future(c.post("/score", json={"items": [{"prompt": "p", "response": "busy"}]}))
            assert await asyncio.to_thread(entered.wait, 60)
            real_append = store.append_comparisons

            async def append_then_queue_fills(user, *args, **kwargs):  # other requests fill the queue meanwhile
                appended = await real_append(user, *args, **kwargs)
                if user == "late":
                    fillers.append(asyncio.ensure_future(batcher.encode(["p"] * 8, [f"fill {i}" for i in range(8)])))
                    for _ in range(400):  # tokenized first (the tokenizer thread), then queued
                        if batcher.queue_depth == 8:
                            break
                        await asyncio.sleep(0.005)
                return appended

            store.append_comparisons = append_then_queue_fills
            late = await c.post("/users/late/adapt", json={"comparisons": [_cmp("late")]})
            assert late.status_code == 202, late.text
            body = late.json()
            assert body["fitted"] is False and body["n_comparisons"] == 1 and body["added"] == 1
            assert body["personalized"] is False and body["weights"] is None and body["replayed"] is False
            assert batcher.queue_depth == 8

            refused = await c.post("/users/refused/adapt", json={"comparisons": [_cmp("refused")]})
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1", refused.text
            assert "nothing was stored" in refused.json()["detail"]
            assert await store.count_comparisons("refused") == (0, 0)
            assert [k async for k in store.r.scan_iter(match="pal:u:{refused}:*")] == []
        finally:
            gate.set()
        assert (await busy).status_code == 200
        await asyncio.gather(*fillers)

        async def late_fitted() -> bool:
            fit = await store.get_fit(engine.version, "late")
            return fit is not None and fit.seq == 1

        await _wait_for(late_fitted, "the stored adapt was never refitted")  # no request asks: the background does
        fit = await store.get_fit(engine.version, "late")
        feats = scorer.features(["question late"], ["a kind, careful answer late"], ["a rude one late"])
        expected = fit_user(scorer.head, feats, engine.prior, engine.prior_strength).weights
        assert fit.n_fitted == 1 and np.allclose(fit.weights, expected, atol=1e-6)
        # The refused request, retried as told, is stored once.
        again = await c.post("/users/refused/adapt", json={"comparisons": [_cmp("refused")]})
        assert again.status_code == 200 and again.json()["n_comparisons"] == 1, again.text


async def test_deleting_a_very_large_user_is_o1_in_redis_and_drops_every_cached_encoding(
    bundle, scorer, tmp_path
) -> None:
    """A user holding ~30 MB (1000 comparisons of 2 x 20 000 random characters, which deflate only to ~3/4) is
    deleted by a rename: the answer is 200 with every key gone, Redis frees the data in its background thread
    (UNLINK), and this process still forgets the encodings it cached from comparisons at the far end of the list."""
    import base64
    import os

    from service.store import Comparison

    def noise() -> str:  # texts that neither repeat nor deflate much
        return base64.b64encode(os.urandom(15000)).decode()

    settings = _settings(bundle, tmp_path, max_bytes_per_user=64 * 2**20, max_comparisons_per_user=5000)
    async with running_app(settings, scorer) as c:
        store, engine = c.app.state.store, c.app.state.engine
        for start in range(0, 1000, 100):
            await store.append_comparisons(
                "huge",
                [Comparison(f"p{i}", noise(), noise()) for i in range(start, start + 100)],
            )
        tail = [Comparison(f"tail {i}", f"good tail {i}", f"bad tail {i}") for i in range(2)]
        await store.append_comparisons("huge", tail)
        await engine.users.features_for(tail)  # what a refit caches from them
        held = [await store.r.memory_usage(f"pal:u:{{huge}}:{kind}", samples=0) for kind in ("c", "t")]
        assert sum(held) > 25 * 10**6  # the texts (stored once each, deflated) and the list referring to them
        freed_before = (await store.r.info("all"))["lazyfreed_objects"]

        r = await c.delete("/users/huge")
        assert r.status_code == 200 and r.json() == {"user_id": "huge", "deleted": True}, r.text
        assert [k async for k in store.r.scan_iter(match="pal:u:{huge}:*")] == []
        # Freed by Redis's lazy-free thread (UNLINK), not by a DEL that other clients wait behind. The thread counts
        # the object when it has freed it, which can be just after the answer on a busy machine.

        async def lazily_freed() -> bool:
            return (await store.r.info("all"))["lazyfreed_objects"] > freed_before

        await _wait_for(lazily_freed, "the deleted user's comparisons were not freed by the lazy-free thread", 10.0)
        before = engine.cache_stats()
        await engine.users.features_for(tail)
        assert engine.cache_stats()["features_misses"] - before["features_misses"] == 2
        assert (await c.get("/users/huge")).status_code == 404


def _big_cmp(tag: str) -> dict[str, str]:
    return {"prompt": f"q {tag}", "chosen": f"{tag} " + "long answer " * 160, "rejected": f"{tag} no"}


async def test_a_users_stored_bytes_are_capped_and_bound_every_refit(bundle, scorer, tmp_path) -> None:
    """PAL_MAX_BYTES_PER_USER: the oldest comparisons go once a user's stored JSON passes the cap, the refit reads
    only what is kept, and one request larger than the cap is 413 with nothing stored."""
    cap = 20_000
    async with running_app(_settings(bundle, tmp_path, max_bytes_per_user=cap), scorer) as c:
        store = c.app.state.store
        for r in range(5):
            resp = await c.post("/users/big/adapt", json={"comparisons": [_big_cmp(f"r{r}-{j}") for j in range(4)]})
            assert resp.status_code == 200, resp.text
        stored, seq = await store.read_comparisons("big")
        sizes = [len(x.to_json()) for x in stored]  # what the cap counts: each comparison's JSON
        assert seq == 20 and 0 < len(stored) < 20 and sum(sizes) <= cap
        assert int(await store.r.get("pal:u:{big}:bytes")) == sum(sizes)
        assert [x.prompt for x in stored] == [f"q r{r}-{j}" for r in range(5) for j in range(4)][-len(stored) :]
        assert resp.json()["n_fitted"] == resp.json()["n_comparisons"] == len(stored)

        too_big = {"comparisons": [_big_cmp(f"x{j}") for j in range(12)]}
        refused = await c.post("/users/big/adapt", json=too_big)
        assert refused.status_code == 413 and "PAL_MAX_BYTES_PER_USER" in refused.json()["detail"], refused.text
        assert await store.read_comparisons("big") == (stored, 20)


async def test_retention_forgets_an_idle_user(bundle, scorer, tmp_path) -> None:
    """PAL_USER_TTL_S: every key of an adapted user expires that long after their last adapt; the fit with them."""
    async with running_app(_settings(bundle, tmp_path, user_ttl_s=1.0), scorer) as c:
        store = c.app.state.store
        resp = await c.post(
            "/users/brief/adapt", json={"comparisons": [_cmp("brief")]}, headers={"Idempotency-Key": "k"}
        )
        assert resp.status_code == 200, resp.text
        keys = [k async for k in store.r.scan_iter(match="pal:u:{brief}:*")]
        assert len(keys) >= 4  # comparisons, counter, fit, the idempotency key and its index (and more)
        for k in keys:
            assert 0 < await store.r.pttl(k) <= 1000, k
        await asyncio.sleep(1.2)
        assert [k async for k in store.r.scan_iter(match="pal:u:{brief}:*")] == []
        assert (await c.get("/users/brief")).status_code == 404
        item = {"prompt": "p", "response": "r", "user_id": "brief"}
        assert (await c.post("/score", json={"items": [item]})).json()["results"][0]["personalized"] is False


async def test_a_delete_through_another_replica_holds_through_an_outage_that_starts_right_after(
    bundle, scorer, tmp_path
) -> None:
    """Replica B has scored the user (their weights are in its outage cache); replica A deletes them; Redis freezes
    at once, before B reads Redis again. B must not serve the deleted user's weights from its cache, and keeps
    serving other users' cached weights through the outage."""
    import signal

    from tests.reliability.conftest import live_settings
    from tests.reliability.procs import RedisServer

    async def personalized(client, user: str) -> bool:
        item = {"prompt": "How should I reply?", "response": "Briefly.", "user_id": user}
        r = await client.post("/score", json={"items": [item]})
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["personalized"]

    with RedisServer(tmp_path / "redis-server") as rs:
        settings = live_settings(bundle, rs.url, redis_timeout_s=0.5)
        async with running_app(settings, scorer) as a, running_app(settings, scorer) as b:
            for user in ("gone", "kept"):
                assert (await a.post(f"/users/{user}/adapt", json={"comparisons": [_cmp(user)]})).status_code == 200
                assert await personalized(b, user)  # B read the weights from Redis and cached them
            assert (await a.delete("/users/gone")).status_code == 200
            rs.proc.send_signal(signal.SIGSTOP)  # the outage starts before B scores anyone again
            try:
                assert not await personalized(b, "gone")
                assert await personalized(b, "kept")
            finally:
                rs.proc.send_signal(signal.SIGCONT)


async def test_state_written_before_generations_and_sizes_keeps_working(bundle, scorer, tmp_path) -> None:
    """A user stored by the previous version (comparisons, counter and a fit, but no generation, size or fit
    generation): their fit is still current (no mass refit on upgrade), the next adapt counts their bytes once and
    fits everything, and a DELETE then works as for any user."""
    import json
    import time

    from service.store import Comparison, StoredFit

    async with running_app(_settings(bundle, tmp_path), scorer) as c:
        store, engine = c.app.state.store, c.app.state.engine
        old = [Comparison(f"question legacy {i}", f"kind {i}", f"rude {i}") for i in range(3)]
        await store.r.rpush("pal:u:{legacy}:c", *[x.to_json() for x in old])
        await store.r.set("pal:u:{legacy}:seq", 3)
        legacy_fit = {"weights": [0.2, 0.3, 0.5], "n_fitted": 3, "seq": 3, "accuracy": 1.0, "confidence": 0.1,
                      "source": "adapt", "fitted_at": time.time()}  # fmt: skip
        await store.r.hset("pal:u:{legacy}:w", engine.version, json.dumps(legacy_fit))

        state = (await c.get("/users/legacy")).json()
        assert state["weights"] == [0.2, 0.3, 0.5] and state["n_fitted"] == 3  # still current: not refitted
        r = await c.post("/users/legacy/adapt", json={"comparisons": [_cmp("new")]})
        assert r.status_code == 200 and r.json()["n_fitted"] == 4, r.text
        stored, _ = await store.read_comparisons("legacy")
        assert int(await store.r.get("pal:u:{legacy}:bytes")) == sum(len(x.to_json()) for x in stored)
        fit = StoredFit.from_json(await store.r.hget("pal:u:{legacy}:w", engine.version))
        assert fit.gen == "" and fit.seq == 4  # the pre-existing comparisons keep the legacy generation
        assert (await c.delete("/users/legacy")).status_code == 200
        again = await c.post("/users/legacy/adapt", json={"comparisons": [_cmp("again")]})
        assert again.json()["n_fitted"] == 1 and (await store.get_fit(engine.version, "legacy")).gen != ""
