"""The ConvNet that dataset-distillation papers (DC, DSA, DM, MTT, ...) train and evaluate.

``depth`` blocks of conv3x3(width) -> norm -> activation -> 2x2 pooling, then a linear
classifier on the flattened map. With the defaults (depth 3, width 128, instance norm, ReLU,
average pooling) a 32x32 input gives a 4x4 map and 2048 features.

Single-channel inputs follow the field's convention: the first convolution pads by 3 instead
of 1, so a 28x28 MNIST image becomes 32x32 and yields the same 4x4 map as CIFAR.

Registered names: ``convnet`` (instance norm) and the aliases ``convnet-bn`` (batch),
``convnet-ln`` (layer), ``convnet-gn`` (group) and ``convnet-nn`` (none). An alias only changes
the default norm; it accepts the same options, and an explicit ``norm=`` wins.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .norm import (
    ACTIVATIONS,
    GROUP_NORM_GROUPS,
    NORMS,
    POOLS,
    conv_out,
    make_activation,
    make_norm,
    make_pool,
)
from .registry import EmbeddingNet, ModelBuilder, OptionChecker, register_model

__all__ = ["ConvNet"]


class ConvNet(EmbeddingNet):
    """The field's ConvNet; see the module docstring.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the classifier.
        image_size: ``(H, W)`` of the inputs.
        depth: number of conv blocks (>= 1).
        width: channels of every conv (>= 1).
        norm: one of `NORMS`.
        act: one of `ACTIVATIONS`.
        pool: one of `POOLS`.

    Raises:
        ConfigError: pooling would shrink the map below one pixel.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        depth: int = 3,
        width: int = 128,
        norm: str = "instance",
        act: str = "relu",
        pool: str = "avg",
    ):
        super().__init__()
        layers: list[nn.Module] = []
        height, width_px = image_size
        channels = in_channels
        for block in range(depth):
            padding = 3 if block == 0 and in_channels == 1 else 1
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=padding))
            height = conv_out(height, kernel=3, padding=padding)
            width_px = conv_out(width_px, kernel=3, padding=padding)
            layers.append(make_norm(norm, width, spatial=(height, width_px)))
            layers.append(make_activation(act))
            if pool != "none":
                if height < 2 or width_px < 2:
                    raise ConfigError(
                        [f"depth={depth} is too deep for {image_size[0]}x{image_size[1]} "
                         f"images: before the pooling of block {block + 1} the map is "
                         f"{height}x{width_px}, and 2x2 pooling would leave no pixel. Use "
                         f"depth<={block}, pool=none, or larger images."],
                        source="model 'convnet'",
                    )
                layers.append(make_pool(pool))
                height, width_px = height // 2, width_px // 2
            channels = width

        self.features = nn.Sequential(*layers)
        self.feature_shape = (width, height, width_px)
        self.feature_dim = width * height * width_px
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened output of the conv blocks, shape ``(B, width * H' * W')``."""
        return self.features(x).flatten(1)  # (B, C, H', W') -> (B, feature_dim)


def _convnet_builder(name: str, default_norm: str) -> ModelBuilder:
    """A builder for `name` whose only difference from ``convnet`` is the default norm."""

    def build(
        *,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        depth: int = 3,
        width: int = 128,
        norm: str = default_norm,
        act: str = "relu",
        pool: str = "avg",
    ) -> ConvNet:
        check = OptionChecker(name)
        depth = check.integer("depth", depth, minimum=1)
        width = check.integer("width", width, minimum=1)
        norm = check.choice("norm", norm, NORMS)
        act = check.choice("act", act, ACTIVATIONS)
        pool = check.choice("pool", pool, POOLS)
        if norm == "group" and width % GROUP_NORM_GROUPS:
            check.add(
                f"width={width} with norm=group; allowed: a width divisible by "
                f"{GROUP_NORM_GROUPS}"
            )
        check.done()
        return ConvNet(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size,
            depth=depth, width=width, norm=norm, act=act, pool=pool,
        )

    build.__name__ = build.__qualname__ = f"build_{name.replace('-', '_')}"
    build.__doc__ = f"Build ``{name}``: the ConvNet with norm={default_norm} by default."
    return build


for _name, _norm in (
    ("convnet", "instance"),
    ("convnet-bn", "batch"),
    ("convnet-ln", "layer"),
    ("convnet-gn", "group"),
    ("convnet-nn", "none"),
):
    register_model(_name)(_convnet_builder(_name, _norm))
