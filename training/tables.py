"""Markdown tables of a multi-seed `pal eval` report (docs/TRAINING.md): `python -m training.tables REPORT`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _ci(x: dict[str, Any], points: bool = False) -> str:
    """`mean [lo, hi]`; accuracies with 3 decimals, differences in signed points with 1."""
    if x.get("mean") is None:
        return "-"

    def fmt(v: float) -> str:
        return f"{100 * v:+.1f}" if points else f"{v:.3f}"

    return fmt(x["mean"]) if x["n"] < 2 else f"{fmt(x['mean'])} [{fmt(x['lo'])}, {fmt(x['hi'])}]"


def conversation_table(report: dict[str, Any], n: int = 20) -> str:
    """Per data set: K=1, K, the served model (seen and unseen@n), its paired difference to K=1 in points, and
    what few-shot adaptation adds over its own zero-shot prior; means with 95% t-intervals over seeds."""
    ks = sorted({k for c in report["conversations"].values() for k in c if k.isdigit() and k != "1"})
    k = ks[0] if ks else "1"
    head = (
        f"| data set | K=1 seen | K={k} seen | served seen | served - K=1 seen (points) | K=1 unseen@{n} | "
        f"K={k} unseen@{n} | served unseen@{n} | served - K=1 unseen@{n} (points) | served unseen@{n} - zero-shot "
        f"(points) | served K per seed |"
    )
    rows = [head, "|" + "---|" * 11]
    for name, c in sorted(report["conversations"].items()):
        s = c.get("served", c["1"])
        rows.append(
            "| "
            + " | ".join(
                [
                    name.removeprefix("polis/"),
                    _ci(c["1"]["seen"]),
                    _ci(c[k]["seen"]),
                    _ci(s["seen"]),
                    _ci(s["minus_k1"].get("seen", {}), points=True),
                    _ci(c["1"][f"unseen@{n}"]),
                    _ci(c[k][f"unseen@{n}"]),
                    _ci(s[f"unseen@{n}"]),
                    _ci(s["minus_k1"].get(f"unseen@{n}", {}), points=True),
                    _ci(s[f"gain@{n}"], points=True),
                    ",".join(str(x) for x in s.get("served_k_per_seed", [])),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def versus_k1_table(report: dict[str, Any], keys: tuple[str, ...] = ("served", "hier", "lore"), n: int = 20) -> str:
    """Per data set and model: seen and unseen@n minus K=1 (paired per seed, points) and unseen@n minus the same
    model's zero-shot accuracy; the per-seed values of seen and unseen@n minus K=1 show the worst cases."""
    rows = [
        f"| data set | model | seen - K=1 | unseen@{n} - K=1 | unseen@{n} - zero-shot "
        f"| per seed: seen / unseen@{n} - K=1 |",
        "|" + "---|" * 6,
    ]
    for name, c in sorted(report["conversations"].items()):
        for key in (k for k in keys if k in c):
            d = c[key]["minus_k1"]
            per_seed = ", ".join(
                f"{100 * a:+.1f}/{100 * b:+.1f}"
                for a, b in zip(d["seen"]["values"], d[f"unseen@{n}"]["values"], strict=True)
            )
            cells = [_ci(d["seen"], True), _ci(d[f"unseen@{n}"], True), _ci(c[key][f"gain@{n}"], True), per_seed]
            rows.append(f"| {name.removeprefix('polis/')} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary_table(report: dict[str, Any]) -> str:
    shots = report["shots"]
    rows = [
        "| model | seen | unseen zero-shot | " + " | ".join(f"n={n}" for n in shots) + " |",
        "|" + "---|" * (3 + len(shots)),
    ]
    for key, s in report["summary"].items():
        name = f"K={key}" if key.isdigit() else key
        cells = [_ci(s["seen"]), _ci(s["zero_shot"])] + [_ci(s[f"unseen@{n}"]) for n in shots]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(path: str) -> None:
    report = json.loads(Path(path).read_text())
    print(f"{report['title']}, seeds {report['seeds']}: mean over data sets [95% t-interval over seeds]\n")
    print(summary_table(report))
    print()
    print(conversation_table(report))
    if any("hier" in c for c in report["conversations"].values()):
        print()
        print(versus_k1_table(report))


if __name__ == "__main__":
    main(sys.argv[1])
