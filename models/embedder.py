"""The frozen encoder on onnxruntime, for embedding training data: the graph `models.export.export_encoder` writes
(token ids + mask -> pooled embedding), run with the scorer's tokenizer loading and token-budget batching
(models.scorer), on CUDA when this onnxruntime build has it, else the CPU. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.config import EncoderSpec
from models.providers import REGISTRY, ExecutionProvider
from models.scorer import _clean, encode_token_ids, load_tokenizer_dir, run_graph

ENCODER_GRAPH = "encoder.onnx"  # what models.export.export_encoder writes (named here: this module has no torch)
ENCODER_SPEC_FILE = "encoder.json"


def pick_provider(requested: str = "auto") -> ExecutionProvider:
    """CUDA when asked for or, under `auto`, when this onnxruntime build has it; else onnxruntime's CPU provider."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"embedding provider must be auto, cuda or cpu, got {requested!r}")
    cuda = REGISTRY["cuda"]
    if requested == "cuda" or (requested == "auto" and cuda.unavailable("fp32") is None):
        return cuda
    return REGISTRY["cpu"]


class OnnxEncoder:
    """texts -> (n, dim) float32 embeddings. `embed` has the training Embedder signature, so the in-memory path
    (training.encoded) can run on it too."""

    def __init__(self, directory: str | Path, provider: str = "auto", threads: int = 0) -> None:
        self.directory = Path(directory)
        self.spec = EncoderSpec.model_validate_json((self.directory / ENCODER_SPEC_FILE).read_text())
        self.backend = pick_provider(provider)
        self._session = self.backend.open(self.directory / ENCODER_GRAPH, "fp32", threads, False)
        self.provider: str = self._session.get_providers()[0]
        self._tokenizer, self._pad_id = load_tokenizer_dir(self.directory, self.spec)
        self._inputs = [i.name for i in self._session.get_inputs()]
        self.dim = int(self._run(np.full((1, 2), self._pad_id, np.int64), np.ones((1, 2), np.int64))[0].shape[1])

    def embed(self, texts: Sequence[str], role: str = "item") -> np.ndarray:
        """Embeddings of `texts` in order (prompts and items share the encoder, so `role` changes nothing)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = [list(e.ids) for e in self._tokenizer.encode_batch(_clean(texts))]
        outputs, _ = encode_token_ids(
            ids, self._run, self._pad_id, self.backend.width_multiple, self.spec.max_length,
            self.backend.batch_tokens,
            self.backend.pad_tolerance,
        )
        return outputs[0]

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        return run_graph(self._session, self._inputs, ids, mask)

