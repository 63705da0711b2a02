"""The product routes: /score and /users/{user_id}[/adapt]. Validation -> engine -> response, nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from redis.exceptions import RedisError
from starlette.convertors import Convertor, register_url_convertor

from service.auth import require_api_key
from service.config import Settings
from service.deps import get_engine, get_settings
from service.domain import ScoreItem, StoreUnavailable, UnknownUser, UserView
from service.engine import RewardEngine
from service.errors import Conflict
from service.schemas import (
    IDEMPOTENCY_KEY_PATTERN,
    USER_ID_MAX_CHARS,
    AdaptRequest,
    AdaptResponse,
    DeleteResponse,
    LimitError,
    PopulationView,
    ScoreItemOut,
    ScoreRequest,
    ScoreResponse,
    UserState,
    check_adapt,
    check_score,
)
from service.store import Comparison, StoredFit

T = TypeVar("T")

router = APIRouter(dependencies=[Depends(require_api_key)])


class _AnyString(Convertor[str]):
    """A path parameter that is any string: "/" (clients percent-encode it, Starlette decodes it) and newlines,
    which Starlette's own `path` convertor (".*") does not match."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("userid", _AnyString())
UserIdPath = Annotated[str, Path(min_length=1, max_length=USER_ID_MAX_CHARS)]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="a client-chosen id of this logical request (e.g. a uuid4), sent again on every retry: the "
        "comparisons are stored once per key and user; a repeat answers the current state with `replayed: true`",
    ),
]
EngineDep = Annotated[RewardEngine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its queued work was dropped."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so its queued encoder items) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientDisconnected()


def _state(view: UserView, version: str) -> dict:
    fit: StoredFit | None = view.fit
    return dict(
        user_id=view.user_id,
        model_version=version,
        weights=None if fit is None else fit.weights,
        personalized=fit is not None,
        n_comparisons=view.n_comparisons,
        n_fitted=0 if fit is None else fit.n_fitted,
        accuracy=None if fit is None else fit.accuracy,
        confidence=None if fit is None else fit.confidence,
        source=None if fit is None else fit.source,
    )


@router.post("/score", response_model=ScoreResponse, summary="Rewards of responses for users (or the prior)")
async def score(body: ScoreRequest, request: Request, engine: EngineDep, settings: SettingsDep) -> ScoreResponse:
    check_score(body, settings)
    default = None if body.objective is None else body.objective.to_objective()
    items = []
    for it in body.items:
        objective = it.objective.to_objective() if it.objective is not None else None if it.user_id else default
        if objective is not None:
            engine.validate_objective(objective)
        items.append(ScoreItem(it.prompt, it.response, it.user_id, objective))
    results, version = await until_disconnect(request, engine.score(items, body.return_prototypes))
    return ScoreResponse(
        model_version=version,
        results=[
            ScoreItemOut(
                reward=r.reward, user_id=r.user_id, personalized=r.personalized, truncated=r.truncated,
                prototype_rewards=r.prototype_rewards, objective=r.objective, group=r.group,
            )
            for r in results
        ],
    )


@router.post(
    "/users/{user_id:userid}/adapt",
    response_model=AdaptResponse,
    summary="Add comparisons and refit the user",
    responses={
        202: {
            "model": AdaptResponse,
            "description": "stored, not yet refitted (`fitted: false`): too busy, or Redis failed after storing; "
            "refitted in the background",
        },
        429: {"description": "too busy: nothing was stored; retry after Retry-After"},
    },
)
async def adapt(
    user_id: UserIdPath,
    body: AdaptRequest,
    request: Request,
    response: Response,
    engine: EngineDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> AdaptResponse:
    check_adapt(body, settings)
    comparisons = [Comparison(c.prompt, c.chosen, c.rejected) for c in body.comparisons]
    size = sum(len(c.to_json()) for c in comparisons)
    if size > settings.max_bytes_per_user:
        raise LimitError(
            413, f"the comparisons take {size} bytes stored; the limit per user is {settings.max_bytes_per_user} "
            "(PAL_MAX_BYTES_PER_USER)",
        )
    adapted = await until_disconnect(request, engine.adapt(user_id, comparisons, idempotency_key))
    if not adapted.fitted:
        # Stored (a retry would store it again unless it carries the same Idempotency-Key); the fit follows.
        response.status_code = 202
        view = UserView(user_id, adapted.fit, adapted.n_comparisons)
        return AdaptResponse(
            **_state(view, engine.version), added=len(comparisons), replayed=adapted.replayed, fitted=False
        )
    if adapted.fit is None:
        raise Conflict(f"user {user_id!r} was deleted while adapting")
    view = UserView(user_id, adapted.fit, adapted.fit.n_fitted)
    return AdaptResponse(**_state(view, engine.version), added=len(comparisons), replayed=adapted.replayed)


@router.get("/users/{user_id:userid}", response_model=UserState, summary="A user's weights and comparison count")
async def get_user(user_id: UserIdPath, engine: EngineDep) -> UserState:
    view = await engine.get_user(user_id)
    return UserState(**_state(view, engine.version))


@router.delete(
    "/users/{user_id:userid}", response_model=DeleteResponse, summary="Forget the user's comparisons and weights"
)
async def delete_user(user_id: UserIdPath, engine: EngineDep) -> DeleteResponse:
    if not await engine.delete_user(user_id):
        raise UnknownUser(user_id)
    return DeleteResponse(user_id=user_id, deleted=True)


@router.get("/population", response_model=PopulationView, summary="How users are spread on the simplex")
async def population(
    engine: EngineDep,
    refresh: Annotated[bool, Query(description="re-read every user now instead of the cached snapshot")] = False,
    sample: Annotated[int, Query(ge=0, le=100_000, description="also return up to this many users' weights")] = 0,
) -> PopulationView:
    try:
        snap = await engine.population.snapshot(refresh=refresh)
    except RedisError as e:
        raise StoreUnavailable(str(e)) from e
    return PopulationView(
        model_version=engine.version, k=engine.weights_dim, **snap.describe(),
        weights=snap.weights[:sample].round(6).tolist() if sample else None,
        labels=snap.labels[:sample].tolist() if sample else None,
    )
