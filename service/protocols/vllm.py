"""POST /classify: vLLM's classification API shape, for verl's reward-model path and other vLLM clients.

Request  {"model"?: str, "input": str | [str]}  or  {"model"?, "messages": [msg...] | [[msg...]...]}
Response {"id", "object": "list", "created", "model", "data": [{"index", "label", "probs": [reward],
          "num_classes": 1}], "usage": {"prompt_tokens", "total_tokens", "completion_tokens"}}

These requests carry no user, so the reward is the population one (the prior mixture of prototypes).
`probs` holds the raw reward by default; `"activation": true` (vLLM >= 0.11.2: `"use_activation"`) returns
sigmoid(reward) instead. verl's reward loop sends exactly {"model", "input": <chat rendered with the RM
tokenizer's template>, "activation": false} and reads data[-1].probs[-1].
An input string is usually a conversation rendered with a chat template: it is parsed back into messages and
rendered with the bundle's template; a string without chat markup is scored as a response to no prompt.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.chat import ChatFormatError
from service.auth import require_api_key
from service.config import Settings
from service.deps import get_pipeline, get_settings
from service.pipeline import Pipeline
from service.protocols.common import ERROR_RESPONSES, as_422, check_count, check_text, score_pairs
from service.protocols.messages import MessageIn, as_dicts

router = APIRouter(tags=["rlhf"])


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
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
    summary="vLLM-style classification: population reward of each input as probs=[reward]",
)
async def classify(
    req: ClassifyRequest,
    request: Request,
    pipeline: Pipeline = Depends(get_pipeline),
    settings: Settings = Depends(get_settings),
) -> ClassifyResponse:
    renderer = pipeline.chat
    pairs: list[tuple[str, str, str | None]] = []
    if req.input is not None:
        texts = [req.input] if isinstance(req.input, str) else req.input
        check_count(len(texts), settings, "inputs")
        for i, text in enumerate(texts):
            check_text(text, f"input[{i}]", settings, texts=2)
            try:
                prompt, response = renderer.pair_from_text(text)
            except ChatFormatError as e:
                raise as_422(e, f"input[{i}]") from e
            pairs.append((prompt, response, None))
    else:
        conversations = _conversations(req)
        check_count(len(conversations), settings, "conversations")
        for i, conv in enumerate(conversations):
            try:
                prompt, response = renderer.pair(as_dicts(conv))
            except ChatFormatError as e:
                raise as_422(e, f"messages[{i}]") from e
            pairs.append((prompt, response, None))
    results, version = await score_pairs(request, pipeline, settings, pairs)
    tokens = await asyncio.to_thread(pipeline.scorer.count_tokens, [t for p, r, _ in pairs for t in (p, r)])
    n_tokens = int(sum(tokens))

    squash = req.activation if req.use_activation is None else req.use_activation

    def value(reward: float) -> float:
        if not squash:
            return reward
        # Stable for any sign: PAL-A rewards (negative squared distances) can be far below -709.
        z = math.exp(-abs(reward))
        return 1.0 / (1.0 + z) if reward >= 0 else z / (1.0 + z)

    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=req.model or f"pal-rm-{version}",
        data=[ClassifyData(index=i, probs=[value(r.reward)]) for i, r in enumerate(results)],
        usage=Usage(prompt_tokens=n_tokens, total_tokens=n_tokens),
    )
