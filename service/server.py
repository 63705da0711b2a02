"""`pal serve BUNDLE`: load the scorer first (fail loudly, e.g. CUDA asked for and absent), then serve."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from service.app import create_app, load_scorer
from service.config import Settings


def run_server(bundle: str | Path | None = None, host: str | None = None, port: int | None = None) -> None:
    overrides: dict = {}
    if bundle is not None:
        overrides["bundle_dir"] = Path(bundle)
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scorer = load_scorer(settings)
    app = create_app(settings, scorer=scorer)
    # One process: the model lives in it; concurrency comes from the batcher, not from workers.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_keep_alive=settings.keep_alive_s,
    )
