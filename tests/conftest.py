"""Session fixtures shared by every suite: random PAL heads on the real MiniLM, exported once, and the PAL-B one
loaded once for the suites that serve it.

Each export costs several seconds (ONNX export + onnxruntime's BERT fusion). The suites only read these bundles
(tests that damage a bundle or a checkpoint copy it first), so one export per form serves them all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.scorer.factory import RANDOM_BUNDLE_MAX_LENGTH, make_random_bundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bundle_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random PAL-B head (K=3); its checkpoint sits beside it as checkpoint-B."""
    return make_random_bundle(tmp_path_factory.mktemp("random-b"), form="B", k=3, max_length=RANDOM_BUNDLE_MAX_LENGTH)


@pytest.fixture(scope="session")
def bundle_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random PAL-A head (K=3), another model version than PAL-B; its checkpoint sits beside it as checkpoint-A."""
    return make_random_bundle(tmp_path_factory.mktemp("random-a"), form="A", k=3, max_length=RANDOM_BUNDLE_MAX_LENGTH)


@pytest.fixture(scope="session")
def scorer_b(bundle_b: Path):
    """bundle_b loaded as the service suites run it (CPU, 1 thread, small cache); thread-safe, so shared."""
    from models.scorer import Scorer

    return Scorer.load(bundle_b, provider="cpu", intra_op_threads=1, cache_size=4096)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def scorer_a(bundle_a: Path):
    """A second model (PAL-A, so another version) for model-change and migration tests."""
    from models.scorer import Scorer

    return Scorer.load(bundle_a, provider="cpu", intra_op_threads=1, cache_size=4096)
