"""Real TRL GRPOTrainer and RLOOTrainer runs (TRL 1.16) with personalised pal-rm rewards: a tiny random Qwen2
built here, two optimizer steps on CPU, the sync and the async reward function side by side, and TRL's own logging."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from service.adapters.trl import make_async_trl_reward_func, make_trl_reward_func

pytest.importorskip("trl")

PROMPTS = ["Name a color.", "Tell me about the sea."]
USERS = ["user-0", "user-1", "user-2", "team a/no weights"]


def tiny_run(output_dir: Path) -> dict[str, object]:
    """The settings GRPO and RLOO share for a two-step CPU run: groups of 4 completions of 6 tokens, a log line a
    step, nothing saved or reported, seeded."""
    return dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_grpo_trainer_two_steps_with_personalized_rewards(rm_url: str, tmp_path: Path, conversational: bool) -> None:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tests.rlhf.tiny_policy import tiny_qwen2, tiny_tokenizer

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = tiny_qwen2(len(tokenizer))
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] if conversational else PROMPTS
    rows = [(p, u) for p in prompts for u in USERS]
    dataset = Dataset.from_dict({"prompt": [p for p, _ in rows], "user_id": [u for _, u in rows]})

    seen: list[dict] = []
    sync_fn = make_trl_reward_func(rm_url, user_field="user_id", name="pal_sync")
    async_fn = make_async_trl_reward_func(rm_url, user_field="user_id", name="pal_async", shaping="sigmoid")

    def spy(prompts, completions, **kwargs):  # what TRL hands reward functions; each user's rewards for it
        n = len(completions)
        per_user = {u: sync_fn(prompts, completions, user_id=[u] * n) for u in USERS}
        seen.append({"keys": sorted(kwargs), "per_user": per_user})
        return [0.0] * n

    config = GRPOConfig(
        **tiny_run(tmp_path), learning_rate=1e-3, dataloader_num_workers=0, reward_weights=[1.0, 1.0, 0.0]
    )
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=[sync_fn, async_fn, spy],
        args=config,
        train_dataset=dataset,
    )
    trainer.train()

    assert trainer.state.global_step == 2
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
    for name in ("pal_sync", "pal_async"):
        assert all(math.isfinite(entry[f"rewards/{name}/mean"]) for entry in logs)
        # log_metric reached TRL's logs: the fraction of personalised items of each batch
        assert all(0.0 <= entry[f"{name}/personalized"] <= 1.0 for entry in logs), logs
    assert all(0.0 < entry["rewards/pal_async/mean"] < 1.0 for entry in logs)  # shaping=sigmoid
    assert {"log_extra", "log_metric", "trainer_state", "user_id"} <= set(seen[0]["keys"])
    # Personalised: the policy's own completions rank differently for different users.
    for call in seen:
        rewards = call["per_user"]
        assert rewards["user-0"] != rewards["user-1"] != rewards["user-2"]


@pytest.mark.slow
def test_rloo_trainer_two_steps_with_the_async_reward(rm_url: str, tmp_path: Path) -> None:
    import torch
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from tests.rlhf.tiny_policy import tiny_qwen2, tiny_tokenizer

    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    rows = [(p, u) for p in PROMPTS for u in USERS]
    dataset = Dataset.from_dict({"prompt": [p for p, _ in rows], "user_id": [u for _, u in rows]})
    config = RLOOConfig(**tiny_run(tmp_path))
    reward_fn = make_async_trl_reward_func(rm_url, user_field="user_id")
    policy = tmp_path / "policy"  # RLOO builds its reference model from the policy's path
    tiny_qwen2(len(tokenizer)).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    trainer = RLOOTrainer(
        model=str(policy), processing_class=tokenizer, reward_funcs=reward_fn, args=config, train_dataset=dataset
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/pal_reward/mean" in entry]
    assert trainer.state.global_step == 2 and len(logs) == 2
    assert all(math.isfinite(entry["rewards/pal_reward/mean"]) and "pal_reward/personalized" in entry for entry in logs)
