"""Users' fitted weights for the served model version: read from Redis, kept in memory to bridge an outage.

The cache keeps scoring personalised while Redis is unreachable, within limits that keep it honest: an entry is
served for at most PAL_WEIGHTS_FALLBACK_TTL_S, never for a user whose deletion this process heard (every DELETE
publishes the user id from the same Lua script that deletes), and never from before this process's latest
subscription to those deletions. After a failed read, reads skip Redis for `retry_after_s` (a circuit breaker),
so an unreachable server costs one timeout per period, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from redis.exceptions import RedisError

from models.cache import LRUCache
from service.config import Settings
from service.store import UserStore
from service.tasks import cancel

log = logging.getLogger(__name__)

ReadMark = tuple[int, float]  # (deletions heard when a read began, when it began)


@dataclass(eq=False)
class UserWeights:
    store: UserStore
    version: str
    settings: Settings
    on_error: Callable[[str, Exception], None]  # (what failed, why): the engine's Redis-error accounting

    def __post_init__(self) -> None:
        settings = self.settings
        # Weights last read from or written to Redis: keeps users personalized while Redis is unreachable.
        self._cache: LRUCache[tuple[float, np.ndarray]] = LRUCache(settings.weights_cache_size)
        # Deletions heard on the store's channel (from any replica): a counter, and the count when each user's
        # deletion was heard, so weights read before a deletion was heard are never kept for a Redis outage.
        self._heard = 0
        self._heard_deleted: LRUCache[int] = LRUCache(65536)
        # Cached weights read before this moment may not bridge an outage: deletions made while this process was
        # not subscribed (at start, after a reconnect) were not heard.
        self._valid_after = float("inf")
        self._listener: asyncio.Task | None = None
        self._retry_at = 0.0
        # Set by Users: refits users read whose comparisons this version has not fitted (returns the weights of
        # those done in time).
        self.refit_missing: Callable[[list[str]], Awaitable[dict[str, np.ndarray]]] | None = None

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    def start(self) -> None:
        if hasattr(self.store.r, "pubsub"):
            self._listener = asyncio.create_task(self._listen_for_deletions(), name="pal-deletions")

    async def close(self) -> None:
        await cancel(self._listener)

    def mark(self) -> ReadMark:
        """Call before a read from Redis whose result may be remembered."""
        return self._heard, time.monotonic()

    async def get(self, users: list[str]) -> dict[str, np.ndarray]:
        """Users' fitted weights for this model version; on a Redis failure, the ones cached in memory. A user with
        comparisons but no fit of this version from them (a new deploy) is refitted first (see refit_missing)."""
        if not users:
            return {}
        if time.monotonic() < self._retry_at:
            return self._cached(users)
        mark = self.mark()
        try:
            fits, unfitted = await self.store.get_fits_checked(self.version, users)
        except RedisError as e:
            self.on_error("get_fits", e)
            self._retry_at = time.monotonic() + self.settings.retry_after_s
            return self._cached(users)
        out = {u: f.array for u, f in fits.items()}
        if unfitted and self.refit_missing is not None:
            out.update(await self.refit_missing(unfitted))  # else their checkpoint weights, or the prior
        for u in users:
            if u in out:
                self.remember(u, out[u], mark)
            else:
                # Deleted (possibly through another replica): an outage must not bring the user back.
                self._cache.pop(u)
        return out

    def remember(self, user: str, weights: np.ndarray, mark: ReadMark) -> None:
        """Keep weights read from Redis (the read began at `mark`) for an outage; unless the user's deletion was
        heard after the read began (the reply can be processed after the news)."""
        since, read_at = mark
        if (self._heard_deleted.get(user) or -1) > since:
            self._cache.pop(user)
            return
        self._cache.put(user, (read_at, weights))

    def drop(self, user: str) -> None:
        self._cache.pop(user)

    def _heard_deletion(self, user: str) -> None:
        self._heard += 1
        self._heard_deleted.put(user, self._heard)
        self._cache.pop(user)

    async def _listen_for_deletions(self) -> None:
        """Drop cached weights of users deleted through any replica, as the deletion happens.

        DELETE publishes the user id in the same Lua script that deletes, so a replica subscribed at that moment
        hears of it before Redis can answer anything else, and an outage that starts after an acknowledged
        DELETE cannot make this process serve the user from its cache. Every (re)subscription, including
        redis-py's silent reconnects, invalidates the weights cached before it: deletions made while this process
        was not subscribed were not heard. Reads from Redis refresh them."""
        while True:
            pubsub = self.store.r.pubsub()
            try:
                await pubsub.subscribe(self.store.deletions_channel)
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":
                        self._valid_after = time.monotonic()
                    elif msg["type"] == "message":
                        data = msg["data"]
                        self._heard_deletion(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as e:
                # What was published before the connection broke was delivered before the break, so the cache
                # keeps bridging this outage; deletions made meanwhile (a partition) are the documented limit.
                self.on_error("subscribe", e)
                await asyncio.sleep(min(1.0, self.settings.retry_after_s))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _cached(self, users: list[str]) -> dict[str, np.ndarray]:
        """Weights last read from Redis, if recent enough and read while deletions were being heard: bounds how
        stale a fallback answer can be, and never serves a user whose acknowledged deletion this process heard."""
        oldest = max(time.monotonic() - self.settings.weights_fallback_ttl_s, self._valid_after)
        out = {}
        for u in users:
            entry = self._cache.get(u)
            if entry is not None and entry[0] >= oldest:
                out[u] = entry[1]
        return out
