"""The other small networks of the field's cross-architecture tables: MLP, LeNet, AlexNet, VGG11.

They follow the versions used by the dataset-condensation papers for 28x28 and 32x32 inputs,
and compute their feature sizes for any input size instead of hard-coding them:

- ``mlp``: flatten -> ``depth`` hidden layers of ``width`` units (default 2 x 128) -> classes.
- ``lenet``: conv5(6) -> ReLU -> maxpool -> conv5(16) -> ReLU -> maxpool -> 120 -> 84 ->
  classes. The first conv pads by 2 for single-channel inputs (28x28 keeps its size). *Small
  images*: a conv whose output would be under 2 pixels gets the smallest extra padding that
  keeps 2, so e.g. 8x8 digits give a 16x1x1 map instead of failing.
- ``alexnet`` / ``alexnet-bn``: the 5-conv AlexNet of the DC papers (128-192-256-192-192
  channels, no norm / BatchNorm); the first conv pads by 4 for single-channel inputs so 28x28
  becomes 32x32, else by 2.
- ``vgg11`` / ``vgg11-bn``: 64-M-128-M-256-256-M-512-512-M-512-512-M with instance norm (the
  field's default) or BatchNorm; the first conv pads by 3 for single-channel inputs.

*Pooling on small inputs* (AlexNet and VGG11): a 2x2 pooling stage is skipped, along each
dimension separately, when it would leave fewer than 2 pixels while more conv layers follow
(an instance, group or layer norm over a single pixel would erase its input), and the last
stage is skipped when the map is already 1 pixel. At 28x28 and 32x32 nothing is skipped;
8x8 digits keep a 3x3 map through VGG11's last conv stages and end at 1x1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .norm import ACTIVATIONS, conv_out, make_activation, make_norm, make_pool
from .registry import EmbeddingNet, OptionChecker, register_model, register_norm_variant

__all__ = ["MLP", "AlexNet", "LeNet", "VGG11"]

VGG11_CONFIG: tuple[int | str, ...] = (
    64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"
)
"""VGG11's layers: an int is a conv3x3 with that many channels, "M" a 2x2 max-pool."""


def _pool_kernel(size: tuple[int, int], *, last: bool) -> tuple[int, int]:
    """Per-dimension pooling kernel (2, or 1 to skip) under the small-input rule above."""
    return tuple(  # type: ignore[return-value]
        2 if (s // 2 >= 2 or (last and s >= 2)) else 1 for s in size
    )


def _min_padding(size: int, *, kernel: int, padding: int) -> int:
    """The smallest padding >= `padding` that keeps a stride-1 conv's output >= 2 pixels."""
    return max(padding, math.ceil((kernel + 1 - size) / 2))


class MLP(EmbeddingNet):
    """Flatten -> ``depth`` x (linear(width) -> activation) -> linear classifier.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the classifier.
        image_size: ``(H, W)`` of the inputs.
        width: units per hidden layer.
        depth: number of hidden layers.
        act: one of `ACTIVATIONS`.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 128,
        depth: int = 2,
        act: str = "relu",
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = in_channels * image_size[0] * image_size[1]
        for _ in range(depth):
            layers += [nn.Linear(in_features, width), make_activation(act)]
            in_features = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = width
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last hidden layer, shape ``(B, width)``."""
        return self.features(x)  # (B, C, H, W) -> (B, width)


class LeNet(EmbeddingNet):
    """LeNet-5 as used by the DC papers; see the module docstring for small inputs.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the classifier.
        image_size: ``(H, W)`` of the inputs.
    """

    def __init__(self, *, in_channels: int, num_classes: int, image_size: tuple[int, int]):
        super().__init__()
        size = tuple(image_size)
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels, base_padding in ((6, 2 if in_channels == 1 else 0), (16, 0)):
            padding = tuple(_min_padding(s, kernel=5, padding=base_padding) for s in size)
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=5, padding=padding),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=2, stride=2),
            ]
            size = tuple(conv_out(s, kernel=5, padding=p) // 2 for s, p in zip(size, padding))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.feature_shape = (channels, *size)
        self.fc = nn.Sequential(
            nn.Linear(channels * size[0] * size[1], 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
        )
        self.feature_dim = 84
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the 84-unit layer, shape ``(B, 84)``."""
        maps = self.features(x)  # (B, 16, H', W')
        return self.fc(maps.flatten(1))  # (B, 84)


def _conv_block(
    in_channels: int, out_channels: int, *, kernel: int, padding: int, norm: str,
    spatial: tuple[int, int],
) -> list[nn.Module]:
    """conv -> norm -> ReLU; `spatial` is the size after the conv (for layer norm)."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=padding),
        make_norm(norm, out_channels, spatial=spatial),
        nn.ReLU(),
    ]


class _PlainConvNet(EmbeddingNet):
    """Shared body of AlexNet and VGG11: conv blocks and pools from a layer list, then linear."""

    def __init__(
        self,
        *,
        layout: tuple[tuple[int, int, int] | str, ...],
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        norm: str,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        size = tuple(image_size)
        channels = in_channels
        last_pool = max(i for i, item in enumerate(layout) if item == "M")
        for i, item in enumerate(layout):
            if item == "M":
                kernel = _pool_kernel(size, last=i == last_pool)
                layers.append(make_pool("max", kernel))
                size = tuple(s // k for s, k in zip(size, kernel))
                continue
            out_channels, kernel_size, padding = item
            size = tuple(conv_out(s, kernel=kernel_size, padding=padding) for s in size)
            layers += _conv_block(
                channels, out_channels, kernel=kernel_size, padding=padding, norm=norm,
                spatial=size,
            )
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.feature_shape = (channels, *size)
        self.feature_dim = channels * size[0] * size[1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened output of the conv stages, shape ``(B, C' * H' * W')``."""
        return self.features(x).flatten(1)  # (B, C', H', W') -> (B, feature_dim)


class AlexNet(_PlainConvNet):
    """The DC papers' AlexNet for 32x32 inputs (192x4x4 features there).

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the classifier.
        image_size: ``(H, W)`` of the inputs.
        norm: one of `NORMS`; "none" is the field's AlexNet, "batch" its AlexNetBN.
    """

    def __init__(
        self, *, in_channels: int, num_classes: int, image_size: tuple[int, int],
        norm: str = "none",
    ):
        first_padding = 4 if in_channels == 1 else 2
        layout = (
            (128, 5, first_padding), "M", (192, 5, 2), "M",
            (256, 3, 1), (192, 3, 1), (192, 3, 1), "M",
        )
        super().__init__(
            layout=layout, in_channels=in_channels, num_classes=num_classes,
            image_size=image_size, norm=norm,
        )


class VGG11(_PlainConvNet):
    """The field's VGG11 (512x1x1 features for 28x28 single-channel and 32x32 inputs).

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the classifier.
        image_size: ``(H, W)`` of the inputs.
        norm: one of `NORMS`; the field uses "instance" (default) and "batch".
    """

    def __init__(
        self, *, in_channels: int, num_classes: int, image_size: tuple[int, int],
        norm: str = "instance",
    ):
        layout: list[tuple[int, int, int] | str] = []
        for item in VGG11_CONFIG:
            if item == "M":
                layout.append("M")
            else:
                padding = 3 if not layout and in_channels == 1 else 1
                layout.append((int(item), 3, padding))
        super().__init__(
            layout=tuple(layout), in_channels=in_channels, num_classes=num_classes,
            image_size=image_size, norm=norm,
        )


@register_model("mlp")
def build_mlp(
    *, in_channels: int, num_classes: int, image_size: tuple[int, int],
    width: int = 128, depth: int = 2, act: str = "relu",
) -> MLP:
    """Build ``mlp``: `depth` hidden layers of `width` units (default 2 x 128, ReLU)."""
    check = OptionChecker("mlp")
    width = check.integer("width", width, minimum=1)
    depth = check.integer("depth", depth, minimum=1)
    act = check.choice("act", act, ACTIVATIONS)
    check.done()
    return MLP(
        in_channels=in_channels, num_classes=num_classes, image_size=image_size,
        width=width, depth=depth, act=act,
    )


@register_model("lenet")
def build_lenet(*, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> LeNet:
    """Build ``lenet`` (no options)."""
    return LeNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size)


register_norm_variant("alexnet", AlexNet, "none")
register_norm_variant("alexnet-bn", AlexNet, "batch")
register_norm_variant("vgg11", VGG11, "instance")
register_norm_variant("vgg11-bn", VGG11, "batch")
