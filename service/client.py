"""Python client for a pal-rm server: `PalClient` (blocking) and `AsyncPalClient` (asyncio), needing only httpx
and Python >= 3.10 (the trainer side: `pip install pal-rm[client]`).

Both faces share one transport: every call is written once, as a generator of the HTTP requests it needs
(`_Calls`), and one retry loop (`_attempts`) decides what to do after each attempt; the faces only send,
sleep and (async) run a call's chunks concurrently. So the two have the same methods with the same behaviour.

- batching: many items are sent as requests of at most `batch_size` items (async: several in flight);
- retries with exponential backoff and jitter on connection errors, read timeouts, dropped connections, 429 and
  503 (honouring Retry-After), for scoring and for `adapt` alike;
- timeouts on every request, typed results, `PalError` with the server's message on 4xx.

Scoring never changes server state, so a retried scoring call is always safe. `adapt` stores comparisons, and
its answer can be lost after they were stored (a 503 when Redis fails during the refit, a timeout, a dropped
connection): every attempt of one call carries the same `Idempotency-Key`, so the server stores them once and
answers a repeat with the current state (`replayed: true`).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, Union
from urllib.parse import quote

import httpx

Json = dict[str, Any]
MessageList = Sequence[Mapping[str, Any]]
# A prompt or response: a string, or chat messages (for the /score/chat route). typing.Union: Python 3.10.
ChatText = Union[str, Mapping[str, Any], MessageList]  # noqa: UP007
T = TypeVar("T")


class PalError(Exception):
    """The server answered with an error that retrying will not fix (or retries ran out)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


class PalUnavailable(PalError):
    """No usable answer after all retries: the server is unreachable, overloaded (429) or not ready (503)."""


@dataclass(frozen=True)
class Score:
    reward: float
    user_id: str | None
    personalized: bool
    truncated: bool
    prototype_rewards: list[float] | None = None
    flags: tuple[str, ...] = ()  # /score/chat: what the server changed to score the item (docs/RLHF.md)
    objective: str | None = None  # the objective's kind, for items scored under one
    group: str | None = None  # maxmin: the worst-off group


@dataclass(frozen=True)
class ScoreBatch:
    model_version: str
    results: list[Score]

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.results]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits uniform(cap/2, cap), cap = min(max_s, base_s * 2**n).

    A Retry-After from the server replaces the computed wait (capped at `max_retry_after_s`), plus up to 10%
    jitter so that clients told the same number do not come back in lockstep.
    """

    max_retries: int = 5
    base_s: float = 0.2
    max_s: float = 10.0
    max_retry_after_s: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            wait = min(max(retry_after, 0.0), self.max_retry_after_s)
            return wait * (1.0 + 0.1 * rng.random())
        cap = min(self.max_s, self.base_s * 2.0**attempt)
        return rng.uniform(cap / 2, cap)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds (integers; decimals accepted) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


# The server did not process the request (or, for adapt, may have stored it: its Idempotency-Key makes a retry safe).
_ALWAYS_RETRY_STATUS = frozenset({429, 503})
_IDEMPOTENT_RETRY_STATUS = frozenset({502, 504})  # a proxy gave up; the request may have run
_NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            if body.get(key):
                value = body[key]
                return value if isinstance(value, str) else str(value)
    return str(body)[:500]


@dataclass
class _Attempt:
    """What to do after one try: return the JSON, raise, or wait `delay` seconds and try again."""

    result: Json | None = None
    error: PalError | None = None
    delay: float | None = None


def _judge(
    response: httpx.Response | None,
    exc: Exception | None,
    attempt: int,
    idempotent: bool,
    policy: RetryPolicy,
    rng: random.Random,
) -> _Attempt:
    last = attempt >= policy.max_retries
    if exc is not None:
        retryable = isinstance(exc, _NOT_SENT_ERRORS) or (idempotent and isinstance(exc, httpx.TransportError))
        if not retryable:
            return _Attempt(error=PalError(None, f"request failed and is not safe to retry: {exc!r}"))
        if last:
            return _Attempt(error=PalUnavailable(None, f"gave up after {attempt + 1} attempts: {exc!r}"))
        return _Attempt(delay=policy.delay(attempt, None, rng))
    assert response is not None
    status = response.status_code
    if status < 400:
        try:
            return _Attempt(result=response.json())
        except ValueError:
            return _Attempt(error=PalError(status, "server answered with a body that is not JSON"))
    if status in _ALWAYS_RETRY_STATUS or (idempotent and status in _IDEMPOTENT_RETRY_STATUS):
        if last:
            return _Attempt(
                error=PalUnavailable(status, f"gave up after {attempt + 1} attempts: {_error_message(response)}")
            )
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return _Attempt(delay=policy.delay(attempt, retry_after, rng))
    return _Attempt(error=PalError(status, _error_message(response)))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _item_json(item: Mapping[str, Any] | Sequence[Any]) -> Json:
    """An item as a mapping {prompt, response, user_id} or a tuple (prompt, response[, user_id])."""
    if isinstance(item, Mapping):
        keys = ("prompt", "response", "user_id", "messages", "objective")
        return {k: item[k] for k in keys if item.get(k) is not None}
    prompt, response, *rest = item
    out: Json = {"prompt": prompt, "response": response}
    if rest and rest[0] is not None:
        out["user_id"] = rest[0]
    return out


def _score_batch(body: Json) -> ScoreBatch:
    try:
        results = [
            Score(
                reward=float(r["reward"]),
                user_id=r.get("user_id"),
                personalized=bool(r["personalized"]),
                truncated=bool(r["truncated"]),
                prototype_rewards=r.get("prototype_rewards"),
                flags=tuple(r.get("flags") or ()),
                objective=r.get("objective"),
                group=r.get("group"),
            )
            for r in body["results"]
        ]
        return ScoreBatch(model_version=str(body["model_version"]), results=results)
    except (KeyError, TypeError, ValueError) as e:
        raise PalError(None, f"unexpected /score answer: {e!r}") from e


def _merge(batches: list[ScoreBatch]) -> ScoreBatch | None:
    """All chunks of one call, or None when a new model was deployed between chunks (rewards not comparable)."""
    versions = {b.model_version for b in batches}
    if len(versions) > 1:
        return None
    return ScoreBatch(batches[0].model_version, [r for b in batches for r in b.results])


@dataclass
class _Config:
    url: str
    api_key: str | None = None
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    batch_size: int = 256
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.url = self.url.rstrip("/")

    def client_kwargs(self) -> Json:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {
            "base_url": self.url,
            "headers": headers,
            "timeout": httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
        }


@dataclass(frozen=True)
class _Req:
    method: str
    path: str
    body: Json | None = None
    idempotent: bool = True
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class _Sleep:
    seconds: float


# A logical call: yields the requests it needs next (sent in any order, answered in order) or a pause, and
# receives their JSON answers; a PalError from sending is thrown into it. Its return value is the call's result.
Call = Generator[Union[list[_Req], _Sleep], Union[list[Json], None], T]  # noqa: UP007
# One request's attempts: yields the request (answered with (response, exception) of one HTTP attempt) or a pause.
Attempts = Generator[Union[_Req, _Sleep], Any, Json]  # noqa: UP007


def _attempts(req: _Req, policy: RetryPolicy, rng: random.Random) -> Attempts:
    """The one retry loop of both faces: try, judge the outcome, wait and try again; returns the JSON or raises
    the PalError."""
    attempt = 0
    while True:
        response, exc = yield req
        outcome = _judge(response, exc, attempt, req.idempotent, policy, rng)
        if outcome.error is not None:
            raise outcome.error
        if outcome.result is not None:
            return outcome.result
        assert outcome.delay is not None
        yield _Sleep(outcome.delay)
        attempt += 1


class _Steps(Generic[T]):
    """Runs a call (or a request's attempts) from a for loop, so that each face's driver is only its I/O: iterate
    the steps the generator yields and set `reply` before the next one (a PalError is thrown into it);
    `result` holds what it returned."""

    def __init__(self, gen: Generator[Any, Any, T]) -> None:
        self._gen = gen
        self.reply: Any = None
        self.result: T | None = None

    def __iter__(self) -> _Steps[T]:
        return self

    def __next__(self) -> Any:
        reply, self.reply = self.reply, None
        try:
            return self._gen.throw(reply) if isinstance(reply, PalError) else self._gen.send(reply)
        except StopIteration as done:
            self.result = done.value
            raise StopIteration from None


def _adapt_call(
    user_id: str, comparisons: Sequence[Mapping[str, str]], idempotency_key: str | None
) -> tuple[str, Json, dict[str, str]]:
    """Path, body and headers of one logical adapt; the key is chosen once here and reused by every attempt."""
    body = {"comparisons": [dict(c) for c in comparisons]}
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    return f"{_user_path(user_id)}/adapt", body, headers


def _user_path(user_id: str) -> str:
    # Any string is a user id ("/" and spaces included): percent-encode all of it.
    return f"/users/{quote(user_id, safe='')}"


def _score_path(chat: bool) -> str:
    return "/score/chat" if chat else "/score"


def _score_body(items: Sequence[Any], with_prototypes: bool, shaping: str | None) -> Json:
    body: Json = {"items": [_item_json(it) for it in items], "return_prototypes": with_prototypes}
    if shaping is not None:
        body["shaping"] = shaping
    return body


class _Calls(Generic[T]):
    """Every call of the API, once. `_drive` runs a call: the sync face returns its result, the async face an
    awaitable of it, so each method below returns `X` on PalClient and `Awaitable[X]` on AsyncPalClient."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        batch_size: int = 256,
        retry: RetryPolicy | None = None,
        seed: int | None = None,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        """`sleep` waits between retries (time.sleep / asyncio.sleep by default; tests pass their own); `seed`
        makes the retry jitter reproducible."""
        self.config = _Config(url, api_key, timeout_s, connect_timeout_s, batch_size, retry or RetryPolicy(), seed)
        self._rng = random.Random(seed)
        self._open(sleep)

    def _open(self, sleep: Callable[[float], Any] | None) -> None:
        """The face's HTTP client and sleep."""
        raise NotImplementedError

    def _drive(self, call: Call[Any]) -> Any:
        raise NotImplementedError

    def score(
        self, items: Sequence[Any], with_prototypes: bool = False, chat: bool = False, shaping: str | None = None
    ) -> ScoreBatch:
        """Rewards for items {prompt, response, user_id?} or tuples (prompt, response[, user_id]).

        `chat=True` sends them to /score/chat, where prompt and response may be chat messages or templated
        text and are rendered with the checkpoint's chat template (and `shaping` may transform the rewards).
        """
        return self._drive(self._score(items, with_prototypes, chat, shaping))

    def _score(self, items: Sequence[Any], with_prototypes: bool, chat: bool, shaping: str | None) -> Call[ScoreBatch]:
        if not items:
            raise ValueError("no items to score")
        if shaping is not None and not chat:
            raise ValueError("shaping applies to chat scoring (score_chat) only")
        path = _score_path(chat)
        bodies = [_score_body(chunk, with_prototypes, shaping) for chunk in _chunks(items, self.config.batch_size)]
        for _ in range(2):
            answers = yield [_Req("POST", path, b) for b in bodies]
            assert answers is not None
            merged = _merge([_score_batch(a) for a in answers])
            if merged is not None:
                return merged
        raise PalError(None, "the model version changed twice during one call; retry later")

    def score_chat(self, items: Sequence[Any], with_prototypes: bool = False, shaping: str | None = None) -> ScoreBatch:
        return self.score(items, with_prototypes=with_prototypes, chat=True, shaping=shaping)

    def get_reward(
        self,
        query: Sequence[str],
        prompts: Sequence[str] | None = None,
        labels: Sequence[Any] | None = None,
        shaping: str | None = None,
    ) -> Json:
        """OpenRLHF remote-RM call, batched; returns {"rewards", "scores", "extra_logs"} for all queries."""
        return self._drive(self._get_reward(query, prompts, labels, shaping))

    def _get_reward(
        self, query: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[Any] | None, shaping: str | None
    ) -> Call[Json]:
        reqs = []
        for start in range(0, len(query), self.config.batch_size):
            end = start + self.config.batch_size
            body: Json = {"query": list(query[start:end])}
            if prompts is not None:
                body["prompts"] = list(prompts[start:end])
            if labels is not None:
                body["labels"] = list(labels[start:end])
            if shaping is not None:
                body["shaping"] = shaping
            reqs.append(_Req("POST", "/get_reward", body))
        out: Json = {"rewards": [], "scores": [], "extra_logs": {}}
        if not reqs:
            return out
        answers = yield reqs
        assert answers is not None
        for part in answers:
            out["rewards"] += part["rewards"]
            out["scores"] += part["scores"]
            for key, values in part.get("extra_logs", {}).items():
                out["extra_logs"].setdefault(key, []).extend(values)
        return out

    def classify(self, inputs: str | Sequence[str], model: str | None = None) -> list[float]:
        """Population rewards through the vLLM-style /classify route (data[i].probs[0])."""
        return self._drive(self._classify(inputs, model))

    def _classify(self, inputs: str | Sequence[str], model: str | None) -> Call[list[float]]:
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        extra: Json = {"model": model} if model else {}
        chunks = _chunks(texts, self.config.batch_size)
        answers = yield [_Req("POST", "/classify", {"input": list(c), **extra}) for c in chunks]
        assert answers is not None
        return [float(d["probs"][0]) for part in answers for d in part["data"]]

    # --- users

    def adapt(
        self, user_id: str, comparisons: Sequence[Mapping[str, str]], idempotency_key: str | None = None
    ) -> Json:
        """Store comparisons {prompt, chosen, rejected} for a user and refit.

        Retried like scoring: every attempt sends the same Idempotency-Key (`idempotency_key`, or a new uuid4 per
        call), so the comparisons are stored once however many attempts reach the server. Pass your own key to
        make a call that is repeated after a crash of the caller idempotent too.
        """
        path, body, headers = _adapt_call(user_id, comparisons, idempotency_key)
        return self._drive(_one(_Req("POST", path, body, headers=headers)))

    def user(self, user_id: str) -> Json:
        return self._drive(_one(_Req("GET", _user_path(user_id))))

    def delete_user(self, user_id: str) -> Json:
        return self._drive(_one(_Req("DELETE", _user_path(user_id))))

    def info(self) -> Json:
        return self._drive(_one(_Req("GET", "/info")))

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.5) -> Json:
        """Poll /health until the model is loaded and warm."""
        return self._drive(_wait_ready(timeout_s, poll_s))

    def request(
        self,
        method: str,
        path: str,
        body: Json | None = None,
        idempotent: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> Json:
        """One call with retries; `idempotent=False` retries only what surely did not reach the server."""
        return self._drive(_one(_Req(method, path, body, idempotent, headers)))


def _one(req: _Req) -> Call[Json]:
    answers = yield [req]
    assert answers is not None
    return answers[0]


def _wait_ready(timeout_s: float, poll_s: float) -> Call[Json]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            answers = yield [_Req("GET", "/health")]
            assert answers is not None
            return answers[0]
        except PalError:
            if time.monotonic() > deadline:
                raise
        yield _Sleep(poll_s)


class PalClient(_Calls[Any]):
    """Blocking client. Thread-safe (one httpx.Client underneath); use as a context manager or call close()."""

    _http: httpx.Client
    _sleep: Callable[[float], None]

    def _open(self, sleep: Callable[[float], Any] | None) -> None:
        self._http = httpx.Client(**self.config.client_kwargs())
        self._sleep = sleep or time.sleep

    def __enter__(self) -> PalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _drive(self, call: Call[T]) -> T:
        return self._run(call, self._answers)

    def _run(self, gen: Generator[Any, Any, T], act: Callable[[Any], Any]) -> T:
        steps = _Steps(gen)
        for step in steps:
            steps.reply = self._sleep(step.seconds) if isinstance(step, _Sleep) else act(step)
        return steps.result  # type: ignore[return-value]

    def _answers(self, reqs: list[_Req]) -> list[Json] | PalError:
        try:
            return [self._run(_attempts(req, self.config.retry, self._rng), self._attempt) for req in reqs]
        except PalError as e:
            return e

    def _attempt(self, req: _Req) -> tuple[httpx.Response | None, Exception | None]:
        try:
            return self._http.request(req.method, req.path, json=req.body, headers=req.headers), None
        except httpx.HTTPError as e:
            return None, e


class AsyncPalClient(_Calls[Any]):
    """asyncio client: PalClient's methods, each returning an awaitable; the chunks of one call are sent
    `max_concurrency` at a time."""

    _http: httpx.AsyncClient
    _sleep: Callable[[float], Awaitable[None]]

    def __init__(self, url: str, *args: Any, max_concurrency: int = 4, **kwargs: Any) -> None:
        """PalClient's arguments (`sleep` must be a coroutine function), and `max_concurrency`."""
        super().__init__(url, *args, **kwargs)
        self._max_concurrency = max(1, max_concurrency)

    def _open(self, sleep: Callable[[float], Any] | None) -> None:
        self._http = httpx.AsyncClient(**self.config.client_kwargs())
        self._sleep = sleep or asyncio.sleep

    async def __aenter__(self) -> AsyncPalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _drive(self, call: Call[T]) -> T:
        return await self._run(call, self._answers)

    async def _run(self, gen: Generator[Any, Any, T], act: Callable[[Any], Awaitable[Any]]) -> T:
        steps = _Steps(gen)
        for step in steps:
            steps.reply = await self._sleep(step.seconds) if isinstance(step, _Sleep) else await act(step)
        return steps.result  # type: ignore[return-value]

    async def _answers(self, reqs: list[_Req]) -> list[Json] | PalError:
        gate = asyncio.Semaphore(self._max_concurrency)

        async def send(req: _Req) -> Json:
            async with gate:  # a request holds its slot through its retries' waits, as one in flight
                return await self._run(_attempts(req, self.config.retry, self._rng), self._attempt)

        try:
            return list(await asyncio.gather(*(send(req) for req in reqs)))
        except PalError as e:
            return e

    async def _attempt(self, req: _Req) -> tuple[httpx.Response | None, Exception | None]:
        try:
            return await self._http.request(req.method, req.path, json=req.body, headers=req.headers), None
        except httpx.HTTPError as e:
            return None, e
