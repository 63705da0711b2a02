"""One-call entry points: the CLI commands' bodies, and the small persona model the product demo and the
end-to-end service test use."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.checkpoint import read_meta
from models.config import DEFAULT_ENCODER, EncoderSpec
from training.data.persona import PersonaParams, build_persona
from training.data.schema import Comparison, PreferenceSplits, by_user
from training.embed import CachedEncoder
from training.evaluate import EvalPlan, encode_splits, run_preset, train_and_save
from training.fewshot import SHOTS
from training.presets import JOINT_SUFFIX, PRESETS, Experiment, _text_pal, experiments, schedule
from training.seeds import write_report

# A few hundred comparisons over ~240 statements: embeds in seconds (then cached) and trains in well under
# a minute on 2 cores, yet the three groups are clearly separated.
SMALL_PERSONA = PersonaParams(
    seen_users_per_group=4, unseen_users_per_group=2, max_statements_per_persona=40,
    train_pairs=40, val_pairs=10, test_pairs=20, pool_pairs=20, unseen_test_pairs=20,
)  # fmt: skip


def small_persona_splits(seed: int = 0) -> PreferenceSplits:
    return build_persona(PersonaParams(**{**SMALL_PERSONA.__dict__, "seed": seed}))


def train_small_persona(
    out_dir: str | Path, k: int = 3, seed: int = 0, encoder: str = DEFAULT_ENCODER, progress: bool = False
) -> Path:
    """Train a small PAL-B persona model (MiniLM) and save it; returns the checkpoint directory."""
    splits = small_persona_splits(seed)
    emb = CachedEncoder(EncoderSpec(name_or_path=encoder))
    exp = Experiment(splits.name, splits, emb, _text_pal(emb, k), schedule("demo", seed))
    encs = encode_splits(exp)
    return train_and_save(exp, k, encs, Path(out_dir), progress)[1]


def unseen_user_comparisons(seed: int = 0) -> dict[str, tuple[list[Comparison], list[Comparison]]]:
    """Unseen users of the small persona set: user id -> (few-shot pool, held-out test pairs).

    Same seed as train_small_persona, so these users are absent from that checkpoint."""
    splits = small_persona_splits(seed)
    pools, tests = by_user(splits.unseen_pool), by_user(splits.unseen_test)
    return {u: (pools[u], tests.get(u, [])) for u in sorted(pools)}


def build_data(preset: str, out: Path, seed: int = 0) -> dict[str, Any]:
    """Write the preset's splits as JSONL (one folder per experiment)."""
    exps = experiments(preset, seed)
    for exp in exps:
        exp.splits.save(out if len(exps) == 1 else out / exp.name.replace("/", "_"))
    return {exp.name: exp.splits.describe() for exp in exps}


@dataclass(frozen=True)
class RunOptions:
    """What every `pal train` and `pal eval` run is given: the chosen K (evaluated beside the K=1 baseline), the
    data and training seed, the frozen encoder (None: the preset's, training.presets.preset_encoder; MiniLM for a
    file), and for `pal eval` the shot counts and prior strength."""

    k: int = 3
    seed: int = 0
    encoder: str | None = None
    shots: tuple[int, ...] = SHOTS
    prior_strength: float | None = None

    def plan(self) -> EvalPlan:
        return EvalPlan((1, self.k) if self.k != 1 else (1,), self.shots, self.prior_strength)


def train_one(preset: str, out: Path, run: RunOptions = RunOptions(), data: Path | None = None) -> dict[str, Any]:
    """Train one model and save the checkpoint: on a preset (the first conversation for Polis), or on JSONL
    splits written by `pal build-data` (text data, PAL-B on the given encoder)."""
    k, seed, encoder = run.k, run.seed, run.encoder
    if data is not None:
        splits = PreferenceSplits.load(data)
        if splits.info.get("builder") == "simulated":
            raise ValueError("simulated JSONL holds item ids, not text: train it with --preset simulated")
        emb = CachedEncoder(encoder_spec(encoder))  # last-token pooling for a decoder-only encoder
        exp = Experiment(splits.name, splits, emb, _text_pal(emb, k), schedule("file", seed))
    else:
        exp = experiments(preset, seed, k, encoder)[0]
    return train_checkpoint(exp, k, encode_splits(exp), out, dict)


def evaluate_preset(
    preset: str, out: Path, run: RunOptions = RunOptions(), seeds: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """One seed: OUT/report.json as before. Several (`seeds`): OUT/seed<s>/ per seed, and OUT/report.json with
    per data set means and 95% t-intervals over seeds (training.seeds)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {PRESETS}")
    joint = preset.endswith(JOINT_SUFFIX)

    def one(seed: int, directory: Path) -> dict[str, Any]:
        return run_preset(experiments(preset, seed, run.k, run.encoder), directory, run.plan(), preset, joint=joint)

    if seeds:
        report = write_report([one(s, out / f"seed{s}") for s in seeds], seeds, out, preset)
    else:
        report = one(run.seed, out)
    skipped = report["skipped"]
    return {
        "summary": report["summary"],
        "skipped": skipped,
        "report": str(out / "report.json"),
        "plot": str(out / "fewshot.png"),
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2)


# --- a user's own preference file (training.data.userfile) ------------------------------------------------------


def encoder_spec(encoder: str | None = None, pooling: str | None = None) -> EncoderSpec:
    """The EncoderSpec for an encoder (None: DEFAULT_ENCODER, what a user's own data is embedded with): pooling as
    given, else what the architecture needs (last token for decoder-only models, mean for encoders)."""
    from models.encoder import default_pooling

    encoder = encoder or DEFAULT_ENCODER
    return EncoderSpec(name_or_path=encoder, pooling=pooling or default_pooling(encoder))


def chat_renderer(spec: EncoderSpec):  # -> models.chat.ChatRenderer
    """The renderer the service builds from the exported bundle (same template, default settings), so message
    lists in a training file become exactly the text the service embeds for the same messages."""
    from models.chat import ChatRenderer
    from models.encoder import load_tokenizer

    return ChatRenderer(template=getattr(load_tokenizer(spec), "chat_template", None) or None)


def file_experiment(
    path: Path,
    k: int = 3,
    seed: int = 0,
    encoder: str | None = None,
    user_column: str = "user_id",
    pooling: str | None = None,
    split: Any = None,
) -> Experiment:
    """A PAL-B experiment on a user's JSONL/CSV/Parquet file, split reproducibly from `seed`."""
    from training.data.userfile import SplitParams, load_preference_splits

    spec = encoder_spec(encoder, pooling)
    params = split or SplitParams(seed=seed)
    splits = load_preference_splits(path, user_column, params, chat_renderer(spec))
    emb = CachedEncoder(spec)
    return Experiment(splits.name, splits, emb, _text_pal(emb, k), schedule("file", seed))


def _save_splits(splits: PreferenceSplits, directory: Path) -> dict[str, Any]:
    """Write the splits (reloadable with `pal train --data DIR`) and return what was printed."""
    splits.save(directory)
    return {"splits": str(directory), **_describe_file_splits(splits)}


def _describe_file_splits(splits: PreferenceSplits) -> dict[str, Any]:
    """What `pal train/eval --data FILE` prints about its split: sizes, and which users were held out."""
    out = {k: v for k, v in splits.describe().items() if k != "split"}
    unseen = splits.unseen_users
    out["unseen_users"] = unseen[:20] + ([f"... {len(unseen) - 20} more"] if len(unseen) > 20 else [])
    return out


def train_file(
    path: Path,
    out: Path,
    run: RunOptions = RunOptions(),
    user_column: str = "user_id",
    pooling: str | None = None,
    stream: bool = False,
    cache_dir: Path | None = None,
    provider: str = "auto",
) -> dict[str, Any]:
    """`pal train --data FILE`: split, train, save the checkpoint and its splits (in `<out>/splits`). With `stream`,
    through the on-disk cache instead (training.stream; the splits stay in the cache, as index arrays)."""
    k, seed, encoder = run.k, run.seed, run.encoder
    if stream:
        from training.stream import train_stream

        return train_stream(path, out, encoder_spec(encoder, pooling), k, seed, user_column, cache_dir, provider)
    exp = file_experiment(path, k, seed, encoder, user_column, pooling)
    print(dumps({"data": _describe_file_splits(exp.splits)}))
    return train_checkpoint(exp, k, encode_splits(exp), out, lambda: {"data": _save_splits(exp.splits, out / "splits")})


def train_checkpoint(
    exp: Experiment, k: int, encs: dict[str, Any], out: Path, extra: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Train, save the checkpoint with its seen-test accuracy, and say what was done (`extra()` after training)."""
    result, ckpt = train_and_save(exp, k, encs, out, True)
    acc = read_meta(ckpt).metrics["seen_test_accuracy"]  # train_and_save measured it for config.json
    return {"checkpoint": str(ckpt), **extra(), **result.describe(), "seen_test_accuracy": acc}


def evaluate_file(
    path: Path, out: Path, run: RunOptions = RunOptions(), user_column: str = "user_id", pooling: str | None = None
) -> dict[str, Any]:
    """`pal eval --data FILE`: K=1 and K on the file's splits; report.json, fewshot.png and splits in `out`."""
    exp = file_experiment(path, run.k, run.seed, run.encoder, user_column, pooling)
    print(dumps({"data": _describe_file_splits(exp.splits)}))
    report = run_preset([exp], out, run.plan(), title=path.name)
    return {
        "summary": report["summary"],
        "data": _save_splits(exp.splits, out / "splits"),
        "report": str(out / "report.json"),
        "plot": str(out / "fewshot.png"),
    }
