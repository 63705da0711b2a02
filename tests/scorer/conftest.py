from __future__ import annotations

from pathlib import Path

import pytest

from models.scorer import Scorer
from tests.scorer.factory import RANDOM_BUNDLE_MAX_LENGTH as MAX_LENGTH
from tests.scorer.factory import make_random_bundle


@pytest.fixture(scope="session")
def bundles(bundle_a: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real export per PAL form (PAL-B with the fp16 graph too, so its own); checkpoints sit beside as
    checkpoint-<form>."""
    root = tmp_path_factory.mktemp("scorer-bundles")
    return {"A": bundle_a, "B": make_random_bundle(root, form="B", max_length=MAX_LENGTH, fp16=True)}


@pytest.fixture(scope="session")
def scorers(bundles: dict[str, Path]) -> dict[str, Scorer]:
    return {form: Scorer.load(path, provider="cpu", intra_op_threads=1) for form, path in bundles.items()}
