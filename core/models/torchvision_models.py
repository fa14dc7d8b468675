"""Torchvision classification models by name: ``tv:resnet18``, ``tv:vit_b_16(image_size=32)``.

Models are built with ``weights=None`` (nothing is ever downloaded) and the requested
``num_classes``. Spec options are passed to torchvision's builder as keyword arguments. The
wrapper `TorchvisionNet` adds the ``embed``/``feature_dim`` contract by taking the final linear
layer out of the network (``fc``, ``classifier``, ``classifier[-1]``, ``heads.head`` or
``head``) and applying it after ``embed``; single-channel inputs are repeated to three channels.

Adjustments made so the models fit this library:

- every ``inplace`` flag on a submodule is switched off (in-place ops break `torch.func`);
  models that call in-place functions inside ``forward`` (e.g. DenseNet) still do so, so
  `torch.func.vmap` is only guaranteed for the native models;
- ``googlenet`` and ``inception_v3`` default to ``aux_logits=false, init_weights=true``, so
  ``forward`` returns one tensor and no initialisation warning is raised;
- ``vit_*`` models default to ``image_size`` = the input's side when the input is square (the
  side must be divisible by the patch size, e.g. 32 for ``vit_b_16``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torchvision
from torch import nn

from ..errors import ConfigError, UnknownNameError, UnsupportedFeatureError
from .registry import TV_PREFIX, EmbeddingNet

__all__ = ["TorchvisionNet", "build_torchvision_model", "list_torchvision_models"]

logger = logging.getLogger(__name__)

_CLASSIFIER_PATHS = ("fc", "classifier", "classifier.-1", "heads.head", "head")
_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def list_torchvision_models() -> list[str]:
    """Names of torchvision's classification models, each usable as ``tv:NAME``."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


class TorchvisionNet(EmbeddingNet):
    """A torchvision model split into a feature body and its final linear classifier.

    Args:
        name: the torchvision model name (for messages).
        body: the network with its final linear layer replaced by `nn.Identity`.
        classifier: that final linear layer.
        in_channels: 1 (repeated to 3 channels) or 3.

    Attributes:
        feature_dim: input width of the classifier.
    """

    def __init__(self, *, name: str, body: nn.Module, classifier: nn.Linear, in_channels: int):
        super().__init__()
        self.name = name
        self.body = body
        self.classifier = classifier
        self.repeat_channels = in_channels == 1
        self.feature_dim = int(classifier.in_features)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features the classifier would see, shape ``(B, feature_dim)``."""
        if self.repeat_channels:
            x = x.expand(-1, 3, -1, -1)  # (B, 1, H, W) -> (B, 3, H, W)
        out = self.body(x)
        if not isinstance(out, torch.Tensor):  # e.g. a namedtuple with aux outputs
            out = out[0]
        return out.flatten(1)  # (B, feature_dim)


def build_torchvision_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    **options: Any,
) -> TorchvisionNet:
    """Build torchvision's `name` with ``weights=None`` and wrap it as a `TorchvisionNet`.

    Args:
        name: a name from `list_torchvision_models` (without the ``tv:`` prefix).
        in_channels: 1 or 3.
        num_classes: outputs of the classifier.
        image_size: ``(H, W)`` of the inputs (used for ViT's ``image_size`` default).
        **options: keyword arguments for torchvision's builder.

    Raises:
        UnknownNameError: not a torchvision classification model (lists all of them).
        ConfigError: options torchvision refuses, or ``weights`` given.
        UnsupportedFeatureError: `in_channels` other than 1 or 3, or no final linear layer
            found where the known layouts keep it.
    """
    names = list_torchvision_models()
    if name not in names:
        raise UnknownNameError(
            "torchvision model", f"{TV_PREFIX}{name}", [f"{TV_PREFIX}{n}" for n in names]
        )
    if in_channels not in (1, 3):
        raise UnsupportedFeatureError(
            f"{TV_PREFIX}{name} takes 1- or 3-channel images, got in_channels={in_channels}; "
            "use a native model (e.g. convnet) for other channel counts"
        )
    if "weights" in options:
        raise ConfigError(
            [f"weights={options['weights']!r}: torchvision models are always built with "
             "weights=None here (nothing is downloaded); remove the option"],
            source=f"model {TV_PREFIX + name!r}",
        )

    kwargs = {**_DEFAULT_OPTIONS.get(name, {}), **options}
    if name.startswith("vit_") and "image_size" not in kwargs and image_size[0] == image_size[1]:
        kwargs["image_size"] = image_size[0]
    try:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            [f"torchvision could not build {name} with options {kwargs}: {exc}"],
            source=f"model {TV_PREFIX + name!r}",
        ) from exc

    for module in net.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False

    classifier = _detach_classifier(net, num_classes=num_classes)
    if classifier is None:
        raise UnsupportedFeatureError(
            f"cannot locate the final linear classifier of {TV_PREFIX}{name} (looked for "
            f"{', '.join(_CLASSIFIER_PATHS)}), so embed() cannot be provided; use a native "
            "model or another torchvision model"
        )
    logger.debug("wrapped %s; classifier in_features=%d", name, classifier.in_features)
    return TorchvisionNet(name=name, body=net, classifier=classifier, in_channels=in_channels)


def _detach_classifier(net: nn.Module, *, num_classes: int) -> nn.Linear | None:
    """Replace the final `nn.Linear` producing `num_classes` with `nn.Identity`; return it."""
    for path in _CLASSIFIER_PATHS:
        parent: Any = net
        *parents, last = path.split(".")
        try:
            for part in parents:
                parent = getattr(parent, part)
            if last == "-1":
                if not isinstance(parent, nn.Sequential) or len(parent) == 0:
                    continue
                layer = parent[-1]
            else:
                layer = getattr(parent, last)
        except AttributeError:
            continue
        if isinstance(layer, nn.Linear) and layer.out_features == num_classes:
            if last == "-1":
                parent[len(parent) - 1] = nn.Identity()
            else:
                setattr(parent, last, nn.Identity())
            return layer
    return None
