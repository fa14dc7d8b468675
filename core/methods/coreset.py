"""Coreset baselines: keep real images chosen by random, herding or k-center selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import FEATURE_KINDS, extract_features, select
from ..synthetic import SyntheticSet
from .base import Distiller, register_method
from .config import MethodConfig, option

__all__ = ["CoresetConfig", "HerdingCoreset", "KCenterCoreset", "RandomCoreset"]


@dataclass(kw_only=True)
class CoresetConfig(MethodConfig):
    """Selection of real images; no optimisation, so `iterations` and the lr are unused."""

    features: str = option("trained-net", "what the rule selects on: pixels, random-net, "
                                           "trained-net (the DC papers' choice)")
    feature_steps: int = option(300, "SGD steps (batch 256) used to train the feature net")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.features not in FEATURE_KINDS:
            out.append(f"features {self.features!r} is not one of {', '.join(FEATURE_KINDS)}")
        if self.iterations:
            out.append(f"iterations does not apply to a one-shot coreset selection (got "
                       f"{self.iterations}); leave it unset")
        if self.feature_steps < 1:
            out.append(f"feature_steps must be >= 1, got {self.feature_steps}")
        return out


class _Coreset(Distiller):
    family = "coreset"
    Config = CoresetConfig
    iterative = False
    rule: str

    def initialize(self, generator: torch.Generator) -> SyntheticSet:
        config = self.config
        if self.rule == "random":
            features = self.train.images.flatten(1)  # unused by the random rule
        else:
            features = extract_features(self.train, kind=config.features, model=config.model,
                                        device=self.device, seed=int(generator.initial_seed()),
                                        train_steps=config.feature_steps)
        index = select(self.rule, features, self.train.class_index, config.ipc,
                       generator=generator)
        images = self.train.images[index.to(self.train.images.device)].to(self.device)
        return SyntheticSet(images, num_classes=self.train.num_classes, ipc=config.ipc)

    def setup(self, syn: SyntheticSet) -> None:
        """Nothing to optimise."""

    def step(self, syn, *, iteration, generator):  # pragma: no cover - never called
        raise RuntimeError(f"{self.name} is a one-shot selection and has no iterations")


@register_method
class RandomCoreset(_Coreset):
    name = "random"
    rule = "random"
    summary = "real images drawn uniformly per class"


@register_method
class HerdingCoreset(_Coreset):
    name = "herding"
    rule = "herding"
    summary = "real images whose running mean herds toward the class mean in feature space"


@register_method
class KCenterCoreset(_Coreset):
    name = "k-center"
    rule = "k-center"
    summary = "real images chosen by greedy k-center (farthest-first) in feature space"
