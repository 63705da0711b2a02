"""Scoring: items -> batcher (tokenizer, encoder) -> PAL head with each item's weights -> rewards.

Each item is scored for its user (their fitted weights, the population prior without them) or under a
pluralistic objective (service/objectives.py). Encoding and the one Redis read of every user's weights run at
once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service import objectives
from service.batcher import Batcher
from service.domain import ScoreItem, ScoreResult
from service.objectives import Objective
from service.population import Population
from service.weights_cache import UserWeights

if TYPE_CHECKING:
    from models.scorer import Scorer


@dataclass(eq=False)
class Scoring:
    scorer: Scorer
    batcher: Batcher
    weights: UserWeights
    population: Population
    prior: np.ndarray  # the population prior: the weights of an item without a user's fit or an objective

    async def score(self, items: list[ScoreItem], with_prototypes: bool = False) -> list[ScoreResult]:
        users = sorted({it.user_id for it in items if it.user_id is not None})
        enc, weights = await asyncio.gather(
            self.batcher.encode([it.prompt for it in items], [it.response for it in items]),
            self.weights.get(users),
        )
        w = np.stack([weights.get(it.user_id, self.prior) if it.user_id else self.prior for it in items])
        rewards = self.scorer.rewards(enc, w)
        groups: list[str | None] = [None] * len(items)
        by_objective: dict[Objective, list[int]] = {}
        for i, it in enumerate(items):
            if it.objective is not None:
                by_objective.setdefault(it.objective, []).append(i)
        for obj, rows in by_objective.items():  # items sharing an objective are computed together
            idx = np.asarray(rows)
            protos_of = None if enc.prompt_prototypes is None else enc.prompt_prototypes[idx]
            dev_of = None if enc.deviation is None else enc.deviation[idx]
            out = await objectives.compute(
                obj, self.scorer.head, enc.latent[idx], protos_of, self.prior, self.population, self.weights.get,
                dev_of,
            )
            rewards[idx] = out.rewards
            for j, group in zip(rows, out.group, strict=True):
                groups[j] = group
        protos = self.scorer.prototype_rewards(enc) if with_prototypes else None
        return [
            ScoreResult(
                reward=float(rewards[i]),
                user_id=it.user_id,
                personalized=it.user_id in weights,
                truncated=bool(enc.truncated[i]),
                prototype_rewards=None if protos is None else [float(x) for x in protos[i]],
                tokens=int(enc.tokens[i]),
                objective=None if it.objective is None else it.objective.kind,
                group=groups[i],
            )
            for i, it in enumerate(items)
        ]
