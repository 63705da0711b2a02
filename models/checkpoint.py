"""Checkpoint format: a directory of JSON + safetensors. Never pickle.

    config.json        format tag, PALConfig, EncoderSpec, training data/metrics, version (content hash),
                       population prior (mean seen-user weights)
    model.safetensors  shared head parameters (names of models.pal; weights stored (in, out))
    users.safetensors  {"logits": (n_users, K)}  seen users' simplex logits
    users.json         seen user ids, row order of the logits
    deviation.safetensors  optional, a hierarchical model (config `deviation_rank`): the K=1 head is the global
                       reward, plus a low-rank personal deviation (models.deviation.Deviation: basis, prior, seen
                       users' weights in the row order of users.json)

Reading needs numpy + safetensors only, so the serving side can load checkpoints without torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from models.config import EncoderSpec, PALConfig
from models.deviation import DEVIATION_FILE, Deviation
from models.head import HeadParams, softmax

if TYPE_CHECKING:
    from models.pal import PALModel

FORMAT = "pal-rm-checkpoint/1"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
USERS_FILE = "users.safetensors"
USER_IDS_FILE = "users.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or inconsistent: raised at load, with what is wrong."""


class CheckpointMeta(BaseModel):
    format: str = FORMAT
    version: str = ""
    pal: PALConfig
    encoder: EncoderSpec
    prior_weights: list[float] = Field(default_factory=list)
    # Few-shot prior strength selected on seen users' validation pairs; what /adapt uses unless overridden.
    prior_strength: float | None = Field(default=None, gt=0)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    # A hierarchical model (global K=1 reward + a rank-R personal deviation in DEVIATION_FILE); None: PAL.
    deviation_rank: int | None = Field(default=None, ge=1)


class Checkpoint(BaseModel, arbitrary_types_allowed=True):
    meta: CheckpointMeta
    head: dict[str, np.ndarray]
    user_ids: list[str]
    user_logits: np.ndarray
    deviation: Deviation | None = None

    @property
    def head_params(self) -> HeadParams:
        return HeadParams(self.meta.pal, {k: v.astype(np.float64) for k, v in self.head.items()})

    def user_weights(self) -> dict[str, np.ndarray]:
        return dict(zip(self.user_ids, softmax(self.user_logits.astype(np.float64)), strict=True))


def expected_head_shapes(cfg: PALConfig) -> dict[str, tuple[int, ...]]:
    dims_f = [cfg.item_dim] + [cfg.hidden_dim] * cfg.n_hidden + [cfg.latent_dim]
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (a, b) in enumerate(zip(dims_f[:-1], dims_f[1:], strict=True)):
        shapes[f"f.w{i}"], shapes[f"f.b{i}"] = (a, b), (b,)
    if cfg.form == "B":
        dims_g = [cfg.prompt_dim] + [cfg.hidden_dim] * cfg.n_hidden + [cfg.latent_dim]
        for i, (a, b) in enumerate(zip(dims_g[:-1], dims_g[1:], strict=True)):
            shapes[f"g.w{i}"], shapes[f"g.b{i}"] = (cfg.k, a, b), (cfg.k, b)
        shapes["log_tau"], shapes["tau"] = (), (1,)
    else:
        shapes["prototypes"] = (cfg.k, cfg.item_dim)
    return shapes


def content_version(directory: str | Path, meta: CheckpointMeta | None = None) -> str:
    """Hash of everything that changes scores: the architecture, the parameters and the seen users.

    meta: the config about to be written (save_checkpoint seals it before config.json exists); by default the
    one in the directory."""
    directory = Path(directory)
    fields = json.loads(meta.model_dump_json() if meta is not None else (directory / CONFIG_FILE).read_text())
    h = hashlib.sha256()
    h.update(json.dumps({"pal": fields["pal"], "encoder": fields["encoder"]}, sort_keys=True).encode())
    for name in content_files(fields.get("deviation_rank")):
        h.update((directory / name).read_bytes())
    return "pal-" + h.hexdigest()[:16]


def content_files(deviation_rank: int | None) -> tuple[str, ...]:
    """The weight files a checkpoint's version hashes (a hierarchical one's deviation too)."""
    files = (MODEL_FILE, USERS_FILE, USER_IDS_FILE)
    return files if deviation_rank is None else (*files, DEVIATION_FILE)


def check_hier(cfg: PALConfig, deviation_rank: int | None, directory: Path, error: type[ValueError]) -> None:
    """A hierarchical model's head must be the global K=1 model: its reward is g, the one prototype's."""
    if deviation_rank is not None and cfg.k != 1:
        raise error(f"{directory} declares a deviation (rank {deviation_rank}) on a K={cfg.k} head; it needs K=1")


def add_deviation(directory: str | Path, meta: CheckpointMeta, deviation: Deviation) -> CheckpointMeta:
    """Make the checkpoint in `directory` (whose weight files `meta` describes) a hierarchical one: write its
    deviation and return the meta with the rank and the version that now binds it; config.json is left to the
    caller (write_config, the one writer)."""
    directory = Path(directory)
    check_hier(meta.pal, deviation.rank, directory, CheckpointError)
    deviation.save(directory)
    meta = meta.model_copy(deep=True, update={"deviation_rank": deviation.rank})
    meta.version = content_version(directory, meta)
    return meta


def write_config(directory: str | Path, meta: CheckpointMeta) -> None:
    """The one writer of config.json. Prior strength and metrics do not change the version (content_version
    hashes the architecture and the weight files), so they can be recorded after the version is sealed."""
    (Path(directory) / CONFIG_FILE).write_text(meta.model_dump_json(indent=2))


def save_checkpoint(
    directory: str | Path,
    model: PALModel,
    user_ids: list[str],
    encoder: EncoderSpec,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    *,
    defer_config: bool = False,
) -> Checkpoint:
    """Write a checkpoint and return it as read_checkpoint will read it.

    defer_config: write the weight files only (the version is sealed all the same). Training records what it
    learns from the saved model (prior strength, metrics) in `meta`, then writes config.json once, complete,
    with write_config."""
    from models.pal import head_state  # torch only when saving from a torch model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head = {k: v.numpy().astype(np.float32) for k, v in head_state(model.head).items()}
    logits = model.user_logits.detach().cpu().numpy().astype(np.float32)
    if len(user_ids) != logits.shape[0]:
        raise ValueError(f"{len(user_ids)} user ids for {logits.shape[0]} rows of user logits")
    save_file(head, str(directory / MODEL_FILE))
    save_file({"logits": logits}, str(directory / USERS_FILE))
    (directory / USER_IDS_FILE).write_text(json.dumps(list(user_ids)))
    prior = (
        softmax(logits.astype(np.float64)).mean(0)
        if len(user_ids)
        else np.full(model.head.cfg.k, 1 / model.head.cfg.k)
    )
    meta = CheckpointMeta(
        pal=model.head.cfg,
        encoder=encoder,
        prior_weights=[float(x) for x in prior],
        training=training or {},
        metrics=metrics or {},
    )
    meta.version = content_version(directory, meta)
    if not defer_config:
        write_config(directory, meta)
    return Checkpoint(meta=meta, head=head, user_ids=list(user_ids), user_logits=logits)


def read_meta(directory: str | Path) -> CheckpointMeta:
    """config.json alone, unverified (read_checkpoint checks it against the weights)."""
    return CheckpointMeta.model_validate_json((Path(directory) / CONFIG_FILE).read_text())


def update_metrics(directory: str | Path, metrics: dict[str, Any]) -> None:
    """Record evaluation results in an existing checkpoint's config.json; metrics do not change its version."""
    meta = read_meta(directory)
    meta.metrics.update(metrics)
    write_config(directory, meta)


def check_head_arrays(arrays: dict[str, np.ndarray], cfg: PALConfig, path: Path, error: type[ValueError]) -> None:
    """Every parameter the config implies, in its shape, finite: checkpoints and bundles hold the same head."""
    for name, shape in expected_head_shapes(cfg).items():
        if name not in arrays:
            raise error(f"{path} lacks parameter {name!r}")
        if tuple(arrays[name].shape) != shape:
            raise error(f"{path}: {name} has shape {tuple(arrays[name].shape)}, config implies {shape}")
        if not np.isfinite(arrays[name]).all():
            raise error(f"{path}: {name} holds NaN or inf")


def check_user_arrays(
    logits: np.ndarray | None, user_ids: Any, k: int, directory: Path, error: type[ValueError]
) -> None:
    """Seen users' ids (a JSON list of strings) and their (n_users, K) finite logits, as checkpoints and bundles
    store them."""
    if not isinstance(user_ids, list) or not all(isinstance(u, str) for u in user_ids):
        raise error(f"{directory / USER_IDS_FILE} must be a JSON list of strings")
    if logits is None or logits.ndim != 2 or logits.shape != (len(user_ids), k):
        shape = None if logits is None else logits.shape
        raise error(f"{directory / USERS_FILE}: logits {shape} do not match {len(user_ids)} users x K={k}")
    if not np.isfinite(logits).all():
        raise error(f"{directory / USERS_FILE}: logits hold NaN or inf")


def read_checkpoint(directory: str | Path, verify_version: bool = True) -> Checkpoint:
    """Load and validate a checkpoint directory with numpy only; CheckpointError says what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is not a directory")
    for name in (CONFIG_FILE, MODEL_FILE, USERS_FILE, USER_IDS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}")
    try:
        meta = read_meta(directory)
    except (ValidationError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid checkpoint config: {e}") from e
    if meta.format != FORMAT:
        raise CheckpointError(f"unsupported checkpoint format {meta.format!r}, expected {FORMAT!r}")
    try:
        head = load_file(str(directory / MODEL_FILE))
        logits = load_file(str(directory / USERS_FILE))["logits"]
        user_ids = json.loads((directory / USER_IDS_FILE).read_text())
    except (SafetensorError, KeyError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {directory} has unreadable weights: {e}") from e
    check_head_arrays(head, meta.pal, directory / MODEL_FILE, CheckpointError)
    check_user_arrays(logits, user_ids, meta.pal.k, directory, CheckpointError)
    if len(meta.prior_weights) != meta.pal.k or abs(sum(meta.prior_weights) - 1) > 1e-3:
        raise CheckpointError("config.json prior_weights must be K weights summing to 1")
    deviation = None
    if meta.deviation_rank is not None:
        check_hier(meta.pal, meta.deviation_rank, directory, CheckpointError)
        deviation = Deviation.read(directory, meta.deviation_rank, meta.pal.item_dim, len(user_ids), CheckpointError)
    if verify_version and meta.version != content_version(directory):
        raise CheckpointError(f"checkpoint {directory}: content does not match its version {meta.version!r}")
    return Checkpoint(meta=meta, head=head, user_ids=user_ids, user_logits=logits, deviation=deviation)


def load_model(directory: str | Path) -> tuple[PALModel, Checkpoint]:
    """Rebuild the torch model from a checkpoint (training, export and parity tests)."""
    import torch

    from models.pal import PALModel

    ckpt = read_checkpoint(directory)
    model = PALModel(ckpt.meta.pal, n_users=len(ckpt.user_ids))
    state = {f"head.{k}": torch.from_numpy(v.copy()) for k, v in ckpt.head.items() if k != "tau"}
    state["user_logits"] = torch.from_numpy(ckpt.user_logits.copy())
    model.load_state_dict(state)
    return model, ckpt
