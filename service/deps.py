"""FastAPI dependencies: how routes (ours and service.protocols) reach the app's pipeline and settings."""

from __future__ import annotations

from fastapi import HTTPException, Request

from service.config import Settings
from service.pipeline import Pipeline


def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None or not pipeline.ready:
        raise HTTPException(status_code=503, detail="model not loaded yet", headers={"Retry-After": "5"})
    return pipeline


def get_settings(request: Request) -> Settings:
    return request.app.state.settings
