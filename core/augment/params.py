"""The parameters of differentiable siamese augmentation and the published strategies.

The defaults are the ones published with DSA (Zhao & Bilen, 2021) and reused by DM, MTT and
most later distillers, so a set distilled with them is comparable with the literature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError

__all__ = [
    "DEFAULT_STRATEGY",
    "NO_FLIP_DATASETS",
    "AugmentParams",
    "MNIST_FAMILY",
    "dataset_key",
    "default_strategy",
    "strategy_for_dataset",
]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
"""The published DSA strategy: every op, one picked at random per call in `single` mode."""

MNIST_FAMILY = frozenset({"mnist", "fashionmnist", "usps", "emnist", "kmnist", "qmnist"})
"""28x28 (USPS 16x16) grey digit and character sets, by `dataset_key`; methods whose released
settings treat them alike (IDC, trajectory matching) look them up here."""

NO_FLIP_DATASETS = MNIST_FAMILY | {"digits", "svhn"}
"""Datasets (names normalised by `dataset_key`) that are distilled without horizontal flips.

A mirrored digit or character is not a member of its class: a flipped "2" or "7" is a glyph
nobody writes, and some mirrored shapes read as another symbol, so flipping injects label
noise rather than invariance. Fashion-MNIST is listed because the published DSA/DM protocols
treat the whole MNIST family alike; keeping it here keeps numbers comparable with them.
"""


@dataclass(frozen=True)
class AugmentParams:
    """Strengths of the DSA ops; the defaults are the published ones.

    Attributes:
        brightness: a brightness shift of ``uniform(-0.5, 0.5) * brightness`` is added.
        saturation: the deviation of each pixel from its mean over channels is scaled by a
            factor drawn from ``[0, saturation]`` (no effect on one-channel images).
        contrast: the deviation of each pixel from the per-image mean is scaled by a factor
            drawn from ``[contrast, contrast + 1]`` (DSA's convention: 0.5 gives [0.5, 1.5]).
        crop_ratio: random translation by up to this fraction of the height/width, with zero
            padding (DSA's "crop": pad, then crop back to the original size).
        cutout_ratio: side of the zeroed rectangle, as a fraction of the height/width.
        scale: each axis is scaled by a factor drawn from ``[1 / scale, scale]``.
        ratio_rotate: rotation angle drawn from ``[-ratio_rotate, ratio_rotate]`` degrees.
        flip_prob: probability of a horizontal flip.
    """

    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop_ratio: float = 0.125
    cutout_ratio: float = 0.5
    scale: float = 1.2
    ratio_rotate: float = 15.0
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        ranges = {
            "brightness": (0.0, math.inf),
            "saturation": (0.0, math.inf),
            "contrast": (0.0, math.inf),
            "crop_ratio": (0.0, 1.0),
            "cutout_ratio": (0.0, 1.0),
            "scale": (1.0, math.inf),
            "ratio_rotate": (0.0, 180.0),
            "flip_prob": (0.0, 1.0),
        }
        problems = []
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{name}: expected a number, got {value!r}")
            elif not (math.isfinite(value) and low <= value <= high):
                problems.append(f"{name}: {value!r} is outside the allowed range [{low}, {high}]")
        if problems:
            raise ConfigError(problems, source="AugmentParams")

    def to_dict(self) -> dict[str, float]:
        """Return the fields as a plain dict, for provenance metadata."""
        return {key: float(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentParams:
        """Rebuild from `to_dict()` output; unknown keys are reported with the allowed ones.

        Raises:
            ConfigError: on unknown keys or out-of-range values.
        """
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(
                [f"unknown key {key!r}; allowed: {', '.join(allowed)}" for key in unknown],
                source="AugmentParams",
            )
        return cls(**data)


def default_strategy(*, flip: bool) -> str:
    """Return the published DSA strategy, with or without the horizontal flip.

    Args:
        flip: keep the ``flip`` op; pass False for data whose class changes when mirrored.

    Returns:
        A strategy string such as ``"color_crop_cutout_flip_scale_rotate"``.
    """
    if flip:
        return DEFAULT_STRATEGY
    return "_".join(op for op in DEFAULT_STRATEGY.split("_") if op != "flip")


def dataset_key(name: str) -> str:
    """A dataset name compared without case or punctuation: "Fashion-MNIST", "fashion_mnist"
    and "FashionMNIST" all give "fashionmnist"."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def strategy_for_dataset(name: str) -> str:
    """Return the published strategy suited to a dataset: no flips for digits and characters.

    Mirroring a handwritten or printed digit gives a glyph that does not belong to its class
    (or reads as another symbol), so the flip would teach the synthetic set label noise. The
    MNIST family, SVHN and the embedded scikit-learn ``digits`` are therefore augmented
    without ``flip``; natural-image datasets (CIFAR, ImageNet subsets, ...) keep it.

    Args:
        name: a dataset name; case, ``-``, ``_`` and spaces are ignored.

    Returns:
        The strategy string.

    Example:
        >>> strategy_for_dataset("mnist")
        'color_crop_cutout_scale_rotate'
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    return default_strategy(flip=dataset_key(name) not in NO_FLIP_DATASETS)
