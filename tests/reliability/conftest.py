"""Fixtures for the reliability suite: one real exported bundle (random PAL-B head on real MiniLM), the scorer
loaded in-process (to recompute fits), and a live in-thread app on loopback backed by a standalone redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.config import Settings
from tests.reliability.procs import RedisServer
from tests.support import cpu_settings

# Small limits so the "past the limit" requests stay cheap; the service reads the same numbers from Settings.
LIMITS = dict(max_text_chars=4000, max_items_per_request=64, max_comparisons_per_request=32, max_body_bytes=256 * 1024)


@pytest.fixture(scope="session")
def bundle(bundle_b: Path) -> Path:
    return bundle_b


@pytest.fixture(scope="session")
def scorer(scorer_b):
    return scorer_b


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@dataclass
class Live:
    url: str
    app: object
    redis: RedisServer
    settings: Settings


def live_settings(bundle: Path, redis_url: str, **overrides: object) -> Settings:
    return cpu_settings(bundle, redis_url=redis_url, **{"redis_timeout_s": 0.5, **LIMITS, **overrides})


@pytest.fixture(scope="session")
def live(bundle: Path, scorer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One served app (uvicorn on a loopback socket, in a thread) with small limits and no API key."""
    from service.app import create_app
    from tests.support import serve_in_thread, wait_until_ready

    with RedisServer(tmp_path_factory.mktemp("live-redis")) as server:
        settings = live_settings(bundle, server.url, api_key=None)
        app = create_app(settings, scorer=scorer)
        with serve_in_thread(app) as url:
            wait_until_ready(app, url)
            yield Live(url, app, server, settings)
