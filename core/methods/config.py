"""Method configs: documented dataclasses, built from dicts with every problem reported."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..typed_config import describe_fields, from_dict

__all__ = ["MethodConfig", "config_from_dict", "describe_config", "interpolate_anchors", "option"]

C = TypeVar("C", bound="MethodConfig")

FLOAT32_MAX = 3.4028234663852886e38

INIT_CHOICES = ("real", "noise", "random", "herding", "k-center")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a one-line description (shown by `ddsuite list methods -v`)."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(kw_only=True)
class MethodConfig:
    """Fields every distiller shares. `None` means "the published default for this method,
    dataset and IPC", filled in by `resolve`."""

    ipc: int = option(10, "images per class of the synthetic set (any value >= 1)")
    iterations: int | None = option(None, "outer iterations; null: the published count")
    model: str = option("convnet", "the network the objective is computed through")
    init: str = option("real", "initial images: real, noise, or a coreset rule "
                               "(random, herding, k-center on pixels)")
    lr_images: float | None = option(None, "learning rate of the synthetic images")
    momentum: float = option(0.5, "SGD momentum of the synthetic images")
    batch_real: int = option(256, "real images per class per iteration (capped at the "
                                  "smallest class)")

    def problems(self) -> list[str]:
        """Every problem with the values (empty when valid)."""
        out = []
        if self.ipc < 1:
            out.append(f"ipc must be >= 1, got {self.ipc}")
        if self.iterations is not None and self.iterations < 0:
            out.append(f"iterations must be >= 0, got {self.iterations}")
        if self.init not in INIT_CHOICES:
            out.append(f"init {self.init!r} is not one of {', '.join(INIT_CHOICES)}")
        if self.lr_images is not None and not self.lr_images > 0:
            out.append(f"lr_images must be > 0, got {self.lr_images}")
        if not 0 <= self.momentum < 1:
            out.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.batch_real < 1:
            out.append(f"batch_real must be >= 1, got {self.batch_real}")
        for spec in dataclasses.fields(self):  # 1e400 in YAML reads as infinity
            value = getattr(self, spec.name)
            if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:
                # tensors are float32: 1e308 would overflow at the first update
                out.append(f"{spec.name} must be a finite number, got {value} (at most "
                           f"{FLOAT32_MAX:.3g} in magnitude: tensors are float32)")
        return out

    def resolve(self: C, *, dataset: str) -> C:
        """A copy with every `None` replaced by the published default for `dataset`."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def interpolate_anchors(anchors: dict[int, float], ipc: int) -> float:
    """Piecewise-linear interpolation over published (ipc -> value) anchors, flat outside.

    Lets a method follow a paper's per-IPC settings at any IPC instead of refusing the values
    the paper did not list.
    """
    keys = sorted(anchors)
    if ipc <= keys[0]:
        return anchors[keys[0]]
    if ipc >= keys[-1]:
        return anchors[keys[-1]]
    for lo, hi in zip(keys, keys[1:]):
        if lo <= ipc <= hi:
            t = (ipc - lo) / (hi - lo)
            return anchors[lo] + t * (anchors[hi] - anchors[lo])
    raise AssertionError("unreachable")


def config_from_dict(cls: type[C], data: dict[str, Any], *, source: str | None = None) -> C:
    """Build a method config from a mapping, reporting every problem at once."""
    return from_dict(cls, data, source=source)


def describe_config(cls: type[MethodConfig]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field, for `--help` and `ddsuite list`."""
    return describe_fields(cls)
