"""ResNet18 as the dataset-distillation papers use it on 32x32 images.

BasicBlocks in four stages of two ([2, 2, 2, 2], 64-128-256-512 channels), a 3x3 stride-1 stem
without max-pooling, adaptive average pooling and a linear classifier on 512 features. The
field's default norm is instance norm (``resnet18``); ``resnet18-bn`` uses BatchNorm. Both take
a ``norm`` option.

*Small inputs*: a stage downsamples (stride 2) only along a dimension whose output would keep
at least 2 pixels, since an instance, group or layer norm over a single pixel erases its input.
32x32 and 28x28 inputs are unaffected (4x4 in the last stage); 8x8 digits end at 2x2.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import conv_out, make_norm
from .registry import EmbeddingNet, register_norm_variant

__all__ = ["BasicBlock", "ResNet18"]

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
"""(channels, nominal stride) of ResNet18's four stages, two BasicBlocks each."""


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 conv + norm when the shape changes).

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: per-dimension stride of the first conv and the shortcut.
        norm: one of `NORMS`.
        spatial: ``(H, W)`` of the output map (for layer norm).
    """

    def __init__(
        self, in_planes: int, planes: int, *, stride: tuple[int, int], norm: str,
        spatial: tuple[int, int],
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.norm1 = make_norm(norm, planes, spatial=spatial)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, planes, spatial=spatial)
        self.act2 = nn.ReLU()
        if stride != (1, 1) or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                make_norm(norm, planes, spatial=spatial),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output, shape ``(B, planes, H', W')``."""
        out = self.act1(self.norm1(self.conv1(x)))  # (B, planes, H', W')
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(EmbeddingNet):
    """The field's ResNet18; see the module docstring.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the classifier.
        image_size: ``(H, W)`` of the inputs.
        norm: one of `NORMS` (default "instance").
    """

    def __init__(
        self, *, in_channels: int, num_classes: int, image_size: tuple[int, int],
        norm: str = "instance",
    ):
        super().__init__()
        size = tuple(image_size)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False),
            make_norm(norm, 64, spatial=size),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        in_planes = 64
        for planes, nominal_stride in STAGES:
            for index in range(2):
                stride = tuple(
                    nominal_stride
                    if index == 0 and conv_out(s, kernel=3, padding=1, stride=nominal_stride) >= 2
                    else 1
                    for s in size
                )
                size = tuple(
                    conv_out(s, kernel=3, padding=1, stride=st) for s, st in zip(size, stride)
                )
                blocks.append(
                    BasicBlock(in_planes, planes, stride=stride, norm=norm, spatial=size)
                )
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.final_map_size = size
        self.feature_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally averaged last-stage features, shape ``(B, 512)``."""
        maps = self.layers(self.stem(x))  # (B, 512, H', W')
        return self.pool(maps).flatten(1)  # (B, 512)


register_norm_variant("resnet18", ResNet18, "instance")
register_norm_variant("resnet18-bn", ResNet18, "batch")
