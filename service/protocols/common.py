"""What every protocol route shares: the chat renderer of the loaded bundle, limits, and one scoring call.

All protocols score through `score_pairs`, after turning their inputs into (prompt, response) with the same
`ChatRenderer`, so the same conversation gets the same reward whichever protocol a trainer uses.

In an RLHF loop one refused item fails a whole batch, and then the training run (OpenRLHF sets the reward to
None and crashes; TRL and verl raise). So these routes score every item they can and say what they changed:
a label that names no user scores with the population (`personalized: false`), an over-long text is cut on the
checkpoint's truncation side (`truncated: true`), a conversation that ends after its last assistant turn (tool
results) is scored up to that turn. Each such change is counted in /metrics (pal_rlhf_flagged{route,reason}).
Only a malformed request (wrong JSON types, too many items) is a 4xx.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ValidationError

from models.chat import ChatFormatError, ChatRenderer, message_role
from service.auth import require_api_key
from service.config import Settings
from service.deps import get_engine, get_renderer, get_settings, get_shaper
from service.domain import ScoreItem, ScoreResult
from service.engine import RewardEngine
from service.errors import Invalid
from service.objectives import Objective, ObjectiveError
from service.routes import until_disconnect
from service.schemas import ObjectiveIn, valid_user_id
from service.shaping import RewardShaper, Shaping

T = TypeVar("T")
V = TypeVar("V")

# Reasons an item was changed before scoring (the `reason` label of pal_rlhf_flagged).
LABEL_NOT_A_USER = "label_not_a_user"  # a bool, float, dict, list or over-long label: population reward
LABEL_IGNORED = "label_ignored"  # PAL_LABEL_USER=ignore
NO_FIT = "user_without_weights"  # a user id the service has no weights for (unknown, or a ground-truth string)
TEXT_CUT = "text_cut"  # a prompt, response or query over PAL_MAX_TEXT_CHARS, cut on the truncation side
TRAILING_TURNS = "trailing_turns_dropped"  # messages after the last assistant turn (tool results) not scored
NO_ASSISTANT = "no_assistant_turn"  # a conversation without an assistant turn: scored as an empty response
QUERY_LEFT_TRUNCATED = "query_left_truncated"  # OpenRLHF cut the prompt's start off the query
QUERY_NOT_SPLIT = "query_not_split"  # the query does not contain its prompt: split by its own chat markup
OBJECTIVE_INVALID = "objective_invalid"  # a label's objective that cannot be computed (wrong K...): population


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


def protocol_router() -> APIRouter:
    """A protocol's router: every route behind the API key, documenting the errors it can answer."""
    return APIRouter(tags=["rlhf"], dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


@dataclass(frozen=True)
class Served:
    """What a protocol route scores with, resolved as one dependency: its request (its queued work is dropped
    when the client hangs up), the loaded model's engine, chat renderer and reward shaper, and the settings."""

    request: Request
    engine: RewardEngine
    renderer: ChatRenderer
    shaper: RewardShaper
    settings: Settings


async def served(
    request: Request,
    engine: RewardEngine = Depends(get_engine),
    renderer: ChatRenderer = Depends(get_renderer),
    shaper: RewardShaper = Depends(get_shaper),
    settings: Settings = Depends(get_settings),
) -> Served:
    return Served(request, engine, renderer, shaper, settings)


ServedDep = Annotated[Served, Depends(served)]


@dataclass
class Pair:
    """One item in canonical form, with what was changed to get there."""

    prompt: str
    response: str
    user: str | None = None
    flags: set[str] = field(default_factory=set)
    objective: Objective | None = None  # a pluralistic objective instead of a user (service/objectives.py)


# Label keys that make a label an objective rather than a user: {"objective": {...}} or {"kind": ...} in full (as
# /score takes it), or the shorthands {"weights": [...]} (a preference vector) and {"aggregate": "mean"|"min"}.
_AGGREGATES = {"mean": "mean", "min": "maxmin", "maxmin": "maxmin"}


def objective_from_label(label: Any) -> Objective | None:
    """The objective a label (an OpenRLHF label, a TRL column value, verl's extra_info entry) asks for, if any.

    None when the label names no objective (it may still name a user). Raises ObjectiveError when it names one
    that is malformed; the routes then score the population and flag it, as for any label that is not a user."""
    if isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            label = json.loads(label)
        except ValueError:
            return None
    if not isinstance(label, dict):
        return None
    spec = label.get("objective")
    if spec is None:
        if "kind" in label:  # the objective itself, as /score takes it
            spec = label
        elif "weights" in label:
            spec = {"kind": label.get("kind", "weights"), **{k: label[k] for k in ("weights", "ideal") if k in label}}
        elif "aggregate" in label:
            kind = _AGGREGATES.get(str(label["aggregate"]))
            if kind is None:
                raise ObjectiveError(f"aggregate must be one of {sorted(_AGGREGATES)}, got {label['aggregate']!r}")
            spec = {"kind": kind, **{k: label[k] for k in ("users", "groups") if k in label}}
        else:
            return None
    try:
        return ObjectiveIn.model_validate(spec).to_objective()
    except ValidationError as e:
        raise ObjectiveError(f"not an objective: {e.errors()[0].get('msg')}") from e


def target_from_label(pair: Pair, label: Any, engine: RewardEngine, mode: str = "id", key: str = "user_id") -> None:
    """Set the pair's objective (a label naming one) or user (any other label), flagging what could not be used."""
    try:
        objective = objective_from_label(label)
        if objective is not None:
            pair.objective = engine.validate_objective(objective)
            return
    except ObjectiveError:
        pair.flags.add(OBJECTIVE_INVALID)
        return
    pair.user, flag = user_from_label(label, mode, key)
    if flag is not None:
        pair.flags.add(flag)


def reject_non_finite(value: Any) -> Any:
    """A validator for fields that take any JSON (labels, user ids): NaN and Infinity are not JSON, so a body
    carrying them is malformed (422), as it is in every typed field."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("NaN and Infinity are not valid JSON numbers")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return value


def user_from_label(label: Any, mode: str = "id", key: str = "user_id") -> tuple[str | None, str | None]:
    """(user id or None, flag) for a label as trainers send it (OpenRLHF's label column, TRL's user column).

    `mode`/`key`: PAL_LABEL_USER / PAL_LABEL_USER_KEY. None or "" is the population, unflagged. With mode
    "key" a dict (or a JSON-object string) names the user under `key`. Anything that is not a user id (bool,
    float, dict, list, too long) gets the population and a flag; a string that names no stored user (a ground
    truth such as "The answer is 42") is a valid id without weights, which also scores with the population
    (`personalized: false`).
    """
    if label is None or label == "":
        return None, None
    if mode == "ignore":
        return None, LABEL_IGNORED
    if mode == "key":
        if isinstance(label, str) and label.lstrip().startswith("{"):
            try:
                label = json.loads(label)
            except ValueError:
                return None, LABEL_NOT_A_USER
        if not isinstance(label, dict):
            return None, LABEL_NOT_A_USER
        label = label.get(key)
        if label is None or label == "":
            return None, LABEL_NOT_A_USER
    user = valid_user_id(label)
    return (user, None) if user is not None else (None, LABEL_NOT_A_USER)


def cut_text(text: str, limit: int, side: str) -> tuple[str, bool]:
    """`text` cut to `limit` characters on `side` ("left": keep the end), as the checkpoint cuts tokens."""
    if len(text) <= limit:
        return text, False
    return (text[-limit:] if side == "left" else text[:limit]), True


def cut_left(text: str, limit: int, parse: Callable[[str], Pair]) -> Pair:
    """parse(text) after cutting the text to `limit` characters from the left (its end, where the response is,
    is kept), flagged TEXT_CUT when it was cut."""
    text, cut = cut_text(text, limit, "left")
    pair = parse(text)
    if cut:
        pair.flags.add(TEXT_CUT)
    return pair


def each_pair(values: Sequence[V], where: str, parse: Callable[[int, V], Pair]) -> list[Pair]:
    """parse(i, value) for every value of a request's list `where`; markup that cannot be read is a 422 naming
    the value (`where[i]: why`)."""
    pairs = []
    for i, value in enumerate(values):
        try:
            pairs.append(parse(i, value))
        except ChatFormatError as e:
            raise Invalid(f"{where}[{i}]: {e}") from e
    return pairs


def truncation_side(engine: RewardEngine) -> str:
    return str(getattr(engine.scorer.meta.encoder, "truncation_side", "left"))


def until_last_assistant(messages: Sequence[Any]) -> tuple[list[Any], str | None]:
    """The conversation up to its last assistant turn, and a flag if turns after it (tool results) were dropped.

    A conversation without an assistant turn comes back unchanged with NO_ASSISTANT; the caller scores an empty
    response to it.
    """
    msgs = list(messages)
    for i in range(len(msgs) - 1, -1, -1):
        if message_role(msgs[i]) == "assistant":
            return msgs[: i + 1], (TRAILING_TURNS if i < len(msgs) - 1 else None)
    return msgs, NO_ASSISTANT


def conversation_pair(renderer: ChatRenderer, messages: Sequence[Any]) -> Pair:
    """A conversation scored up to its last assistant turn (none: an empty response to all of it)."""
    msgs, flag = until_last_assistant(messages)
    pair = Pair(renderer.prompt(msgs), "") if flag == NO_ASSISTANT else Pair(*renderer.pair(msgs))
    if flag is not None:
        pair.flags.add(flag)
    return pair


async def off_loop(fn: Callable[[], T]) -> T:
    """Run CPU work (template rendering, query splitting) in a thread, so long texts never block the event loop."""
    return await asyncio.to_thread(fn)


@dataclass(frozen=True)
class Scored:
    results: list[ScoreResult]
    rewards: list[float]  # shaped
    flags: list[set[str]]
    version: str

    def truncated(self, i: int) -> bool:
        return self.results[i].truncated or TEXT_CUT in self.flags[i]


async def score_pairs(
    s: Served, pairs: Sequence[Pair], route: str, shaping: Shaping | None = None, with_prototypes: bool = False
) -> Scored:
    """Score canonical pairs; texts over PAL_MAX_TEXT_CHARS are cut (flagged), rewards shaped, flags counted.

    A client that disconnects drops its queued work. Reads state only, so a client may retry it freely.
    """
    engine, settings = s.engine, s.settings
    side = truncation_side(engine)
    items = []
    for pair in pairs:
        prompt, cut_p = cut_text(pair.prompt, settings.max_text_chars, side)
        response, cut_r = cut_text(pair.response, settings.max_text_chars, side)
        if cut_p or cut_r:
            pair.flags.add(TEXT_CUT)
        items.append(ScoreItem(prompt=prompt, response=response, user_id=pair.user, objective=pair.objective))
    if not items:
        return Scored([], [], [], engine.version)
    results, version = await until_disconnect(s.request, engine.score(items, with_prototypes=with_prototypes))
    for pair, r in zip(pairs, results, strict=True):
        if pair.user is not None and not r.personalized:
            pair.flags.add(NO_FIT)
    mode = shaping or settings.reward_shaping
    rewards = s.shaper.shape([r.reward for r in results], [p.user for p in pairs], mode)
    if engine.metrics is not None:
        for pair in pairs:
            for reason in pair.flags:
                engine.metrics.rlhf_flagged.labels(route, reason).inc()
    return Scored(results, rewards, [p.flags for p in pairs], version)
