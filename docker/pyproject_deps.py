"""Print pal-rm's requirements (base + the named extras) one per line, read from pyproject.toml.

The images install dependencies from this list in their own cached layer and then the package itself with
`pip install --no-deps`, so the Dockerfiles never repeat (and drift from) pyproject.toml. `--without` drops
distributions an image replaces: the GPU image swaps the CPU `onnxruntime` for `onnxruntime-gpu` (both ship the
same `onnxruntime` module; with both installed, whichever was installed last wins), the training image
installs torch itself from the CPU wheel index.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def distribution_name(requirement: str) -> str:
    """'uvicorn[standard]>=0.29' -> 'uvicorn' (PEP 503 normalised)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a distribution name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, extras: list[str], without: set[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    dropped = {distribution_name(name) for name in without}
    listed = list(project.get("dependencies", []))
    for extra in extras:
        listed += optional[extra]
    return [r for r in listed if distribution_name(r) not in dropped]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="optional-dependency groups to include, e.g. serve")
    parser.add_argument("--without", action="append", default=[], help="distribution to leave out (repeatable)")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    sys.stdout.write("".join(f"{r}\n" for r in requirements(args.pyproject, args.extras, set(args.without))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
