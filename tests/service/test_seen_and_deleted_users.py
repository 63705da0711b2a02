"""The checkpoint's seen users are written to Redis before the service reports ready, once per model version,
and seeding cut short goes on where it stopped; a deleted user stays deleted under later model versions, and
this process's caches drop what they derived from the user's comparisons."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.store import UserStore
from tests.support import running_app

pytestmark = pytest.mark.anyio

VERSION = "pal-seeding-test"


def _weights(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"seen-{i:03d}": rng.dirichlet(np.ones(3)) for i in range(n)}


def _slow_seeding(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> None:
    real_seed = UserStore.seed_checkpoint_users

    async def slow_seed(self, *args, **kwargs):
        await asyncio.sleep(delay_s)
        return await real_seed(self, *args, **kwargs)

    monkeypatch.setattr(UserStore, "seed_checkpoint_users", slow_seed)


async def test_interrupted_seeding_resumes_and_keeps_deletions(settings, scorer_b) -> None:
    weights = _weights(25)
    async with running_app(settings, scorer_b) as c:
        store: UserStore = c.app.state.store
        real_hset, calls = store.r.hset, []

        async def hset_failing_second_time(*args, **kwargs):
            calls.append(args)
            if len(calls) == 2:  # chunk 2 is written, its progress record is lost: the worst moment to fail
                raise RedisConnectionError("connection lost")
            return await real_hset(*args, **kwargs)

        store.r.hset = hset_failing_second_time
        with pytest.raises(RedisConnectionError):
            await store.seed_checkpoint_users(VERSION, weights, chunk=10)
        store.r.hset = real_hset
        assert len((await store.get_fits_checked(VERSION, list(weights)))[0]) == 20

        # A user of a finished chunk deleted before seeding resumes stays deleted.
        assert await store.delete_user("seen-003")
        assert await store.seed_checkpoint_users(VERSION, weights, chunk=10) == 5
        fits, _ = await store.get_fits_checked(VERSION, list(weights))
        assert sorted(fits) == sorted(u for u in weights if u != "seen-003")
        for user, fit in fits.items():
            assert fit.weights == pytest.approx(weights[user].tolist()) and fit.source == "checkpoint"
        assert await store.r.hget(f"{settings.redis_prefix}:seeding", VERSION) is None

        # Seeded once: a later start writes nothing, not even users deleted since.
        assert await store.delete_user("seen-010")
        assert await store.seed_checkpoint_users(VERSION, weights, chunk=10) == 0
        assert await store.get_fit(VERSION, "seen-010") is None


async def test_not_ready_until_seen_users_are_in_redis(settings, scorer_b, monkeypatch) -> None:
    seen = scorer_b.seen_users()
    assert seen, "the test bundle has seen users"
    _slow_seeding(monkeypatch, 0.5)
    async with running_app(settings, scorer_b, wait_ready=False) as c:
        not_ready = 0
        while (h := await c.get("/health")).status_code == 503:
            not_ready += 1
            await asyncio.sleep(0.02)
        assert h.status_code == 200 and not_ready > 0
        # The first moment it says ready, every seen user already scores with its checkpoint weights.
        items = [{"prompt": "p", "response": "r", "user_id": u} for u in seen]
        results = (await c.post("/score", json={"items": items})).json()["results"]
        assert all(r["personalized"] for r in results)
        fits, _ = await c.app.state.store.get_fits_checked(scorer_b.meta.version, list(seen))
        assert sorted(fits) == sorted(seen)


async def test_slow_seeding_does_not_hold_start_past_seed_wait(settings, scorer_b, monkeypatch) -> None:
    settings.seed_wait_s = 0.05
    _slow_seeding(monkeypatch, 1.0)
    async with running_app(settings, scorer_b, wait_ready=False) as c:
        for _ in range(200):
            if (await c.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        engine = c.app.state.engine
        assert engine.ready and engine.migration["state"] == "seeding"  # ready while seeding goes on
        for _ in range(300):
            if engine.migration["state"] == "done":
                break
            await asyncio.sleep(0.02)
        assert engine.migration["state"] == "done" and engine.migration["seeded"] == len(scorer_b.seen_users())


CMPS = [
    {"prompt": "Which pet?", "chosen": "A calm old cat.", "rejected": "A loud parrot."},
    {"prompt": "Which drink?", "chosen": "Green tea.", "rejected": "Sugary soda."},
]


async def test_deleted_checkpoint_user_stays_deleted_under_a_new_model_version(settings, scorer_b, scorer_a) -> None:
    from models.head import fit_user

    seen = sorted(scorer_b.seen_users())
    victim, kept = seen[0], seen[1]
    assert victim in scorer_a.seen_users()  # the next model's checkpoint holds the user too
    async with running_app(settings, scorer_b) as c:
        assert (await c.delete(f"/users/{victim}")).status_code == 200
        assert (await c.post("/users/walker/adapt", json={"comparisons": CMPS})).status_code == 200
        assert (await c.delete("/users/walker")).status_code == 200
        # Users who are in no checkpoint leave nothing behind, not even their id.
        assert await c.app.state.store.r.keys("*walker*") == []

    async with running_app(settings, scorer_a) as c:  # a new version seeds its checkpoint users...
        assert (await c.get(f"/users/{kept}")).json()["source"] == "checkpoint"
        assert (await c.get(f"/users/{victim}")).status_code == 404  # ...but not the deleted one
        item = {"prompt": "p", "response": "r", "user_id": victim}
        assert (await c.post("/score", json={"items": [item]})).json()["results"][0]["personalized"] is False

        # Coming back, the user is fitted from the population prior, not from the weights they asked to forget.
        fit = (await c.post(f"/users/{victim}/adapt", json={"comparisons": CMPS})).json()
        engine = c.app.state.engine
        feats = scorer_a.features(*([x[k] for x in CMPS] for k in ("prompt", "chosen", "rejected")))
        expected = fit_user(scorer_a.head, feats, engine.prior, engine.prior_strength).weights
        old_prior = fit_user(scorer_a.head, feats, engine.seen[victim], engine.prior_strength).weights
        assert np.abs(expected - old_prior).max() > 1e-3  # the test can tell the two apart
        assert fit["weights"] == pytest.approx(expected.tolist(), abs=1e-6)


async def test_delete_drops_what_this_process_derived_from_the_users_comparisons(settings, scorer_b) -> None:
    tag = uuid.uuid4().hex  # texts no other test has encoded
    cmps = [
        {"prompt": f"{tag} question {i}", "chosen": f"{tag} good answer {i}", "rejected": f"{tag} bad answer {i}"}
        for i in range(2)
    ]
    async with running_app(settings, scorer_b) as c:
        engine = c.app.state.engine
        assert (await c.post("/users/forgetful/adapt", json={"comparisons": cmps})).status_code == 200
        assert (await c.delete("/users/forgetful")).status_code == 200
        before = engine.cache_stats()
        assert (await c.post("/users/forgetful/adapt", json={"comparisons": cmps})).status_code == 200
        after = engine.cache_stats()
        # Nothing of the first adapt was left to reuse: both comparisons and their 6 texts were encoded again.
        assert after["features_misses"] - before["features_misses"] == 2
        assert after["encoder_misses"] - before["encoder_misses"] == 6
