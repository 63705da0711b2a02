"""create_app(settings): wiring, lifespan (model, Redis, batcher), health/info/metrics and error handling.

All mutable state (scorer, reward engine, chat renderer, shaper, Redis client, metrics registry) is created in
the lifespan and hangs off `app.state`; nothing is global, so several apps can live in one process (tests do).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.chat import ChatRenderer
from service.config import Settings
from service.engine import RewardEngine
from service.errors import Busy, ServiceError, error_response
from service.guard import RequestGuard
from service.metrics import Metrics, MetricsMiddleware
from service.redis_conn import RedisHandle, connect
from service.routes import ClientDisconnected, router
from service.schemas import Health, Info
from service.shaping import RewardShaper
from service.store import UserStore
from service.tasks import cancel

if TYPE_CHECKING:
    from models.scorer import Scorer

log = logging.getLogger(__name__)
MAX_REPORTED_ERRORS = 20  # validation errors listed in a 422; the rest are counted


def load_scorer(settings: Settings) -> Scorer:
    """The bundle's scorer at the configured precision, or under PAL_PRECISION=auto the one chosen by measured
    fidelity (models/precision.py); how it was chosen is on `scorer.precision_choice` for /info."""
    from models.precision import choose
    from models.scorer import Scorer

    def load(provider: str, precision: str) -> Scorer:
        return Scorer.load(
            settings.bundle_dir,
            provider=provider,
            precision=precision,
            intra_op_threads=settings.intra_op_threads,
            spinning=settings.intra_op_spinning,
            max_batch_tokens=settings.max_batch_tokens,
            cache_size=settings.embedding_cache_size,
        )

    scorer, choice = choose(
        settings.bundle_dir,
        settings.provider,
        load,
        requested=settings.precision,
        min_agreement=settings.precision_min_agreement,
        cache_dir=settings.precision_cache_dir,
    )
    scorer.precision_choice = choice
    log.info("precision %s (%s): %s", choice.precision, choice.source, choice.reason)
    return scorer


async def _start(app: FastAPI, settings: Settings, store: UserStore, scorer: Scorer | None) -> None:
    """Load and warm the model off the event loop, then start batching and the user-state migration."""
    try:
        if scorer is None:
            scorer = await asyncio.to_thread(load_scorer, settings)
        await asyncio.to_thread(scorer.warmup)
        engine = RewardEngine(scorer, store, settings, app.state.metrics)
        app.state.metrics.watch(lambda: {"queue_depth": engine.batcher.queue_depth}, engine.cache_stats)
        # What the RLHF protocols need of the loaded model besides scoring: its chat template, and reward statistics
        # that belong to this model version.
        app.state.chat = ChatRenderer(
            template=getattr(scorer.meta, "chat_template", None),
            include_system=settings.chat_include_system,
            strip_tokens=tuple(settings.strip_tokens),
        )
        app.state.shaper = RewardShaper(
            settings.sigmoid_temperature, settings.shaping_min_count, settings.shaping_users
        )
        # Ready only once the checkpoint's seen users are in Redis, or they would score with the prior meanwhile.
        # Redis unreachable or slow: start anyway (scoring works on the prior) and let migrate() finish seeding.
        try:
            await asyncio.wait_for(engine.seed_users(), settings.seed_wait_s)
        except (RedisError, TimeoutError) as e:
            log.warning("seen users not yet written (%s); seeding goes on in the background", str(e) or "timed out")
        engine.start()
        app.state.engine = engine
        app.state.metrics.ready.set(1)
        log.info(
            "model %s ready on %s, %s (K=%d)", scorer.meta.version, scorer.provider, scorer.precision, scorer.meta.pal.k
        )
    except Exception as e:
        log.exception("loading the model failed")
        app.state.load_error = f"{type(e).__name__}: {e}"
        return
    await engine.migrate(retry_s=settings.retry_after_s * 5)


def _precision_choice(scorer: Scorer) -> dict[str, object]:
    """How the served precision was chosen; a scorer handed to create_app was chosen by its caller."""
    if scorer.precision_choice is not None:
        return scorer.precision_choice.as_dict()
    return {"precision": scorer.precision, "source": "given", "reason": "the scorer was loaded by the caller"}


def _lifespan(settings: Settings, scorer: Scorer | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.metrics = Metrics()
        app.state.engine = None
        app.state.load_error = None
        redis: RedisHandle = await connect(settings)
        app.state.redis = redis
        store = UserStore(
            redis.client,
            settings.redis_prefix,
            settings.max_comparisons_per_user,
            max_bytes=settings.max_bytes_per_user,
            retention_s=settings.user_ttl_s,
            min_replicas=settings.redis_min_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
        app.state.store = store
        app.state.startup = asyncio.create_task(_start(app, settings, store, scorer), name="pal-startup")
        try:
            yield
        finally:
            await cancel(app.state.startup)
            if app.state.engine is not None:
                await app.state.engine.close()
            await redis.close()

    return lifespan


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = []
        for err in errors[:MAX_REPORTED_ERRORS]:  # the first few say what is wrong; thousands would only cost
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        if len(errors) > MAX_REPORTED_ERRORS:
            parts.append(f"... and {len(errors) - MAX_REPORTED_ERRORS} more errors")
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        if isinstance(exc, Busy):
            request.app.state.metrics.queue_full.inc()
        return error_response(exc, settings.retry_after_s)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)


def create_app(settings: Settings | None = None, scorer: Scorer | None = None) -> FastAPI:
    """The ASGI app. `scorer`: an already loaded Scorer (tests share one); None loads Settings.bundle_dir."""
    settings = settings or Settings()
    app = FastAPI(
        title="pal-rm",
        summary="Pluralistic (PAL) reward model: score responses per user, adapt users from a few comparisons",
        version="1",
        lifespan=_lifespan(settings, scorer),
    )
    _install_error_handlers(app, settings)
    app.include_router(router)
    from service.protocols import PROTOCOL_ROUTERS

    for protocol_router in PROTOCOL_ROUTERS:
        app.include_router(protocol_router)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, summary="200 once warm")
    async def health(request: Request) -> JSONResponse:
        engine: RewardEngine | None = request.app.state.engine
        ready = engine is not None and engine.ready
        if request.app.state.load_error:
            redis_state = "unknown"
            status = f"model failed to load: {request.app.state.load_error}"
        else:
            try:
                await request.app.state.store.ping()
                redis_state = "ok"
            except Exception as e:  # health reports, it never fails
                redis_state = f"unreachable: {type(e).__name__}"
            status = "ok" if ready else "loading"
        body = Health(status=status, model_loaded=engine is not None, warm=ready, redis=redis_state)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get("/livez", summary="200 while the process serves requests (liveness); 503 if the model failed to load")
    async def livez(request: Request) -> JSONResponse:
        # Unlike /health, no Redis and no warm-up: a pod still loading or cut off from Redis must not be restarted.
        error = request.app.state.load_error
        return JSONResponse({"status": f"model failed to load: {error}" if error else "alive"}, 503 if error else 200)

    @app.get("/info", response_model=Info, summary="Model version, K, encoder, provider and limits")
    async def info(request: Request) -> Info:
        from service.deps import get_engine

        engine = await get_engine(request)
        meta = engine.scorer.meta
        s = request.app.state.settings
        return Info(
            model_version=engine.version,
            form=meta.pal.form,
            k=meta.pal.k,
            deviation_rank=meta.deviation_rank,
            encoder=meta.encoder.model_dump(),
            provider=engine.scorer.provider,
            precision=engine.scorer.precision,
            precision_choice=_precision_choice(engine.scorer),
            limits={
                "max_items_per_request": s.max_items_per_request,
                "max_text_chars": s.max_text_chars,
                "max_comparisons_per_request": s.max_comparisons_per_request,
                "max_comparisons_per_user": s.max_comparisons_per_user,
                "max_queue": s.max_queue,
                "max_batch_tokens": engine.scorer.max_batch_tokens,
                "max_gather_tokens": engine.batcher.max_gather_tokens,
                "max_wait_ms": s.max_wait_ms,
                "max_body_bytes": s.max_body_bytes,
            },
            seen_users=len(engine.seen),
            user_state=dict(engine.migration),
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    # Outermost but for metrics: auth, body size, read deadline and JSON checks before anything reads the body.
    app.add_middleware(RequestGuard, settings=settings)
    app.add_middleware(MetricsMiddleware, metrics=lambda: getattr(app.state, "metrics", None))
    return app
