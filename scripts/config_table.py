"""Print the README's configuration table from `service.config.Settings`, or rewrite it in place (--write).

The table is generated so it cannot drift from the code; tests/test_readme.py fails when it has.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic.fields import FieldInfo

from service.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def _variable(name: str) -> str:
    if name == "redis_url":
        return "`REDIS_URL` (or `PAL_REDIS_URL`)"
    return f"`PAL_{name.upper()}`"


def _default(name: str, field: FieldInfo) -> str:
    if name == "strip_tokens":
        return "common templates' pad/BOS/EOS"
    value = field.get_default(call_default_factory=True)
    return "unset" if value is None else f"`{value}`"


def table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| {_variable(name)} | {_default(name, field)} | {field.description or ''} |")
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    if not rest or END not in rest:
        raise SystemExit(f"{README} lacks the {START} ... {END} markers")
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        README.write_text(readme_with_table(README.read_text()))
    else:
        print(table())
