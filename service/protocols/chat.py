"""POST /score/chat: native scoring for chat-format inputs (what the TRL and verl adapters call).

An item is either a whole conversation `messages` (ending with the assistant response), or `prompt` (string,
plain or templated, or messages) and `response` (string, one assistant message, or messages ending with
one). Both are rendered with the bundle's chat template (models.chat), so a conversation scores the same here
as through /get_reward or /classify. Plain-string items score exactly as on /score. Responses may be empty
(a policy can emit nothing but EOS), unlike on /score.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.chat import ChatFormatError
from service.auth import require_api_key
from service.config import Settings
from service.deps import get_pipeline, get_settings
from service.pipeline import Pipeline
from service.protocols.common import ERROR_RESPONSES, as_422, check_count, score_pairs
from service.protocols.messages import MessageIn, as_dicts
from service.schemas import ScoreItemOut, ScoreResponse, UserId

router = APIRouter(tags=["rlhf"])


class ChatItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[MessageIn] | None = Field(default=None, description="whole conversation, last = response")
    prompt: str | list[MessageIn] | None = None
    response: str | MessageIn | list[MessageIn] | None = None
    user_id: UserId | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ChatItemIn:
        if self.messages is not None and (self.prompt is not None or self.response is not None):
            raise ValueError("give either 'messages' or 'prompt'/'response', not both")
        if self.messages is None and self.response is None:
            raise ValueError("give 'messages' (a conversation ending with the response) or 'response'")
        return self


class ChatScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ChatItemIn] = Field(min_length=1)
    return_prototypes: bool = False


@router.post(
    "/score/chat",
    response_model=ScoreResponse,
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
    summary="Score chat-format (or templated) items, rendered with the checkpoint's chat template",
)
async def score_chat(
    req: ChatScoreRequest,
    request: Request,
    pipeline: Pipeline = Depends(get_pipeline),
    settings: Settings = Depends(get_settings),
) -> ScoreResponse:
    check_count(len(req.items), settings)
    renderer = pipeline.chat
    pairs = []
    for i, item in enumerate(req.items):
        try:
            if item.messages is not None:
                prompt, response = renderer.pair(as_dicts(item.messages))
            else:
                raw_prompt = item.prompt if item.prompt is not None else ""
                prompt = renderer.prompt_any(raw_prompt if isinstance(raw_prompt, str) else as_dicts(raw_prompt))
                resp = item.response
                if isinstance(resp, MessageIn):
                    resp = resp.as_dict()
                elif isinstance(resp, list):
                    resp = as_dicts(resp)
                response = renderer.response_any(resp)
        except ChatFormatError as e:
            raise as_422(e, f"items[{i}]") from e
        pairs.append((prompt, response, item.user_id))
    results, version = await score_pairs(request, pipeline, settings, pairs, with_prototypes=req.return_prototypes)
    return ScoreResponse(
        model_version=version,
        results=[
            ScoreItemOut(
                reward=r.reward,
                user_id=r.user_id,
                personalized=r.personalized,
                truncated=r.truncated,
                prototype_rewards=r.prototype_rewards,
            )
            for r in results
        ],
    )
