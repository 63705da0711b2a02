"""verl custom reward functions backed by a pal-rm server.

In the verl config:

    custom_reward_function:
      path: /path/to/pal-rm/service/adapters/verl.py
      name: compute_score            # reward_model.reward_manager=naive (one sample per call)
      # name: compute_score_batch    # reward_model.reward_manager=batch (lists per call)

The server URL comes from PAL_RM_URL (and the token from PAL_RM_API_KEY, else PAL_API_KEY), or build your
own function with `make_compute_score(url, ...)`. Each sample's user id and prompt are read from its
`extra_info` (keys "user_id" and "prompt" by default; the prompt may be a string or chat messages). A sample
without a user id gets the population reward. `ground_truth` is not used: the reward is a learned preference.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from service.client import PalClient, RetryPolicy

PROMPT_KEYS_FALLBACK = ("prompt", "question", "query")


def _client_from_env() -> PalClient:
    url = os.environ.get("PAL_RM_URL")
    if not url:
        raise RuntimeError("set PAL_RM_URL to the pal-rm server (e.g. http://rm-host:8000), or use make_compute_score")
    api_key = os.environ.get("PAL_RM_API_KEY") or os.environ.get("PAL_API_KEY")
    return PalClient(url, api_key=api_key, timeout_s=float(os.environ.get("PAL_RM_TIMEOUT_S", "120")))


def _item(solution_str: str, extra_info: Mapping[str, Any] | None, user_field: str, prompt_field: str) -> dict:
    info = extra_info or {}
    if not isinstance(info, Mapping):
        raise TypeError(f"extra_info must be a dict, got {type(info).__name__}")
    prompt: Any = info.get(prompt_field)
    if prompt is None and prompt_field == "prompt":
        prompt = next((info[k] for k in PROMPT_KEYS_FALLBACK if info.get(k) is not None), "")
    if prompt is not None and not isinstance(prompt, str):
        prompt = list(prompt)  # numpy arrays of message dicts (parquet) -> list
    user = info.get(user_field)
    return {"prompt": prompt or "", "response": solution_str, "user_id": None if user in (None, "") else str(user)}


def make_compute_score(
    url: str | None = None,
    user_field: str = "user_id",
    prompt_field: str = "prompt",
    *,
    api_key: str | None = None,
    batch_size: int = 256,
    timeout_s: float = 120.0,
    retry: RetryPolicy | None = None,
    client: PalClient | None = None,
) -> tuple[Callable[..., float], Callable[..., list[float]]]:
    """(compute_score, compute_score_batch) bound to one server; the client is created on first use."""
    lock = threading.Lock()
    holder: list[PalClient] = [client] if client is not None else []

    def pal() -> PalClient:
        with lock:
            if not holder:
                holder.append(
                    PalClient(url, api_key=api_key, timeout_s=timeout_s, batch_size=batch_size, retry=retry)
                    if url
                    else _client_from_env()
                )
            return holder[0]

    def compute_score(
        data_source: str,
        solution_str: str,
        ground_truth: Any = None,
        extra_info: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> float:
        return pal().score_chat([_item(solution_str, extra_info, user_field, prompt_field)]).rewards[0]

    def compute_score_batch(
        data_sources: Sequence[str],
        solution_strs: Sequence[str],
        ground_truths: Sequence[Any] | None = None,
        extra_infos: Sequence[Mapping[str, Any] | None] | None = None,
        **_: Any,
    ) -> list[float]:
        infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
        if len(infos) != len(solution_strs):
            raise ValueError(f"{len(infos)} extra_infos for {len(solution_strs)} solutions")
        if not solution_strs:
            return []
        items = [_item(s, e, user_field, prompt_field) for s, e in zip(solution_strs, infos, strict=True)]
        return pal().score_chat(items).rewards

    return compute_score, compute_score_batch


# Module-level functions for verl's custom_reward_function (URL from PAL_RM_URL, read on first call).
compute_score, compute_score_batch = make_compute_score()
