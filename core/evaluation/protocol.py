"""The evaluation protocol: how a set of images becomes a number.

One protocol object is stored with every result, so two numbers are comparable exactly when
their protocols are equal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from ..augment import DiffAugment
from ..errors import ConfigError, DDSuiteError

__all__ = ["EvaluationProtocol"]

_OPTIMIZERS = ("sgd", "adam")
_LABEL_LOSSES = ("cross_entropy", "soft_cross_entropy", "kl")


@dataclass(frozen=True)
class EvaluationProtocol:
    """Train `num_eval` fresh networks on a set, test each on the real test split.

    The default is the protocol of the DC/DSA/DM papers. The reported figure is the mean and
    standard deviation (population, as the field reports) of the accuracy after the final
    epoch; no epoch is ever picked on the test set.
    """

    name: str = "dc"
    """A label for the protocol; changes to any field below make a different protocol."""
    num_eval: int = 5
    """Fresh networks trained per model (their seeds are seed, seed + 1, ...)."""
    models: tuple[str, ...] = ("convnet",)
    """Model specs to evaluate on (a cross-architecture pool when more than one)."""
    epochs: int | None = None
    """Training epochs; None means 300 without augmentation and 1000 with it."""
    optimizer: str = "sgd"
    """"sgd" (momentum below) or "adam"."""
    lr: float = 0.01
    """Initial learning rate of the evaluation networks."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    lr_decay_at: float = 0.5
    """Fraction of the epochs after which the learning rate is multiplied by `lr_decay`."""
    lr_decay: float = 0.1
    """Factor applied to the learning rate at `lr_decay_at`."""
    batch_size: int = 256
    """Training batch size."""
    augmentation: str = "none"
    """"none", or a differentiable-augmentation strategy such as "crop_scale_rotate"."""
    label_loss: str = "cross_entropy"
    """"cross_entropy" on hard labels; "soft_cross_entropy" or "kl" on soft labels."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form notes recorded beside the protocol (not part of its identity)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source="evaluation protocol")

    def problems(self) -> list[str]:
        out = []
        if self.num_eval < 1:
            out.append(f"num_eval must be >= 1, got {self.num_eval}")
        if not self.models:
            out.append("models must name at least one model")
        if self.epochs is not None and self.epochs < 1:
            out.append(f"epochs must be >= 1 or null, got {self.epochs}")
        if self.optimizer not in _OPTIMIZERS:
            out.append(f"optimizer {self.optimizer!r} is not one of {', '.join(_OPTIMIZERS)}")
        if not self.lr > 0:
            out.append(f"lr must be > 0, got {self.lr}")
        if self.momentum < 0:
            out.append(f"momentum must be >= 0, got {self.momentum}")
        if self.weight_decay < 0:
            out.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.augmentation not in ("none", ""):
            try:
                DiffAugment(self.augmentation)
            except ConfigError as exc:
                out.extend(f"augmentation: {p}" for p in exc.problems)
        if not 0 <= self.lr_decay_at <= 1:
            out.append(f"lr_decay_at must be in [0, 1], got {self.lr_decay_at}")
        if self.batch_size < 1:
            out.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.label_loss not in _LABEL_LOSSES:
            out.append(
                f"label_loss {self.label_loss!r} is not one of {', '.join(_LABEL_LOSSES)}"
            )
        return out

    @property
    def uses_augmentation(self) -> bool:
        return self.augmentation not in ("none", "")

    @property
    def resolved_epochs(self) -> int:
        if self.epochs is not None:
            return self.epochs
        return 1000 if self.uses_augmentation else 300

    def check_models(self, *, image_shape: tuple[int, ...], num_classes: int) -> None:
        """Build each model once on the CPU, so a bad spec fails before any training."""
        from ..models import build_model

        problems = []
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
            for spec in self.models:
                try:
                    build_model(spec, in_channels=image_shape[0], num_classes=num_classes,
                                image_size=tuple(image_shape[1:]), device="cpu")
                except DDSuiteError as exc:
                    problems.append(f"models: {spec!r}: {exc}")
        if problems:
            raise ConfigError(problems, source="evaluation protocol")

    def with_overrides(self, **changes: Any) -> "EvaluationProtocol":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(
                [f"unknown protocol field {k!r}; allowed: {', '.join(sorted(known))}"
                 for k in unknown]
            )
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models)
        data["resolved_epochs"] = self.resolved_epochs
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvaluationProtocol":
        from ..typed_config import from_dict

        if not isinstance(data, dict):
            raise ConfigError([f"expected a mapping, got {data!r}"], source="evaluation protocol")
        values = {k: v for k, v in data.items() if k != "resolved_epochs"}
        return from_dict(cls, values, source="evaluation protocol")
