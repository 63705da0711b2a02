from __future__ import annotations

from pathlib import Path

import pytest

from models.scorer import Scorer
from tests.scorer.factory import make_random_bundle

# Short enough that a few sentences get truncated, so parity covers the truncation path cheaply.
MAX_LENGTH = 64


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real export per PAL form (PAL-B also with the fp16 graph); checkpoints sit beside as checkpoint-<form>."""
    root = tmp_path_factory.mktemp("scorer-bundles")
    return {form: make_random_bundle(root, form=form, max_length=MAX_LENGTH, fp16=form == "B") for form in "AB"}


@pytest.fixture(scope="session")
def scorers(bundles: dict[str, Path]) -> dict[str, Scorer]:
    return {form: Scorer.load(path, provider="cpu", intra_op_threads=1) for form, path in bundles.items()}
