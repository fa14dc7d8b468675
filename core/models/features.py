"""Intermediate features of any model: the output of every activation layer, in call order.

Feature-matching distillers (CAFE, DataDAM) compare real and synthetic images layer by layer,
not only through the final embedding. Rather than change every model's `forward`, this module
records what the model's activation modules return while `embed` runs, through forward hooks
that are removed again before the call returns::

    from ddsuite.core.models.features import intermediate_features

    maps, embedding = intermediate_features(net, images)
    # ConvNet-3 on 32x32: maps[i] is (B, 128, 32 / 2**i, 32 / 2**i), taken before pooling;
    # embedding is net.embed(images), (B, net.feature_dim)

The outputs stay in the autograd graph, so a loss on them reaches the input images. For the
native models the recorded layers are:

- ``convnet``, ``alexnet``, ``vgg11``: one map per conv block (after the activation, before
  the pooling that follows it);
- ``lenet``: the two conv blocks' maps, then the two hidden fully connected layers' outputs;
- ``mlp``: each hidden layer's output (2-D, no spatial extent);
- ``resnet18``: the stem, then both activations of every residual block.

Torchvision models are covered when their activations are modules (a module used twice, as
in torchvision's ResNet blocks, is recorded at each call); activations applied as functions
inside ``forward`` are invisible to hooks, and a model with none recorded is refused.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import UnsupportedFeatureError

__all__ = ["ACTIVATION_TYPES", "activation_modules", "intermediate_features"]

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.Hardswish,
    nn.ReLU6,
)
"""Module types whose outputs count as a layer's features."""


def activation_modules(model: nn.Module) -> list[nn.Module]:
    """The activation modules of `model` (registration order; the classifier has none)."""
    return [m for m in model.modules() if isinstance(m, ACTIVATION_TYPES)]


def intermediate_features(model: nn.Module, images: Tensor) -> tuple[list[Tensor], Tensor]:
    """Run ``model.embed(images)`` and return every activation's output with the embedding.

    Args:
        model: a built model (``embed`` and ``feature_dim``, see `build_model`).
        images: (B, C, H, W) inputs.

    Returns:
        ``(maps, embedding)``: the activation outputs in the order they were computed, each
        (B, channels, H', W') or (B, units), and ``model.embed(images)``, (B, feature_dim).

    Raises:
        UnsupportedFeatureError: the model's embedding passes through no activation module,
            so no intermediate feature can be recorded.
    """
    recorded: list[Tensor] = []

    def record(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        recorded.append(output)

    handles = [m.register_forward_hook(record) for m in activation_modules(model)]
    try:
        embedding = model.embed(images)
    finally:
        for handle in handles:
            handle.remove()
    if not recorded:
        raise UnsupportedFeatureError(
            f"{type(model).__name__} applies no activation module inside embed(), so its "
            "intermediate features cannot be recorded; use a native model (convnet, lenet, "
            "alexnet, vgg11, resnet18, mlp) or a torchvision model whose activations are "
            "modules"
        )
    return recorded, embedding
