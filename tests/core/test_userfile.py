"""A user's own preference file: JSONL / CSV / Parquet in TRL's columns, validated with file:line errors, split
reproducibly; and the documented commands (train, eval, export, serve) on a small JSONL made here."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.chat import ChatRenderer
from tests.support import disagreeing_rows
from training.data.paths import REPO_ROOT
from training.data.userfile import (
    PreferenceFileError,
    SplitParams,
    load_preference_splits,
    make_splits,
    read_preference_file,
)

LIKES = ["cats", "tea", "mountains", "winter", "jazz", "novels"]
DISLIKES = ["dogs", "coffee", "beaches", "summer", "techno", "films"]


def synthetic_rows(n_users: int = 12, pairs: int = 16, seed: int = 0) -> list[dict]:
    """Two groups that disagree: group 0 prefers the LIKES side of every topic, group 1 the other side; the user
    column is "user" and each name carries its group."""

    def draw(rng: np.random.Generator) -> tuple[str, str, str]:
        i, j = rng.integers(len(LIKES)), rng.integers(3)
        return "What do you enjoy?", f"I really enjoy {LIKES[i]}{'!' * j}", f"I really enjoy {DISLIKES[i]}{'!' * j}"

    return disagreeing_rows(n_users, pairs, seed, draw, "user", lambda u: f"u{u:02d}-g{u % 2}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_formats_agree_and_messages_are_rendered(tmp_path: Path) -> None:
    rows = synthetic_rows(4, 3)
    jsonl = read_preference_file(write_jsonl(tmp_path / "d.jsonl", rows), "user")
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read_preference_file(tmp_path / "d.csv", "user") == jsonl
    assert read_preference_file(tmp_path / "d.parquet", "user") == jsonl

    # TRL conversational forms: explicit prompt, and implicit prompt (shared leading messages).
    user = [{"role": "user", "content": "What do you enjoy?"}]
    explicit = {"user": "x", "prompt": user, "chosen": [{"role": "assistant", "content": "Tea."}],
                "rejected": [{"role": "assistant", "content": "Coffee."}]}  # fmt: skip
    implicit = {"user": "x", "chosen": user + [{"role": "assistant", "content": "Tea."}],
                "rejected": user + [{"role": "assistant", "content": "Coffee."}]}  # fmt: skip
    got = read_preference_file(write_jsonl(tmp_path / "m.jsonl", [explicit, implicit]), "user")
    assert got[0] == got[1]
    assert (got[0].prompt, got[0].chosen, got[0].rejected) == ("What do you enjoy?", "Tea.", "Coffee.")
    # With a chat template the prompt is the templated text, the one the service renders for these messages.
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    templated = read_preference_file(tmp_path / "m.jsonl", "user", ChatRenderer(template=template))
    expected = "<|user|>What do you enjoy?<|assistant|>"
    assert templated[0].prompt == ChatRenderer(template=template).prompt(user) == expected
    # A CSV cell holding a JSON message list is read as messages.
    with (tmp_path / "m.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["user", "prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in explicit.items()})
    assert read_preference_file(tmp_path / "m.csv", "user") == got[:1]


def test_bad_rows_are_reported_with_file_and_line(tmp_path: Path) -> None:
    good = {"user_id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "user_id": ""}),
        "",
        json.dumps({**good, "rejected": "x"}),
        json.dumps({**good, "chosen": 3}),
        json.dumps({k: v for k, v in good.items() if k != "rejected"}),
        json.dumps([1, 2]),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PreferenceFileError) as e:
        read_preference_file(path)
    msg = str(e.value)
    assert msg.startswith("6 invalid row(s)")
    for line in (2, 3, 5, 6, 7, 8):
        assert f"{path}:{line}: " in msg
    assert f"{path}:1:" not in msg and f"{path}:4:" not in msg
    assert "user column 'user_id'" in msg and "same text" in msg and "'rejected' is missing" in msg

    # CSV: the line a record starts on, even after a quoted cell spanning two lines.
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text('user_id,prompt,chosen,rejected\na,"two\nlines",x,y\n,p,x,y\n')
    with pytest.raises(PreferenceFileError, match=rf"{csv_path}:4: user column"):
        read_preference_file(csv_path)
    with pytest.raises(PreferenceFileError, match="unknown format"):
        read_preference_file(write_jsonl(tmp_path / "d.txt", [good]))


def test_splits_are_reproducible_and_disjoint(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(10, 12))
    a = load_preference_splits(path, "user", SplitParams(seed=3))
    b = load_preference_splits(path, "user", SplitParams(seed=3))
    c = load_preference_splits(path, "user", SplitParams(seed=4))
    assert a == b and a != c
    assert len(a.unseen_users) == 2 and not set(a.unseen_users) & set(a.seen_users)
    assert all(getattr(a, s) for s in ("seen_train", "seen_val", "seen_test", "unseen_pool", "unseen_test"))
    all_rows = a.seen_train + a.seen_val + a.seen_test + a.unseen_pool + a.unseen_test
    assert sorted(map(repr, all_rows)) == sorted(map(repr, read_preference_file(path, "user")))
    assert a.info["sha256"] and a.info["builder"] == "file" and a.info["split"]["seed"] == 3
    # File order of rows does not change the split.
    shuffled = write_jsonl(tmp_path / "s.jsonl", synthetic_rows(10, 12)[::-1])
    s = load_preference_splits(shuffled, "user", SplitParams(seed=3))
    assert (s.seen_users, s.unseen_users) == (a.seen_users, a.unseen_users)
    with pytest.raises(PreferenceFileError, match="too few comparisons"):
        make_splits(read_preference_file(path, "user")[:2], SplitParams(), "tiny", {})


def _pal(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "training.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.anyio
async def test_own_jsonl_trains_evaluates_exports_and_serves(tmp_path: Path) -> None:
    from tests.support import cpu_settings, running_app

    data = write_jsonl(tmp_path / "prefs.jsonl", synthetic_rows(12, 16))
    env = {**os.environ, "PAL_CACHE_DIR": str(tmp_path / "cache")}
    run = _pal("train", "--data", str(data), "--user-column", "user", "--out", str(tmp_path / "ckpt"), env=env)
    train = json.loads(run.stdout[run.stdout.rindex('{\n  "checkpoint"') :])
    assert train["data"]["n_seen_users"] == 10 and train["data"]["n_unseen_users"] == 2
    assert train["seen_test_accuracy"] > 0.9  # two groups that disagree on every pair: K=3 must separate them
    saved = json.loads((tmp_path / "ckpt" / "splits" / "info.json").read_text())
    assert saved["info"]["sha256"] and (tmp_path / "ckpt" / "splits" / "unseen_test.jsonl").is_file()

    run = _pal("eval", "--data", str(data), "--user-column", "user", "--out", str(tmp_path / "eval"),
               "--shots", "1,5", env=env)  # fmt: skip
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["summary"]["3"]["seen_test_accuracy"] > 0.9
    assert report["summary"]["1"]["seen_test_accuracy"] < 0.75  # one reward model cannot please both groups
    assert (tmp_path / "eval" / "splits" / "seen_train.jsonl").is_file()

    _pal("export", str(tmp_path / "ckpt"), str(tmp_path / "bundle"), env=env)
    settings = cpu_settings(tmp_path / "bundle", tmp_path / "redis")  # fmt: skip
    prompt = "What do you enjoy?"
    seen = json.loads((tmp_path / "ckpt" / "users.json").read_text())
    g0, g1 = next(u for u in seen if u.endswith("g0")), next(u for u in seen if u.endswith("g1"))
    async with running_app(settings) as client:
        for user, first_wins in ((g0, True), (g1, False)):
            items = [{"prompt": prompt, "response": f"I really enjoy {x}", "user_id": user} for x in ("cats", "dogs")]
            resp = await client.post("/score", json={"items": items})
            assert resp.status_code == 200, resp.text
            r = [x["reward"] for x in resp.json()["results"]]
            assert (r[0] > r[1]) == first_wins, (user, r)


def test_cli_reports_bad_rows_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"user_id": "a", "prompt": "p", "chosen": "x", "rejected": "x"}\n')
    args = [sys.executable, "-m", "training.cli", "train", "--data", str(path), "--out", str(tmp_path / "ckpt")]
    run = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"{path}:1: 'chosen' and 'rejected' are the same text" in run.stderr
    assert not (tmp_path / "ckpt").exists()
