"""Fixtures of the training suites."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from models.checkpoint import CONFIG_FILE


@pytest.fixture
def config_writes(monkeypatch: pytest.MonkeyPatch) -> Counter[Path]:
    """How many times each checkpoint directory's config.json is written while the test runs."""
    writes: Counter[Path] = Counter()
    write_text = Path.write_text

    def counting(self: Path, *args, **kwargs) -> int:
        if self.name == CONFIG_FILE:
            writes[self.parent] += 1
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", counting)
    return writes
