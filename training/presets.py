"""The acceptance settings as named presets: data builder + embedder + head shape + training schedule."""

from __future__ import annotations

from dataclasses import dataclass

from models.config import DEFAULT_ENCODER, EncoderSpec, PALConfig
from training.data.persona import PersonaParams, build_persona
from training.data.polis import PolisParams, build_polis, conversations
from training.data.schema import PreferenceSplits
from training.data.simulated import SimulatedParams, build_simulated
from training.embed import CachedEncoder, Embedder, TableEmbedder
from training.train import TrainConfig

PRESETS: tuple[str, ...] = ("simulated", "persona", "polis", "polis-pairs", "polis-joint", "polis-pairs-joint")
# "<preset>-joint": the preset's data sets, one model trained across all of them (training.joint).
JOINT_SUFFIX = "-joint"


# Every training schedule in one place: TrainConfig's defaults (training/train.py) and what each setting changes.
SCHEDULES: dict[str, dict[str, object]] = {
    # PAL-A with a linear f on a vector table: many cheap epochs; user weights move fast, nothing to decay.
    "simulated": {"epochs": 200, "lr": 3e-3, "user_lr": 0.2, "weight_decay": 0.0, "patience": 20},
    "persona": {"epochs": 40},
    # K > 1 starts from the trained global (K=1) model and keeps it unless an epoch beats it on validation:
    # on these small real data sets a randomly initialised K=3 model was often below K=1 (taxes: below chance).
    "polis": {"epochs": 20, "batch_size": 512, "patience": 5, "warm_start": True, "deviation_models": True},
    "demo": {"epochs": 30},  # the small persona set of `pal demo` and the end-to-end tests
    "file": {},  # a user's own preference file (pal train/eval --data)
}
# The frozen encoder of each preset unless --encoder names another. Polis reads all-mpnet-base-v2 (5 PyPI part
# packages, installed by scripts/setup.sh): on new statements it lifts the global model by ~4 points over MiniLM,
# the largest lift of the shared model we measured on these small conversations (docs/TRAINING.md).
PRESET_ENCODERS: dict[str, str] = {"polis": "all-mpnet-base-v2", "polis-pairs": "all-mpnet-base-v2"}
# The PAL-B head on a text encoder's embeddings (its input dims come from the encoder).
TEXT_HEAD = {"form": "B", "latent_dim": 64, "hidden_dim": 256, "n_hidden": 1}


def schedule(name: str, seed: int) -> TrainConfig:
    return TrainConfig(seed=seed, **SCHEDULES[name])  # type: ignore[arg-type]


@dataclass
class Experiment:
    name: str
    splits: PreferenceSplits
    embedder: Embedder
    pal: PALConfig  # k is set per model (K=1 baseline and the chosen K)
    train: TrainConfig


def simulated(seed: int = 0, k: int = 3, **params) -> Experiment:
    p = SimulatedParams(seed=seed, **params)
    data = build_simulated(p)
    # PAL-A with a linear f: the generating model is exactly an ideal point in item space.
    pal = PALConfig(form="A", k=k, prompt_dim=1, item_dim=p.dim, latent_dim=p.dim, n_hidden=0)
    table = TableEmbedder(data.item_vectors, name="simulated-table")
    return Experiment(data.splits.name, data.splits, table, pal, schedule("simulated", seed))


def hf_embedder(encoder: str = DEFAULT_ENCODER) -> CachedEncoder:
    return CachedEncoder(EncoderSpec(name_or_path=encoder))


def _text_pal(embedder: Embedder, k: int) -> PALConfig:
    dim = int(embedder.embed(["dimension probe"]).shape[1])
    return PALConfig(k=k, prompt_dim=dim, item_dim=dim, **TEXT_HEAD)  # type: ignore[arg-type]


def persona(seed: int = 0, k: int = 3, encoder: str = DEFAULT_ENCODER, **params) -> Experiment:
    splits = build_persona(PersonaParams(seed=seed, **params))
    emb = hf_embedder(encoder)
    return Experiment(splits.name, splits, emb, _text_pal(emb, k), schedule("persona", seed))


def polis(
    conversation: str, seed: int = 0, k: int = 3, encoder: str = PRESET_ENCODERS["polis"], **params
) -> Experiment:
    splits = build_polis(PolisParams(conversation=conversation, seed=seed, **params))
    emb = hf_embedder(encoder)
    return Experiment(splits.name, splits, emb, _text_pal(emb, k), schedule("polis", seed))


def preset_encoder(name: str) -> str:
    """The encoder a preset reads when none is named (polis, polis-pairs and their -joint: all-mpnet-base-v2)."""
    return PRESET_ENCODERS.get(name.removesuffix(JOINT_SUFFIX), DEFAULT_ENCODER)


def experiments(name: str, seed: int = 0, k: int = 3, encoder: str | None = None) -> list[Experiment]:
    encoder = encoder or preset_encoder(name)
    name = name.removesuffix(JOINT_SUFFIX)
    if name == "simulated":
        return [simulated(seed, k)]
    if name == "persona":
        return [persona(seed, k, encoder)]
    if name in ("polis", "polis-pairs"):
        convs = conversations()
        if not convs:
            raise FileNotFoundError("no Polis conversations found; set PAL_DATA_DIR to the shared data directory")
        holdout = "pairs" if name == "polis-pairs" else "statements"
        return [polis(c, seed, k, encoder, holdout=holdout) for c in convs]
    raise ValueError(f"unknown preset {name!r}: expected one of {PRESETS}")


def with_k(exp: Experiment, k: int) -> PALConfig:
    return exp.pal.model_copy(update={"k": k})
