"""Scenario kinds and scenario files: find a YAML by name or path, validate, apply overrides."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module, resources
from pathlib import Path
from typing import Any

import yaml

from ddsuite.core.errors import ConfigError, UnknownNameError
from ddsuite.core.registry import Registry
from ddsuite.core.typed_config import from_dict

__all__ = [
    "SCENARIO_KINDS",
    "LoadedScenario",
    "ScenarioKind",
    "apply_overrides",
    "list_scenarios",
    "load_scenario",
    "register_scenario_kind",
    "scenario_name_problems",
]


@dataclass(frozen=True)
class ScenarioKind:
    """A kind of scenario: its typed schema and the harness that runs it.

    `run(config, *, out_dir, device, resolved, overwrite)` checks what it can, creates the
    report folder (refusing an existing one unless `overwrite`), writes the report and
    returns its summary text.
    """

    name: str
    schema: type
    run: Callable[..., str]
    summary: str


SCENARIO_KINDS: Registry[ScenarioKind] = Registry("scenario kind")

# Modules that register scenario kinds when imported (applications add theirs here).
_KIND_MODULES = ("ddsuite.scenarios.compare", "ddsuite.applications.continual.harness",
                 "ddsuite.applications.nas.harness",
                 "ddsuite.applications.federated.harness",
                 "ddsuite.applications.privacy.harness")


def scenario_name_problems(name: str) -> list[str]:
    """A scenario's name names its report folder: it must be a plain, non-empty name."""
    if not name or any(s in name for s in ("/", "\\", "..")):
        return [f"name: {name!r} must be a plain name (no '/', '\\' or '..'); it names the "
                "report folder"]
    return []


def register_scenario_kind(kind: ScenarioKind) -> ScenarioKind:
    SCENARIO_KINDS.register(kind.name, kind)
    return kind


def _load_kinds() -> None:
    for module in _KIND_MODULES:
        import_module(module)


def _builtin_files() -> dict[str, Any]:
    folder = resources.files("ddsuite.scenarios")
    return {entry.name[:-5]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def list_scenarios() -> list[str]:
    """Names of the scenario files shipped with ddsuite."""
    return sorted(_builtin_files())


@dataclass
class LoadedScenario:
    """A validated scenario: its kind, typed config and the resolved mapping."""

    kind: ScenarioKind
    config: Any
    resolved: dict[str, Any]
    source: str


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading exponent floats without a dot (``1e-3``) as numbers, as
    YAML 1.2 does; YAML 1.1 left them strings, which a learning rate must never be."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _parse_value(text: str) -> Any:
    try:
        return _yaml_load(text)
    except yaml.YAMLError:
        return text


def _list_index_problem(item: str, part: str, node: list) -> str | None:
    if part.isdigit() and int(part) < len(node):
        return None
    return (f"override {item!r}: {part!r} is not an index of a list with {len(node)} "
            f"entries (0..{len(node) - 1})")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a copy of `data`."""
    out = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} must look like key=value or key.sub=value")
            continue
        parts = key.strip().split(".")
        node: Any = out
        for part in parts[:-1]:
            if isinstance(node, list):
                problem = _list_index_problem(item, part, node)
                if problem:
                    problems.append(problem)
                    break
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                problems.append(f"override {item!r}: {part!r} does not name a mapping or list")
                break
        else:
            last = parts[-1]
            if isinstance(node, list):
                problem = _list_index_problem(item, last, node)
                if problem:
                    problems.append(problem)
                else:
                    node[int(last)] = _parse_value(text)
            elif isinstance(node, dict):
                node[last] = _parse_value(text)
            else:
                problems.append(f"override {item!r}: cannot set {last!r} there")
    if problems:
        raise ConfigError(problems, source="command-line overrides")
    return out


def load_scenario(name_or_path: str, overrides: Sequence[str] = ()) -> LoadedScenario:
    """Load a scenario by shipped name or YAML path, apply overrides, validate everything."""
    _load_kinds()
    path = Path(name_or_path)
    builtin = _builtin_files()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError([f"scenario file {path} does not exist"])
        text, source = path.read_text(encoding="utf-8"), str(path)
    elif name_or_path in builtin:
        text, source = builtin[name_or_path].read_text(encoding="utf-8"), name_or_path
    else:
        raise UnknownNameError("scenario", name_or_path, builtin)
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=source) from None
    if not isinstance(data, dict):
        raise ConfigError(["a scenario file must hold a mapping"], source=source)
    data = apply_overrides(data, overrides)
    kind_name = data.get("kind")
    if kind_name not in SCENARIO_KINDS:
        raise ConfigError([f"kind: {kind_name!r} is not a scenario kind; allowed: "
                           + ", ".join(SCENARIO_KINDS.names())], source=source)
    kind = SCENARIO_KINDS.get(kind_name)
    config = from_dict(kind.schema, data, source=source)
    return LoadedScenario(kind=kind, config=config, resolved=data, source=source)
