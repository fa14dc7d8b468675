"""Candidate architectures: the field's ConvNet search space as ddsuite model spec strings.

A candidate is a spec string such as ``convnet(depth=3,width=64,norm=instance,act=relu,
pool=avg)``, so the network a proxy ranks is the one `ddsuite.core.models.build_model` builds
everywhere else. `FIELD_SPACE` is the 720-network space of the dataset-distillation NAS
experiments: depth 1-4, width 32/64/128/256, five norms, three activations, three poolings.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ddsuite.core.errors import ConfigError, DDSuiteError
from ddsuite.core.models import build_model, parse_model_spec
from ddsuite.core.models.norm import ACTIVATIONS, NORMS, POOLS

__all__ = ["DIMENSIONS", "FIELD_SPACE", "ConvNetDims", "convnet_spec", "parse_candidate"]

DIMENSIONS = ("depth", "width", "norm", "act", "pool")
"""The dimensions of a ConvNet candidate, in spec order."""


def convnet_spec(*, depth: int, width: int, norm: str, act: str, pool: str) -> str:
    """The canonical spec string of one ConvNet candidate (every option, fixed order)."""
    return f"convnet(depth={depth},width={width},norm={norm},act={act},pool={pool})"


def parse_candidate(spec: str) -> dict[str, object]:
    """The five dimensions of a canonical ConvNet spec; ConfigError for anything else."""
    parsed = parse_model_spec(spec)
    options = parsed.kwargs
    if parsed.name != "convnet" or sorted(options) != sorted(DIMENSIONS):
        raise ConfigError([f"candidate {spec!r} is not a ConvNet candidate; expected "
                           "convnet(depth=D,width=W,norm=N,act=A,pool=P) with all five options"])
    return {name: options[name] for name in DIMENSIONS}


@dataclass(frozen=True, kw_only=True)
class ConvNetDims:
    """The choices of each dimension of a ConvNet search space."""

    depths: tuple[int, ...] = (1, 2, 3, 4)
    widths: tuple[int, ...] = (32, 64, 128, 256)
    norms: tuple[str, ...] = NORMS
    acts: tuple[str, ...] = ACTIVATIONS
    pools: tuple[str, ...] = POOLS
    choices: dict[str, tuple] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("depths", "widths", "norms", "acts", "pools"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "choices", dict(zip(
            DIMENSIONS, (self.depths, self.widths, self.norms, self.acts, self.pools))))
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source="ConvNet search space")

    def problems(self) -> list[str]:
        out = []
        allowed = {"norm": NORMS, "act": ACTIVATIONS, "pool": POOLS}
        for name, values in self.choices.items():
            if not values:
                out.append(f"{name}: the space is empty along {name}; give at least one value")
            if len(set(values)) != len(values):
                out.append(f"{name}: repeated values in {list(values)}")
            if name in allowed:
                bad = [v for v in values if v not in allowed[name]]
                if bad:
                    out.append(f"{name}: {bad} not allowed; allowed: {', '.join(allowed[name])}")
            elif any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                out.append(f"{name}: expected integers >= 1, got {list(values)}")
        return out

    @property
    def size(self) -> int:
        """The number of architectures in the space."""
        n = 1
        for values in self.choices.values():
            n *= len(values)
        return n

    def specs(self) -> list[str]:
        """Every candidate of the space, in grid order (depth slowest, pool fastest)."""
        return [convnet_spec(**dict(zip(DIMENSIONS, combo)))
                for combo in itertools.product(*self.choices.values())]

    def sample(self, n: int, *, seed: int) -> list[str]:
        """`n` distinct candidates drawn uniformly (seeded), in grid order."""
        everything = self.specs()
        if not 1 <= n <= len(everything):
            raise ConfigError([f"sample: cannot draw {n} distinct candidates from a space of "
                               f"{len(everything)}; allowed: 1..{len(everything)}"])
        chosen = set(random.Random(seed).sample(range(len(everything)), n))
        return [spec for i, spec in enumerate(everything) if i in chosen]

    def contains(self, spec: str) -> bool:
        values = parse_candidate(spec)
        return all(values[name] in self.choices[name] for name in DIMENSIONS)


FIELD_SPACE = ConvNetDims()
"""The 720-ConvNet space of the field (4 depths x 4 widths x 5 norms x 3 acts x 3 pools)."""


def check_candidates_fit(specs: Sequence[str], *, image_shape: Sequence[int],
                         num_classes: int) -> None:
    """Build every candidate on the meta device; one ConfigError names each misfit.

    A candidate misfits when ddsuite cannot build it for images of `image_shape` (C, H, W),
    e.g. a depth whose 2x2 poolings would shrink the map below one pixel.
    """
    if not specs:
        raise ConfigError(["the search space holds no candidate; give at least one"])
    problems = []
    c, h, w = (int(s) for s in image_shape)
    for spec in specs:
        try:
            build_model(spec, in_channels=c, num_classes=num_classes, image_size=(h, w),
                        device=torch.device("meta"))
        except DDSuiteError as exc:
            detail = "; ".join(getattr(exc, "problems", None) or [str(exc)])
            problems.append(f"{spec} does not fit {c}x{h}x{w} images: {detail}")
    if problems:
        raise ConfigError(problems[:10] + ([f"... and {len(problems) - 10} more"]
                                           if len(problems) > 10 else []),
                          source="search space")
