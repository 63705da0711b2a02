"""Faults against real processes: Redis dies or freezes under load, the service is SIGKILLed mid-adapt.

Promises proven here:
- while Redis is unreachable /score answers 200 (cached weights, else the prior with personalized=false) and
  /adapt answers 503 + Retry-After (or 202 `fitted: false` if Redis failed after storing); nothing answers 500;
- when Redis is back everything recovers in the same service process, and every comparison the service
  acknowledged (200 or 202) is stored;
- a SIGKILL of the service mid-adapt leaves parseable comparisons, all-or-nothing appends, and a stored fit
  that is exactly the fit of a prefix of the stored comparisons; a restarted service carries on from there.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.store import Comparison, StoredFit, parse_comparisons
from tests.reliability.procs import RedisServer, ServiceProcess

pytestmark = pytest.mark.timeout(300)

PREFIX = "pal"


def ckey(user: str, kind: str) -> str:
    return f"{PREFIX}:u:{{{user}}}:{kind}"


@dataclass
class Record:
    phase: str
    route: str
    status: int
    retry_after: str | None
    body: dict
    phase_end: str = ""  # the phase when the answer came (a request can straddle two)


@dataclass
class Load:
    """Mixed /score and /adapt traffic from a few async workers until `stop` is set."""

    url: str
    warm_users: list[str]
    phase: str = "normal"
    stop: threading.Event = field(default_factory=threading.Event)
    records: list[Record] = field(default_factory=list)
    acked: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # user -> acknowledged prompts
    transport_errors: list[str] = field(default_factory=list)

    async def worker(self, client: httpx.AsyncClient, w: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            phase = self.phase
            if i % 3:
                items = [
                    {"prompt": "p", "response": "r0-0", "user_id": self.warm_users[w % len(self.warm_users)]},
                    {"prompt": "p", "response": "stranger", "user_id": f"stranger-{w}"},
                    {"prompt": "p", "response": "prior"},
                ]
                route, req = "/score", client.post("/score", json={"items": items})
            else:
                user, prompt = f"load-{w}", f"w{w}-{i}"
                cmps = [{"prompt": prompt, "chosen": f"yes {i}", "rejected": f"no {i}"}]
                route, req = "/adapt", client.post(f"/users/{user}/adapt", json={"comparisons": cmps})
            try:
                r = await req
            except httpx.HTTPError as e:
                self.transport_errors.append(f"{route}: {type(e).__name__}: {e}")
                continue
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            self.records.append(Record(phase, route, r.status_code, r.headers.get("Retry-After"), body, self.phase))
            if route == "/adapt" and r.status_code in (200, 202):  # 202: stored, refit pending
                self.acked[user].add(prompt)
            await asyncio.sleep(0.01)

    def run(self, n_workers: int = 6) -> None:
        async def main() -> None:
            async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
                await asyncio.gather(*(self.worker(client, w) for w in range(n_workers)))

        asyncio.run(main())


def _stored(r, user: str) -> tuple[list[Comparison], int]:
    raw, texts = r.lrange(ckey(user, "c"), 0, -1), r.hgetall(ckey(user, "t"))
    return parse_comparisons(raw, texts), int(r.get(ckey(user, "seq")) or 0)


def test_redis_killed_and_frozen_under_load_then_recovers_without_losing_acked_comparisons(
    bundle: Path, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "redis") as rs, ServiceProcess(bundle, rs.url, tmp_path / "svc.log") as svc:
        warm = ["warm-0", "warm-1"]
        with httpx.Client(base_url=svc.url, timeout=30) as c:
            for u in warm:
                assert c.post(f"/users/{u}/adapt", json={"comparisons": [{"chosen": "a", "rejected": "b"}]}).is_success
            items = [{"prompt": "p", "response": "r0-0", "user_id": u} for u in warm]
            before = [x["reward"] for x in c.post("/score", json={"items": items}).json()["results"]]
        pid = svc.proc.pid

        load = Load(svc.url, warm)
        thread = threading.Thread(target=load.run, daemon=True)
        thread.start()
        time.sleep(1.5)
        load.phase = "killed"
        rs.kill(signal.SIGKILL)  # appendfsync always: what Redis acknowledged is on disk
        time.sleep(3.0)
        load.phase = "restarting"
        rs.start()
        time.sleep(3.0)
        load.phase = "recovered"
        time.sleep(1.5)
        load.phase = "frozen"
        rs.proc.send_signal(signal.SIGSTOP)  # a hung server: commands time out instead of being refused
        time.sleep(3.0)
        load.phase = "thawing"
        rs.proc.send_signal(signal.SIGCONT)
        time.sleep(3.0)
        load.phase = "recovered-2"
        time.sleep(1.5)
        load.stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()

        assert svc.proc.poll() is None and svc.proc.pid == pid, "the service must ride out the outage itself"
        assert not load.transport_errors, load.transport_errors[:5]
        by = defaultdict(list)
        for rec in load.records:
            by[(rec.phase, rec.route)].append(rec)

        # Nothing ever answers 500; /score always answers; /adapt refuses with 503 + Retry-After only.
        assert all(rec.status < 500 or rec.status == 503 for rec in load.records), {rec.status for rec in load.records}
        scores = [rec for rec in load.records if rec.route == "/score"]
        assert scores and all(rec.status == 200 for rec in scores), {rec.status for rec in scores}
        adapts = [rec for rec in load.records if rec.route == "/adapt"]
        # 202: Redis failed after the append (stored, refitted later); 503: the append itself failed or was lost.
        assert {rec.status for rec in adapts} <= {200, 202, 503}
        for rec in adapts:
            if rec.status == 503:
                assert rec.retry_after == "1" and "unavailable" in rec.body["detail"]
            if rec.status == 202:
                assert rec.body["fitted"] is False

        for phase in ("killed", "frozen"):
            # An adapt sees the outage as a 503 (its append failed) or, when Redis went away between its append and
            # its refit, as a 202 `fitted: false` (issue 16): which one a short freeze produces is timing.
            saw_outage = [rec for rec in by[(phase, "/adapt")] if rec.status in (503, 202)]
            assert saw_outage, f"no adapt saw the outage while Redis was {phase}"
            for rec in by[(phase, "/score")]:
                warm_item, stranger, prior = rec.body["results"]
                # Cached weights keep warm users personalized; the others get the prior, marked as such.
                assert warm_item["personalized"] is True and stranger["personalized"] is False
                assert prior["personalized"] is False and prior["user_id"] is None
        # Warm users were never re-adapted: their rewards during the outages are their rewards from before.
        reward_of = dict(zip(warm, before, strict=True))
        outage = [rec for ph in ("killed", "frozen") for rec in by[(ph, "/score")]]
        assert outage
        for rec in outage:
            item = rec.body["results"][0]
            assert item["reward"] == pytest.approx(reward_of[item["user_id"]])

        # Recovered in the same process: adapts are acknowledged again. (On a starved CI box a command can
        # still miss the Redis timeout now and then; that answer is a 503 + Retry-After, checked above.)
        for phase in ("recovered", "recovered-2"):
            # Only adapts that also ended in the phase: one still in flight when the next fault starts fails.
            late = [rec.status for rec in by[(phase, "/adapt")] if rec.phase_end == phase]
            assert late and late.count(200) >= 0.8 * len(late), f"{phase}: {late}"

        with httpx.Client(base_url=svc.url, timeout=30) as c:
            assert c.get("/health").json()["redis"] == "ok"
            again = [x["reward"] for x in c.post("/score", json={"items": items}).json()["results"]]
            assert again == pytest.approx(before)
            for u in warm:  # writes work again, one after another, and refit from everything stored
                resp = c.post(f"/users/{u}/adapt", json={"comparisons": [{"chosen": "c", "rejected": "d"}]})
                assert resp.status_code == 200 and resp.json()["n_fitted"] == 2
            r = rs.client()
            for user, acked in load.acked.items():
                stored, seq = _stored(r, user)
                prompts = [x.prompt for x in stored]
                assert acked <= set(prompts), f"{user}: acknowledged but missing {sorted(acked - set(prompts))[:5]}"
                assert len(prompts) == len(set(prompts)) == seq  # no duplicate, the counter agrees
                state = c.get(f"/users/{user}").json()
                assert state["n_comparisons"] == len(stored)
            # Acknowledged comparisons, all users together, against what Redis holds.
            n_acked = sum(len(v) for v in load.acked.values())
            n_stored = sum(len(_stored(r, u)[0]) for u in load.acked)
            assert n_stored >= n_acked > 0


def _assert_consistent(r, user: str, version: str, head, prior: np.ndarray, scorer, strength: float) -> StoredFit:
    """Comparisons parse, appends were all-or-nothing, and the stored fit is the fit of a stored prefix."""
    from models.head import fit_user

    stored, seq = _stored(r, user)
    assert seq == len(stored)
    per_request = defaultdict(int)
    for cmp in stored:
        per_request[cmp.prompt.split("/")[0]] += 1
    for req, n in per_request.items():
        assert n == (5 if req == "seed" else 12), f"request {req} partially stored: {n}"
    fit = StoredFit.from_json(r.hget(ckey(user, "w"), version))
    assert fit.source == "adapt" and fit.n_fitted == fit.seq and 0 < fit.seq <= seq
    w = fit.array
    assert np.isfinite(w).all() and w.min() >= 0 and abs(w.sum() - 1) < 1e-9
    prefix = stored[: fit.seq]
    feats = scorer.features([c.prompt for c in prefix], [c.chosen for c in prefix], [c.rejected for c in prefix])
    expect = fit_user(head, feats, prior, strength)
    np.testing.assert_allclose(w, expect.weights, atol=2e-3)
    return fit


def test_sigkill_mid_adapt_leaves_consistent_state_and_a_restart_carries_on(
    bundle: Path, scorer, tmp_path: Path
) -> None:
    user, version = "victim", scorer.meta.version
    prior = np.asarray(scorer.meta.prior_weights, dtype=np.float64)

    def cmps(tag: str, n: int) -> list[dict]:
        filler = " ".join(f"word{j}" for j in range(20))
        return [
            {"prompt": f"{tag}/{j} {filler}", "chosen": f"good {tag} {j} {filler}", "rejected": f"bad {tag} {j}"}
            for j in range(n)
        ]

    with RedisServer(tmp_path / "redis") as rs:
        r = rs.client()
        with ServiceProcess(bundle, rs.url, tmp_path / "svc1.log") as svc:
            seed = httpx.post(f"{svc.url}/users/{user}/adapt", json={"comparisons": cmps("seed", 5)}, timeout=60)
            assert seed.status_code == 200
            old = seed.json()["weights"]

            async def storm() -> list[httpx.Response | Exception]:
                async with httpx.AsyncClient(base_url=svc.url, timeout=60) as client:

                    def send(first: int, n: int) -> list[asyncio.Future]:
                        return [
                            asyncio.ensure_future(
                                client.post(f"/users/{user}/adapt", json={"comparisons": cmps(f"r{i}", 12)})
                            )
                            for i in range(first, first + n)
                        ]

                    # A first wave is acknowledged; a second (6 x 12 new comparisons to encode and fit) is in
                    # flight when the service dies: killed as soon as one of its appends reached Redis, i.e.
                    # while the refit that would answer it is encoding or fitting.
                    wave1 = send(0, 3)
                    await asyncio.wait(wave1, timeout=60)
                    acked_seq = int(r.get(ckey(user, "seq")))
                    wave2 = send(3, 6)
                    deadline = time.monotonic() + 60
                    while int(r.get(ckey(user, "seq"))) == acked_seq and time.monotonic() < deadline:
                        await asyncio.sleep(0.002)
                    svc.kill(signal.SIGKILL)
                    return await asyncio.gather(*wave1, *wave2, return_exceptions=True)

            outcomes = asyncio.run(storm())
        acked = [i for i, o in enumerate(outcomes) if isinstance(o, httpx.Response) and o.status_code == 200]
        died = [i for i, o in enumerate(outcomes) if isinstance(o, Exception)]
        assert acked and died, f"the kill did not land mid-adapt: {outcomes}"
        assert all(isinstance(o, Exception) or o.status_code == 200 for o in outcomes)

        fit = _assert_consistent(r, user, version, scorer.head, prior, scorer, 1.0)
        stored, _ = _stored(r, user)
        present = {c.prompt.split("/")[0] for c in stored}
        assert {f"r{i}" for i in acked} <= present and "seed" in present  # acknowledged = stored
        assert fit.weights != old  # an acknowledged refit replaced the seed's fit

        with (
            ServiceProcess(bundle, rs.url, tmp_path / "svc2.log") as svc2,
            httpx.Client(base_url=svc2.url, timeout=60) as c,
        ):
            state = c.get(f"/users/{user}").json()
            assert state["n_comparisons"] == len(stored) and state["weights"] is not None
            more = c.post(f"/users/{user}/adapt", json={"comparisons": cmps("after", 12)})
            assert more.status_code == 200 and more.json()["n_fitted"] == len(stored) + 12
            _assert_consistent(r, user, version, scorer.head, prior, scorer, 1.0)
            scored = c.post("/score", json={"items": [{"prompt": "p", "response": "x", "user_id": user}]}).json()
            assert scored["results"][0]["personalized"] is True
            assert json.loads(r.hget(ckey(user, "w"), version))["seq"] == len(stored) + 12
