"""Feature vectors that coreset rules select on: raw pixels, a random net, or a trained net."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..data import RealDataset
from ..evaluation import EvaluationProtocol, train_networks
from ..models import build_model

__all__ = ["FEATURE_KINDS", "extract_features"]

FEATURE_KINDS = ("pixels", "random-net", "trained-net")


@torch.no_grad()
def _embed(net: torch.nn.Module, images: Tensor, batch_size: int = 1024) -> Tensor:
    net.eval()
    return torch.cat([net.embed(images[i:i + batch_size])
                      for i in range(0, images.shape[0], batch_size)])


def extract_features(
    train: RealDataset,
    *,
    kind: str,
    model: str,
    device: torch.device | str,
    seed: int,
    train_steps: int = 300,
) -> Tensor:
    """Features of every training image, (N, D).

    Args:
        train: the real training split.
        kind: "pixels" (flattened images), "random-net" (embedding of an untrained `model`),
            or "trained-net" (embedding of `model` trained on `train` for about
            `train_steps` SGD steps of batch 256 under the default protocol, no augmentation).
        model: model spec for the network kinds.
        device: where to compute.
        seed: initialisation seed of the network.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind {kind!r} is not one of {', '.join(FEATURE_KINDS)}")
    images = train.images.to(device)
    if kind == "pixels":
        return images.flatten(1)
    if kind == "random-net":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            c, h, w = train.image_shape
            net = build_model(model, in_channels=c, num_classes=train.num_classes,
                              image_size=(h, w), device=device)
        return _embed(net, images)
    steps_per_epoch = math.ceil(len(train) / 256)
    protocol = EvaluationProtocol(name="feature-extractor", num_eval=1, models=(model,),
                                  epochs=max(1, math.ceil(train_steps / steps_per_epoch)))
    networks = train_networks(images, train.labels, model=model,
                              num_classes=train.num_classes, protocol=protocol,
                              device=device, seed=seed)
    return _embed(networks.unstack(0), images)
