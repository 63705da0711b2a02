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

Where training knows the held-out statements (Polis `pairs`), hier's basis also has a free vector per statement,
b(x) = V e(x) + c_x (collaborative filtering; c_x = 0 for a statement outside training, keyed by
models.deviation.statement_key); on new statements hier is the best of RESTARTS restarts by user-level
cross-validation (cv_gain). training.evaluate.deviation_models makes that choice from seen users' data only.

`python -m training.hierarchical RUN_DIR --preset polis` adds both models to an existing `pal eval --seeds`
run (its K=1 checkpoints, the same splits from the same seeds) and rewrites RUN_DIR/report.json.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.deviation import empirical_bayes_precision, fit_deviation, statement_key
from models.head import HeadParams, margins
from training.data.schema import Comparison
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
    # Per-statement deviation vectors (collaborative filtering): b(x) = V e(x) + c_x with c_x in R^rank free for
    # every statement in the seen users' training pairs (zero for any other statement), L2 `item_l2` on each.
    # None: b(x) = V e(x) only. Needs statement keys on the Pairs (Pairs.build(..., keys=statement_keys(...))).
    item_l2: float | None = None


def statement_keys(comparisons: Sequence[Comparison]) -> tuple[np.ndarray, np.ndarray]:
    """The statement key (models.deviation.statement_key: a digest of prompt and text) of each comparison's
    chosen and rejected item: identical statements in different splits share a key, so a per-statement vector
    learned on training pairs applies to a held-out pair of known statements."""
    keys = {(c.prompt, t): statement_key(c.prompt, t) for c in comparisons for t in (c.chosen, c.rejected)}
    return (
        np.asarray([keys[c.prompt, c.chosen] for c in comparisons], dtype=str),
        np.asarray([keys[c.prompt, c.rejected] for c in comparisons], dtype=str),
    )


@dataclass(frozen=True)
class Pairs:
    """One split as the deviation model sees it: global margins, embedding differences, users, and (optional)
    the statement keys of the chosen and rejected items."""

    global_margin: np.ndarray  # (n,) g(chosen) - g(rejected); zeros for LoRe
    diff: np.ndarray  # (n, d) e(chosen) - e(rejected)
    users: list[str]
    chosen_key: np.ndarray | None = None  # (n,) str
    rejected_key: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        head: HeadParams,
        enc: EncodedComparisons,
        use_global: bool,
        keys: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Pairs:
        e = enc.item_vecs.astype(np.float64)
        gm = np.zeros(len(enc))
        if use_global and len(enc):
            gm = margins(head, FeatureTable.build(head, enc).features(np.arange(len(enc))), np.ones(1))
        ck, rk = keys if keys is not None else (None, None)
        return cls(gm, e[enc.chosen_idx] - e[enc.rejected_idx], list(enc.users), ck, rk)

    def subset(self, rows: np.ndarray) -> Pairs:
        ck = None if self.chosen_key is None else self.chosen_key[rows]
        rk = None if self.rejected_key is None else self.rejected_key[rows]
        return Pairs(self.global_margin[rows], self.diff[rows], [self.users[i] for i in rows], ck, rk)

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
    # statement key -> c_x (K,) when trained with per-statement vectors; a statement not in it has c_x = 0
    item_vectors: dict[str, np.ndarray] = field(default_factory=dict)

    def basis_margins(self, p: Pairs, rows: np.ndarray) -> np.ndarray:
        """(len(rows), K): b(chosen) - b(rejected), b(x) = V e(x) + c_x."""
        out = p.diff[rows] @ self.basis.T
        if self.item_vectors and p.chosen_key is not None and p.rejected_key is not None:
            zero = np.zeros(len(self.basis))
            table = self.item_vectors
            pairs = zip(p.chosen_key[rows], p.rejected_key[rows], strict=True)
            out = out + np.asarray([table.get(a, zero) - table.get(b, zero) for a, b in pairs]).reshape(out.shape)
        return out

    def user_margins(self, p: Pairs, rows: np.ndarray, w: np.ndarray) -> np.ndarray:
        return p.global_margin[rows] + self.basis_margins(p, rows) @ w

    def fit(self, p: Pairs, rows: np.ndarray) -> np.ndarray:
        return fit_deviation(p.global_margin[rows], self.basis_margins(p, rows), self.prior_mean, self.precision)


def _item_index(p: Pairs, vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the per-statement table for each pair's chosen and rejected item; len(vocab) (a zero row) for a
    statement not in the vocabulary."""
    assert p.chosen_key is not None and p.rejected_key is not None
    n = len(vocab)
    return (
        torch.as_tensor([vocab.get(k, n) for k in p.chosen_key], dtype=torch.long),
        torch.as_tensor([vocab.get(k, n) for k in p.rejected_key], dtype=torch.long),
    )


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
    params = [basis, weights]
    items = cfg.item_l2 is not None and train.chosen_key is not None and val.chosen_key is not None
    vocab: dict[str, int] = {}
    if items:  # per-statement vectors c_x: a table with one extra zero row for statements outside training
        vocab = {k: i for i, k in enumerate(sorted(set(train.chosen_key) | set(train.rejected_key)))}  # type: ignore[arg-type]
        ci, ri = _item_index(train, vocab)
        vci, vri = _item_index(val.subset(np.flatnonzero(keep)), vocab)
        table = torch.nn.Parameter(0.1 * torch.randn(len(vocab), cfg.rank, generator=gen, dtype=torch.float64))
        params.append(table)
    pad = torch.zeros(1, cfg.rank, dtype=torch.float64)
    opt = torch.optim.Adam(params, lr=cfg.lr)

    def features(diff: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        out = diff @ basis.T
        if rows is not None:
            c = torch.cat([table, pad])
            out = out + c[rows[0]] - c[rows[1]]
        return out

    @torch.no_grad()
    def validate() -> tuple[float, float]:
        m = vg + (weights[vidx] * features(vd, (vci, vri) if items else None)).sum(-1)
        return accuracy_of_margins(m), float(torch.nn.functional.softplus(-m).mean())

    def snapshot() -> list[torch.Tensor]:
        return [copy.deepcopy(x.detach()) for x in params]

    best = validate() if use_global else (-1.0, float("inf"))
    state, best_epoch = snapshot(), 0
    for epoch in range(1, cfg.max_epochs + 1):
        m = g + (weights[uidx] * features(d, (ci, ri) if items else None)).sum(-1)
        loss = torch.nn.functional.softplus(-m).sum() + 0.5 * cfg.l2 * ((weights**2).sum() + (basis**2).sum())
        if items:
            loss = loss + 0.5 * float(cfg.item_l2) * (table**2).sum()  # type: ignore[arg-type]
        opt.zero_grad(set_to_none=True)
        (loss / len(m)).backward()
        opt.step()
        if epoch % cfg.eval_every:
            continue
        acc = validate()
        if (acc[0], -acc[1]) > (best[0], -best[1]):
            best, best_epoch = acc, epoch
            state = snapshot()
        elif epoch - best_epoch > cfg.patience:
            break
    b, w = state[0].numpy(), state[1].numpy()
    c = {k: state[2][i].numpy().copy() for k, i in vocab.items()} if items and best_epoch > 0 else {}
    mean = np.zeros(cfg.rank) if use_global else w.mean(0)
    return DeviationModel(
        b, {u: w[i] for u, i in index.items()}, mean, empirical_bayes_precision(w, mean), best_epoch, best[0], c
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


def known_statements(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether most statements of the seen users' validation pairs (statement_keys) are in their training pairs
    (Polis `pairs` hold-out: collaborative filtering), so that per-statement vectors can help held-out pairs of
    those statements. Decided on training and validation data only."""
    held = np.concatenate(val)
    if not len(held):
        return False
    known = set(np.concatenate(train).tolist())
    return bool(np.mean([k in known for k in held.tolist()]) >= 0.5)


# hier's candidates (rank, L2 on basis and weights, L2 on per-statement vectors) where statements are known
KNOWN_STATEMENT_GRID: tuple[tuple[int, float, float | None], ...] = ((16, 1.0, 0.3),)


RESTARTS = 8  # hier on new statements: restarts of the deviation training, the one kept chosen by cv_gain


def restart_grid(cfg: DeviationConfig, n: int = RESTARTS) -> list[DeviationConfig]:
    """n restarts of cfg (seeds cfg.seed + 1000 r; r = 0 is cfg itself)."""
    return [replace(cfg, seed=cfg.seed + 1000 * r) for r in range(n)]


def known_statement_grid(
    cfg: DeviationConfig, keys: dict[str, tuple[np.ndarray, np.ndarray]] | None
) -> list[DeviationConfig]:
    """cfg varied over KNOWN_STATEMENT_GRID when the seen users' validation statements are known to training;
    else no grid (hier as before: cfg alone, no per-statement vectors)."""
    if not keys or not known_statements(keys["seen_train"], keys["seen_val"]):
        return []
    return [replace(cfg, rank=r, l2=l2, item_l2=il2) for r, l2, il2 in KNOWN_STATEMENT_GRID]


def grid_key(cfg: DeviationConfig) -> str:
    return f"rank {cfg.rank}, l2 {cfg.l2}, item_l2 {cfg.item_l2}, seed {cfg.seed}"


def choose_deviation(
    train: Pairs, val: Pairs, use_global: bool, grid: Sequence[DeviationConfig], choose_on: str = "val"
) -> tuple[DeviationModel, DeviationConfig, dict[str, float]]:
    """Train every config of the grid; keep the one with the best score (the first on ties): "val", the seen
    users' validation accuracy, or "cv", the few-shot gain of seen users held out of the basis (cv_gain: what a
    new user gets). Returns it, its config and every candidate's score (grid_key -> score). A grid that varies only
    the seed is restarts chosen on seen users."""
    best: tuple[float, DeviationModel, DeviationConfig] | None = None
    scores: dict[str, float] = {}
    for cfg in grid:
        model = train_deviation(train, val, use_global, cfg)
        score = model.val_accuracy if choose_on == "val" else cv_gain(train, val, cfg)
        scores[grid_key(cfg)] = score
        if best is None or score > best[0]:
            best = (score, model, cfg)
    assert best is not None, "an empty grid"
    return best[1], best[2], scores


def global_only(rank: int, dim: int, users: list[str], val_accuracy: float) -> DeviationModel:
    """The hierarchical model with no deviation: every user, seen or new, gets the global reward."""
    zero = np.zeros(rank)
    return DeviationModel(np.zeros((rank, dim)), dict.fromkeys(users, zero), zero, np.full(rank, 1e6), 0, val_accuracy)


def measure_deviation(
    head: HeadParams,
    encs: dict[str, EncodedComparisons],
    use_global: bool,
    shots: Sequence[int] = SHOTS,
    cfg: DeviationConfig = DeviationConfig(),
    keys: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    grid: Sequence[DeviationConfig] = (),
    choose_on: str = "val",
) -> tuple[dict[str, Any], DeviationModel]:
    """The numbers `pal eval` reports for a model (seen test accuracy, zero-shot and n-shot unseen accuracy), and
    the model measured (what served_hier_checkpoint writes). keys: each split's statement keys (statement_keys),
    needed by per-statement vectors (cfg.item_l2). grid: candidate configs instead of cfg alone, the one kept
    chosen on seen users (choose_deviation)."""
    with limit_threads(1):
        p = {s: Pairs.build(head, e, use_global, keys[s] if keys else None) for s, e in encs.items()}
        scores = None
        if grid:
            model, cfg, scores = choose_deviation(p["seen_train"], p["seen_val"], use_global, grid, choose_on)
        else:
            model = train_deviation(p["seen_train"], p["seen_val"], use_global, cfg)
        gain = None
        if use_global and (cfg.cv_folds or (grid and choose_on == "cv")) and model.best_epoch > 0:
            # chosen on cv: the winner's score is its cv gain already
            gain = (
                scores[grid_key(cfg)] if scores and choose_on == "cv" else cv_gain(p["seen_train"], p["seen_val"], cfg)
            )
            if gain <= 0:  # the deviation does not carry to held-out users: serve the global model
                dim = p["seen_train"].diff.shape[1]
                model = global_only(cfg.rank, dim, sorted(model.user_weights), model.val_accuracy)
        seen_rows = np.arange(len(p["seen_test"].users))
        seen_w = np.stack([model.user_weights.get(u, model.prior_mean) for u in p["seen_test"].users])
        seen_m = p["seen_test"].global_margin + (model.basis_margins(p["seen_test"], seen_rows) * seen_w).sum(-1)
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
        "l2": cfg.l2,
        "item_l2": cfg.item_l2,
        "item_vectors": len(model.item_vectors),
        "grid_scores": scores,
        "best_epoch": model.best_epoch,
        "cv_gain": gain,
        "seen_val_accuracy": model.val_accuracy,
        "seen_test_accuracy": accuracy_of_margins(seen_m[seen_rows]),
        "prior_sigma": (1.0 / np.sqrt(model.precision)).tolist(),
        "unseen_zero_shot_accuracy": zero,
        "unseen_fewshot": curve,
    }, model


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
            k1 = rep["models"]["1"]["checkpoint"]
            rep["models"].update(deviation_models(k1, encs, shots or run["shots"], s, exp.splits))
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
    deviation = Deviation.with_items(model.basis, model.prior_mean, model.precision, weights, model.item_vectors)
    meta = add_deviation(out, ckpt.meta, deviation)
    meta.metrics.update(metrics or {})
    write_config(out, meta)
    return out


def served_hier_checkpoint(
    k1_checkpoint: str | Path, model: DeviationModel, measured: dict[str, Any], out_dir: str | Path
) -> Path | None:
    """Write the `hier` model measure_deviation measured (`model`, and `measured`, its report) as a servable
    checkpoint in out_dir, if its deviation was kept: an epoch beat the global model on validation (best_epoch > 0)
    and, where the user-level cross-validation ran, it carried to held-out users (cv_gain > 0). Else None: the
    global model is what hier would serve, and K=1 is served as is."""
    if measured["best_epoch"] <= 0 or (measured.get("cv_gain") is not None and measured["cv_gain"] <= 0):
        return None
    return write_hier_checkpoint(k1_checkpoint, model, out_dir, measured)


if __name__ == "__main__":
    add_to_run(Path(sys.argv[1]), sys.argv[sys.argv.index("--preset") + 1])
