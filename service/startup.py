"""Start-up user state for a model version: the checkpoint's seen users written to Redis (resumable, once per
version), the users this version has not fitted refitted ahead of their first read (optional, shared by all
replicas), and the weights of versions past PAL_KEEP_MODEL_VERSIONS pruned. `seeded` and `done` are the readiness
signals (asyncio events); `state` is what /info reports.

Nothing here reads every user before the replica serves: a user whose comparisons this version has not fitted is
refitted on their first read (service/users.py, under the per-user lease replicas share). With
PAL_MIGRATE_IN_BACKGROUND the replicas also walk all users once per version, ahead of those reads: the keyspace is
split in shards (one per Redis Cluster primary, else one), each walked by whichever replica holds its lease, with
its SCAN cursor in Redis, so the cluster walks it once and a replica that dies is taken over where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from redis.exceptions import RedisError

from service.store import SWEPT, Shard
from service.users import LEASED, REFITTED, Users

log = logging.getLogger(__name__)

_SWEEP_LEASE_S = 120  # a replica's hold on walking one shard; renewed every page, expires if it dies
_SWEEP_PAGE = 100  # SCAN COUNT: users refitted between two cursor saves (what a replica that dies leaves to redo)


@dataclass(eq=False)
class Startup:
    users: Users  # start-up seeds and migrates users through their store, settings and error accounting

    def __post_init__(self) -> None:
        self.store, self.settings, self.on_error = self.users.store, self.users.settings, self.users.on_error
        self.version = self.users.version
        self.state: dict[str, int | str] = {"state": "pending", "seeded": 0, "refitted": 0, "swept": 0}
        self.seeded = asyncio.Event()
        self.done = asyncio.Event()

    async def seed_users(self) -> None:
        """Write the checkpoint's seen users to Redis for this model version (resumable; once per version)."""
        self.state["state"] = "seeding"
        self.state["seeded"] = await self.store.seed_checkpoint_users(self.version, self.users.seen)
        self.seeded.set()

    async def migrate(self, retry_s: float = 5.0) -> None:
        """Seed unless start-up already did, walk the users (PAL_MIGRATE_IN_BACKGROUND), then prune old versions'
        weights. Runs in the background while the replica serves; retries while Redis is unreachable."""
        token = uuid.uuid4().hex  # this replica's shard leases
        while True:
            try:
                await self.store.record_version(self.version)
                if not self.seeded.is_set():
                    await self.seed_users()
                if self.settings.migrate_in_background:
                    await self._sweep(token, retry_s)
                # Older weights are not needed to score this version: a user it has not fitted is refitted from
                # their comparisons (on read, or by the walk above).
                self.state["state"] = "pruning"
                self.state["pruned"] = await self.store.prune_versions(self.settings.keep_model_versions, self.version)
                self.state["state"] = "done"
                self.done.set()
                log.info("user state ready for %s: %s", self.version, self.state)
                return
            except RedisError as e:
                self.on_error("migrate", e)
                self.state["state"] = f"waiting for redis: {e}"
                await asyncio.sleep(retry_s)
            except Exception as e:  # a refit that fails (e.g. queue full) must not stop the service; retry later
                log.exception("user migration failed; retrying")
                self.state["state"] = f"retrying after error: {type(e).__name__}"
                await asyncio.sleep(retry_s)

    async def _sweep(self, token: str, retry_s: float) -> None:
        """Walk every shard not yet walked for this version (by any replica), then retry the users whose refit
        another replica held meanwhile until that refit is stored (or its lease expired and this one took it)."""
        deferred: set[str] = set()
        while True:
            shards = await self.store.shards()
            cursors = await self.store.sweep_cursors(self.version)
            left = [s for s in shards if cursors.get(s.name) != SWEPT]
            if not left:
                break
            walked = False
            for shard in left:
                if await self.store.claim_shard(self.version, shard.name, token, _SWEEP_LEASE_S):
                    walked = True
                    try:
                        deferred |= await self._walk(shard, int(cursors.get(shard.name, 0)), token)
                    finally:
                        await self.store.release_shard(self.version, shard.name, token)
            if not walked:  # every shard left is being walked by another replica
                self.state["state"] = f"waiting for another replica walking {len(left)} shards"
                await asyncio.sleep(retry_s)
        while deferred:
            deferred = {u for u in deferred if await self._refit(u) == LEASED}
            if deferred:
                self.state["state"] = f"waiting for {len(deferred)} users another replica is refitting"
                await asyncio.sleep(retry_s)

    async def _walk(self, shard: Shard, cursor: int, token: str) -> set[str]:
        """Refit the stale users of one shard from `cursor` on, saving the cursor after every page; returns the users
        another replica was refitting. Stops early if the lease was lost (another replica took the shard over)."""
        self.state["state"] = f"walking users (shard {shard.name})"
        deferred: set[str] = set()
        while True:
            cursor, users = await self.store.scan_users(shard, cursor, _SWEEP_PAGE)
            for user in users:
                if await self._refit(user) == LEASED:
                    deferred.add(user)
            self.state["swept"] = int(self.state["swept"]) + len(users)
            mark = str(cursor) if cursor else SWEPT
            if not await self.store.save_cursor(self.version, shard.name, mark, token, _SWEEP_LEASE_S) or not cursor:
                return deferred

    async def _refit(self, user: str) -> str:
        status, _ = await self.users.refit_if_stale(user)
        if status == REFITTED:
            self.state["refitted"] = int(self.state["refitted"]) + 1
        return status
