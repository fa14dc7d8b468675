"""Normalisation, activation and pooling factories shared by the native models.

The names follow the dataset-distillation literature: "instance" norm is a `GroupNorm` with one
group per channel (affine), "group" norm uses `GROUP_NORM_GROUPS` groups, and "layer" norm
normalises over ``(C, H, W)`` with an elementwise affine, so it needs the spatial size. No
factory returns an in-place module, so every model works under `torch.func` transforms.
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "ACTIVATIONS",
    "GROUP_NORM_GROUPS",
    "NORMS",
    "POOLS",
    "conv_out",
    "make_activation",
    "make_norm",
    "make_pool",
]

NORMS = ("none", "batch", "layer", "instance", "group")
"""Normalisation layers a model may use (see the module docstring)."""

ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")
"""Activation functions; ``leakyrelu`` has negative slope 0.01."""

POOLS = ("none", "max", "avg")
"""Pooling after each convolution block; ``max`` and ``avg`` are 2x2 with stride 2."""

GROUP_NORM_GROUPS = 4
"""Groups of the "group" norm; the channel count must be a multiple of it."""


def make_norm(kind: str, channels: int, *, spatial: tuple[int, int]) -> nn.Module:
    """Return the normalisation layer `kind` for a ``(B, channels, *spatial)`` feature map.

    Args:
        kind: one of `NORMS`.
        channels: channels of the feature map.
        spatial: ``(H, W)`` of the feature map; only "layer" norm uses it.

    Raises:
        ValueError: an unknown kind, or a channel count "group" norm cannot split (builders
            validate options first, so users see a `ConfigError` instead).
    """
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.LayerNorm([channels, *spatial], elementwise_affine=True)
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "group":
        if channels % GROUP_NORM_GROUPS:
            raise ValueError(
                f"group norm needs channels divisible by {GROUP_NORM_GROUPS}, got {channels}"
            )
        return nn.GroupNorm(GROUP_NORM_GROUPS, channels, affine=True)
    raise ValueError(f"unknown norm {kind!r}; allowed: {', '.join(NORMS)}")


def make_activation(kind: str) -> nn.Module:
    """Return the (never in-place) activation `kind`, one of `ACTIVATIONS`."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    raise ValueError(f"unknown activation {kind!r}; allowed: {', '.join(ACTIVATIONS)}")


def make_pool(kind: str, kernel: tuple[int, int] = (2, 2)) -> nn.Module:
    """Return the pooling layer `kind` with stride equal to `kernel`.

    A kernel of 1 along a dimension leaves that dimension alone; ``(1, 1)`` or kind "none"
    gives `nn.Identity`.
    """
    if kind == "none" or tuple(kernel) == (1, 1):
        return nn.Identity()
    if kind == "max":
        return nn.MaxPool2d(kernel_size=kernel, stride=kernel)
    if kind == "avg":
        return nn.AvgPool2d(kernel_size=kernel, stride=kernel)
    raise ValueError(f"unknown pooling {kind!r}; allowed: {', '.join(POOLS)}")


def conv_out(size: int, *, kernel: int, padding: int = 0, stride: int = 1) -> int:
    """Output length of a convolution or pooling along one dimension."""
    return (size + 2 * padding - kernel) // stride + 1
