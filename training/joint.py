"""One model across all data sets of a preset (`pal eval --preset polis-joint`): the union of every Polis
conversation's splits trains one shared head (the prompt is each conversation's topic, so PAL-B's prototypes
g_k(topic) stay conversation-specific), so the item space learns what "stance" looks like from thousands of
statements instead of a few hundred. It is then scored per conversation, on exactly the users and pairs the
per-conversation models are scored on, so the two reports compare row by row."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from models.checkpoint import write_config
from training.data.schema import PreferenceSplits
from training.encoded import EncodedComparisons
from training.evaluate import (
    SPLIT_NAMES,
    EvalPlan,
    _evaluate_checkpoint,
    choose_served,
    deviation_models,
    encode_splits,
    train_model,
)
from training.presets import Experiment
from training.threads import limit_threads


def merge(exps: list[Experiment], name: str) -> Experiment:
    splits = PreferenceSplits(
        name=name,
        **{s: [c for e in exps for c in getattr(e.splits, s)] for s in SPLIT_NAMES},
        info={"builder": "joint", "data_sets": [e.name for e in exps]},
    )
    first = exps[0]
    return Experiment(name, splits, first.embedder, first.pal, first.train)


def _subset(enc: EncodedComparisons, users: set[str]) -> EncodedComparisons:
    return enc.rows([i for i, u in enumerate(enc.users) if u in users])


def run_joint(exps: list[Experiment], out_dir: Path, plan: EvalPlan, name: str = "joint") -> list[dict[str, Any]]:
    """Train one model per K on the union; return one report per data set (run_experiment's shape)."""
    ks, shots, prior_strength, progress = plan.ks, plan.shots, plan.prior_strength, plan.progress
    t0 = time.perf_counter()
    joint = merge(exps, name)
    encs = encode_splits(joint)
    trained = {}
    global_model = None
    for k in sorted(ks):
        init = global_model if (joint.train.warm_start and k > 1) else None
        trained[k] = train_model(joint, k, encs, out_dir / f"k{k}", progress, init)
        if k == 1:
            global_model = trained[k][0].model
    # The joint checkpoints' config.json is written again below, when every data set's numbers are known; K=1's
    # is written now, because each data set's hier model is fitted on it and copies it.
    metas = {str(k): ckpt.meta for k, (_, ckpt) in trained.items()}
    if joint.train.deviation_models and 1 in trained:
        write_config(out_dir / "k1", metas["1"])
    reports = []
    for exp in exps:
        users = set(exp.splits.seen_users) | set(exp.splits.unseen_users)
        sub = {s: _subset(encs[s], users) for s in SPLIT_NAMES}
        models: dict[str, dict[str, Any]] = {}
        with limit_threads(1):
            for k, (result, ckpt) in trained.items():
                models[str(k)] = _evaluate_checkpoint(
                    result, out_dir / f"k{k}", ckpt, k, sub, shots, prior_strength, progress=False, record=False
                )
        exp_dir = out_dir / exp.name.replace("/", "_")
        exp_dir.mkdir(parents=True, exist_ok=True)
        if joint.train.deviation_models and "1" in models:
            # Per data set, a personal deviation on top of the shared global model, chosen on that data set's seen
            # users (the same code path as per-data-set runs), written as that data set's own hier checkpoint.
            k1 = str(out_dir / "k1")
            models.update(deviation_models(k1, sub, shots, exp.train.seed, exp.splits, exp_dir / "hier"))
        if "1" in models and len(models) > 1:  # per data set: the joint K or the joint K=1, on its validation data
            models["served"] = choose_served(models, exp_dir, metas)
        reports.append(
            {
                "experiment": exp.name,
                "data": exp.splits.describe(),
                "joint_model": name,
                "encoder": exp.embedder.spec.model_dump(),
                "models": models,
            }
        )
    for k, (_, ckpt) in trained.items():
        ckpt.meta.metrics["per_data_set"] = {r["experiment"]: r["models"][str(k)] for r in reports}
        write_config(out_dir / f"k{k}", ckpt.meta)
    if progress:
        print(f"joint model over {len(exps)} data sets: {time.perf_counter() - t0:.0f} s")
    return reports
