"""User state: adapt (store comparisons, refit), read, forget, and refits in the background.

A refit reads the user's comparisons with their append counter and generation in one round trip, encodes what
this process has not cached (through the same batcher as scoring, in chunks so one big adapt cannot hog the
queue), fits the K logits with models.head.fit_user (a hierarchical model's R deviation weights with
models.deviation.fit_hier; the code `pal eval` measures either way) on a worker thread, and
writes the fit with a script that refuses it if a newer fit is stored or the user was deleted meanwhile.

A user whose comparisons the served model version has not fitted (a new deploy, or a rollback) is refitted on
their first read, /score included: no replica has to walk all users before serving them right. Such refits (and
the background walk's, service/startup.py) take a per-user lease in Redis, so replicas reading the same user at
once fit them once; the others wait for the stored fit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from redis.exceptions import RedisError

from models.cache import LRUCache
from models.deviation import fit_hier
from models.head import ComparisonFeatures, FitResult, fit_user
from service.batcher import Batcher, QueueFull
from service.config import Settings
from service.domain import Adapted, StoreUnavailable, UnknownUser, UserView, stale
from service.store import Comparison, StoredFit, UserStore
from service.tasks import cancel
from service.weights_cache import UserWeights

if TYPE_CHECKING:
    from models.scorer import Scorer
    from service.metrics import Metrics

log = logging.getLogger(__name__)

_N_USER_LOCKS = 64  # striped per-user locks: bounded memory, and refits of one user never run twice at once
_ENCODE_CHUNK = 256  # items per batcher call when encoding comparisons, so one big adapt cannot hog the queue

REFIT_LEASE_S = 120  # a replica's hold on refitting one user for a new model version; expires if it dies
_LEASE_POLL_S = 0.1  # how often a replica waiting for another one's refit looks for the stored fit
# What refit_if_stale did: nothing to do, refitted (or found deleted meanwhile), or left to another replica's lease.
FRESH, REFITTED, LEASED = "fresh", "refitted", "leased"

# One encoded comparison: chosen latent, rejected latent, the prompt's prototype points (PAL-B; None for PAL-A),
# and V e(chosen) - V e(rejected) (a hierarchical model; None for PAL).
_FeatureRow = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


def comparison_key(c: Comparison) -> str:
    return hashlib.blake2b(c.to_json().encode(), digest_size=16).hexdigest()


@dataclass(eq=False)
class Users:
    scorer: Scorer
    store: UserStore
    batcher: Batcher
    weights: UserWeights
    settings: Settings
    metrics: Metrics | None
    on_error: Callable[[str, Exception], None]  # (what failed, why): the engine's Redis-error accounting

    def __post_init__(self) -> None:
        scorer, settings, weights = self.scorer, self.settings, self.weights
        self.version: str = scorer.meta.version
        self.prior = scorer.prior
        # A deployment can override the strength chosen on validation users at training time.
        self.prior_strength: float = settings.prior_strength or scorer.meta.prior_strength or 1.0
        self.seen = scorer.seen_users()
        # Encoded comparisons by content hash (this process serves one model version), so refits re-encode nothing.
        self._features: LRUCache[_FeatureRow] = LRUCache(settings.feature_cache_size)
        self._locks = [asyncio.Lock() for _ in range(_N_USER_LOCKS)]
        # Users whose comparisons were stored while the encoder queue was full: refitted in the background.
        self._pending: set[str] = set()
        self._pending_task: asyncio.Task | None = None
        self._token = uuid.uuid4().hex  # this process's refit leases
        # Refits on read in flight, by user: concurrent reads of one user in this process share one.
        self._reading: dict[str, asyncio.Task[StoredFit | None]] = {}
        weights.refit_missing = self.refit_missing

    @property
    def features(self) -> LRUCache[_FeatureRow]:
        return self._features

    async def close(self) -> None:
        for task in [self._pending_task, *self._reading.values()]:
            await cancel(task)

    async def adapt(self, user: str, comparisons: list[Comparison], idempotency_key: str | None = None) -> Adapted:
        """Store the comparisons, refit from all the user's stored comparisons, write and return the fit.

        QueueFull (429) is raised only before anything is stored: if the encoder queue cannot take the refit's first
        chunk now, nothing is appended. If the append is stored and the refit then cannot run (the queue filled up,
        or Redis failed), the answer is `fitted=False` (the previous fit, if any) and the user is refitted in the
        background. StoreUnavailable (503) therefore means the append itself failed (or its answer was lost, which
        only an idempotency key makes safe to retry). A request whose idempotency key was already
        applied stores nothing and returns the fit covering the first request's append (refitting if that one
        failed before writing its fit). Raises IdempotencyKeyReused.
        """
        need = 2 * min(len(comparisons), self._encode_chunk)
        if self.batcher.queue_depth + need > self.batcher.max_queue:
            raise QueueFull(
                f"{self.batcher.queue_depth} items queued; the limit is {self.batcher.max_queue} (PAL_MAX_QUEUE); "
                "nothing was stored"
            )
        try:
            appended = await self.store.append_comparisons(
                user, comparisons, idempotency_key, self.settings.idempotency_ttl_s
            )
            try:
                fit = await self.refit(user, min_seq=appended.seq, gen=appended.gen)
            except (QueueFull, RedisError) as e:
                # Stored: a 429 or 503 now would make a client store it again. Answer "stored, fit pending".
                if isinstance(e, RedisError):
                    self.on_error("refit", e)
                self._refit_later(user)
                return Adapted(
                    await self._current_fit(user, appended.gen), appended.replayed, fitted=False,
                    n_comparisons=appended.stored,
                )
            return Adapted(fit, appended.replayed, n_comparisons=appended.stored)
        except RedisError as e:
            self.on_error("adapt", e)
            raise StoreUnavailable(str(e)) from e

    async def _current_fit(self, user: str, gen: str) -> StoredFit | None:
        """The stored fit of this generation, if Redis answers (for a 202's body)."""
        try:
            fit = await self.store.get_fit(self.version, user)
        except RedisError:
            return None
        return fit if fit is not None and fit.gen == gen else None

    async def get(self, user: str) -> UserView:
        mark = self.weights.mark()
        try:
            fit = await self.store.get_fit(self.version, user)
            n, seq, gen = await self.store.counts(user)
            if n and stale(fit, seq, gen):
                # Comparisons this version's fit has not seen (a new deploy, or a rollback): refit now. The caller
                # waits for an answer: past PAL_REFIT_ON_READ_WAIT_S of another replica's lease (it may have died),
                # fit here too (the store keeps the newer fit).
                fit = await self._refit_or_wait(user, patience_s=self.settings.refit_on_read_wait_s)
        except RedisError as e:
            self.on_error("get_user", e)
            raise StoreUnavailable(str(e)) from e
        if fit is None and n == 0:
            raise UnknownUser(user)
        if fit is not None:
            self.weights.remember(user, fit.array, mark)
        return UserView(user, fit, n)

    async def delete(self, user: str) -> bool:
        """Forget the user in Redis (one O(1) script), then what this process derived from their comparisons.

        True once Redis has deleted the user: the answer is that, even if dropping this process's cached encodings
        fails half way (then every cached encoding goes, since which ones were the user's is unknown)."""
        self.weights.drop(user)
        self._pending.discard(user)
        try:
            deleted = await self.store.delete_user(user, tombstone=user in self.seen)
        except RedisError as e:
            self.on_error("delete_user", e)
            raise StoreUnavailable(str(e)) from e
        self.weights.drop(user)
        if deleted is None:
            return False
        if deleted.trash is None:
            return True
        # What this process derived from the user's comparisons goes too (other replicas' caches keep theirs).
        try:
            async for chunk in self.store.drain_trash(deleted.trash):
                for c in chunk:
                    self._features.pop(comparison_key(c))
                prompts = [c.prompt for c in chunk]
                texts = [c.chosen for c in chunk] + [c.rejected for c in chunk]
                await asyncio.to_thread(self.scorer.forget, prompts + prompts, texts)  # hashing: off the event loop
        except RedisError as e:
            self.on_error("delete_user", e)
            self._features.clear()
            self.scorer.clear_cache()
        return True

    def _lock(self, user: str) -> asyncio.Lock:
        return self._locks[int(hashlib.blake2b(user.encode(), digest_size=4).hexdigest(), 16) % _N_USER_LOCKS]

    @property
    def _encode_chunk(self) -> int:
        """Comparisons per batcher call: two texts each, and never more than the queue can ever hold."""
        return max(1, min(_ENCODE_CHUNK, self.batcher.max_queue) // 2)

    def _refit_later(self, user: str) -> None:
        self._pending.add(user)
        if self._pending_task is None or self._pending_task.done():
            self._pending_task = asyncio.create_task(self._refit_pending(), name="pal-pending-refits")

    async def _refit_pending(self) -> None:
        """Refit users whose comparisons were stored while the queue was full, once it has room again. (If the
        process dies first, the next GET /users/{id}, adapt or a restart's migration refits them.)"""
        while self._pending:
            user = self._pending.pop()
            try:
                fit = await self.store.get_fit(self.version, user)
                n, seq, gen = await self.store.counts(user)
                if n and stale(fit, seq, gen):
                    await self.refit(user, min_seq=seq, gen=gen)
            except (QueueFull, RedisError) as e:
                log.info("background refit of %r postponed: %s", user, e)
                self._pending.add(user)
                await asyncio.sleep(self.settings.retry_after_s)
            except Exception:
                log.exception("background refit of %r failed", user)

    async def refit_missing(self, users: list[str]) -> dict[str, np.ndarray]:
        """Weights of users read (e.g. scored) whose comparisons this model version has not fitted: refitted now,
        waiting up to PAL_REFIT_ON_READ_WAIT_S; the ones not done by then are left out (the caller scores them with
        what it has) and finish in the background."""
        tasks = {u: self._refit_on_read(u) for u in users}
        if self.settings.refit_on_read_wait_s > 0:
            await asyncio.wait(tasks.values(), timeout=self.settings.refit_on_read_wait_s)
        return {
            u: fit.array
            for u, t in tasks.items()
            if t.done() and not t.cancelled() and (fit := t.result()) is not None
        }

    def _refit_on_read(self, user: str) -> asyncio.Task[StoredFit | None]:
        task = self._reading.get(user)
        if task is None:
            task = asyncio.create_task(self._refit_quietly(user), name="pal-refit-on-read")
            self._reading[user] = task
            task.add_done_callback(lambda _: self._reading.pop(user, None))
        return task

    async def _refit_quietly(self, user: str) -> StoredFit | None:
        """A refit on read: its failure leaves the read to score without it, and is not the reader's error."""
        try:
            return await self._refit_or_wait(user)
        except QueueFull:
            self._refit_later(user)
        except RedisError as e:
            self.on_error("refit_on_read", e)
        except Exception:
            log.exception("refit on read of %r failed", user)
        return None

    async def _refit_or_wait(self, user: str, patience_s: float | None = None) -> StoredFit | None:
        """Refit the user if stale, under the shared lease; while another replica holds it, wait for its fit (or
        for the lease to expire, if that replica died, and take it), or at most `patience_s`, then refit anyway."""
        give_up = None if patience_s is None else time.monotonic() + patience_s
        while True:
            status, fit = await self.refit_if_stale(user)
            if status != LEASED:
                return fit
            if give_up is not None and time.monotonic() >= give_up:
                _, seq, gen = await self.store.counts(user)
                return await self.refit(user, min_seq=seq, gen=gen)
            await asyncio.sleep(_LEASE_POLL_S)

    async def refit_if_stale(self, user: str) -> tuple[str, StoredFit | None]:
        """Refit the user unless this version's fit covers all their comparisons, holding their refit lease: LEASED
        (and no fit) if another replica holds it, so replicas reading or walking the same users fit each once."""
        fit = await self.store.get_fit(self.version, user)
        n, seq, gen = await self.store.counts(user)
        if not n or not stale(fit, seq, gen):
            return FRESH, fit
        if not await self.store.claim_refit(user, self._token, REFIT_LEASE_S):
            return LEASED, None
        try:
            return REFITTED, await self.refit(user, min_seq=seq, gen=gen)
        finally:
            await self.store.release_refit(user, self._token)

    async def refit(self, user: str, min_seq: int, gen: str) -> StoredFit | None:
        """Fit from all stored comparisons unless a fit covering append `min_seq` of generation `gen` is stored.

        Concurrent adapts of one user queue on the lock; the first refit usually covers the others' appends,
        which then return at once with the stored fit instead of fitting again. None: the user was deleted since
        (their generation is gone), so nothing of what was read may be stored or served.
        """
        async with self._lock(user):
            mark = self.weights.mark()
            current = await self.store.get_fit(self.version, user)
            if current is not None and not stale(current, min_seq, gen):
                return current
            data = await self.store.read_user(user)
            if not data.comparisons or data.gen != gen:  # deleted meanwhile
                return None
            feats = await self.features_for(data.comparisons)
            # A checkpoint user who was deleted starts again from the population, not from their old weights.
            seen = user in self.seen and not await self.store.is_forgotten(user)
            prior = self.seen[user] if seen else self.prior
            t0 = time.perf_counter()
            result = await asyncio.to_thread(self.fit, feats, prior)
            if self.metrics is not None:
                self.metrics.fit_seconds.observe(time.perf_counter() - t0)
            fit: StoredFit | None = StoredFit(
                weights=[float(x) for x in result.weights],
                n_fitted=result.n,
                seq=data.seq,
                accuracy=float(result.accuracy),
                confidence=float(result.confidence),
                source="adapt",
                fitted_at=time.time(),
                gen=data.gen,
            )
            if not await self.store.put_fit_if_newer(self.version, user, fit):
                # Another replica stored a newer fit, or the user was deleted meanwhile (then no fit of this
                # generation exists, and a new user's fit under the same id is not this request's).
                fit = await self.store.get_fit(self.version, user)
                if fit is not None and fit.gen != gen:
                    fit = None
            if fit is not None:
                self.weights.remember(user, fit.array, mark)
            return fit

    def fit(self, feats: ComparisonFeatures, prior: np.ndarray) -> FitResult:
        """One user's fit from their encoded comparisons, centred on `prior` (the population's, or a seen user's
        checkpoint weights): PAL's simplex weights, or a hierarchical model's deviation weights (prior precision
        from empirical Bayes at training time; PAL_PRIOR_STRENGTH applies to PAL only)."""
        if self.scorer.deviation is not None:
            return fit_hier(self.scorer.head, self.scorer.deviation, feats, prior)
        return fit_user(self.scorer.head, feats, prior, self.prior_strength)

    async def features_for(self, comparisons: list[Comparison]) -> ComparisonFeatures:
        """The comparisons through the encoder and the head's user-independent part, cached per comparison."""
        if len(comparisons) > 256:  # hashing a big user's texts (up to PAL_MAX_BYTES_PER_USER): off the event loop
            keys = await asyncio.to_thread(lambda: [comparison_key(c) for c in comparisons])
        else:
            keys = [comparison_key(c) for c in comparisons]
        rows = [self._features.get(k) for k in keys]
        missing = [i for i, r in enumerate(rows) if r is None]
        chunk = self._encode_chunk
        for start in range(0, len(missing), chunk):
            idx = missing[start : start + chunk]
            prompts = [comparisons[i].prompt for i in idx]
            texts = [comparisons[i].chosen for i in idx] + [comparisons[i].rejected for i in idx]
            enc = await self.batcher.encode(prompts + prompts, texts)
            m = len(idx)
            for j, i in enumerate(idx):
                protos = None if enc.prompt_prototypes is None else enc.prompt_prototypes[j].copy()
                dev = None if enc.deviation is None else enc.deviation[j] - enc.deviation[m + j]
                # Copies, not views: a cached row must not keep its whole encoder batch alive.
                rows[i] = (enc.latent[j].copy(), enc.latent[m + j].copy(), protos, dev)
                self._features.put(keys[i], rows[i])
        chosen = np.stack([r[0] for r in rows]).astype(np.float64)
        rejected = np.stack([r[1] for r in rows]).astype(np.float64)
        protos = None if rows[0][2] is None else np.stack([r[2] for r in rows]).astype(np.float64)
        dev = None if rows[0][3] is None else np.stack([r[3] for r in rows]).astype(np.float64)
        return ComparisonFeatures(chosen=chosen, rejected=rejected, prompt_prototypes=protos, deviation=dev)
