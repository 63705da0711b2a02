"""Request and response bodies of the HTTP API, and the limits that depend on Settings.

Static rules (types, non-empty texts, the user id charset) live in the pydantic models; limits that come from
configuration (items per request, characters per text) are checked by `check_*` after parsing, because
pydantic field constraints are fixed at class definition and the limits are per app.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.config import Settings
from service.errors import Invalid, ServiceError
from service.objectives import Objective

# A user id is any non-empty string up to USER_ID_MAX_CHARS (dataset columns hold emails, paths, names with
# spaces): the store encodes ids that are not plain [A-Za-z0-9._:@-] before they become part of a Redis key
# (UserStore._key), so no id can reach a key's hash tag, a glob or a control character.
USER_ID_MAX_CHARS = 512
UserId = Annotated[
    str, Field(min_length=1, max_length=USER_ID_MAX_CHARS, description=f"any string of 1..{USER_ID_MAX_CHARS} chars")
]


def valid_user_id(value: object) -> str | None:
    """`value` as a user id if it is one (a non-empty string or an int, not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str) and 0 < len(value) <= USER_ID_MAX_CHARS:
        return value
    return None


# Part of a Redis key name too, so the same kind of charset (no braces, globs, spaces or control characters).
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class LimitError(ServiceError):
    """A request within the schema but past a configured limit: 413 (too many) or 422 (a text too long)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status  # type: ignore[misc]  # per instance: the limits differ in kind


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectiveIn(_Strict):
    """A pluralistic objective (service/objectives.py) an item is scored under instead of one user's reward."""

    kind: Literal["weights", "linear", "tchebycheff", "mean", "maxmin"] = Field(
        description="weights: the reward under this mixture of prototypes (a Panacea preference vector); linear / "
        "tchebycheff: scalarisations of the prototype reward vector for the preference `weights`; mean: the "
        "expected reward over `users` (default: every stored user); maxmin: the worst group's mean reward, over "
        "named `groups` (default: k-means clusters of every stored user's weights)"
    )
    weights: list[float] | None = Field(
        default=None, description="K numbers on the simplex (refused by a hierarchical model: no prototypes to mix)"
    )
    ideal: list[float] | None = Field(
        default=None, description="tchebycheff's ideal point (default: the reward's upper bound)"
    )
    users: list[UserId] | None = Field(default=None, min_length=1, description="mean: the users to average over")
    groups: dict[str, list[UserId]] | None = Field(default=None, description="maxmin: group name -> users")

    def to_objective(self) -> Objective:
        return Objective(
            kind=self.kind,
            preference=None if self.weights is None else tuple(self.weights),
            ideal=None if self.ideal is None else tuple(self.ideal),
            users=None if self.users is None else tuple(self.users),
            groups=None if self.groups is None else tuple((k, tuple(v)) for k, v in self.groups.items()),
        )


class ScoreItemIn(_Strict):
    prompt: str = Field(default="", description="may be empty")
    response: str = Field(min_length=1)
    user_id: UserId | None = Field(default=None, description="omit to score with the population prior")
    objective: ObjectiveIn | None = Field(default=None, description="instead of user_id: a pluralistic objective")

    @model_validator(mode="after")
    def _one_target(self) -> ScoreItemIn:
        if self.user_id is not None and self.objective is not None:
            raise ValueError("give a user_id or an objective, not both")
        return self


class ScoreRequest(_Strict):
    items: list[ScoreItemIn] = Field(min_length=1)
    return_prototypes: bool = Field(default=False, description="also return each item's reward under each prototype")
    objective: ObjectiveIn | None = Field(
        default=None, description="the objective of every item that names neither a user_id nor an objective"
    )


class ScoreItemOut(BaseModel):
    reward: float
    user_id: str | None
    personalized: bool = Field(description="false when the user has no weights yet and the population prior was used")
    truncated: bool = Field(description="the prompt or response was cut to the encoder's max_length")
    prototype_rewards: list[float] | None = None
    objective: str | None = Field(default=None, description="the objective's kind, for items scored under one")
    group: str | None = Field(default=None, description="maxmin: the group whose reward this is (the worst-off)")


class ScoreResponse(BaseModel):
    model_version: str
    results: list[ScoreItemOut]


class ComparisonIn(_Strict):
    prompt: str = Field(default="", description="may be empty")
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)


class AdaptRequest(_Strict):
    comparisons: list[ComparisonIn] = Field(min_length=1)


class UserState(BaseModel):
    user_id: str
    model_version: str
    weights: list[float] | None = Field(
        description="simplex weights over the K prototypes, or a hierarchical model's R unconstrained deviation "
        "weights (0: the global reward); null if not fitted"
    )
    personalized: bool
    n_comparisons: int = Field(description="comparisons stored for this user")
    n_fitted: int = Field(description="comparisons the weights were fitted on (0 for checkpoint users)")
    accuracy: float | None = Field(description="fraction of the fitted comparisons the weights rank correctly")
    confidence: float | None = Field(description="1 - posterior std / prior std of the weights, in [0, 1]")
    source: str | None = Field(description="'adapt' (fitted here) or 'checkpoint' (a seen user of the model)")


class AdaptResponse(UserState):
    added: int = Field(description="comparisons in this request (stored once per Idempotency-Key)")
    replayed: bool = Field(
        description="true when the Idempotency-Key was already applied: nothing was stored again, the current "
        "state is returned"
    )
    fitted: bool = Field(
        default=True,
        description="false (with status 202): the comparisons are stored but could not be refitted now (too busy, "
        "or Redis failed after storing); the weights are the previous ones (null if none) and the user is refitted "
        "in the background",
    )


class GroupView(BaseModel):
    group: int
    users: int
    center: list[float]
    std: list[float] | None


class PopulationView(BaseModel):
    model_version: str
    k: int = Field(description="numbers in a user's weights: K prototypes, or a hierarchical model's rank R")
    users: int = Field(description="users with weights for this model version")
    sampled: bool = Field(description="true when the snapshot holds a uniform sample (PAL_POPULATION_MAX_USERS)")
    mean: list[float] | None
    std: list[float] | None
    groups: list[GroupView] = Field(description="k-means clusters of users' weights (the maxmin objective's default)")
    taken_at: float
    weights: list[list[float]] | None = Field(default=None, description="the first `sample` users' weights")
    labels: list[int] | None = Field(default=None, description="their groups")


class DeleteResponse(BaseModel):
    user_id: str
    deleted: bool


class Health(BaseModel):
    status: str
    model_loaded: bool
    warm: bool
    redis: str


class Info(BaseModel):
    model_version: str
    form: str
    k: int
    deviation_rank: int | None = Field(
        default=None,
        description="a hierarchical model's rank R (users' weights: R deviation weights added to the K=1 reward); "
        "null for PAL",
    )
    encoder: dict
    provider: str
    precision: str
    precision_choice: dict = Field(
        default_factory=dict,
        description="how the precision was chosen: source (override, measured, cached, only, no-sample, given), "
        "reason, min_agreement and the measured agreement with fp32 per precision (models/precision.py)",
    )
    limits: dict[str, int | float]
    seen_users: int
    user_state: dict[str, int | str] = Field(description="start-up seeding of checkpoint users and refits")


def _check_text(where: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise LimitError(422, f"{where} has {len(text)} characters; the limit is {limit} (PAL_MAX_TEXT_CHARS)")


def _objective_users(obj: ObjectiveIn | None) -> int:
    if obj is None:
        return 0
    return len(obj.users or ()) + sum(len(v) for v in (obj.groups or {}).values())


def check_count(n: int, settings: Settings, what: str = "items", allow_empty: bool = False) -> None:
    """How many items (queries, inputs, conversations) one request may score: every route and protocol's check."""
    if n == 0 and not allow_empty:
        raise Invalid(f"no {what} to score")
    limit = settings.max_items_per_request
    if n > limit:
        raise LimitError(413, f"{n} {what} in one request; the limit is {limit} (PAL_MAX_ITEMS_PER_REQUEST)")


def check_score(req: ScoreRequest, settings: Settings) -> None:
    check_count(len(req.items), settings)
    listed = _objective_users(req.objective) + sum(_objective_users(it.objective) for it in req.items)
    if listed > settings.max_objective_users:
        raise LimitError(
            413, f"objectives list {listed} users in one request; the limit is {settings.max_objective_users} "
            "(PAL_MAX_OBJECTIVE_USERS; leave out `users` to average over every stored user)"
        )
    for i, item in enumerate(req.items):
        _check_text(f"items[{i}].prompt", item.prompt, settings.max_text_chars)
        _check_text(f"items[{i}].response", item.response, settings.max_text_chars)


def check_adapt(req: AdaptRequest, settings: Settings) -> None:
    n, limit = len(req.comparisons), settings.max_comparisons_per_request
    if n > limit:
        raise LimitError(
            413, f"{n} comparisons in one request; the limit is {limit} (PAL_MAX_COMPARISONS_PER_REQUEST)"
        )
    for i, c in enumerate(req.comparisons):
        for field in ("prompt", "chosen", "rejected"):
            _check_text(f"comparisons[{i}].{field}", getattr(c, field), settings.max_text_chars)
