"""Scorer bundle format: what `pal export` writes and `models.scorer` serves. numpy + safetensors + pydantic only.

    config.json        BundleMeta: format tag, model version, PALConfig, EncoderSpec, prior weights, graph I/O
                       names, the transformer fusions found in the graph, chat template, opset, creation time
    model.onnx         fp32 graph: token ids + mask -> encoder -> pooling -> PAL head outputs
    model.fp16.onnx    optional fp16 graph (fp32 inputs/outputs) for GPU serving
    model.portable.onnx  the same fp32 graph before onnxruntime's fusions (standard ONNX ops only), for the
                       OpenVINO provider, which cannot run the fused com.microsoft operators
    head.safetensors   the checkpoint's head parameters (models.head.HeadParams: fitting, PAL-A ideal points)
    users.safetensors  {"logits": (n_users, K)} seen users' simplex logits
    users.json         seen user ids, row order of the logits
    deviation.safetensors  a hierarchical model only (config `deviation_rank`): models.deviation.Deviation, and
                       the graph's third output `deviation` = V e(x)
    tokenizer/         tokenizer.json (+ the HF tokenizer config files; tokenizer_config.json names the pad token)
    validation.json    optional: a sample of the checkpoint's validation comparisons, on which the scorer measures
                       how many decisions each precision keeps (models/validation_sample.py, models/precision.py)

The version is a hash of everything that changes a reward: the config fields the scorer reads and the sha256 of
every file above but config.json (`digests`). It keys stored user fits and cached encodings, so a bundle whose
head, users, tokenizer, graphs or max_length differ always serves under another version; `verify_contents`
recomputes both at load, so a file changed after export is refused instead of reusing fits made for another
model. An intentional edit (tests, a hand-set chat template) is re-sealed with `seal`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file

from models import validation_sample
from models.checkpoint import USER_IDS_FILE, USERS_FILE, check_head_arrays, check_hier, check_user_arrays
from models.config import EncoderSpec, PALConfig
from models.deviation import DEVIATION_FILE, Deviation
from models.head import HeadParams, softmax

FORMAT = "pal-rm-bundle/1"
CONFIG_FILE = "config.json"
GRAPH_FP32 = "model.onnx"
GRAPH_FP16 = "model.fp16.onnx"
GRAPH_PORTABLE = "model.portable.onnx"
HEAD_FILE = "head.safetensors"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
VALIDATION_FILE = validation_sample.FILE

LATENT = "latent"
PROMPT_PROTOTYPES = "prompt_prototypes"
DEVIATION = "deviation"  # a hierarchical model's V e(x), (B, R)


class BundleError(ValueError):
    """A bundle that is missing, malformed or inconsistent: raised at load, saying what is wrong."""


class BundleMeta(BaseModel):
    format: str = FORMAT
    # Hash of the versioned fields and the file digests (see the module doc): the model version every response,
    # stored fit and cache key carries.
    version: str
    # The content hash of the checkpoint this bundle was exported from.
    checkpoint_version: str = ""
    # sha256 of every content file, by path relative to the bundle.
    digests: dict[str, str] = Field(default_factory=dict)
    pal: PALConfig
    encoder: EncoderSpec
    prior_weights: list[float]
    prior_strength: float | None = Field(default=None, gt=0)
    input_names: list[str] = Field(default_factory=lambda: ["input_ids", "attention_mask"])
    output_names: list[str]
    # Fused-operator counts onnxruntime's transformer optimizer produced (Attention, SkipLayerNormalization, ...).
    fusions: dict[str, int] = Field(default_factory=dict)
    graphs: dict[str, str] = Field(default_factory=lambda: {"fp32": GRAPH_FP32})
    chat_template: str | None = None
    opset: int
    created_at: str
    # Largest |onnx - torch| over the export's self-check texts, per graph.
    export_max_abs_diff: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, object] = Field(default_factory=dict)
    # A hierarchical model: the K=1 head's reward plus a rank-R personal deviation (DEVIATION_FILE); None: PAL.
    deviation_rank: int | None = Field(default=None, ge=1)

    @property
    def weights_dim(self) -> int:
        """How many numbers a user's weights are: K simplex weights (PAL), or R deviation weights (hier)."""
        return self.pal.k if self.deviation_rank is None else self.deviation_rank


# Config fields that change a reward (the rest are provenance: fusions, creation time, export diffs, metrics).
VERSIONED_FIELDS = (
    "format", "checkpoint_version", "pal", "encoder", "prior_weights", "prior_strength", "input_names",
    "output_names", "graphs", "chat_template",
)  # fmt: skip


def content_files(directory: str | Path, meta: BundleMeta) -> list[str]:
    """Paths (relative, posix) of every file whose bytes change a reward."""
    directory = Path(directory)
    names = [HEAD_FILE, USERS_FILE, USER_IDS_FILE, *meta.graphs.values()]
    if meta.deviation_rank is not None or (directory / DEVIATION_FILE).is_file():
        names.append(DEVIATION_FILE)
    if (directory / VALIDATION_FILE).is_file():  # optional; bundles exported before it have none
        names.append(VALIDATION_FILE)
    tokenizer = directory / TOKENIZER_DIR
    if tokenizer.is_dir():
        names += [p.relative_to(directory).as_posix() for p in tokenizer.rglob("*") if p.is_file()]
    return sorted(set(names))


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_version(meta: BundleMeta, digests: dict[str, str]) -> str:
    fields = meta.model_dump(mode="json", include=set(VERSIONED_FIELDS))
    if meta.deviation_rank is not None:  # only then: the versions of PAL bundles stay what they were
        fields["deviation_rank"] = meta.deviation_rank
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for name, digest in sorted(digests.items()):
        h.update(f"\n{name}={digest}".encode())
    return "pal-" + h.hexdigest()[:16]


def seal(directory: str | Path, meta: BundleMeta | None = None) -> BundleMeta:
    """Record the digests of the bundle's files and the version they imply in its config.json; returns the
    sealed meta. Export calls it last; call it after editing a bundle on purpose."""
    directory = Path(directory)
    meta = meta or BundleMeta.model_validate_json((directory / CONFIG_FILE).read_text())
    digests = {name: file_digest(directory / name) for name in content_files(directory, meta)}
    meta = meta.model_copy(update={"digests": digests, "version": content_version(meta, digests)})
    (directory / CONFIG_FILE).write_text(meta.model_dump_json(indent=2))
    return meta


def verify_contents(directory: str | Path, meta: BundleMeta) -> None:
    """The bundle's files and config are the ones its version was computed from, or BundleError."""
    directory = Path(directory)
    if not meta.digests:
        raise BundleError(
            f"bundle {directory} records no file digests (exported by an older pal-rm), so its version does not "
            "bind its contents: re-export it with `pal export`"
        )
    expected = content_files(directory, meta)
    if sorted(meta.digests) != expected:
        missing = sorted(set(meta.digests) - set(expected))
        extra = sorted(set(expected) - set(meta.digests))
        raise BundleError(f"bundle {directory}: files differ from the export (missing {missing}, unrecorded {extra})")
    for name in expected:
        if not (directory / name).is_file():
            raise BundleError(f"bundle {directory} has no {name}")
        if file_digest(directory / name) != meta.digests[name]:
            raise BundleError(
                f"{directory / name} does not match its digest in {CONFIG_FILE}: the file changed after export; "
                "re-export the bundle (a changed file must not serve under the old version)"
            )
    actual = content_version(meta, meta.digests)
    if actual != meta.version:
        raise BundleError(
            f"bundle {directory}: version {meta.version!r} does not match its contents ({actual!r}): {CONFIG_FILE} "
            "was edited after export; re-export the bundle, or re-seal it (models.bundle.seal) if the edit is meant"
        )


def expected_outputs(cfg: PALConfig, deviation_rank: int | None = None) -> list[str]:
    names = [LATENT, PROMPT_PROTOTYPES] if cfg.form == "B" else [LATENT]
    return names if deviation_rank is None else [*names, DEVIATION]


def read_meta(directory: str | Path) -> BundleMeta:
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle {directory} is not a directory")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise BundleError(f"bundle {directory} has no {CONFIG_FILE}")
    try:
        meta = BundleMeta.model_validate_json(path.read_text())
    except (ValidationError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not a valid bundle config: {e}") from e
    if meta.format != FORMAT:
        raise BundleError(f"unsupported bundle format {meta.format!r}, expected {FORMAT!r}")
    if meta.encoder.kind != "hf":
        raise BundleError(f"bundle {directory} has encoder kind {meta.encoder.kind!r}; only 'hf' encoders serve text")
    if meta.output_names != expected_outputs(meta.pal, meta.deviation_rank):
        form = f"PAL-{meta.pal.form}"
        if meta.deviation_rank is not None:
            form += f" + a rank-{meta.deviation_rank} deviation"
        raise BundleError(f"bundle outputs {meta.output_names} do not match {form}")
    check_hier(meta.pal, meta.deviation_rank, directory, BundleError)
    if len(meta.prior_weights) != meta.pal.k or abs(sum(meta.prior_weights) - 1) > 1e-3:
        raise BundleError(f"{CONFIG_FILE} prior_weights must be K={meta.pal.k} weights summing to 1")
    return meta


def read_head(directory: str | Path, meta: BundleMeta) -> HeadParams:
    """Head parameters, checked against the shapes the config implies."""

    path = Path(directory) / HEAD_FILE
    arrays = _load_safetensors(path)
    check_head_arrays(arrays, meta.pal, path, BundleError)
    return HeadParams(meta.pal, {k: v.astype(np.float64) for k, v in arrays.items()})


def read_users(directory: str | Path, meta: BundleMeta) -> dict[str, np.ndarray]:
    """Seen users' simplex weights, user id -> (K,)."""
    directory = Path(directory)
    logits = _load_safetensors(directory / USERS_FILE).get("logits")
    try:
        user_ids = json.loads((directory / USER_IDS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"bundle {directory}: unreadable {USER_IDS_FILE}: {e}") from e
    check_user_arrays(logits, user_ids, meta.pal.k, directory, BundleError)
    return dict(zip(user_ids, softmax(logits.astype(np.float64)), strict=True))


def read_deviation(directory: str | Path, meta: BundleMeta, user_ids: list[str]) -> Deviation | None:
    """A hierarchical bundle's deviation, checked against its rank, item dimension and seen users; None for PAL."""
    if meta.deviation_rank is None:
        return None
    return Deviation.read(directory, meta.deviation_rank, meta.pal.item_dim, len(user_ids), BundleError)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise BundleError(f"bundle {path.parent} has no {path.name}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path} is not a readable safetensors file: {e}") from e
