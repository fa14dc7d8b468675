"""Architecture-search proxies: rank candidates by training them on distilled sets, on NNI.

- `ConvNetSpace`: the field's 720-ConvNet space as an NNI `ModelSpace`; a sampled model is a
  ddsuite spec string and the network built from it (`space.py`).
- `proxy_evaluator`, `search`: an NNI `FunctionalEvaluator` that trains each sampled model on
  a proxy under a fixed budget, and a search in NNI's in-process engine (`evaluator.py`).
- `make_proxy`, `load_proxy`, `hold_out`, `TrainingBudget`: the proxies (distilled, coreset,
  artifact, full training split) and the budget (`proxy.py`).
- `GroundTruthCache`, `measure_ground_truth`: real-data accuracies, computed once
  (`ground_truth.py`).
- `spearman`, `kendall`, `top_k_spearman`: rank correlations with ties (`ranking.py`).
- the "nas-proxy" scenario kind (`harness.py`).

NNI is an optional dependency (``pip install 'ddsuite[nas]'``); it is imported when a name
that needs it is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["FIELD_SPACE", "CandidateDivergedError", "ConvNetDims", "ConvNetSpace",
           "GroundTruthCache", "ProxyScorer", "ProxySet", "TrainingBudget", "TrialRecord",
           "hold_out", "measure_ground_truth", "kendall", "load_proxy", "make_proxy",
           "proxy_evaluator", "search", "spearman", "top_k_spearman"]

_HOMES = {
    "FIELD_SPACE": "candidates",
    "ConvNetDims": "candidates",
    "CandidateDivergedError": "evaluator",
    "ProxyScorer": "evaluator",
    "TrialRecord": "evaluator",
    "proxy_evaluator": "evaluator",
    "search": "evaluator",
    "ConvNetSpace": "space",
    "GroundTruthCache": "ground_truth",
    "measure_ground_truth": "ground_truth",
    "ProxySet": "proxy",
    "TrainingBudget": "proxy",
    "hold_out": "proxy",
    "load_proxy": "proxy",
    "make_proxy": "proxy",
    "kendall": "ranking",
    "spearman": "ranking",
    "top_k_spearman": "ranking",
}


def require_nni() -> None:
    """Raise ImportError with the install command when NNI cannot be imported."""
    try:
        import nni  # noqa: F401
    except ImportError as exc:
        raise ImportError("ddsuite.applications.nas needs NNI for model spaces and search: "
                          "pip install 'ddsuite[nas]' (nni 3.0)") from exc


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _HOMES[name] in ("evaluator", "space"):
        require_nni()
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
