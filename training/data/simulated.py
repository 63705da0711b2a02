"""The PAL paper's synthetic ideal-point data: users prefer the item nearer their ideal point in R^d.

Prototypes ~ N(0, I/d). Partition setting: each user is one prototype (groups of equal size). Mixture
setting: a user's ideal point is a Dirichlet mixture of the prototypes. Items ~ N(0, I/d). Texts are ids
("item-17"); their vectors come from the returned table (EncoderSpec(kind="table")).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from training.data.schema import Comparison, PreferenceSplits

# Empty prompt: pair_text("", x) == x, so PAL-A's pair embedding is the item vector itself.
SIM_PROMPT = ""


@dataclass(frozen=True)
class SimulatedParams:
    k_star: int = 3
    dim: int = 16
    setting: Literal["partition", "mixture"] = "partition"
    n_seen_users: int = 50
    n_unseen_users: int = 30
    train_pairs: int = 200
    val_pairs: int = 50
    test_pairs: int = 50
    pool_pairs: int = 50
    unseen_test_pairs: int = 100
    n_items: int = 4000
    flip_prob: float = 0.0  # label noise: probability that a comparison's label is flipped
    dirichlet_alpha: float = 1.0
    seed: int = 0


@dataclass
class SimulatedData:
    splits: PreferenceSplits
    item_vectors: dict[str, np.ndarray]  # text -> vector, the embedding table
    prototypes: np.ndarray  # (K*, d)
    user_weights: dict[str, np.ndarray]  # true mixture of every user, seen and unseen


def build_simulated(p: SimulatedParams = SimulatedParams()) -> SimulatedData:
    rng = np.random.default_rng(p.seed)
    protos = rng.normal(0.0, 1.0 / np.sqrt(p.dim), size=(p.k_star, p.dim))
    items = rng.normal(0.0, 1.0 / np.sqrt(p.dim), size=(p.n_items, p.dim))
    names = [f"item-{i}" for i in range(p.n_items)]

    def user_mix(u: int) -> np.ndarray:
        if p.setting == "partition":
            return np.eye(p.k_star)[u % p.k_star]
        return rng.dirichlet(np.full(p.k_star, p.dirichlet_alpha))

    def pairs(uid: str, ideal: np.ndarray, n: int) -> list[Comparison]:
        out = []
        for _ in range(n):
            a, b = rng.choice(p.n_items, size=2, replace=False)
            a_wins = np.sum((items[a] - ideal) ** 2) < np.sum((items[b] - ideal) ** 2)
            if p.flip_prob > 0 and rng.random() < p.flip_prob:
                a_wins = not a_wins
            win, lose = (a, b) if a_wins else (b, a)
            out.append(Comparison(uid, SIM_PROMPT, names[win], names[lose]))
        return out

    info = {"builder": "simulated", "params": asdict(p)}
    splits = PreferenceSplits(f"simulated-{p.setting}", [], [], [], [], [], info)
    weights: dict[str, np.ndarray] = {}
    for u in range(p.n_seen_users + p.n_unseen_users):
        seen = u < p.n_seen_users
        uid = f"sim-{'seen' if seen else 'unseen'}-{u:03d}"
        weights[uid] = user_mix(u)
        ideal = weights[uid] @ protos
        if seen:
            splits.seen_train += pairs(uid, ideal, p.train_pairs)
            splits.seen_val += pairs(uid, ideal, p.val_pairs)
            splits.seen_test += pairs(uid, ideal, p.test_pairs)
        else:
            splits.unseen_pool += pairs(uid, ideal, p.pool_pairs)
            splits.unseen_test += pairs(uid, ideal, p.unseen_test_pairs)
    table = {n: items[i].astype(np.float32) for i, n in enumerate(names)}
    return SimulatedData(splits, table, protos, weights)
