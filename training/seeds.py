"""`pal eval --seeds 0,1,2`: one full evaluation per seed (its own data split, initialisation and users), then
per data set (Polis conversation) the mean over seeds with a 95% t-interval over seeds.

The interval is Student's t over the per-seed numbers (n - 1 degrees of freedom): each seed redraws which
participants are unseen, which statements are held out and the model's initialisation, so the seed-to-seed
spread is the uncertainty a user of these numbers cares about. With 3 seeds t(0.975, 2) = 4.30: wide, honestly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from training.plots import fewshot_axes, model_label


def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval over seeds; a single value has no interval (lo = hi = the value)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "values": []}
    mean = float(v.mean())
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(v), "values": [float(x) for x in v]}


def model_numbers(m: dict[str, Any], shots: Sequence[int]) -> dict[str, float]:
    """The numbers of one model in one run that are averaged over seeds."""
    out = {"seen": m["seen_test_accuracy"], "zero_shot": m["unseen_zero_shot_accuracy"]}
    out.update({f"unseen@{n}": m["unseen_fewshot"][str(n)]["accuracy"] for n in shots})
    # what adaptation itself adds over the same model's zero-shot prior (paired within the run)
    out.update({f"gain@{n}": m["unseen_fewshot"][str(n)]["accuracy"] - out["zero_shot"] for n in shots})
    return out


def aggregate(runs: list[dict[str, Any]], shots: Sequence[int]) -> dict[str, Any]:
    """Per data set and model: every number's mean and t-interval over the seeds that evaluated it, plus the
    paired difference to K=1 (same seed, same split), whose interval is narrower than the two apart."""
    per: dict[str, dict[str, dict[str, list[float]]]] = {}
    diffs: dict[str, dict[str, dict[str, list[float]]]] = {}
    served_k: dict[str, list[int | str]] = {}  # the served K per seed, or "hier" where the hierarchical model is
    for run in runs:
        for exp in run["experiments"]:
            name, models = exp["experiment"], exp["models"]
            if "served" in models:
                sel = models["served"]["served_selection"]
                served_k.setdefault(name, []).append("hier" if sel.get("served_form") == "hier" else sel["served_k"])
            base = model_numbers(models["1"], shots) if "1" in models else None
            for key, m in models.items():
                nums = model_numbers(m, shots)
                for metric, value in nums.items():
                    per.setdefault(name, {}).setdefault(key, {}).setdefault(metric, []).append(value)
                    if base is not None and key != "1":
                        d = diffs.setdefault(name, {}).setdefault(key, {}).setdefault(metric, [])
                        d.append(value - base[metric])
    conversations = {
        name: {
            key: {
                **{metric: t_interval(vals) for metric, vals in metrics.items()},
                "minus_k1": {metric: t_interval(v) for metric, v in diffs.get(name, {}).get(key, {}).items()},
            }
            for key, metrics in models.items()
        }
        for name, models in per.items()
    }
    for name, ks in served_k.items():
        conversations[name]["served"]["served_k_per_seed"] = ks
    return conversations


def overall(runs: list[dict[str, Any]], shots: Sequence[int]) -> dict[str, Any]:
    """Mean over data sets within each seed, then mean and t-interval of that over seeds."""
    keys = sorted({k for r in runs for k in r["summary"]}, key=lambda k: (not k.isdigit(), k))
    out: dict[str, Any] = {}
    for key in keys:
        per_seed: dict[str, list[float]] = {}
        for r in runs:
            ms = [e["models"][key] for e in r["experiments"] if key in e["models"]]
            if not ms:
                continue
            for metric in model_numbers(ms[0], shots):
                per_seed.setdefault(metric, []).append(float(np.mean([model_numbers(m, shots)[metric] for m in ms])))
        out[key] = {metric: t_interval(v) for metric, v in per_seed.items()}
    return out


def plot(summary: dict[str, Any], shots: Sequence[int], path: Path, title: str) -> None:
    with fewshot_axes(shots, path, title, figsize=(6.5, 4.2), title_size=9, legend_size=7) as ax:
        for i, (key, s) in enumerate(summary.items()):
            color, label = f"C{i}", model_label(key)
            ys = [s[f"unseen@{n}"] for n in shots]
            mean = [y["mean"] for y in ys]
            err = np.array([[y["mean"] - y["lo"] for y in ys], [y["hi"] - y["mean"] for y in ys]])
            ax.errorbar(shots, mean, yerr=err, fmt="o-", color=color, capsize=3, label=f"{label} unseen")
            seen = s["seen"]
            ax.axhline(seen["mean"], ls="--", color=color, label=f"{label} seen (held-out pairs)")
            ax.axhspan(seen["lo"], seen["hi"], color=color, alpha=0.08)


def write_report(runs: list[dict[str, Any]], seeds: Sequence[int], out_dir: Path, title: str) -> dict[str, Any]:
    shots = runs[0]["shots"]
    report = {
        "title": title,
        "seeds": list(seeds),
        "shots": shots,
        "interval": "95% Student-t interval over seeds (n-1 degrees of freedom) of the per-seed numbers",
        "summary": overall(runs, shots),
        "conversations": aggregate(runs, shots),
        "skipped": {str(s): r["skipped"] for s, r in zip(seeds, runs, strict=True) if r["skipped"]},
        "runs": [f"seed{s}/report.json" for s in seeds],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    n = len({e["experiment"] for r in runs for e in r["experiments"]})
    plot(report["summary"], shots, out_dir / "fewshot.png", f"{title}: mean over {n} data sets, {len(seeds)} seeds")
    return report
