"""Pluralistic objectives an item may be scored under instead of one user's reward.

- `weights`: an explicit preference vector on the simplex (Panacea conditions its policy on one): the model's
  reward under that mixture of prototypes.
- `linear` / `tchebycheff`: scalarisations of the prototype reward vector r_1..r_K for a preference `lambda`:
  sum_k lambda_k r_k, or -max_k lambda_k (z_k - r_k) with an ideal point z (default: the reward's upper bound,
  tau for PAL-B whose rewards are tau * cosine, 0 for PAL-A's negative distances; so rewards never depend on which
  other items share the request).
- `mean`: the expected reward over users (utilitarian): over the listed users, or every stored user.
- `maxmin`: MaxMin-RLHF's egalitarian reward: the mean reward of each group, then the worst group's. Groups are
  named sets of users, or k-means clusters of all stored users' weights (service.population).

A hierarchical model (global reward + personal deviation, models/deviation.py) has one prototype, the global
reward, and users' weights that are R unconstrained deviation weights: `mean` and `maxmin` average its users'
rewards (the reward is linear in w: the reward at their mean weights; nobody stored: the global reward), k-means
groups them on those weights, and linear / tchebycheff see a one-entry prototype vector (the global reward);
`weights`, a mixture of prototypes, has no meaning there and is refused (ObjectiveError: a 422 in /score, an
`objective_invalid` flag in the RLHF protocols).

The math is models/aggregate.py; this module validates the objectives and finds the weights they need.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models import aggregate as agg
from models.head import HeadParams
from service.errors import Invalid
from service.population import Population

KINDS = ("weights", "linear", "tchebycheff", "mean", "maxmin")

FitsFor = Callable[[list[str]], Awaitable[dict[str, np.ndarray]]]


class ObjectiveError(Invalid):
    """An objective that cannot be computed as asked (wrong K, not on the simplex, an empty group...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"objective: {reason}")
        self.reason = reason


def refuse_for_hier(obj: Objective) -> None:
    """A hierarchical model has no prototype mixture for a `weights` objective to weight: ObjectiveError."""
    if obj.kind == "weights":
        raise ObjectiveError(
            "this model form (hier: the global reward plus a personal deviation) has no prototypes to mix; score "
            "with a user_id, or the mean, maxmin, linear or tchebycheff objective"
        )


@dataclass(frozen=True)
class Objective:
    """Hashable, so items that share an objective are computed together."""

    kind: str
    preference: tuple[float, ...] | None = None  # `weights`, or lambda of `linear` / `tchebycheff`
    ideal: tuple[float, ...] | None = None  # `tchebycheff`
    users: tuple[str, ...] | None = None  # `mean` over these users (None: every stored user)
    groups: tuple[tuple[str, tuple[str, ...]], ...] | None = None  # `maxmin` over named groups (None: clusters)


@dataclass(frozen=True)
class ObjectiveRewards:
    rewards: np.ndarray  # (n,)
    group: list[str | None]  # maxmin: the worst-off group of each item
    users: int  # how many users the reward is over (0 for preference vectors)


def validate(obj: Objective, k: int, hier: bool = False) -> Objective:
    """Check what can be checked without Redis (against K prototypes; `hier`: a hierarchical model, which has no
    prototype mixture); ObjectiveError says what is wrong."""
    if obj.kind not in KINDS:
        raise ObjectiveError(f"objective kind must be one of {KINDS}, got {obj.kind!r}")
    if hier:
        refuse_for_hier(obj)
    try:
        if obj.kind in ("weights", "linear", "tchebycheff"):
            if obj.preference is None:
                raise ObjectiveError(f"objective {obj.kind!r} needs 'weights' (K={k} numbers on the simplex)")
            agg.check_simplex(obj.preference, k, "objective weights")
        if obj.ideal is not None:
            if obj.kind != "tchebycheff":
                raise ObjectiveError("'ideal' applies to the tchebycheff objective only")
            if len(obj.ideal) != k or not np.isfinite(obj.ideal).all():
                raise ObjectiveError(f"objective ideal must be K={k} finite numbers")
    except ValueError as e:
        raise ObjectiveError(str(e)) from e
    if obj.kind in ("mean", "maxmin") and obj.preference is not None:
        raise ObjectiveError(f"objective {obj.kind!r} takes users or groups, not weights")
    if obj.users is not None and (obj.kind != "mean" or not obj.users):
        raise ObjectiveError("'users' applies to the mean objective and must list at least one user")
    if obj.groups is not None:
        if obj.kind != "maxmin":
            raise ObjectiveError("'groups' applies to the maxmin objective only")
        if not obj.groups or any(not members for _, members in obj.groups):
            raise ObjectiveError("maxmin groups must be named, non-empty lists of users")
    return obj


def upper_bound(head: HeadParams) -> float:
    """The largest reward the head can give: tau (PAL-B, tau * cosine) or 0 (PAL-A, a negative squared distance)."""
    return head.tau if head.cfg.form == "B" else 0.0


async def compute(
    obj: Objective,
    head: HeadParams,
    latent: np.ndarray,
    prototypes: np.ndarray | None,
    prior: np.ndarray,
    population: Population,
    fits_for: FitsFor,
    deviation: np.ndarray | None = None,
) -> ObjectiveRewards:
    """Rewards of n items (their encoder outputs; a hierarchical model's deviation features too) under one
    objective. Users without stored weights count with the population prior, as they are scored."""
    n = len(latent)
    if deviation is not None:
        refuse_for_hier(obj)
    none: list[str | None] = [None] * n
    if obj.kind == "weights":
        assert obj.preference is not None
        r = agg.user_rewards(head, latent, prototypes, np.asarray([obj.preference]))[:, 0]
        return ObjectiveRewards(r, none, 0)
    if obj.kind in ("linear", "tchebycheff"):
        vector = agg.prototype_vector(head, latent, prototypes)
        lam = np.asarray(obj.preference)
        if obj.kind == "linear":
            return ObjectiveRewards(agg.linear_scalarization(vector, lam), none, 0)
        ideal = np.asarray(obj.ideal) if obj.ideal is not None else np.full(head.cfg.k, upper_bound(head))
        return ObjectiveRewards(agg.tchebycheff_scalarization(vector, lam, ideal), none, 0)
    if obj.kind == "mean":
        if obj.users is not None:
            weights = await _weights_of(list(obj.users), prior, fits_for)
        else:
            weights = (await population.snapshot()).weights
            if len(weights) == 0:
                weights = prior[None, :]
        # O(items x users) numpy: on a worker thread, never on the event loop.
        mean, count = await asyncio.to_thread(
            agg.mean_reward, head, latent, prototypes, agg.weight_blocks(weights), deviation
        )
        return ObjectiveRewards(mean, none, count)
    # maxmin
    if obj.groups is not None:
        names = [name for name, _ in obj.groups]
        members = [list(users) for _, users in obj.groups]
        everyone = await _weights_of([u for group in members for u in group], prior, fits_for)
        labels = np.repeat(np.arange(len(members)), [len(m) for m in members])
    else:
        snap = await population.snapshot()
        everyone, labels = snap.weights, snap.labels
        names = [f"cluster-{g}" for g in range(len(snap.centers))]
        if len(everyone) == 0:
            everyone, labels, names = prior[None, :], np.zeros(1, dtype=int), ["population"]
    groups = await asyncio.to_thread(
        agg.group_means, head, latent, prototypes, everyone, labels, len(names), deviation
    )
    worst, which = agg.maxmin_reward(groups)
    return ObjectiveRewards(worst, [names[g] for g in which], len(everyone))


async def _weights_of(users: Sequence[str], prior: np.ndarray, fits_for: FitsFor) -> np.ndarray:
    fits = await fits_for(sorted(set(users)))
    return np.stack([fits.get(u, prior) for u in users])
