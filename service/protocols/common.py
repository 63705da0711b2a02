"""What every protocol route shares: the chat renderer of the loaded bundle, limits, and one scoring call.

All protocols score through `score_pairs`, after turning their inputs into (prompt, response) with the same
`ChatRenderer`, so the same conversation gets the same reward whichever protocol a trainer uses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fastapi import HTTPException, Request
from pydantic import BaseModel

from models.chat import ChatFormatError
from service.config import Settings
from service.pipeline import Pipeline, ScoreItem, ScoreResult
from service.routes import until_disconnect
from service.schemas import USER_ID_PATTERN, LimitError

_USER_ID = re.compile(USER_ID_PATTERN)


class ErrorBody(BaseModel):
    detail: str


# What the app's error handlers actually send (a message string), documented for every status a route can give.
ERROR_RESPONSES: dict[int | str, dict] = {
    401: {"model": ErrorBody, "description": "missing or wrong bearer token (PAL_API_KEY)"},
    413: {"model": ErrorBody, "description": "too many items, or body too large"},
    422: {"model": ErrorBody, "description": "malformed input; the message says which field and why"},
    429: {"model": ErrorBody, "description": "encoder queue full; retry after Retry-After seconds"},
    503: {"model": ErrorBody, "description": "model not loaded yet; retry after Retry-After seconds"},
}


def unprocessable(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


def check_user_id(value: object, where: str) -> str | None:
    """A user id from a protocol field that is not typed as one (OpenRLHF labels): None/"" = population."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise unprocessable(f"{where} must be a user id string or null, got {type(value).__name__}")
    user = str(value)
    if not _USER_ID.fullmatch(user):  # match() would let "$" accept a trailing newline
        raise unprocessable(f"{where} = {user[:40]!r} is not a valid user id ([A-Za-z0-9._:@-]{{1,128}})")
    return user


def check_count(n: int, settings: Settings, what: str = "items") -> None:
    if n == 0:
        raise unprocessable(f"no {what} to score")
    if n > settings.max_items_per_request:
        raise HTTPException(
            status_code=413,
            detail=f"{n} {what} in one request; the limit is {settings.max_items_per_request} "
            "(PAL_MAX_ITEMS_PER_REQUEST)",
        )


def check_text(text: str, where: str, settings: Settings, texts: int = 1) -> None:
    """Characters of one text; `texts=2` for a prompt+response string, checked again once split."""
    limit = texts * settings.max_text_chars
    if len(text) > limit:
        times = f"{texts} x " if texts > 1 else ""
        raise unprocessable(f"{where} has {len(text)} characters; the limit is {times}PAL_MAX_TEXT_CHARS = {limit}")


async def score_pairs(
    request: Request,
    pipeline: Pipeline,
    settings: Settings,
    pairs: Sequence[tuple[str, str, str | None]],
    with_prototypes: bool = False,
) -> tuple[list[ScoreResult], str]:
    """Score canonical (prompt, response, user_id) triples; a client that disconnects drops its queued work.

    Reads state only, so a client may retry it freely.
    """
    for i, (prompt, response, _) in enumerate(pairs):
        check_text(prompt, f"item {i} prompt (rendered)", settings)
        check_text(response, f"item {i} response (rendered)", settings)
    items = [ScoreItem(prompt=p, response=r, user_id=u) for p, r, u in pairs]
    try:
        return await until_disconnect(request, pipeline.score(items, with_prototypes=with_prototypes))
    except LimitError as e:
        raise HTTPException(status_code=e.status, detail=e.detail) from e


def as_422(e: ChatFormatError, where: str) -> HTTPException:
    return unprocessable(f"{where}: {e}")
