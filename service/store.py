"""User state in Redis: comparisons (independent of the model) and fitted weights (per model version).

Keys, all of one user in one cluster hash slot thanks to the {braces}:
    {prefix}:u:{<user>}:c    list of JSON comparisons, oldest first, capped (oldest dropped)
    {prefix}:u:{<user>}:seq  how many comparisons were ever appended (monotonic; survives the cap)
    {prefix}:u:{<user>}:w    hash model_version -> JSON StoredFit
    {prefix}:seeded          set of model versions whose checkpoint users were written once

Appends are MULTI transactions (RPUSH + LTRIM + INCRBY), so concurrent adapts lose nothing. A fit records the
`seq` it was computed from and is written by a Lua script only if it is newer than the stored one and the user
still exists, so a slow refit can neither overwrite a fresher one nor resurrect a deleted user.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import redis.asyncio as aioredis

_PUT_IF_NEWER = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, old = pcall(cjson.decode, cur)
  if ok and old['seq'] and tonumber(old['seq']) >= tonumber(ARGV[2]) then return 0 end
end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class Comparison:
    prompt: str
    chosen: str
    rejected: str

    def to_json(self) -> str:
        # ASCII escapes: a lone surrogate (valid in a JSON string, not in UTF-8) is stored and read back intact
        # instead of failing the Redis write.
        return json.dumps([self.prompt, self.chosen, self.rejected])

    @classmethod
    def from_json(cls, raw: bytes | str) -> Comparison:
        p, c, r = json.loads(raw)
        return cls(p, c, r)


@dataclass(frozen=True)
class StoredFit:
    weights: list[float]
    n_fitted: int  # comparisons the fit used
    seq: int  # the user's append counter when the comparisons were read (0 for checkpoint users)
    accuracy: float | None
    confidence: float | None
    source: str  # "adapt" | "checkpoint"
    fitted_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> StoredFit:
        return cls(**json.loads(raw))

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.weights, dtype=np.float64)


class UserStore:
    def __init__(self, client: aioredis.Redis, prefix: str, max_comparisons: int) -> None:
        self.r = client
        self.prefix = prefix
        self.max_comparisons = max_comparisons
        self._put_if_newer = client.register_script(_PUT_IF_NEWER)

    def _key(self, user: str, kind: str) -> str:
        return f"{self.prefix}:u:{{{user}}}:{kind}"

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def append_comparisons(self, user: str, comparisons: Iterable[Comparison]) -> int:
        """Append atomically, drop the oldest past the cap; returns the user's append counter after it."""
        values = [c.to_json() for c in comparisons]
        async with self.r.pipeline(transaction=True) as p:
            p.rpush(self._key(user, "c"), *values)
            p.ltrim(self._key(user, "c"), -self.max_comparisons, -1)
            p.incrby(self._key(user, "seq"), len(values))
            _, _, seq = await p.execute()
        return int(seq)

    async def read_comparisons(self, user: str) -> tuple[list[Comparison], int]:
        """All stored comparisons and the append counter they correspond to, read in one transaction."""
        async with self.r.pipeline(transaction=True) as p:
            p.lrange(self._key(user, "c"), 0, -1)
            p.get(self._key(user, "seq"))
            raw, seq = await p.execute()
        return [Comparison.from_json(x) for x in raw], int(seq or 0)

    async def count_comparisons(self, user: str) -> tuple[int, int]:
        """(comparisons stored now, the user's append counter)."""
        async with self.r.pipeline(transaction=True) as p:
            p.llen(self._key(user, "c"))
            p.get(self._key(user, "seq"))
            n, seq = await p.execute()
        return int(n), int(seq or 0)

    async def get_fit(self, version: str, user: str) -> StoredFit | None:
        raw = await self.r.hget(self._key(user, "w"), version)
        return None if raw is None else StoredFit.from_json(raw)

    async def get_fits(self, version: str, users: list[str]) -> dict[str, StoredFit]:
        """Fits of many users in one round trip; users without one are absent."""
        if not users:
            return {}
        async with self.r.pipeline(transaction=False) as p:
            for u in users:
                p.hget(self._key(u, "w"), version)
            raws = await p.execute()
        return {u: StoredFit.from_json(raw) for u, raw in zip(users, raws, strict=True) if raw is not None}

    async def put_fit_if_newer(self, version: str, user: str, fit: StoredFit) -> bool:
        keys = [self._key(user, "w"), self._key(user, "c")]
        return bool(await self._put_if_newer(keys=keys, args=[version, fit.seq, fit.to_json()]))

    async def seed_checkpoint_users(self, version: str, weights: dict[str, np.ndarray]) -> int:
        """Write the checkpoint's seen users once per model version (a later DELETE stays deleted).

        Never overwrites a fit already stored for this version. Returns how many were written.
        """
        if not await self.r.sadd(f"{self.prefix}:seeded", version):
            return 0
        now = time.time()
        written = 0
        items = list(weights.items())
        for start in range(0, len(items), 1000):
            async with self.r.pipeline(transaction=False) as p:
                for user, w in items[start : start + 1000]:
                    fit = StoredFit([float(x) for x in w], 0, 0, None, None, "checkpoint", now)
                    p.hsetnx(self._key(user, "w"), version, fit.to_json())
                written += sum(int(x) for x in await p.execute())
        return written

    async def delete_user(self, user: str) -> bool:
        """Forget comparisons and weights of every model version; True if anything existed."""
        n = await self.r.delete(self._key(user, "c"), self._key(user, "seq"), self._key(user, "w"))
        return n > 0

    async def users_with_comparisons(self) -> AsyncIterator[str]:
        head, tail = f"{self.prefix}:u:{{", "}:c"
        async for key in self.r.scan_iter(match=f"{head}*{tail}", count=1000):
            k = key.decode() if isinstance(key, bytes) else key
            yield k[len(head) : -len(tail)]
