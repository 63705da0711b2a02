"""POST /get_reward: OpenRLHF's remote reward-model protocol.

Request  {"query": [...], "prompts": [...], "labels": [...]}  (or single strings; `prompts`/`labels` optional)
Response {"rewards": [...], "scores": [...], "extra_logs": {"personalized": [...], "truncated": [...]}}

- query[i] is prompt + response as one templated string, maybe with pad/BOS/EOS tokens: they are stripped and
  the response is what follows prompts[i] (models.chat.split_query). Without `prompts` (older OpenRLHF sends
  only `query`) the query's own chat markup is parsed; plain text is then scored as a response to no prompt.
- labels[i] is the user id (OpenRLHF's --label_key column); null or "" scores with the population prior.
- scores = rewards (OpenRLHF uses them for dynamic filtering); extra_logs hold per-sample numbers, which
  OpenRLHF concatenates as tensors and logs. The model version is in the X-Model-Version header.
- Scoring reads state only, so OpenRLHF's retries of a request are harmless.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from models.chat import ChatFormatError, split_query
from service.auth import require_api_key
from service.config import Settings
from service.deps import get_pipeline, get_settings
from service.pipeline import Pipeline
from service.protocols.common import (
    ERROR_RESPONSES,
    as_422,
    check_count,
    check_text,
    check_user_id,
    score_pairs,
    unprocessable,
)

router = APIRouter(tags=["rlhf"])

Label = str | int | None


class GetRewardRequest(BaseModel):
    # OpenRLHF versions add fields over time; unknown ones are ignored rather than failing a training run.
    model_config = ConfigDict(extra="ignore")

    query: list[str] | str = Field(description="prompt + response strings, as the policy's tokenizer decoded them")
    prompts: list[str] | str | None = Field(default=None, description="the prompt of each query (a prefix of it)")
    labels: list[Label] | Label = Field(default=None, description="user id of each query; null = population")


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


def _as_list(value: object, n: int, name: str) -> list:
    if value is None:
        return [None] * n
    values = value if isinstance(value, list) else [value]
    if len(values) != n:
        raise unprocessable(f"'{name}' has {len(values)} entries but 'query' has {n}")
    return values


@router.post(
    "/get_reward",
    response_model=GetRewardResponse,
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
    summary="OpenRLHF remote reward model: rewards for templated prompt+response queries, labels = user ids",
)
async def get_reward(
    req: GetRewardRequest,
    request: Request,
    response: Response,
    pipeline: Pipeline = Depends(get_pipeline),
    settings: Settings = Depends(get_settings),
) -> GetRewardResponse:
    queries = req.query if isinstance(req.query, list) else [req.query]
    check_count(len(queries), settings, "queries")
    prompts = _as_list(req.prompts, len(queries), "prompts")
    labels = _as_list(req.labels, len(queries), "labels")
    renderer = pipeline.chat
    pairs = []
    for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels, strict=True)):
        check_text(query, f"query[{i}]", settings, texts=2)
        user = check_user_id(label, f"labels[{i}]")
        try:
            if prompt is None:
                canonical_prompt, reply = renderer.pair_from_text(query)
            else:
                raw_prompt, reply = split_query(query, prompt, renderer.strip_tokens)
                canonical_prompt = renderer.prompt_from_text(raw_prompt)
        except ChatFormatError as e:
            raise as_422(e, f"query[{i}]") from e
        pairs.append((canonical_prompt, reply, user))
    results, version = await score_pairs(request, pipeline, settings, pairs)
    response.headers["X-Model-Version"] = version
    rewards = [r.reward for r in results]
    return GetRewardResponse(
        rewards=rewards,
        scores=list(rewards),
        extra_logs={
            "personalized": [float(r.personalized) for r in results],
            "truncated": [float(r.truncated) for r in results],
        },
    )
