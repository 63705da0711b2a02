"""RewardEngine: the service's internal API, one object per loaded model. It knows no HTTP.

Routers (service/routes.py and service/protocols) reach it through `service.deps.get_engine`. It wires the parts,
each in a module of its own, and owns their lifecycle:

    scoring.Scoring        items -> batcher (tokenizer thread, encoder thread) -> PAL head with each item's weights
    weights_cache.UserWeights  users' fitted weights from Redis, cached to bridge an outage, deletions heard
    users.Users            adapt / read / forget users, refits (one fitting code path with `pal eval`)
    startup.Startup        seeding the checkpoint's users, refitting on a new version, pruning; readiness events
    population.Population  every user's weights, for the mean and MaxMin objectives
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from service import objectives
from service.batcher import GATHER_BATCHES, Batcher
from service.config import Settings
from service.domain import Adapted, ScoreItem, ScoreResult, UserView
from service.objectives import Objective
from service.population import Population
from service.scoring import Scoring
from service.startup import Startup
from service.store import Comparison, UserStore
from service.users import Users
from service.weights_cache import UserWeights

if TYPE_CHECKING:
    from models.scorer import Scorer
    from service.metrics import Metrics

log = logging.getLogger(__name__)


class RewardEngine:
    def __init__(self, scorer: Scorer, store: UserStore, settings: Settings, metrics: Metrics | None = None) -> None:
        self.scorer = scorer
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.version: str = scorer.meta.version
        self.k: int = scorer.meta.pal.k  # prototypes (objective preference vectors have K entries)
        self.weights_dim: int = scorer.weights_dim  # numbers in a user's weights: K, or a hier model's rank R
        self.batcher = Batcher(
            scorer,
            max_gather_tokens=scorer.max_batch_tokens * GATHER_BATCHES,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            observe_batch=metrics.observe_batch if metrics else None,
        )
        self.weights = UserWeights(store, self.version, settings, self._redis_error)
        self.users = Users(scorer, store, self.batcher, self.weights, settings, metrics, self._redis_error)
        self.population = Population(
            store, self.version, self.weights_dim, settings.population_ttl_s, settings.population_max_users
        )
        self.scoring = Scoring(scorer, self.batcher, self.weights, self.population, self.users.prior)
        self.startup = Startup(self.users)
        self.ready = False

    # --- what the checkpoint says about users
    @property
    def prior(self):  # noqa: ANN201 - numpy array
        return self.users.prior

    @property
    def prior_strength(self) -> float:
        return self.users.prior_strength

    @property
    def seen(self):  # noqa: ANN201 - dict of numpy arrays
        return self.users.seen

    @property
    def migration(self) -> dict[str, int | str]:
        """Start-up user state as /info reports it (service/startup.py)."""
        return self.startup.state

    # --- lifecycle
    def start(self) -> None:
        self.batcher.start()
        self.weights.start()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.users.close()
        await self.weights.close()
        await self.batcher.stop()

    def cache_stats(self) -> dict[str, float]:
        stats = {f"encoder_{k}": float(v) for k, v in self.scorer.cache_stats().items()}
        features = self.users.features
        stats.update(
            features_hits=features.hits, features_misses=features.misses,
            weights_hits=self.weights.hits, weights_misses=self.weights.misses,
        )
        return stats

    # --- the API routes call
    def validate_objective(self, objective: Objective) -> Objective:
        """The objective checked against this model (its K; a hierarchical model mixes no prototypes); raises
        objectives.ObjectiveError (422) saying what is wrong."""
        return objectives.validate(objective, self.k, hier=self.scorer.deviation is not None)

    async def score(self, items: list[ScoreItem], with_prototypes: bool = False) -> tuple[list[ScoreResult], str]:
        return await self.scoring.score(items, with_prototypes), self.version

    async def adapt(self, user: str, comparisons: list[Comparison], idempotency_key: str | None = None) -> Adapted:
        return await self.users.adapt(user, comparisons, idempotency_key)

    async def get_user(self, user: str) -> UserView:
        return await self.users.get(user)

    async def delete_user(self, user: str) -> bool:
        return await self.users.delete(user)

    async def seed_users(self) -> None:
        await self.startup.seed_users()

    async def migrate(self, retry_s: float = 5.0) -> None:
        await self.startup.migrate(retry_s)

    def _redis_error(self, op: str, e: Exception) -> None:
        log.warning("redis %s failed: %s", op, e)
        if self.metrics is not None:
            self.metrics.redis_errors.labels(op).inc()
