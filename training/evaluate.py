"""`pal eval`: train K=1 (homogeneous BTL baseline) and the chosen K, then score seen users on held-out pairs
and unseen users after n-shot adaptation with models.head.fit_user, reading the saved checkpoints back."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import validation_sample
from models.checkpoint import (
    CONFIG_FILE,
    Checkpoint,
    CheckpointMeta,
    read_checkpoint,
    read_meta,
    save_checkpoint,
    write_config,
)
from models.pal import PALModel
from training.data.schema import PreferenceSplits
from training.encoded import EncodedComparisons, encode
from training.fewshot import (
    SHOTS,
    fewshot_curve,
    select_prior_strength,
    validation_fewshot_score,
    zero_shot_accuracy,
)
from training.plots import fewshot_axes, model_label
from training.presets import Experiment, with_k
from training.threads import limit_threads
from training.train import TrainResult, config_dict, seen_accuracy, train_pal

SPLIT_NAMES = ("seen_train", "seen_val", "seen_test", "unseen_pool", "unseen_test")
MIN_SEEN_USERS = 2


def split_problems(splits: PreferenceSplits) -> list[str]:
    """Why these splits cannot be trained and evaluated (empty: they can).

    A small conversation (a few dozen participants and statements) can leave a split empty; training or
    scoring it would crash (an empty array through the head) or report NaN, so it is skipped with these reasons.
    """
    seen = set(splits.seen_users)
    problems = []
    if len(seen) < MIN_SEEN_USERS:
        problems.append(f"{len(seen)} seen users with training pairs (need >= {MIN_SEEN_USERS})")
    for name, what in (("seen_val", "validation (selects the epoch)"), ("seen_test", "test")):
        n = sum(c.user_id in seen for c in getattr(splits, name))
        if n == 0:
            problems.append(f"no {what} pairs of seen users ({name}: {len(getattr(splits, name))} pairs in all)")
    pool_users = {c.user_id for c in splits.unseen_pool}
    adaptable = pool_users & {c.user_id for c in splits.unseen_test}
    if not adaptable:
        problems.append(
            f"no unseen user with both few-shot pool and test pairs "
            f"(unseen_pool {len(splits.unseen_pool)} pairs, unseen_test {len(splits.unseen_test)} pairs)"
        )
    return problems


def encode_splits(exp: Experiment) -> dict[str, EncodedComparisons]:
    return {s: encode(getattr(exp.splits, s), exp.embedder, exp.pal.form) for s in SPLIT_NAMES}


def train_model(
    exp: Experiment,
    k: int,
    encs: dict[str, EncodedComparisons],
    ckpt_dir: Path,
    progress: bool = True,
    init: PALModel | None = None,
) -> tuple[TrainResult, Checkpoint]:
    """Train, write the checkpoint's weights and select its few-shot prior strength. The returned checkpoint's
    config.json is not written yet: the caller adds its own numbers to `meta` and writes it once (write_config)."""
    t0 = time.perf_counter()
    result = train_pal(with_k(exp, k), encs["seen_train"], encs["seen_val"], exp.train, progress=progress, init=init)
    ckpt = save_checkpoint(
        ckpt_dir,
        result.model,
        result.user_ids,
        exp.embedder.spec,
        training={"data": exp.splits.describe(), "config": config_dict(exp.train), **result.describe()},
        metrics={"seen_val_accuracy": result.val_accuracy, "train_seconds": time.perf_counter() - t0},
        defer_config=True,
    )
    # A sample of the validation comparisons travels with the checkpoint into its bundle, where the scorer measures
    # on it how many decisions each precision keeps (models/precision.py).
    # A streamed run's comparisons stay in its on-disk cache: its bundle takes them from `pal export --validation`.
    if isinstance(exp.splits, PreferenceSplits):
        validation_sample.write(ckpt_dir, validation_sample.sample(exp.splits.seen_val))
    # Chosen on seen users' validation pairs, from the checkpoint as saved: the value /adapt will serve with.
    with limit_threads(1):
        strength, scores = select_prior_strength(
            ckpt.head_params, np.asarray(ckpt.meta.prior_weights), encs["seen_train"], encs["seen_val"]
        )
        # The same number for every K (K=1 included) on the same users and pairs: what the served model is
        # chosen on.
        fewshot_val = validation_fewshot_score(
            ckpt.head_params, np.asarray(ckpt.meta.prior_weights), encs["seen_train"], encs["seen_val"], strength
        )
    ckpt.meta.prior_strength = float(strength)
    ckpt.meta.metrics.update({"prior_strength_val_scores": scores, "seen_val_fewshot_accuracy": fewshot_val})
    return result, ckpt


def train_and_save(
    exp: Experiment, k: int, encs: dict[str, EncodedComparisons], ckpt_dir: Path, progress: bool = True
) -> tuple[TrainResult, Path]:
    """`pal train`: train_model plus the seen users' held-out accuracy, then the complete config.json."""
    result, ckpt = train_model(exp, k, encs, ckpt_dir, progress)
    acc = seen_accuracy(result, encs["seen_test"]) if len(encs["seen_test"]) else None
    ckpt.meta.metrics["seen_test_accuracy"] = acc
    write_config(ckpt_dir, ckpt.meta)
    return result, ckpt_dir


def evaluate_model(
    exp: Experiment,
    k: int,
    encs: dict[str, EncodedComparisons],
    out_dir: Path,
    shots: Sequence[int] = SHOTS,
    prior_strength: float | None = None,
    progress: bool = True,
    init: PALModel | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    ckpt_dir = out_dir / f"k{k}"
    result, ckpt = train_model(exp, k, encs, ckpt_dir, progress, init)
    with limit_threads(1):
        metrics = _evaluate_checkpoint(result, ckpt_dir, ckpt, k, encs, shots, prior_strength, progress)
    write_config(ckpt_dir, ckpt.meta)
    return result, metrics


def _evaluate_checkpoint(
    result: TrainResult,
    ckpt_dir: Path,
    ckpt: Checkpoint,
    k: int,
    encs: dict[str, EncodedComparisons],
    shots: Sequence[int],
    prior_strength: float | None,
    progress: bool,
    record: bool = True,
) -> dict[str, Any]:
    """Every number of one checkpoint (as saved in ckpt_dir: the weights the service will load) on these
    splits, recorded in ckpt.meta.metrics for its config.json. record=False (a joint model scored on one data
    set's users): validation numbers are recomputed on these splits and nothing is recorded."""
    head, prior = ckpt.head_params, np.asarray(ckpt.meta.prior_weights)
    # Training selected the strength on validation (and /adapt serves with it); an explicit value overrides it.
    strengths = ckpt.meta.metrics.get("prior_strength_val_scores", {})
    if prior_strength is None:
        prior_strength = ckpt.meta.prior_strength or 1.0
    metrics = {
        "k": k,
        "checkpoint": str(ckpt_dir),
        "version": ckpt.meta.version,
        "best_epoch": result.best_epoch,
        "seen_val_accuracy": result.val_accuracy if record else seen_accuracy(result, encs["seen_val"]),
        "seen_val_fewshot_accuracy": ckpt.meta.metrics.get("seen_val_fewshot_accuracy")
        if record
        else validation_fewshot_score(head, prior, encs["seen_train"], encs["seen_val"], prior_strength),
        "seen_test_accuracy": seen_accuracy(result, encs["seen_test"]),
        "prior_weights": ckpt.meta.prior_weights,
        "prior_strength": prior_strength,
        "prior_strength_val_scores": strengths,
        "unseen_zero_shot_accuracy": zero_shot_accuracy(head, prior, encs["unseen_test"]),
        "unseen_fewshot": fewshot_curve(
            head, prior, encs["unseen_pool"], encs["unseen_test"], shots, prior_strength, progress
        ),
    }
    if record:
        ckpt.meta.metrics.update({k_: v for k_, v in metrics.items() if k_ not in ("checkpoint", "version")})
    return metrics


@dataclass(frozen=True)
class EvalPlan:
    """What `pal eval` measures: the Ks (K=1, the global model, is the baseline), the shot counts of the unseen
    users' few-shot curve and their prior strength (None: chosen on seen users' validation pairs)."""

    ks: tuple[int, ...]
    shots: tuple[int, ...] = SHOTS
    prior_strength: float | None = None
    progress: bool = True


def run_experiment(exp: Experiment, out_dir: Path, plan: EvalPlan) -> dict[str, Any]:
    ks, shots, prior_strength, progress = plan.ks, plan.shots, plan.prior_strength, plan.progress
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    encs = encode_splits(exp)
    t_embed = time.perf_counter() - t0
    models: dict[str, dict[str, Any]] = {}
    global_model = None
    for k in sorted(ks):  # K=1 first: with warm_start the K model starts from it
        init = global_model if (exp.train.warm_start and k > 1) else None
        result, models[str(k)] = evaluate_model(exp, k, encs, out_dir, shots, prior_strength, progress, init)
        if k == 1:
            global_model = result.model
    if exp.train.deviation_models and "1" in models:  # before the choice: a kept hier model is a candidate
        models.update(deviation_models(models["1"]["checkpoint"], encs, shots, exp.train.seed, exp.splits))
    if "1" in models and len(models) > 1:
        models["served"] = choose_served(models, out_dir)
    return {
        "experiment": exp.name,
        "data": exp.splits.describe(),
        "encoder": exp.embedder.spec.model_dump(),
        "embed_seconds": t_embed,
        "seconds": time.perf_counter() - t0,
        "models": models,
    }


def deviation_models(
    k1_checkpoint: str | Path,
    encs: dict[str, EncodedComparisons],
    shots: Sequence[int],
    seed: int,
    splits: Any = None,
    hier_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """`hier` (global K=1 reward + low-rank deviation) and `lore` (the low-rank basis alone), fitted on the K=1
    checkpoint as written, scored on the same users and pairs as every other model. hier is chosen on seen users
    only: with the splits' texts (a PreferenceSplits) and validation statements that training knows (the Polis
    pair hold-out) it adds per-statement vectors with the rank and L2s of KNOWN_STATEMENT_GRID; otherwise it is
    the best of RESTARTS restarts by user-level cross-validation, the global model where none helps held-out users
    (training.hierarchical). A hier model whose deviation was kept is also written as a servable checkpoint
    beside the K=1 one (`hier/`, or `hier_dir`; its report's `checkpoint`)."""
    from training.hierarchical import (
        DeviationConfig,
        known_statement_grid,
        measure_deviation,
        restart_grid,
        served_hier_checkpoint,
        statement_keys,
    )

    head = read_checkpoint(k1_checkpoint).head_params
    keys = None
    if isinstance(splits, PreferenceSplits):
        keys = {s: statement_keys(getattr(splits, s)) for s in encs}
    cfg = DeviationConfig(seed=seed)
    known = known_statement_grid(cfg, keys)
    out, hier = {}, None
    for use_global in (True, False):
        if not use_global:  # LoRe, the baseline, as before
            m, _ = measure_deviation(head, encs, use_global, shots, cfg)
        elif known:
            m, hier = measure_deviation(head, encs, use_global, shots, cfg, keys, known)
        else:
            m, hier = measure_deviation(head, encs, use_global, shots, cfg, None, restart_grid(cfg), choose_on="cv")
        out[m["form"]] = m
    assert hier is not None
    written = served_hier_checkpoint(k1_checkpoint, hier, out["hier"], hier_dir or Path(k1_checkpoint).parent / "hier")
    if written is not None:
        out["hier"]["checkpoint"] = str(written)
        out["hier"]["version"] = read_meta(written).version
    return out


def choose_served(
    models: dict[str, dict[str, Any]], out_dir: Path, metas: dict[str, CheckpointMeta] | None = None
) -> dict[str, Any]:
    """The model `pal export` should serve, chosen on validation data only: a K > 1 model only where it beats
    the global K=1 model on seen users' validation pairs both without adaptation (held-out pairs of seen users)
    and after few-shot fitting (seen users refitted from 1/5/20 of their training pairs, scored on their
    validation pairs); else the global model. Ties go to K=1. The choice is copied to OUT/served and recorded in
    its config.json; the service serves it unchanged (a K=1 checkpoint adapts to nothing, by construction).
    Where a hierarchical model was measured, it decides instead: hier written as a checkpoint (`hier` with a
    `checkpoint`: its deviation was kept, i.e. it beat the global model on validation, and on held-out users where
    cross-validation ran) is served, the global model plus what each user's comparisons support (the global model
    itself at zero shots); else K=1. metas: the candidates' configs where their config.json is not written yet
    (a joint model's); else read."""
    base = models["1"]
    chosen = "1"
    for key, m in models.items():
        if key == "1" or not key.isdigit():
            continue
        c = models[chosen]
        if (
            m["seen_val_accuracy"] > base["seen_val_accuracy"]
            and m["seen_val_fewshot_accuracy"] > base["seen_val_fewshot_accuracy"]
            and (m["seen_val_accuracy"], m["seen_val_fewshot_accuracy"])
            > (c["seen_val_accuracy"], c["seen_val_fewshot_accuracy"])
        ):
            chosen = key
    hier = models.get("hier", {})
    if hier:
        # hier decided with user-level cross-validation whether any deviation carries to held-out users; where
        # none does, its answer is the global model, which the one small validation pool behind the K > 1 rule
        # cannot overrule (on Polis that rule served K=3 below K=1 on new statements: docs/TRAINING.md).
        chosen = "hier" if "checkpoint" in hier else "1"
    selection = {
        "served_k": 1 if chosen == "hier" else int(chosen),
        "served_form": "hier" if chosen == "hier" else "pal",
        "rule": "where hier was measured: hier (K=1 + its deviation) if its deviation was kept (beat K=1 on seen "
        "val pairs; where cross-validated, cv_gain > 0), else K=1; otherwise K > 1 only if above K=1 on seen val "
        "pairs, unadapted and few-shot, else K=1",
        "val": {
            key: {"seen": m["seen_val_accuracy"], "fewshot": m.get("seen_val_fewshot_accuracy")}
            for key, m in models.items()
            if key.isdigit() or key == "hier"
        },
    }
    if hier:
        selection["hier"] = {"best_epoch": hier["best_epoch"], "cv_gain": hier.get("cv_gain")}
    source = models[chosen]["checkpoint"]
    meta = (metas[chosen] if metas and chosen in metas else read_meta(source)).model_copy(deep=True)
    meta.metrics["served_selection"] = selection
    served_dir = out_dir / "served"
    if served_dir.exists():
        shutil.rmtree(served_dir)
    shutil.copytree(source, served_dir, ignore=shutil.ignore_patterns(CONFIG_FILE))
    write_config(served_dir, meta)
    return {**models[chosen], "checkpoint": str(served_dir), "served_selection": selection}


def summarize(reports: list[dict[str, Any]], ks: Sequence[int], shots: Sequence[int]) -> dict[str, Any]:
    """Averages over experiments (Polis conversations); identical to the single report for one experiment."""
    out: dict[str, Any] = {}
    extra = ("served", "hier", "lore")  # models every report has beside the trained Ks
    keys = [str(k) for k in ks] + [key for key in extra if all(key in r["models"] for r in reports)]
    for key in keys:
        ms = [r["models"][key] for r in reports]
        out[key] = {
            "seen_test_accuracy": float(np.mean([m["seen_test_accuracy"] for m in ms])),
            "unseen_zero_shot_accuracy": float(np.mean([m["unseen_zero_shot_accuracy"] for m in ms])),
            "unseen_fewshot_accuracy": {
                str(n): float(np.mean([m["unseen_fewshot"][str(n)]["accuracy"] for m in ms])) for n in shots
            },
        }
    return out


def plot(summary: dict[str, Any], shots: Sequence[int], path: Path, title: str) -> None:
    with fewshot_axes(shots, path, title) as ax:
        for i, (k, s) in enumerate(summary.items()):
            color, name = f"C{i}", model_label(k)
            ys = [s["unseen_fewshot_accuracy"][str(n)] for n in shots]
            ax.plot(shots, ys, "o-", color=color, label=f"{name} unseen")
            ax.axhline(s["seen_test_accuracy"], ls="--", color=color, label=f"{name} seen (held-out pairs)")


def run_preset(
    experiments: list[Experiment], out_dir: Path, plan: EvalPlan, title: str = "", joint: bool = False
) -> dict[str, Any]:
    """Run every experiment of a preset (joint: one model over all of them, training.joint, scored per
    experiment); write report.json and fewshot.png into out_dir."""
    ks, shots, progress = plan.ks, plan.shots, plan.progress
    out_dir = Path(out_dir)
    reports, skipped, kept = [], [], []
    for exp in experiments:
        problems = split_problems(exp.splits)
        if problems:  # one small conversation must not cost the results of all the others
            skipped.append({"experiment": exp.name, "reasons": problems, "data": exp.splits.describe()})
            if progress:
                print(f"skipping {exp.name}: {'; '.join(problems)}", file=sys.stderr)
            continue
        kept.append(exp)
    if joint and kept:
        from training.joint import run_joint

        reports = run_joint(kept, out_dir, plan, name=title or "joint")
    for exp in [] if joint else kept:
        sub = out_dir if len(experiments) == 1 else out_dir / exp.name.replace("/", "_")
        reports.append(run_experiment(exp, sub, plan))
    summary = summarize(reports, ks, shots) if reports else {}
    report = {
        "title": title,
        "ks": list(ks),
        "shots": list(shots),
        "summary": summary,
        "experiments": reports,
        "skipped": skipped,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    if not reports:
        return report  # everything skipped: report.json says why, there is nothing to plot
    if len(reports) > 1:
        title = f"{title}: mean over {len(reports)} data sets"
    plot(summary, shots, out_dir / "fewshot.png", title or reports[0]["experiment"])
    return report
