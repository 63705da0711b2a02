"""A TRL reward function backed by a pal-rm server (GRPOTrainer / RLOOTrainer `reward_funcs=`).

    reward_fn = make_trl_reward_func("http://rm:8000", user_field="user_id")
    trainer = GRPOTrainer(model=..., reward_funcs=reward_fn, train_dataset=ds)  # ds has a "user_id" column

TRL calls `reward_fn(prompts=..., completions=..., **columns)`: prompts and completions are strings (standard
datasets) or message lists (conversational datasets); every other dataset column arrives as a keyword list.
The user of each completion is read from `kwargs[user_field]`; None scores with the population prior.
Items go to /score/chat, where messages are rendered with the checkpoint's chat template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from service.client import PalClient, RetryPolicy

RewardFunc = Callable[..., list[float]]


def _user(value: object) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def make_trl_reward_func(
    url: str,
    user_field: str = "user_id",
    *,
    api_key: str | None = None,
    missing_user: Literal["error", "population"] = "error",
    batch_size: int = 256,
    timeout_s: float = 120.0,
    retry: RetryPolicy | None = None,
    client: PalClient | None = None,
    name: str = "pal_reward",
) -> RewardFunc:
    """A function with TRL's reward signature `(prompts, completions, **kwargs) -> list[float]`.

    missing_user: what to do when TRL passes no `user_field` column at all: "error" (default: a typo in the
    column name must not silently train on population rewards) or "population".
    """
    pal = client or PalClient(url, api_key=api_key, timeout_s=timeout_s, batch_size=batch_size, retry=retry)

    def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        n = len(completions)
        if prompts is None:
            prompts = [""] * n
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        users = kwargs.get(user_field)
        if users is None:
            if missing_user == "error":
                raise KeyError(
                    f"TRL passed no '{user_field}' column to the reward function; add it to the dataset, or build "
                    "the function with missing_user='population' to score everyone with the population prior"
                )
            users = [None] * n
        if len(users) != n:
            raise ValueError(f"{len(users)} values in '{user_field}' for {n} completions")
        if n == 0:
            return []
        rows = zip(prompts, completions, users, strict=True)
        items = [{"prompt": p, "response": c, "user_id": _user(u)} for p, c, u in rows]
        return pal.score_chat(items).rewards

    reward_func.__name__ = name  # TRL logs each reward function under its __name__
    reward_func.__qualname__ = name
    return reward_func
