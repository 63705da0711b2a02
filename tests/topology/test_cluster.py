"""The service on a real Redis Cluster (3 masters + 3 replicas): start-up seeding, /score with users whose keys
live on different masters, /adapt, DELETE, and the refit of every node's users on a new model version."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster as SyncCluster

from service.config import Settings
from tests.support import cpu_settings, running_app
from tests.topology.servers import Cluster, redis_cluster

pytestmark = pytest.mark.anyio

CMPS = [
    {"prompt": "Which pet?", "chosen": "A calm old cat.", "rejected": "A loud parrot."},
    {"prompt": "Which drink?", "chosen": "Green tea.", "rejected": "Sugary soda."},
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with redis_cluster(tmp_path / "cluster") as c:
        yield c


def _settings(bundle: Path, url: str, **extra: object) -> Settings:
    return cpu_settings(bundle, redis_url=url, **extra)


def _masters_of(cluster: Cluster, keys: list[str]) -> set[str]:
    """The master each key lives on, asked of the cluster itself."""
    rc = SyncCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        return {rc.get_node_from_key(k).name for k in keys}
    finally:
        rc.close()


async def test_service_on_a_cluster_seeds_scores_adapts_deletes_and_migrates(
    cluster: Cluster, bundle_b: Path, scorer_b, scorer_a
) -> None:
    url = cluster.url
    adapted = [f"cl-user-{i}" for i in range(12)]
    async with running_app(_settings(bundle_b, url, redis_prefix="t1"), scorer_b) as c:
        engine = c.app.state.engine
        seen = sorted(engine.seen)
        assert (await c.get("/health")).status_code == 200
        assert engine.migration["seeded"] == len(seen) > 0
        # The checkpoint's users landed on several masters, and all of them are read back.
        assert len(_masters_of(cluster, [f"t1:u:{{{u}}}:w" for u in seen])) == 3
        for u in adapted:
            r = await c.post(f"/users/{u}/adapt", json={"comparisons": CMPS}, headers={"Idempotency-Key": "k1"})
            assert r.status_code == 200, r.text
        assert len(_masters_of(cluster, [f"t1:u:{{{u}}}:c" for u in adapted])) == 3
        # One batch with seen and adapted users of every node, and one never seen: all scored, none failed.
        items = [{"prompt": "Which pet?", "response": "A sleepy dog.", "user_id": u} for u in [*seen, *adapted]]
        items.append({"prompt": "Which pet?", "response": "A sleepy dog.", "user_id": "nobody"})
        r = await c.post("/score", json={"items": items})
        assert r.status_code == 200, r.text
        flags = [x["personalized"] for x in r.json()["results"]]
        assert flags == [True] * (len(seen) + len(adapted)) + [False]
        # A replayed adapt stores nothing more; DELETE forgets a user on whichever node holds it.
        key = {"Idempotency-Key": "k1"}
        again = await c.post(f"/users/{adapted[0]}/adapt", json={"comparisons": CMPS}, headers=key)
        assert again.json()["replayed"] is True and again.json()["n_comparisons"] == 2
        assert (await c.delete(f"/users/{adapted[1]}")).status_code == 200
        assert (await c.get(f"/users/{adapted[1]}")).status_code == 404
        assert (await c.delete(f"/users/{seen[0]}")).status_code == 200

    # A new model version on the same cluster: every node's users with comparisons are refitted, once.
    async with running_app(_settings(bundle_b, url, redis_prefix="t1"), scorer_a) as c:
        engine = c.app.state.engine
        assert engine.migration["refitted"] == len(adapted) - 1
        # Walked as one shard per primary (named by its first slot), each with its cursor done.
        cursors = await c.app.state.store.sweep_cursors(engine.version)
        assert cursors == {"0": "done", "5461": "done", "10923": "done"}, cursors
        assert (await c.get(f"/users/{adapted[1]}")).status_code == 404
        assert (await c.get(f"/users/{seen[0]}")).status_code == 404  # the tombstone holds across versions
        view = (await c.get(f"/users/{adapted[5]}")).json()
        assert view["model_version"] == scorer_a.meta.version and view["n_fitted"] == 2


def test_cluster_keys_of_one_user_share_a_slot(cluster: Cluster) -> None:
    """What makes the scripts and MULTI reads legal on a cluster: one user's keys hash to one slot."""
    r = redis.Redis(host="127.0.0.1", port=cluster.ports[0])
    slots = {r.execute_command("CLUSTER KEYSLOT", f"pal:u:{{someone}}:{kind}") for kind in ("c", "seq", "w", "gone")}
    assert len(slots) == 1


async def test_a_master_killed_scores_on_and_adapts_resume_after_its_replica_takes_over(
    cluster: Cluster, bundle_b: Path, scorer_b
) -> None:
    """SIGKILL the master of some users: /score keeps answering 200, personalized (weights cached in the
    process), /adapt answers 503 (never 500) until the cluster promotes the replica, then 200 again."""
    users = [f"kill-{i}" for i in range(12)]
    cmp = {"comparisons": [{"prompt": "p", "chosen": "a", "rejected": "b"}]}
    async with running_app(_settings(bundle_b, cluster.url, redis_timeout_s=0.5), scorer_b) as c:
        for u in users:
            assert (await c.post(f"/users/{u}/adapt", json=cmp)).status_code == 200
        rc = SyncCluster(host="127.0.0.1", port=cluster.ports[0])
        victim = rc.get_node_from_key("pal:u:{kill-0}:c").port
        rc.close()
        cluster.kill(victim)
        items = [{"prompt": "p", "response": "r", "user_id": u} for u in users]
        adapts: list[int] = []
        for _ in range(150):  # at most ~30 s: the node timeout is 2 s
            r = await c.post("/score", json={"items": items})
            assert r.status_code == 200, r.text
            assert all(x["personalized"] for x in r.json()["results"])
            adapts.append((await c.post("/users/kill-0/adapt", json=cmp)).status_code)
            assert adapts[-1] in (200, 503)
            if adapts[-1] == 200 and 503 in adapts:
                break
            await asyncio.sleep(0.2)
        assert 503 in adapts and adapts[-1] == 200, adapts
