"""Callbacks that hook into the distillation loop: evaluation, image grids, logging, TensorBoard."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DDSuiteError
from ..evaluation import EvaluationProtocol, evaluate_images

if TYPE_CHECKING:
    from .loop import RunContext

__all__ = [
    "Callback",
    "FinalEvaluation",
    "ImageGrid",
    "LogMetrics",
    "PeriodicEvaluation",
    "ProgressBar",
    "TensorBoardLogger",
]

logger = logging.getLogger(__name__)


class Callback:
    """Base class: override any of the hooks. Hooks see the run's `RunContext`."""

    def on_start(self, ctx: "RunContext") -> None:
        """After the synthetic set exists (fresh or resumed), before the first iteration."""

    def on_step(self, ctx: "RunContext", metrics: dict[str, float]) -> None:
        """After iteration `ctx.iteration` (1-based count of finished iterations)."""

    def on_end(self, ctx: "RunContext") -> None:
        """After the last iteration, before the artifact is written (metrics may be added)."""


class LogMetrics(Callback):
    """Log the step metrics every `every` iterations."""

    def __init__(self, every: int = 100):
        self.every = every

    def on_step(self, ctx: "RunContext", metrics: dict[str, float]) -> None:
        if ctx.iteration % self.every == 0 or ctx.iteration == ctx.iterations:
            text = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            logger.info("%s iteration %d/%d: %s", ctx.method, ctx.iteration, ctx.iterations, text)


class PeriodicEvaluation(Callback):
    """Evaluate the current set every `every` iterations; results go to `ctx.history`."""

    def __init__(self, every: int, protocol: EvaluationProtocol):
        self.every = every
        self.protocol = protocol

    def on_step(self, ctx: "RunContext", metrics: dict[str, float]) -> None:
        if self.every <= 0 or ctx.iteration % self.every:
            return
        protocol = ctx.distiller.final_protocol(ctx.syn, self.protocol)  # current step size
        images, labels, _ = ctx.syn.decoded()
        result = evaluate_images(images, labels, ctx.splits,
                                 protocol=protocol, device=ctx.device, seed=ctx.seed)
        scores = {m: s.mean for m, s in result.scores.items()}
        ctx.history.append({"iteration": ctx.iteration, "evaluation": scores})
        logger.info("iteration %d: %s", ctx.iteration,
                    ", ".join(f"{m} {s}" for m, s in result.scores.items()))


class FinalEvaluation(Callback):
    """Evaluate the final set under `protocol`; stores the result in `ctx.metrics`."""

    def __init__(self, protocol: EvaluationProtocol, *, seed: int | None = None):
        self.protocol = protocol
        self.seed = seed

    def on_end(self, ctx: "RunContext") -> None:
        protocol = ctx.distiller.final_protocol(ctx.syn, self.protocol)
        images, labels, labels_soft = ctx.syn.decoded()
        if protocol.label_loss == "cross_entropy":
            labels_soft = None
        result = evaluate_images(images, labels, ctx.splits,
                                 protocol=protocol, device=ctx.device,
                                 seed=ctx.seed if self.seed is None else self.seed,
                                 labels_soft=labels_soft)
        ctx.metrics["evaluation"] = result.to_dict()


class ImageGrid(Callback):
    """Write a PNG grid of the set (one row per class) every `every` iterations and at the end."""

    def __init__(self, folder: str | Path, *, every: int = 0, max_classes: int = 20):
        self.folder = Path(folder)
        self.every = every
        self.max_classes = max_classes

    def _write(self, ctx: "RunContext", name: str) -> None:
        from ..synthetic.grid import save_grid

        save_grid(ctx.syn, ctx.splits.input_space, self.folder / name,
                  max_classes=self.max_classes)

    def on_start(self, ctx: "RunContext") -> None:
        if self.every > 0 and ctx.iteration == 0:
            self._write(ctx, "grids/iteration_000000.png")

    def on_step(self, ctx: "RunContext", metrics: dict[str, float]) -> None:
        if self.every > 0 and ctx.iteration % self.every == 0:
            self._write(ctx, f"grids/iteration_{ctx.iteration:06d}.png")

    def on_end(self, ctx: "RunContext") -> None:
        self._write(ctx, "grid.png")


class TensorBoardLogger(Callback):
    """Write step metrics and evaluations to TensorBoard (needs the `tensorboard` extra)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise DDSuiteError(
                "TensorBoard logging needs the tensorboard package: "
                "pip install 'ddsuite[tensorboard]'"
            ) from exc
        self.log_dir = Path(log_dir)
        self._writer_class = SummaryWriter
        self.writer: Any = None

    def on_start(self, ctx: "RunContext") -> None:
        # Created here, not in __init__, so the run folder is still empty when it is checked.
        self.writer = self._writer_class(str(self.log_dir))

    def on_step(self, ctx: "RunContext", metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"distill/{key}", value, ctx.iteration)
        last = ctx.history[-1] if ctx.history else None
        if last and last.get("iteration") == ctx.iteration and "evaluation" in last:
            for model, acc in last["evaluation"].items():
                self.writer.add_scalar(f"eval/{model}", acc, ctx.iteration)

    def on_end(self, ctx: "RunContext") -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar(Callback):
    """A tqdm progress bar over the iterations (for the command line and harnesses)."""

    def __init__(self, description: str = "", *, leave: bool = False):
        self.description = description
        self.leave = leave
        self.bar: Any = None

    def on_start(self, ctx: "RunContext") -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=ctx.iterations, initial=ctx.iteration, leave=self.leave,
                        desc=self.description or ctx.method, dynamic_ncols=True)

    def on_step(self, ctx: "RunContext", metrics: dict[str, float]) -> None:
        self.bar.update(1)
        if "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)

    def on_end(self, ctx: "RunContext") -> None:
        if self.bar is not None:
            self.bar.close()
