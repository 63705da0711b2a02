"""Readers for the deployment files, shared by the tests in this folder (no docker engine needed).

- compose files: YAML with Compose's merge tags (`!reset`, `!override`), merged the way `docker compose -f a -f b`
  does for the parts these files use, and `${VAR:-default}` interpolation with the defaults;
- the compose-specification JSON schema, as vendored (Apache-2.0, licence file beside it) by the
  check-jsonschema package from the `dev` extra;
- Dockerfiles: instructions per build stage (continuation lines joined, comments kept for hadolint ignores);
- .dockerignore: Docker's last-match-wins include/exclude rules;
- the environment variable names service.config.Settings reads, derived from its fields.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
DOCKER_DIR = REPO / "docker"
DOCKERFILES = {p.name.removesuffix(".Dockerfile"): p for p in sorted(DOCKER_DIR.glob("*.Dockerfile"))}


# --- compose -----------------------------------------------------------------------------------------------


class Reset:
    """`!reset`: drop what earlier files said for this key."""


@dataclass
class Override:
    """`!override VALUE`: replace what earlier files said for this key instead of merging."""

    value: Any


class ComposeLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _override)


def load_compose(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return yaml.load(f, Loader=ComposeLoader)  # noqa: S506 - SafeLoader subclass with two inert tags


def strip_tags(value: Any) -> Any:
    """A single file as the schema sees it: `!reset` -> null, `!override X` -> X."""
    if isinstance(value, Reset):
        return None
    if isinstance(value, Override):
        return strip_tags(value.value)
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_tags(v) for v in value]
    return value


def merge(base: Any, override: Any) -> Any:
    """Compose's multi-file merge for what these files use: mappings merge key by key, sequences append,
    scalars replace; `!reset` removes the key, `!override` replaces without merging."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                out.pop(key, None)
            elif isinstance(value, Override):
                out[key] = strip_tags(value.value)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = strip_tags(value)
        return out
    if isinstance(base, list) and isinstance(override, list):
        return copy.deepcopy(base) + [v for v in strip_tags(override) if v not in base]
    return strip_tags(override)


def merged_compose(*paths: Path) -> dict[str, Any]:
    model: dict[str, Any] = {}
    for path in paths:
        model = merge(model, load_compose(path))
    return model


_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


def interpolation_variables(text: str) -> set[str]:
    return {m.group("name") for m in _INTERPOLATION.finditer(text)}


def interpolate_defaults(value: Any) -> Any:
    """`${VAR:-default}` -> default, `${VAR}` -> "": the model as compose resolves it with nothing set on the host."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group("arg") if m.group("op") in (":-", "-") else "", value)
    if isinstance(value, dict):
        return {k: interpolate_defaults(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_defaults(v) for v in value]
    return value


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's `environment` as a mapping, in either of Compose's two spellings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict((item.split("=", 1) + [None])[:2] if "=" in item else (item, None) for item in env)
    return {k: None if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def compose_schema() -> dict[str, Any]:
    schema = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(schema.read_text())


# --- Dockerfiles ---------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def run_text(self) -> str:
        return "\n".join(i.args for i in self.all("RUN"))


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages). Continuation lines are joined; comments and blank lines are dropped."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are dropped by docker too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = pending + line, ""
        keyword, _, args = text.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if instruction.keyword == "ARG":
                key, _, default = instruction.args.partition("=")
                global_args[key] = default
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def arg_defaults(stage: Stage) -> dict[str, str]:
    out = {}
    for instruction in stage.all("ARG"):
        key, _, default = instruction.args.partition("=")
        out[key.strip()] = default.strip().strip('"')
    return out


def env_names(stage: Stage) -> set[str]:
    """Names set by ENV lines, in `ENV A=1 B=2` form."""
    names = set()
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            names.add(word.split("=", 1)[0])
    return names


# --- .dockerignore --------------------------------------------------------------------------------------------


def dockerignore_rules(path: Path = REPO / ".dockerignore") -> list[tuple[bool, str]]:
    """(exclude?, pattern) in file order."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((not negated, line.lstrip("!").strip().strip("/")))
    return rules


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's dockerignore syntax: `*` and `?` stay within one path element, `**` spans any number."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _matches(pattern: str, rel: str) -> bool:
    """A pattern matching a directory also matches everything under it."""
    regex, parts = _pattern_regex(pattern), rel.split("/")
    return any(regex.fullmatch("/".join(parts[: i + 1])) for i in range(len(parts)))


def in_build_context(rel: str, rules: list[tuple[bool, str]] | None = None) -> bool:
    excluded = False
    for exclude, pattern in rules if rules is not None else dockerignore_rules():
        if _matches(pattern, rel):
            excluded = exclude
    return not excluded


# --- the service's configuration ----------------------------------------------------------------------------


def settings_env_names() -> set[str]:
    """Every environment variable service.config.Settings reads: PAL_<FIELD> plus each field's aliases."""
    from pydantic import AliasChoices, AliasPath

    from service.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names: set[str] = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias or info.alias
        if alias is None:
            names.add(f"{prefix}{name}".upper())
        elif isinstance(alias, AliasChoices):
            names |= {c.upper() for c in alias.choices if isinstance(c, str)}
            names |= {c.path[0].upper() for c in alias.choices if isinstance(c, AliasPath)}
        else:
            names.add(str(alias).upper())
    return names
