"""POST /classify: vLLM's classification API shape, for verl's reward-model path and other vLLM clients.

Request  {"model"?: str, "input": str | [str]}  or  {"model"?, "messages": [msg...] | [[msg...]...]}
Response {"id", "object": "list", "created", "model", "data": [{"index", "label", "probs": [reward],
          "num_classes": 1}], "usage": {"prompt_tokens", "total_tokens", "completion_tokens"}}

These requests carry no user, so the reward is the population one (the prior mixture of prototypes).
`probs` holds the reward shaped by `?shaping=` or PAL_REWARD_SHAPING (raw by default); `"activation": true`
(vLLM >= 0.11.2: `"use_activation"`) returns sigmoid(reward) instead. Over-long inputs lose their start and
turns after the last assistant one are dropped (never a 4xx for what an RLHF loop sends).
verl's reward loop sends exactly {"model", "input": <chat rendered with the RM
tokenizer's template>, "activation": false} and reads data[-1].probs[-1].
An input string is usually a conversation rendered with a chat template: it is parsed back into messages and
rendered with the bundle's template; a string without chat markup is scored as a response to no prompt.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.chat import ChatRenderer
from service.protocols import common
from service.protocols.common import Pair, ServedDep
from service.protocols.messages import MessageIn, as_dicts
from service.schemas import check_count
from service.shaping import Shaping

router = common.protocol_router()


class ClassifyRequest(BaseModel):
    # vLLM accepts more sampling/pooling options (truncate_prompt_tokens, user, priority...); ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | None = None
    messages: list[MessageIn] | list[list[MessageIn]] | None = None
    activation: bool = Field(default=False, description="sigmoid(reward) instead of the raw reward")
    use_activation: bool | None = Field(default=None, description="vLLM >= 0.11.2 name of `activation`")

    @model_validator(mode="after")
    def _one_input(self) -> ClassifyRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of 'input' (text or list of texts) or 'messages'")
        return self


class ClassifyData(BaseModel):
    index: int
    label: str = "reward"
    probs: list[float]
    num_classes: int = 1


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassifyResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: Usage


def _conversations(req: ClassifyRequest) -> list[list[MessageIn]]:
    assert req.messages is not None
    if req.messages and isinstance(req.messages[0], list):
        return req.messages  # type: ignore[return-value]
    return [req.messages]  # type: ignore[list-item]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="vLLM-style classification: population reward of each input as probs=[reward]",
)
async def classify(
    req: ClassifyRequest,
    s: ServedDep,
    shaping: Shaping | None = Query(default=None, description="reward transform; `activation` means sigmoid"),
) -> ClassifyResponse:
    renderer, settings = s.renderer, s.settings
    if req.input is not None:
        texts = [req.input] if isinstance(req.input, str) else req.input
        check_count(len(texts), settings, "inputs")
        pairs = await common.off_loop(lambda: _text_pairs(renderer, texts, 2 * settings.max_text_chars))
    else:
        conversations = _conversations(req)
        check_count(len(conversations), settings, "conversations")
        pairs = await common.off_loop(lambda: _message_pairs(renderer, conversations))
    squash = req.activation if req.use_activation is None else req.use_activation
    scored = await common.score_pairs(s, pairs, "/classify", "sigmoid" if squash else shaping)
    n_tokens = sum(r.tokens for r in scored.results)  # counted once, when the batcher tokenized them
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=req.model or f"pal-rm-{scored.version}",
        data=[ClassifyData(index=i, probs=[reward]) for i, reward in enumerate(scored.rewards)],
        usage=Usage(prompt_tokens=n_tokens, total_tokens=n_tokens),
    )


def _text_pairs(renderer: ChatRenderer, texts: list[str], limit: int) -> list[Pair]:
    return common.each_pair(
        texts, "input", lambda _, text: common.cut_left(text, limit, lambda t: Pair(*renderer.pair_from_text(t)))
    )


def _message_pairs(renderer: ChatRenderer, conversations: list[list[MessageIn]]) -> list[Pair]:
    return common.each_pair(
        conversations, "messages", lambda _, conv: common.conversation_pair(renderer, as_dicts(conv))
    )
