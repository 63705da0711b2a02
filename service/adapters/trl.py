"""TRL reward functions backed by a pal-rm server (GRPOTrainer / RLOOTrainer `reward_funcs=`), tested with TRL 1.16.

    reward_fn = make_trl_reward_func("http://rm:8000", user_field="user_id")          # sync
    reward_fn = make_async_trl_reward_func("http://rm:8000", user_field="user_id")    # async: TRL runs it
    trainer = GRPOTrainer(model=..., reward_funcs=reward_fn, train_dataset=ds)       # concurrently with others

TRL calls `reward_fn(prompts=..., completions=..., completion_ids=..., **columns)`: prompts and completions are
strings (standard datasets) or message lists (conversational datasets); every other dataset column arrives as a
keyword list, plus `trainer_state`, `log_extra` and `log_metric`. The user of each completion is read from
`kwargs[user_field]` (None, or a value that is no user id, scores with the population prior). Items go to
/score/chat, where messages are rendered with the checkpoint's chat template and a completion ending in tool
results is scored up to its last assistant turn.

When TRL passes `log_extra`/`log_metric`, each item's `personalized`/`truncated`/flags go to the completions
table and their batch fractions to the metrics (`<name>/personalized`, ...). `on_error="none"` returns None for
every item of a batch the server could not score (TRL turns None into NaN and ignores it) instead of raising.

The functions are callable objects that pickle (their HTTP client is made on first use in each process).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any, Literal

from service.client import AsyncPalClient, PalClient, PalError, RetryPolicy, ScoreBatch

OnError = Literal["raise", "none"]


def _user(value: object) -> object:
    """A user column value as JSON the server can judge (it maps what is no user id to the population)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # pandas NaN for a missing user
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return value


class _RewardBase:
    def __init__(
        self,
        url: str,
        user_field: str = "user_id",
        *,
        api_key: str | None = None,
        missing_user: Literal["error", "population"] = "error",
        batch_size: int = 256,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        shaping: str | None = None,
        on_error: OnError = "raise",
        name: str = "pal_reward",
        client: PalClient | None = None,
        objective_field: str = "objective",
    ) -> None:
        if on_error not in ("raise", "none"):
            raise ValueError("on_error must be 'raise' or 'none'")
        self.url = url
        # What the HTTP client is made from, in each process that calls the function.
        self.client_options: dict[str, Any] = {
            "api_key": api_key, "timeout_s": timeout_s, "batch_size": batch_size, "retry": retry
        }  # fmt: skip
        self.user_field, self.objective_field, self.missing_user = user_field, objective_field, missing_user
        self.shaping, self.on_error = shaping, on_error
        self.__name__ = name  # TRL logs each reward function under its __name__
        self.__qualname__ = name
        if client is not None:  # a caller's own client; not pickled, remade from `url` after
            if not isinstance(client, PalClient) or isinstance(self, AsyncPalRewardFunc):
                raise TypeError("client= takes a PalClient, for the sync reward function only")
            self.__dict__["_client"] = client

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_client", None)  # a connection pool does not cross processes
        return state

    def _items(self, prompts: Sequence[Any] | None, completions: Sequence[Any], kwargs: dict[str, Any]) -> list[dict]:
        n = len(completions)
        if prompts is None:
            prompts = [""] * n
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        users = kwargs.get(self.user_field)
        # A column of objectives (Panacea preference vectors, {"kind": "mean"}, ...; docs/RLHF.md): a row with one
        # is scored under it instead of a user.
        objectives = kwargs.get(self.objective_field) or [None] * n
        if len(objectives) != n:
            raise ValueError(f"{len(objectives)} values in '{self.objective_field}' for {n} completions")
        if users is None and any(o is not None for o in objectives):
            users = [None] * n
        if users is None:
            if self.missing_user == "error":
                raise KeyError(
                    f"TRL passed no '{self.user_field}' column to the reward function; add it to the dataset, or "
                    "build the function with missing_user='population' to score everyone with the population prior"
                )
            users = [None] * n
        if len(users) != n:
            raise ValueError(f"{len(users)} values in '{self.user_field}' for {n} completions")
        rows = zip(prompts, completions, users, objectives, strict=True)
        return [
            {"prompt": p, "response": c, "objective": dict(o)}
            if o is not None
            else {"prompt": p, "response": c, "user_id": _user(u)}
            for p, c, u, o in rows
        ]

    def _finish(self, batch: ScoreBatch | None, n: int, kwargs: dict[str, Any]) -> list[float | None]:
        log_extra, log_metric = kwargs.get("log_extra"), kwargs.get("log_metric")
        if batch is None:
            if callable(log_metric):
                log_metric(f"{self.__name__}/failed", 1.0)
            return [None] * n
        results = batch.results
        columns = {
            "personalized": [r.personalized for r in results],
            "truncated": [r.truncated for r in results],
            "flagged": [bool(r.flags) for r in results],
        }
        if callable(log_extra):
            for key, values in columns.items():
                log_extra(f"{self.__name__}/{key}", values)
            log_extra(f"{self.__name__}/flags", [",".join(r.flags) for r in results])
        if callable(log_metric):
            for key, values in columns.items():
                log_metric(f"{self.__name__}/{key}", sum(values) / len(values))
        return list(batch.rewards)


class PalRewardFunc(_RewardBase):
    """Sync TRL reward function: `(prompts, completions, **kwargs) -> list[float | None]`."""

    def _pal(self) -> PalClient:
        client = self.__dict__.get("_client")
        if client is None:
            client = PalClient(self.url, **self.client_options)
            self.__dict__["_client"] = client
        return client

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        items = self._items(prompts, completions, kwargs)
        if not items:
            return []
        try:
            batch: ScoreBatch | None = self._pal().score_chat(items, shaping=self.shaping)
        except PalError:
            if self.on_error == "raise":
                raise
            batch = None
        return self._finish(batch, len(items), kwargs)


class AsyncPalRewardFunc(_RewardBase):
    """Async TRL reward function (TRL >= 1.0 awaits it on its event loop, concurrently with other async ones)."""

    def _pal(self) -> AsyncPalClient:
        # An httpx.AsyncClient belongs to the event loop it first ran on: one client per loop.
        loop = asyncio.get_running_loop()
        clients: dict[int, tuple[asyncio.AbstractEventLoop, AsyncPalClient]] = self.__dict__.setdefault("_client", {})
        entry = clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            client = AsyncPalClient(self.url, **self.client_options)
            entry = clients[id(loop)] = (loop, client)
        return entry[1]

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        items = self._items(prompts, completions, kwargs)
        if not items:
            return []
        try:
            batch: ScoreBatch | None = await self._pal().score_chat(items, shaping=self.shaping)
        except PalError:
            if self.on_error == "raise":
                raise
            batch = None
        return self._finish(batch, len(items), kwargs)


def make_trl_reward_func(url: str, user_field: str = "user_id", **options: Any) -> PalRewardFunc:
    """A sync function with TRL's reward signature `(prompts, completions, **kwargs) -> list[float | None]`.

    Options (keyword): api_key, missing_user ("error": a typo in the column name must not silently train on
    population rewards; or "population"), batch_size, timeout_s, retry, shaping (raw, sigmoid, standardize,
    standardize_user; unset: the server's PAL_REWARD_SHAPING), on_error ("raise" or "none"), name, client.
    """
    return PalRewardFunc(url, user_field, **options)


def make_async_trl_reward_func(url: str, user_field: str = "user_id", **options: Any) -> AsyncPalRewardFunc:
    """As make_trl_reward_func, as a coroutine function TRL runs concurrently with its other async rewards."""
    return AsyncPalRewardFunc(url, user_field, **options)
