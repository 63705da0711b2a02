"""A minimal RLHF-style loop against a running pal-rm server: one reward model, different users, different policies.

No language model: each user's "policy" is a softmax over a fixed pool of candidate responses per prompt. Every
step samples a group of candidates per user (GRPO-style), scores the group through EVERY protocol a trainer can
use, checks that they agree, and applies a REINFORCE update with group-normalised advantages:

    native /score  |  OpenRLHF /get_reward  |  TRL reward function  |  verl compute_score  |  vLLM /classify

(/classify carries no user, so it is compared with the population reward.) At the end it prints each user's
ranking of the candidates and where users disagree.

    python examples/rlhf_loop.py --url http://127.0.0.1:8000            # adapts two demo users first
    python examples/rlhf_loop.py --url ... --users persona-0,persona-3  # users the checkpoint already knows
    python examples/rlhf_loop.py --url ... --pool pool.json            # {"prompt": ["response", ...], ...}

Exit status 1 if the protocols disagree or the server is unreachable.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from service.adapters.trl import make_trl_reward_func
from service.adapters.verl import make_compute_score
from service.client import PalClient, PalError, RetryPolicy

POOL: dict[str, list[str]] = {
    "How do I make my coffee less bitter?": [
        "Use a coarser grind.",
        "Brew at about 92 C instead of boiling, use a coarser grind, and shorten the contact time; bitterness "
        "mostly comes from over-extraction, so anything that extracts less will help.",
        "Add a pinch of salt! It blocks bitterness instantly, an old diner trick.",
        "Try lighter roasts, filtered water, and a 1:16 coffee-to-water ratio. Measure with a scale so you can "
        "adjust one variable at a time.",
        "Honestly, just add milk and sugar.",
    ],
    "Should I learn Rust or Go first?": [
        "Go.",
        "Go if you want to ship web services quickly; Rust if you want to understand memory and are ready for a "
        "steeper start. Both are great second languages after Python.",
        "Rust, obviously. The borrow checker will make you a better programmer in every language.",
        "It depends on your goals. Could you tell me what you want to build?",
        "Learn both! Start with Go for a month, then Rust. Variety is the spice of programming.",
    ],
    "What is a good way to start running?": [
        "Run-walk intervals, three times a week.",
        "Start with a run-walk plan: one minute running, two walking, for 20 minutes, three days a week. Increase "
        "the running part gradually over eight weeks and get shoes fitted at a running store.",
        "Just go out and run until you are tired. Your body adapts!",
        "Join a local couch-to-5k group; the social commitment keeps most beginners going.",
        "Consult a doctor before starting any exercise program.",
    ],
}

DEMO_USERS = ("demo-concise", "demo-detailed")


def chatml_prompt(prompt: str) -> str:
    """How a Qwen-style policy's tokenizer renders the prompt (with its injected system message)."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )


def demo_comparisons(pool: dict[str, list[str]], prefer_short: bool) -> list[dict[str, str]]:
    """Every (shorter, longer) pair of the pool, chosen by length: a user who likes brevity, or detail."""
    out = []
    for prompt, candidates in pool.items():
        for i, a in enumerate(candidates):
            for b in candidates[i + 1 :]:
                short, long = sorted((a, b), key=len)
                chosen, rejected = (short, long) if prefer_short else (long, short)
                out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def ranking(rewards: Sequence[float]) -> list[int]:
    return sorted(range(len(rewards)), key=lambda i: -rewards[i])


class ToyPolicy:
    """A categorical distribution over the candidate pool of each prompt, trained by REINFORCE."""

    def __init__(self, pool: dict[str, list[str]], lr: float) -> None:
        self.logits = {p: [0.0] * len(c) for p, c in pool.items()}
        self.lr = lr

    def probs(self, prompt: str) -> list[float]:
        m = max(self.logits[prompt])
        e = [math.exp(x - m) for x in self.logits[prompt]]
        return [x / sum(e) for x in e]

    def sample_group(self, prompt: str, size: int, rng: random.Random) -> list[int]:
        """Distinct candidates drawn by the policy (without replacement), like a group of generations."""
        left = list(range(len(self.logits[prompt])))
        group: list[int] = []
        while left and len(group) < size:
            weights = [self.probs(prompt)[i] for i in left]
            group.append(left.pop(rng.choices(range(len(left)), weights)[0]))
        return group

    def update(self, prompt: str, group: list[int], advantages: list[float]) -> None:
        probs = self.probs(prompt)
        for i, adv in zip(group, advantages, strict=True):
            for j in range(len(probs)):  # d log p_i / d logit_j = 1[i=j] - p_j
                self.logits[prompt][j] += self.lr * adv * ((1.0 if i == j else 0.0) - probs[j])


def advantages(rewards: list[float]) -> list[float]:
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) or 1.0
    return [(r - mean) / std for r in rewards]


class Protocols:
    """The same group scored five ways; returns the native rewards and the largest disagreement seen."""

    def __init__(self, url: str, api_key: str | None, retries: int) -> None:
        self.client = PalClient(url, api_key=api_key, retry=RetryPolicy(max_retries=retries))
        self.trl = make_trl_reward_func(url, api_key=api_key, client=self.client)
        self.verl, _ = make_compute_score(url, api_key=api_key, client=self.client)

    def score(self, prompt: str, responses: list[str], user: str | None) -> tuple[list[float], float]:
        n = len(responses)
        native = self.client.score([(prompt, r, user) for r in responses]).rewards
        templated = chatml_prompt(prompt)
        openrlhf = self.client.get_reward(
            query=[templated + r + "<|im_end|>" for r in responses], prompts=[templated] * n, labels=[user] * n
        )["rewards"]
        trl = self.trl(
            prompts=[[{"role": "user", "content": prompt}]] * n,
            completions=[[{"role": "assistant", "content": r}] for r in responses],
            user_id=[user] * n,
        )
        verl = [self.verl("pal-demo", r, None, {"prompt": prompt, "user_id": user}) for r in responses]
        others = [openrlhf, trl, verl]
        if user is None:  # /classify has no user: it is the population reward
            others.append(self.client.classify([templated + r + "<|im_end|>" for r in responses]))
        gap = max(abs(a - b) for other in others for a, b in zip(native, other, strict=True))
        return native, gap


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--users", default=None, help="comma-separated user ids; default: adapt two demo users")
    ap.add_argument("--pool", type=Path, default=None, help='JSON {"prompt": ["candidate", ...]} to use instead')
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--group-size", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retries", type=int, default=5, help="client retries on connection errors, 429 and 503")
    ap.add_argument("--keep-users", action="store_true", help="do not delete the demo users at the end")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    pool = POOL
    if args.pool is not None:
        pool = json.loads(args.pool.read_text())
        if not isinstance(pool, dict) or not all(
            isinstance(c, list) and len(c) >= 2 and all(isinstance(x, str) for x in c) for c in pool.values()
        ):
            print("--pool must map each prompt to a list of at least two candidate strings", file=sys.stderr)
            return 2
    rm = Protocols(args.url, args.api_key, args.retries)
    try:
        info = rm.client.info()
    except PalError as e:
        print(f"cannot reach the reward server at {args.url}: {e}", file=sys.stderr)
        return 1
    print(f"reward model {info['model_version']} (PAL-{info['form']}, K={info['k']}) at {args.url}")

    users: list[str | None]
    if args.users:
        users = [u.strip() for u in args.users.split(",") if u.strip()]
    else:
        users = list(DEMO_USERS)
        for user, short in zip(DEMO_USERS, (True, False), strict=True):
            fit = rm.client.adapt(user, demo_comparisons(pool, prefer_short=short))
            acc = fit.get("accuracy")
            print(
                f"adapted {user}: {fit['n_comparisons']} comparisons, fit accuracy {acc:.2f}, weights "
                f"{[round(w, 3) for w in fit['weights']]}"
            )
    users.append(None)  # the population prior, for comparison (and the only user /classify can score)

    policies = {u: ToyPolicy(pool, args.lr) for u in users}
    worst_gap = 0.0
    print(
        f"\n{args.steps} steps, groups of {args.group_size}, each scored via /score, /get_reward, TRL, verl"
        " (+ /classify for the population)"
    )
    for step in range(args.steps):
        prompt = rng.choice(list(pool))
        line = []
        for user in users:
            group = policies[user].sample_group(prompt, args.group_size, rng)
            rewards, gap = rm.score(prompt, [pool[prompt][i] for i in group], user)
            worst_gap = max(worst_gap, gap)
            policies[user].update(prompt, group, advantages(rewards))
            line.append(f"{user or 'population'}: mean r {sum(rewards) / len(rewards):+.3f}")
        print(f"step {step}: {prompt[:32]!r:36} " + " | ".join(line))

    print("\nranking of the full pool per user (best first), and each policy's favourite after training:")
    disagreements = 0
    for prompt, candidates in pool.items():
        print(f"\n  {prompt}")
        ranks = {}
        for user in users:
            rewards = rm.client.score([(prompt, c, user) for c in candidates]).rewards
            ranks[user] = ranking(rewards)
            fav = max(range(len(candidates)), key=lambda i: policies[user].probs(prompt)[i])
            print(
                f"    {user or 'population':>14}: ranking {ranks[user]}  policy favourite #{fav}: "
                f"{candidates[fav][:50]!r}"
            )
        if len({tuple(r) for r in ranks.values()}) > 1:
            disagreements += 1
    print(f"\nusers rank candidates differently on {disagreements}/{len(pool)} prompts")
    print(f"largest reward difference between protocols: {worst_gap:.2e}")

    if not args.users and not args.keep_users:
        for user in DEMO_USERS:
            rm.client.delete_user(user)
    rm.client.close()
    if worst_gap > 1e-3:
        print("PROTOCOLS DISAGREE", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
