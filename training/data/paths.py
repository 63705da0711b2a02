"""Where the shared data lives: $PAL_DATA_DIR, default <repo>/../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    return Path(os.environ.get("PAL_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}; set PAL_DATA_DIR to the shared data directory")
    return path
