"""ddsuite.scenarios: YAML scenario files, their typed schemas, and the harnesses that run them."""

from .registry import (
    SCENARIO_KINDS,
    LoadedScenario,
    ScenarioKind,
    apply_overrides,
    list_scenarios,
    load_scenario,
    register_scenario_kind,
)

__all__ = [
    "SCENARIO_KINDS",
    "LoadedScenario",
    "ScenarioKind",
    "apply_overrides",
    "list_scenarios",
    "load_scenario",
    "register_scenario_kind",
]
