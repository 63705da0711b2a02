"""The README is part of the product: its configuration table is the one generated from Settings, and it names
the two commands CI and users run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _config_table_module():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" / "config_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_configuration_table_is_the_generated_one() -> None:
    config_table = _config_table_module()
    assert config_table.readme_with_table(README) == README, (
        "README.md's configuration table is stale: run `python scripts/config_table.py --write`"
    )


def test_readme_documents_every_setting() -> None:
    missing = [f"PAL_{name.upper()}" for name in Settings.model_fields if f"`PAL_{name.upper()}`" not in README]
    missing = [m for m in missing if m != "PAL_REDIS_URL"] + (["REDIS_URL"] if "`REDIS_URL`" not in README else [])
    assert not missing, f"README.md configuration table lacks {missing}"
    assert all(field.description for field in Settings.model_fields.values()), "every setting needs a description"


def test_readme_names_the_two_commands_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in README and "scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in README
