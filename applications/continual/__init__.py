"""Continual learning with a distilled replay memory, on Avalanche.

- `CondensedBuffer`: an Avalanche storage policy whose memory any registered ddsuite method
  condenses from each experience (`memory.py`).
- `distilled_replay`, `RetrainOnMemoryPlugin`: the two ways to use it in an Avalanche strategy
  (`plugins.py`).
- `make_benchmark`: Split and Permuted streams from local data (`benchmark.py`).
- the "continual" scenario kind that compares memory policies (`harness.py`).

Avalanche is an optional dependency (``pip install 'ddsuite[continual]'``); it is imported
when one of these names is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["CondensationCache", "CondensedBuffer", "ContinualBenchmark", "RetrainOnMemoryPlugin",
           "distilled_replay", "make_benchmark", "run_stream"]

_HOMES = {
    "CondensationCache": "memory",
    "CondensedBuffer": "memory",
    "ContinualBenchmark": "benchmark",
    "RetrainOnMemoryPlugin": "plugins",
    "distilled_replay": "plugins",
    "make_benchmark": "benchmark",
    "run_stream": "harness",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = import_module(f".{_HOMES[name]}", __name__)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] == "avalanche":
            raise ImportError("ddsuite.applications.continual needs Avalanche: "
                              "pip install 'ddsuite[continual]' (avalanche-lib 0.6.0)") from exc
        raise
    return getattr(module, name)
