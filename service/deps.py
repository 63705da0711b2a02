"""FastAPI dependencies: how routes (ours and service.protocols) reach the app's pipeline and settings.

They are `async def` although they never await: FastAPI runs a plain `def` dependency in a worker thread, and
three thread hops per request cost more than the rest of a cached /score (measured in docs/SERVICE.md).
"""

from __future__ import annotations

from fastapi import HTTPException, Request

from service.config import Settings
from service.pipeline import Pipeline


async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None or not pipeline.ready:
        raise HTTPException(status_code=503, detail="model not loaded yet", headers={"Retry-After": "5"})
    return pipeline


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings
