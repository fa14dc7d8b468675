"""Running a private distiller so that its artifact carries what it spent."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddsuite.core.data import DatasetSplits
from ddsuite.core.engine import Callback, DistillResult, distill
from ddsuite.core.engine.loop import resolve_config
from ddsuite.core.errors import DDSuiteError
from ddsuite.core.methods import get_method

if TYPE_CHECKING:
    from ddsuite.core.engine.loop import RunContext

__all__ = ["PrivacyLedger", "distill_private"]


class PrivacyLedger(Callback):
    """At the end of a run, store the distiller's spent privacy in `ctx.metrics["privacy"]`
    and refuse a record that would understate it."""

    def __init__(self, recorded: dict[str, Any]):
        self.recorded = recorded

    def on_end(self, ctx: "RunContext") -> None:
        spent = ctx.distiller.privacy_record()
        if spent["steps"] != self.recorded["steps"] or spent["epsilon"] > self.recorded["epsilon"]:
            raise DDSuiteError(
                f"the run answered {spent['steps']} private queries (epsilon "
                f"{spent['epsilon']:.4g}) but its artifact would record {self.recorded['steps']} "
                f"(epsilon {self.recorded['epsilon']:.4g}); nothing was saved")
        ctx.metrics["privacy"] = spent


def distill_private(method: str, *, splits: DatasetSplits, config: dict[str, Any] | Any = None,
                    seed: int = 0, device: torch.device | str = "cpu",
                    out_dir: str | Path | None = None, callbacks: Sequence[Callback] = (),
                    overwrite: bool = False) -> tuple[DistillResult, dict[str, Any]]:
    """Distil with a private method and record its privacy in the artifact.

    The private distiller itself writes the artifact's "privacy" entry (`artifact_meta`):
    accountant, noise multiplier, clip norm, sample rate, steps, delta and the accountant's
    epsilon for those steps. This wrapper adds a check of the finished run against the planned
    record (nothing is saved when they differ) and returns the record.

    Returns:
        The engine's result and the privacy record.
    """
    resolved = resolve_config(method, config, dataset=splits.identity.name)
    cls = get_method(method)
    probe = cls(resolved, splits=splits, device=device)
    if not hasattr(probe, "privacy_record"):
        raise DDSuiteError(f"method {method!r} is not a private distiller; use dp-dm or dp-dc")
    probe.queries = probe.plan.steps
    record = probe.privacy_record()
    result = distill(method, splits=splits, config=resolved, seed=seed, device=device,
                     out_dir=out_dir, callbacks=[*callbacks, PrivacyLedger(record)],
                     overwrite=overwrite, checkpoint_every=0)
    return result, result.metrics.get("privacy", record)
