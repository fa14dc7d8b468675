"""The distillation engine: the outer loop and the callbacks that hook into it."""

from .callbacks import (
    Callback,
    FinalEvaluation,
    ImageGrid,
    LogMetrics,
    PeriodicEvaluation,
    ProgressBar,
    TensorBoardLogger,
)
from .loop import (
    CHECKPOINT_FILE,
    DistillResult,
    RunContext,
    distill,
    prepare_out_dir,
    scenario_status,
    resolve_config,
)

__all__ = [
    "CHECKPOINT_FILE",
    "Callback",
    "DistillResult",
    "FinalEvaluation",
    "ImageGrid",
    "LogMetrics",
    "PeriodicEvaluation",
    "ProgressBar",
    "RunContext",
    "TensorBoardLogger",
    "distill",
    "prepare_out_dir",
    "scenario_status",
    "resolve_config",
]
