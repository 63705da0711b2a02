"""The hierarchical reward (global K=1 reward + low-rank personal deviation) and LoRe, trained on top of a
trained K=1 checkpoint and evaluated like any model of `pal eval` (same splits, same numbers in report.json).

    hier:  r_u(x) = g(x) + w_u . V e(x),  w_u ~ N(0, diag(sigma^2))      zero shots == the global model exactly
    lore:  r_u(x) =        w_u . V e(x),  w_u ~ N(mean w, diag(sigma^2))  LoRe: a low-rank basis, no global term

g is the K=1 checkpoint's reward (frozen), e(x) the frozen item embedding, V (K, d) the deviation basis. V and
the seen users' weights are trained together (BTL loss, L2 on both: a rank-K factorisation with a nuclear-norm
like penalty), the epoch chosen on seen users' validation pairs; for `hier` epoch 0 (V random, every w = 0) is
the global model itself, so the deviation is kept only when an epoch beats it on validation. sigma^2 is
empirical Bayes: the seen users' spread of fitted weights. Unseen users are fitted with
models.deviation.fit_deviation (the one fitter) on their first n pool pairs.

`python -m training.hierarchical RUN_DIR --preset polis` adds both models to an existing `pal eval --seeds`
run (its K=1 checkpoints, the same splits from the same seeds) and rewrites RUN_DIR/report.json.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.deviation import empirical_bayes_precision, fit_deviation
from models.head import HeadParams, margins
from training.encoded import EncodedComparisons, rows_by_user
from training.fewshot import SHOTS, FeatureTable
from training.threads import limit_threads
from training.train import accuracy_of_margins


@dataclass(frozen=True)
class DeviationConfig:
    rank: int = 2  # K of the deviation basis
    l2: float = 10.0  # on the basis and on the seen users' weights, against the summed (not mean) pair losses
    lr: float = 0.05
    max_epochs: int = 300  # full-batch Adam steps
    eval_every: int = 5
    patience: int = 60
    seed: int = 0
    # hier only: the number of user folds of a cross-validation (`cv_gain`) that keeps the deviation only if it
    # helps seen users held out of its training; else the model is the global one. None: validation pool only.
    cv_folds: int | None = None
    cv_shots: tuple[int, ...] = (5, 20)


@dataclass(frozen=True)
class Pairs:
    """One split as the deviation model sees it: global margins, embedding differences, users."""

    global_margin: np.ndarray  # (n,) g(chosen) - g(rejected); zeros for LoRe
    diff: np.ndarray  # (n, d) e(chosen) - e(rejected)
    users: list[str]

    @classmethod
    def build(cls, head: HeadParams, enc: EncodedComparisons, use_global: bool) -> Pairs:
        e = enc.item_vecs.astype(np.float64)
        gm = np.zeros(len(enc))
        if use_global and len(enc):
            gm = margins(head, FeatureTable.build(head, enc).features(np.arange(len(enc))), np.ones(1))
        return cls(gm, e[enc.chosen_idx] - e[enc.rejected_idx], list(enc.users))

    def subset(self, rows: np.ndarray) -> Pairs:
        return Pairs(self.global_margin[rows], self.diff[rows], [self.users[i] for i in rows])

    def user_rows(self) -> dict[str, np.ndarray]:
        return rows_by_user(self.users)


@dataclass(frozen=True)
class DeviationModel:
    basis: np.ndarray  # (K, d)
    user_weights: dict[str, np.ndarray]  # seen users
    prior_mean: np.ndarray  # (K,)
    precision: np.ndarray  # (K,) empirical Bayes
    best_epoch: int
    val_accuracy: float

    def user_margins(self, p: Pairs, rows: np.ndarray, w: np.ndarray) -> np.ndarray:
        return p.global_margin[rows] + (p.diff[rows] @ self.basis.T) @ w

    def fit(self, p: Pairs, rows: np.ndarray) -> np.ndarray:
        return fit_deviation(p.global_margin[rows], p.diff[rows] @ self.basis.T, self.prior_mean, self.precision)


def train_deviation(
    train: Pairs, val: Pairs, use_global: bool, cfg: DeviationConfig = DeviationConfig()
) -> DeviationModel:
    users = sorted(set(train.users))
    index = {u: i for i, u in enumerate(users)}
    keep = np.asarray([u in index for u in val.users], dtype=bool)
    uidx = torch.as_tensor([index[u] for u in train.users])
    vidx = torch.as_tensor([index[u] for u, k in zip(val.users, keep, strict=True) if k], dtype=torch.long)
    g, d = torch.from_numpy(train.global_margin), torch.from_numpy(train.diff)
    vg, vd = torch.from_numpy(val.global_margin[keep]), torch.from_numpy(val.diff[keep])
    gen = torch.Generator().manual_seed(cfg.seed)
    basis = torch.nn.Parameter(0.1 * torch.randn(cfg.rank, d.shape[1], generator=gen, dtype=torch.float64))
    # hier starts at the global model (w = 0); LoRe has no global term, so its weights need a random start.
    w0 = 0.0 if use_global else 0.1
    weights = torch.nn.Parameter(w0 * torch.randn(len(users), cfg.rank, generator=gen, dtype=torch.float64))
    opt = torch.optim.Adam([basis, weights], lr=cfg.lr)

    @torch.no_grad()
    def validate() -> tuple[float, float]:
        m = vg + (weights[vidx] * (vd @ basis.T)).sum(-1)
        return accuracy_of_margins(m), float(torch.nn.functional.softplus(-m).mean())

    best = validate() if use_global else (-1.0, float("inf"))
    state, best_epoch = (copy.deepcopy(basis.detach()), copy.deepcopy(weights.detach())), 0
    for epoch in range(1, cfg.max_epochs + 1):
        m = g + (weights[uidx] * (d @ basis.T)).sum(-1)
        loss = torch.nn.functional.softplus(-m).sum() + 0.5 * cfg.l2 * ((weights**2).sum() + (basis**2).sum())
        opt.zero_grad(set_to_none=True)
        (loss / len(m)).backward()
        opt.step()
        if epoch % cfg.eval_every:
            continue
        acc = validate()
        if (acc[0], -acc[1]) > (best[0], -best[1]):
            best, best_epoch = acc, epoch
            state = (copy.deepcopy(basis.detach()), copy.deepcopy(weights.detach()))
        elif epoch - best_epoch > cfg.patience:
            break
    b, w = state[0].numpy(), state[1].numpy()
    mean = np.zeros(cfg.rank) if use_global else w.mean(0)
    return DeviationModel(
        b, {u: w[i] for u, i in index.items()}, mean, empirical_bayes_precision(w, mean), best_epoch, best[0]
    )


def cv_gain(train: Pairs, val: Pairs, cfg: DeviationConfig) -> float:
    """Mean few-shot gain over the global model for seen users held out of the deviation's training: users are
    split into cfg.cv_folds folds; for each, the basis is trained on the other folds' users, and each held-out user
    is fitted on n of its training pairs and scored on its validation pairs (new statements in `polis`), against
    the global model on the same pairs. Uses every seen user, not one small validation pool."""
    folds = cfg.cv_folds or 3
    users = sorted(set(train.users))
    users = [users[i] for i in np.random.default_rng(cfg.seed).permutation(len(users))]
    t_rows, v_rows = train.user_rows(), val.user_rows()
    gains = []
    for f in range(folds):
        held = set(users[f::folds])
        keep_t = np.asarray([u not in held for u in train.users])
        keep_v = np.asarray([u not in held for u in val.users])
        model = train_deviation(train.subset(np.flatnonzero(keep_t)), val.subset(np.flatnonzero(keep_v)), True, cfg)
        for u in sorted(held & set(v_rows)):
            rows = np.random.default_rng(len(gains)).permutation(t_rows[u])
            base = accuracy_of_margins(val.global_margin[v_rows[u]])
            for n in cfg.cv_shots:
                w = model.fit(train, rows[:n])
                gains.append(accuracy_of_margins(model.user_margins(val, v_rows[u], w)) - base)
    return float(np.mean(gains)) if gains else 0.0


def global_only(rank: int, dim: int, users: list[str], val_accuracy: float) -> DeviationModel:
    """The hierarchical model with no deviation: every user, seen or new, gets the global reward."""
    zero = np.zeros(rank)
    return DeviationModel(np.zeros((rank, dim)), dict.fromkeys(users, zero), zero, np.full(rank, 1e6), 0, val_accuracy)


def evaluate_deviation(
    head: HeadParams,
    encs: dict[str, EncodedComparisons],
    use_global: bool,
    shots: Sequence[int] = SHOTS,
    cfg: DeviationConfig = DeviationConfig(),
) -> dict[str, Any]:
    """The numbers `pal eval` reports for a model (seen test accuracy, zero-shot and n-shot unseen accuracy)."""
    with limit_threads(1):
        p = {s: Pairs.build(head, e, use_global) for s, e in encs.items()}
        model = train_deviation(p["seen_train"], p["seen_val"], use_global, cfg)
        gain = None
        if use_global and cfg.cv_folds and model.best_epoch > 0:
            gain = cv_gain(p["seen_train"], p["seen_val"], cfg)
            if gain <= 0:  # the deviation does not carry to held-out users: serve the global model
                dim = p["seen_train"].diff.shape[1]
                model = global_only(cfg.rank, dim, sorted(model.user_weights), model.val_accuracy)
        seen_rows = np.arange(len(p["seen_test"].users))
        seen_w = np.stack([model.user_weights.get(u, model.prior_mean) for u in p["seen_test"].users])
        seen_m = p["seen_test"].global_margin + ((p["seen_test"].diff @ model.basis.T) * seen_w).sum(-1)
        pool_rows, test_rows = p["unseen_pool"].user_rows(), p["unseen_test"].user_rows()
        users = sorted(u for u in test_rows if u in pool_rows)
        test = p["unseen_test"]
        curve = {}
        for n in shots:
            accs = [
                accuracy_of_margins(
                    model.user_margins(test, test_rows[u], model.fit(p["unseen_pool"], pool_rows[u][:n]))
                )
                for u in users
            ]
            full = sum(len(pool_rows[u]) >= n for u in users)
            curve[str(n)] = {"accuracy": float(np.mean(accs)), "n_users": len(users), "n_users_with_full_shots": full}
        # over every unseen user with test pairs, as training.fewshot.zero_shot_accuracy counts them
        zero = float(
            np.mean([accuracy_of_margins(model.user_margins(test, r, model.prior_mean)) for r in test_rows.values()])
        )
    return {
        "k": cfg.rank,
        "form": "hier" if use_global else "lore",
        "best_epoch": model.best_epoch,
        "cv_gain": gain,
        "seen_val_accuracy": model.val_accuracy,
        "seen_test_accuracy": accuracy_of_margins(seen_m[seen_rows]),
        "prior_sigma": (1.0 / np.sqrt(model.precision)).tolist(),
        "unseen_zero_shot_accuracy": zero,
        "unseen_fewshot": curve,
    }


def add_to_run(run_dir: Path, preset: str, shots: Sequence[int] | None = None) -> dict[str, Any]:
    """Add `hier` and `lore` to every seed of a `pal eval --seeds` run and rewrite its aggregate report."""
    from training.evaluate import deviation_models, encode_splits, summarize
    from training.presets import experiments
    from training.seeds import write_report

    top = json.loads((run_dir / "report.json").read_text())
    seeds = top["seeds"]
    runs = []
    for s in seeds:
        path = run_dir / f"seed{s}" / "report.json"
        run = json.loads(path.read_text())
        encoder = run["experiments"][0]["encoder"]["name_or_path"]  # the run's own encoder (`--encoder`)
        exps = {e.name: e for e in experiments(preset, s, encoder=encoder)}
        for rep in run["experiments"]:
            exp = exps[rep["experiment"]]
            encs = encode_splits(exp)
            rep["models"].update(deviation_models(rep["models"]["1"]["checkpoint"], encs, shots or run["shots"], s))
            print(s, rep["experiment"], file=sys.stderr, flush=True)
        run["summary"] = summarize(run["experiments"], run["ks"], run["shots"])
        path.write_text(json.dumps(run, indent=2))
        runs.append(run)
    return write_report(runs, seeds, run_dir, top["title"])


def write_hier_checkpoint(
    k1_checkpoint: str | Path, model: DeviationModel, out_dir: str | Path, metrics: dict[str, Any] | None = None
) -> Path:
    """The served form of a `hier` model: a copy of its K=1 checkpoint (the global reward) plus its deviation
    (basis, prior, and the weights of the checkpoint's seen users: the trained ones, the prior mean for a user the
    deviation was not trained on), sealed under a version of its own; config.json written once, with `metrics`.
    `pal export` turns it into a bundle whose /adapt fits with models.deviation.fit_deviation."""
    import shutil

    from models.checkpoint import CONFIG_FILE, add_deviation, read_checkpoint, write_config
    from models.deviation import Deviation

    src, out = Path(k1_checkpoint), Path(out_dir)
    ckpt = read_checkpoint(src)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(CONFIG_FILE))
    weights = np.stack([model.user_weights.get(u, model.prior_mean) for u in ckpt.user_ids]).reshape(
        len(ckpt.user_ids), len(model.prior_mean)
    )
    deviation = Deviation(model.basis, model.prior_mean, model.precision, weights)
    meta = add_deviation(out, ckpt.meta, deviation)
    meta.metrics.update(metrics or {})
    write_config(out, meta)
    return out



def served_hier_checkpoint(
    k1_checkpoint: str | Path,
    encs: dict[str, EncodedComparisons],
    measured: dict[str, Any],
    out_dir: str | Path,
    cfg: DeviationConfig = DeviationConfig(),
) -> Path | None:
    """Write the `hier` model that evaluate_deviation measured (`measured`, its report) as a servable checkpoint
    in out_dir, if its deviation was kept: an epoch beat the global model on validation (best_epoch > 0) and,
    where the user-level cross-validation ran, it carried to held-out users (cv_gain > 0). Else None: the global
    model is what hier would serve, and K=1 is served as is. The deviation is trained again with the same config
    and seed (deterministic on one thread), and checked to be the measured one."""
    if measured["best_epoch"] <= 0 or (measured.get("cv_gain") is not None and measured["cv_gain"] <= 0):
        return None
    from models.checkpoint import read_checkpoint

    head = read_checkpoint(k1_checkpoint).head_params
    with limit_threads(1):
        p = {s: Pairs.build(head, encs[s], True) for s in ("seen_train", "seen_val")}
        model = train_deviation(p["seen_train"], p["seen_val"], True, cfg)
    if (model.best_epoch, model.val_accuracy) != (measured["best_epoch"], measured["seen_val_accuracy"]):
        got, want = model.best_epoch, measured["best_epoch"]
        print(f"hier not written: training it again gave epoch {got}, not {want}", file=sys.stderr)
        return None
    return write_hier_checkpoint(k1_checkpoint, model, out_dir, measured)


if __name__ == "__main__":
    add_to_run(Path(sys.argv[1]), sys.argv[sys.argv.index("--preset") + 1])
