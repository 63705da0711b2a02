"""POST /score/chat: native scoring for chat-format inputs (what the TRL and verl adapters call).

An item is either a whole conversation `messages` (ending with the assistant response), or `prompt` (string,
plain or templated, or messages) and `response` (string, one assistant message, or messages ending with
one). Both are rendered with the bundle's chat template (models.chat), so a conversation scores the same here
as through /get_reward or /classify. Plain-string items score exactly as on /score. Responses may be empty
(a policy can emit nothing but EOS), unlike on /score.

Nothing an RLHF loop sends fails the batch (service.protocols.common): a `user_id` that is no user id scores
with the population, over-long texts are cut, turns after the last assistant one (tool results) are dropped;
each item's `flags` say what was changed. Rewards are shaped as `shaping` (or PAL_REWARD_SHAPING) says.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from models.chat import ChatRenderer
from service.protocols import common
from service.protocols.common import Pair, ServedDep
from service.protocols.messages import MessageIn, as_dicts
from service.schemas import ObjectiveIn, ScoreItemOut, check_count
from service.shaping import Shaping

router = common.protocol_router()


class ChatItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[MessageIn] | None = Field(default=None, description="whole conversation, last = response")
    prompt: str | list[MessageIn] | None = None
    response: str | MessageIn | list[MessageIn] | None = None
    user_id: Annotated[Any, AfterValidator(common.reject_non_finite)] = Field(
        default=None,
        description="the user (any string up to 512 characters, or an int); null, or a value that is not a user id "
        "(a bool, float, dict...), scores with the population prior and is flagged personalized: false",
    )

    objective: ObjectiveIn | None = Field(default=None, description="instead of user_id: a pluralistic objective")

    @model_validator(mode="after")
    def _one_form(self) -> ChatItemIn:
        if self.objective is not None and self.user_id is not None:
            raise ValueError("give a user_id or an objective, not both")
        if self.messages is not None and (self.prompt is not None or self.response is not None):
            raise ValueError("give either 'messages' or 'prompt'/'response', not both")
        if self.messages is None and self.response is None:
            raise ValueError("give 'messages' (a conversation ending with the response) or 'response'")
        return self


class ChatScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ChatItemIn] = Field(min_length=1)
    return_prototypes: bool = False
    shaping: Shaping | None = Field(default=None, description="reward transform; unset: PAL_REWARD_SHAPING")


class ChatScoreItemOut(ScoreItemOut):
    flags: list[str] = Field(
        default_factory=list, description="what was changed to score this item (docs/RLHF.md); empty when nothing"
    )


class ChatScoreResponse(BaseModel):
    model_version: str
    shaping: str
    results: list[ChatScoreItemOut]


def _pair(renderer: ChatRenderer, item: ChatItemIn) -> Pair:
    """The canonical (prompt, response) of one item; turns after the last assistant one (tool results) dropped."""
    if item.messages is not None:
        return common.conversation_pair(renderer, as_dicts(item.messages))
    pair = Pair("", "")
    raw_prompt = item.prompt if item.prompt is not None else ""
    pair.prompt = renderer.prompt_any(raw_prompt if isinstance(raw_prompt, str) else as_dicts(raw_prompt))
    resp: Any = item.response
    flag = None
    if isinstance(resp, MessageIn):
        resp = resp.as_dict()
    elif isinstance(resp, list):
        resp, flag = common.until_last_assistant(as_dicts(resp))
    pair.response = "" if flag == common.NO_ASSISTANT or resp == [] else renderer.response_any(resp)
    if flag is not None:
        pair.flags.add(flag)
    return pair


def _scored_pair(renderer: ChatRenderer, item: ChatItemIn) -> Pair:
    """The item's pair with what it is scored for: its objective, else its user (flagged if not one)."""
    pair = _pair(renderer, item)
    if item.objective is not None:
        pair.objective = item.objective.to_objective()
    else:
        pair.user, flag = common.user_from_label(item.user_id)
        if flag is not None:
            pair.flags.add(flag)
    return pair


def _pairs(renderer: ChatRenderer, items: list[ChatItemIn]) -> list[Pair]:
    return common.each_pair(items, "items", lambda _, item: _scored_pair(renderer, item))


@router.post(
    "/score/chat",
    response_model=ChatScoreResponse,
    summary="Score chat-format (or templated) items, rendered with the checkpoint's chat template",
)
async def score_chat(req: ChatScoreRequest, s: ServedDep) -> ChatScoreResponse:
    settings = s.settings
    check_count(len(req.items), settings)
    pairs = await common.off_loop(lambda: _pairs(s.renderer, req.items))
    for pair in pairs:
        if pair.objective is not None:
            s.engine.validate_objective(pair.objective)  # a typed field: a bad one is a 422
    scored = await common.score_pairs(s, pairs, "/score/chat", req.shaping, with_prototypes=req.return_prototypes)
    return ChatScoreResponse(
        model_version=scored.version,
        shaping=req.shaping or settings.reward_shaping,
        results=[
            ChatScoreItemOut(
                reward=reward,
                user_id=r.user_id,
                personalized=r.personalized,
                truncated=scored.truncated(i),
                prototype_rewards=r.prototype_rewards,
                objective=r.objective,
                group=r.group,
                flags=sorted(scored.flags[i]),
            )
            for i, (r, reward) in enumerate(zip(scored.results, scored.rewards, strict=True))
        ],
    )
