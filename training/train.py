"""Train a PALModel on embedding arrays: BTL (or hinge) loss, AdamW with separate learning rates for the
shared head and the users' simplex logits, mini-batches, best epoch chosen on the validation split."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.config import PALConfig
from models.pal import PALModel, preference_loss
from training.encoded import EncodedComparisons
from training.threads import limit_threads


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 256
    lr: float = 3e-3  # shared head parameters
    user_lr: float = 5e-2  # users' simplex logits: few parameters, each seen by few comparisons
    weight_decay: float = 1e-2  # shared head only; user logits are not decayed towards uniform
    loss: str = "logistic"
    hinge_margin: float = 1.0
    patience: int = 10  # stop after this many epochs without a better validation accuracy
    seed: int = 0
    # The head's matrices are small: one thread avoids OpenMP sync costs that dominate on shared cores.
    threads: int = 1
    # K > 1 starts from the trained K=1 (global) model (`pal eval` trains it first): every prototype a copy of
    # the global one plus warm_start_noise relative noise, so training begins at the global reward, and that
    # starting point (epoch 0) is kept unless an epoch beats it on validation.
    warm_start: bool = False
    warm_start_noise: float = 0.01
    # `pal eval` also fits the hierarchical reward (global K=1 + low-rank deviation) and LoRe on the trained K=1
    # model and reports them beside K=1 and K (training.hierarchical); evaluation only, nothing is served.
    deviation_models: bool = False


@dataclass
class TrainResult:
    model: PALModel
    user_ids: list[str]
    best_epoch: int
    val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "val_accuracy": self.val_accuracy, "epochs_run": len(self.history)}


class Batches:
    """Index arrays of an encoded split, with comparisons of unknown users dropped. Embedding rows are gathered per
    batch, so the table may be a memory-mapped one (training.shards.ShardedVectors) that never sits in memory."""

    def __init__(self, enc: EncodedComparisons, user_index: dict[str, int]) -> None:
        codes = np.fromiter((user_index.get(u, -1) for u in enc.users), dtype=np.int64, count=len(enc.users))
        rows = np.flatnonzero(codes >= 0)
        self.n = len(rows)
        self.prompt_vecs = _float32(enc.prompt_vecs)
        self.item_vecs = _float32(enc.item_vecs)
        self.prompt_idx = np.asarray(enc.prompt_idx)[rows]
        self.chosen_idx = np.asarray(enc.chosen_idx)[rows]
        self.rejected_idx = np.asarray(enc.rejected_idx)[rows]
        self.user_idx = torch.from_numpy(codes[rows])

    def margin(self, model: PALModel, sel: torch.Tensor | slice) -> torch.Tensor:
        at = sel.numpy() if isinstance(sel, torch.Tensor) else sel
        return model.margin(
            _gather(self.prompt_vecs, self.prompt_idx[at]),
            _gather(self.item_vecs, self.chosen_idx[at]),
            _gather(self.item_vecs, self.rejected_idx[at]),
            self.user_idx[sel],
        )


def _float32(vecs: Any) -> Any:
    """In-memory tables become float32 once (as training always used them); a memory-mapped one stays on disk."""
    return np.asarray(vecs, dtype=np.float32) if isinstance(vecs, np.ndarray) else vecs


def _gather(vecs: Any, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(vecs[rows], dtype=np.float32))


def accuracy_of_margins(m: np.ndarray | torch.Tensor) -> float:
    """Fraction ranked correctly; an exact tie counts as half (a constant model scores 0.5, not 0)."""
    m = np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m)
    return float(((m > 0) + 0.5 * (m == 0)).mean()) if len(m) else float("nan")


@torch.no_grad()
def evaluate(model: PALModel, batches: Batches, chunk: int = 8192) -> tuple[float, float]:
    """(accuracy, mean loss) over a split."""
    model.eval()
    ms = [batches.margin(model, slice(s, s + chunk)) for s in range(0, batches.n, chunk)]
    m = torch.cat(ms) if ms else torch.zeros(0)
    loss = float(preference_loss(m).item()) if len(m) else float("nan")
    return accuracy_of_margins(m), loss


def train_pal(
    cfg: PALConfig,
    train: EncodedComparisons,
    val: EncodedComparisons,
    tc: TrainConfig = TrainConfig(),
    progress: bool = True,
    init: PALModel | None = None,
) -> TrainResult:
    with limit_threads(tc.threads):
        return _train(cfg, train, val, tc, progress, init)


@torch.no_grad()
def warm_start(model: PALModel, global_model: PALModel, noise: float, seed: int) -> None:
    """Copy a K=1 model into a K-prototype one: shared f and tau as they are, each prototype (PAL-B: each g_k
    MLP; PAL-A: each prototype point) the global one times (1 + noise * N(0, 1)). With equal prototypes every
    mixture gives the global reward, so the K model starts exactly where the global one ended."""
    if global_model.head.cfg.k != 1:
        raise ValueError(f"warm start needs a K=1 model, got K={global_model.head.cfg.k}")
    gen = torch.Generator().manual_seed(seed + 7)
    src, dst = dict(global_model.head.named_parameters()), dict(model.head.named_parameters())
    for name, p in dst.items():
        g = src[name]
        if name.startswith("g.") or name == "prototypes":
            rep = g.expand_as(p).clone()
            p.copy_(rep * (1 + noise * torch.randn(rep.shape, generator=gen)))
        else:
            p.copy_(g)


def _train(
    cfg: PALConfig,
    train: EncodedComparisons,
    val: EncodedComparisons,
    tc: TrainConfig,
    progress: bool,
    init: PALModel | None = None,
) -> TrainResult:
    torch.manual_seed(tc.seed)
    user_ids = sorted(set(train.users))
    user_index = {u: i for i, u in enumerate(user_ids)}
    model = PALModel(cfg, n_users=len(user_ids), seed=tc.seed)
    if init is not None:
        warm_start(model, init, tc.warm_start_noise, tc.seed)
    tr, va = Batches(train, user_index), Batches(val, user_index)
    opt = torch.optim.AdamW(
        [
            {"params": list(model.head.parameters()), "lr": tc.lr, "weight_decay": tc.weight_decay},
            {"params": [model.user_logits], "lr": tc.user_lr, "weight_decay": 0.0},
        ]
    )
    gen = torch.Generator().manual_seed(tc.seed)
    best = (-1.0, float("inf"))
    best_state, best_epoch, history = copy.deepcopy(model.state_dict()), 0, []
    if init is not None:  # epoch 0 is the global model itself: a candidate like any epoch
        best = evaluate(model, va)
        history.append({"epoch": 0, "train_loss": float("nan"), "val_acc": best[0], "val_loss": best[1]})
    bar = tqdm(range(1, tc.epochs + 1), desc=f"train K={cfg.k}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(tr.n, generator=gen)
        total = 0.0
        for s in range(0, tr.n, tc.batch_size):
            sel = perm[s : s + tc.batch_size]
            loss = preference_loss(tr.margin(model, sel), tc.loss, tc.hinge_margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(sel)
        val_acc, val_loss = evaluate(model, va)
        history.append({"epoch": epoch, "train_loss": total / max(tr.n, 1), "val_acc": val_acc, "val_loss": val_loss})
        bar.set_postfix(loss=f"{total / max(tr.n, 1):.3f}", val_acc=f"{val_acc:.3f}")
        # Best validation accuracy; validation loss breaks ties (accuracy saturates on easy data).
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best, best_state, best_epoch = (val_acc, val_loss), copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= tc.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, user_ids, best_epoch, best[0], history)


def seen_accuracy(result: TrainResult, enc: EncodedComparisons) -> float:
    return evaluate(result.model, Batches(enc, {u: i for i, u in enumerate(result.user_ids)}))[0]


def config_dict(tc: TrainConfig) -> dict[str, Any]:
    return asdict(tc)
