"""POST /get_reward: OpenRLHF's remote reward-model protocol (tested against OpenRLHF 0.11,
openrlhf/utils/agent.py `_fetch_rewards_via_http`: one request per sample {"query": [q], "prompts": [p],
"labels": [l]}; with several --reward.remote_url servers, a shard can be an empty list).

Request  {"query": [...], "prompts": [...], "labels": [...]}  (or single strings; `prompts`/`labels` optional)
Response {"rewards": [...], "scores": [...], "extra_logs": {"personalized": [...], "truncated": [...],
          "flagged": [...]}}

- query[i] is prompt + response as one templated string, maybe with pad/BOS/EOS tokens: they are stripped and
  the response is what follows prompts[i] (models.chat.split_query). OpenRLHF cuts a long prompt's start off
  the query (prompt tokens[-max_prompt_length:]) but sends the whole prompt: the response is then what follows
  the prompt's end, and the whole prompt is scored. Without `prompts` (older OpenRLHF) the query's own chat
  markup is parsed, as it is when the query does not contain its prompt at all; plain text is then scored as
  a response to no prompt.
- labels[i] names the user (OpenRLHF's --data.label_key column) as PAL_LABEL_USER says; null, "" and anything
  that names no user score with the population prior (flagged, never refused: a 4xx fails OpenRLHF's run). A
  label that is a JSON object naming an objective ({"weights": [...]}, {"aggregate": "mean"|"min"} or
  {"objective": {...}}) is scored under it (service/objectives.py).
- rewards are shaped by `?shaping=` in the URL or PAL_REWARD_SHAPING; scores = rewards (OpenRLHF filters on
  them with --dynamic_filtering_reward_range, (0, 1) by default: use shaping=sigmoid). extra_logs hold
  per-sample numbers, which OpenRLHF concatenates as tensors and logs. The model version is in the
  X-Model-Version header.
- Scoring reads state only, so OpenRLHF's retries of a request are harmless.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from models.chat import MARKUP_TOKENS, ChatFormatError, ChatRenderer, split_query, strip_special, visible_text
from service.errors import Invalid
from service.protocols import common
from service.protocols.common import Pair, ServedDep
from service.schemas import check_count
from service.shaping import Shaping

router = common.protocol_router()


class GetRewardRequest(BaseModel):
    # OpenRLHF versions add fields over time; unknown ones are ignored rather than failing a training run.
    model_config = ConfigDict(extra="ignore")

    query: list[str] | str = Field(description="prompt + response strings, as the policy's tokenizer decoded them")
    prompts: list[str] | str | None = Field(default=None, description="the prompt of each query (a prefix of it)")
    # Any JSON: a label column may hold ground truths, numbers or dicts; PAL_LABEL_USER says which name a user.
    labels: Annotated[Any, AfterValidator(common.reject_non_finite)] = Field(
        default=None, description="the user of each query (PAL_LABEL_USER); null = population"
    )
    shaping: Shaping | None = Field(default=None, description="reward transform; unset: ?shaping= or the default")


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


def _as_list(value: object, n: int, name: str) -> list:
    if value is None:
        return [None] * n
    values = value if isinstance(value, list) else [value]
    if len(values) != n:
        raise Invalid(f"'{name}' has {len(values)} entries but 'query' has {n}")
    return values


_ANCHOR = 48  # visible characters of the prompt's end searched for in the query
_MAX_CANDIDATES = 64  # occurrences of the anchor checked (bounds the work on repetitive text)
_LEAD_SLACK = 4  # leading query characters that may not be in the prompt (a token cut inside a character)


def split_left_truncated(query: str, prompt: str, tokens: tuple[str, ...]) -> str | None:
    """The response of a query whose prompt part lost its start: the text after the prompt's end, or None.

    OpenRLHF keeps prompt_token_ids[-max_prompt_length:], so the query begins inside the prompt. The prompt's
    part is the longest start of the query (up to a few characters) that is an end of the prompt, compared
    without whitespace and special/markup tokens, like split_query.
    """
    skip = tokens + MARKUP_TOKENS
    q = strip_special(query, tokens)
    pv, _ = visible_text(strip_special(prompt, tokens), skip)
    qv, q_index = visible_text(q, skip)
    if not pv or not qv:
        return None
    anchor = pv[-min(len(pv), _ANCHOR) :]
    best = None
    start, checked = qv.find(anchor), 0
    while start != -1 and start + len(anchor) <= len(pv) + _LEAD_SLACK and checked < _MAX_CANDIDATES:
        end = start + len(anchor)
        if any(pv.endswith(qv[lead:end]) for lead in range(min(_LEAD_SLACK, start) + 1)):
            best = end
        checked += 1
        start = qv.find(anchor, start + 1)
    if best is None:
        return None
    return strip_special(q[q_index[best - 1] + 1 :], tokens)


def _pair(renderer: ChatRenderer, query: str, prompt: str | None) -> Pair:
    """Canonical (prompt, response) of one query; never raises for a query it can read some response from."""
    if prompt is None:
        return Pair(*renderer.pair_from_text(query))
    try:
        raw_prompt, reply = split_query(query, prompt, renderer.strip_tokens)
        return Pair(renderer.prompt_from_text(raw_prompt), reply)
    except ChatFormatError:
        pass
    reply = split_left_truncated(query, prompt, renderer.strip_tokens)
    if reply is not None:
        return Pair(renderer.prompt_from_text(prompt), reply, flags={common.QUERY_LEFT_TRUNCATED})
    # The query does not hold its prompt (another tokenizer, an edited prompt): its own markup, else all reply.
    return Pair(*renderer.pair_from_text(query), flags={common.QUERY_NOT_SPLIT})


def _pairs(renderer: ChatRenderer, queries: list[str], prompts: list, limit: int) -> list[Pair]:
    # A query over twice the text limit loses its start, as OpenRLHF's own prompt truncation does: the response
    # (at the end) is kept, and the prompt comes from `prompts`.
    def parse(i: int, query: str) -> Pair:
        return common.cut_left(query, limit, lambda q: _pair(renderer, q, prompts[i]))

    return common.each_pair(queries, "query", parse)


@router.post(
    "/get_reward",
    response_model=GetRewardResponse,
    summary="OpenRLHF remote reward model: rewards for templated prompt+response queries, labels = user ids",
)
async def get_reward(
    req: GetRewardRequest,
    response: Response,
    s: ServedDep,
    shaping: Shaping | None = Query(default=None, description="reward transform (e.g. in --reward.remote_url)"),
) -> GetRewardResponse:
    engine, renderer, settings = s.engine, s.renderer, s.settings
    queries = req.query if isinstance(req.query, list) else [req.query]
    # OpenRLHF shards a batch over its reward servers; a server can get an empty shard and must answer it.
    check_count(len(queries), settings, "queries", allow_empty=True)
    prompts = _as_list(req.prompts, len(queries), "prompts")
    labels = _as_list(req.labels, len(queries), "labels")
    pairs = await common.off_loop(lambda: _pairs(renderer, queries, prompts, 2 * settings.max_text_chars))
    for pair, label in zip(pairs, labels, strict=True):
        common.target_from_label(pair, label, engine, settings.label_user, settings.label_user_key)
    scored = await common.score_pairs(s, pairs, "/get_reward", req.shaping or shaping)
    response.headers["X-Model-Version"] = scored.version
    return GetRewardResponse(
        rewards=scored.rewards,
        scores=list(scored.rewards),
        extra_logs={
            "personalized": [float(r.personalized) for r in scored.results],
            "truncated": [float(scored.truncated(i)) for i in range(len(pairs))],
            "flagged": [float(bool(f)) for f in scored.flags],
        },
    )
