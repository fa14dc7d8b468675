"""Distribution matching (DM; Zhao & Bilen, WACV 2023).

Each iteration draws a freshly initialised network and moves the synthetic images so that
the mean embedding of every class matches the mean embedding of a batch of real images of
that class, both seen through the same siamese augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..augment import DiffAugment, strategy_for_dataset
from ..evaluation import EvaluationProtocol
from ..synthetic import SyntheticSet
from .base import Distiller, register_method
from .config import MethodConfig, option

__all__ = ["DMConfig", "DistributionMatching"]


@dataclass(kw_only=True)
class DMConfig(MethodConfig):
    """DM's published settings: 20,000 iterations, lr 1.0 (momentum 0.5), 256 real images per
    class, DSA augmentation, ConvNet-3 with instance norm."""

    augmentation: str | None = option(None, "siamese augmentation strategy; null: DSA's "
                                            "published strategy (no flip on digit datasets); "
                                            "'none' turns it off")

    def resolve(self, *, dataset: str) -> "DMConfig":
        return replace(
            self,
            iterations=20000 if self.iterations is None else self.iterations,
            lr_images=1.0 if self.lr_images is None else self.lr_images,
            augmentation=(strategy_for_dataset(dataset) if self.augmentation is None
                          else self.augmentation),
        )


@register_method
class DistributionMatching(Distiller):
    name = "dm"
    family = "distribution matching"
    summary = "match class-mean embeddings of random networks (Zhao & Bilen 2023)"
    Config = DMConfig

    def __init__(self, config: DMConfig, **kwargs):
        super().__init__(config, **kwargs)
        strategy = config.augmentation or "none"
        self.augment = DiffAugment(strategy) if strategy != "none" else None

    def step(self, syn: SyntheticSet, *, iteration: int,
             generator: torch.Generator) -> dict[str, float]:
        net = self.fresh_model()
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        classes, ipc, b = syn.num_classes, syn.ipc, self.batch_real()

        real, images_syn = self.siamese_batches(syn, b, generator, self.augment)

        with torch.no_grad():
            mean_real = net.embed(real).view(classes, b, -1).mean(dim=1)  # (classes, D)
        mean_syn = net.embed(images_syn).view(classes, ipc, -1).mean(dim=1)
        loss = ((mean_real - mean_syn) ** 2).sum()
        self.update_images(loss, iteration=iteration)
        return {"loss": float(loss.detach())}

    @classmethod
    def eval_protocol(cls, config: MethodConfig) -> EvaluationProtocol:
        """DM reports accuracies of networks trained with DSA augmentation (1000 epochs)."""
        return EvaluationProtocol(name="dc-dsa", models=(config.model,),
                                  augmentation=config.augmentation or "none")
