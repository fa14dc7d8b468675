"""DataDAM: dataset distillation with attention matching (Sajedi et al., ICCV 2023).

Each iteration draws a freshly initialised network, as DM does, and compares real and
synthetic images of every class at two places:

- *spatial attention matching* (SAM) at every intermediate layer: a layer's feature map
  ``f`` (B, C, H, W) becomes an attention map ``a = mean_c |f_c|^p`` over its spatial
  positions, L2-normalised per image; the class means of the real and synthetic attention
  maps are matched (squared distance), layer by layer;
- the *MMD of the final embeddings*: the class means of ``embed(x)`` are matched, as in DM
  (a linear-kernel maximum mean discrepancy).

The intermediate layers are the model's activation outputs before the last one (whose
information the embedding term carries), taken from `intermediate_features`; for ConvNet-3
these are the first two blocks' maps, before pooling. Real and synthetic batches of one class
share one draw of the siamese augmentation.

Defaults (see `DataDAMConfig`) follow the authors' released training script for CIFAR:
20,000 iterations, image lr 1 (10 from IPC 100), 64 real images per class, attention power 1,
SAM weight 100 and embedding weight 100 x 0.01 = 1, DSA's strategy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import DiffAugment, strategy_for_dataset
from ..errors import UnsupportedFeatureError
from ..evaluation import EvaluationProtocol
from ..models.features import intermediate_features
from ..synthetic import SyntheticSet
from .base import Distiller, register_method
from .config import MethodConfig, interpolate_anchors, option

__all__ = ["DataDAM", "DataDAMConfig", "attention_map", "attention_matching_loss"]

logger = logging.getLogger(__name__)

# Image learning rate by IPC in the released script ("1 for low IPCs, 10 for >= 100").
LR_IMAGES_ANCHORS = {1: 1.0, 50: 1.0, 100: 10.0}


@dataclass(kw_only=True)
class DataDAMConfig(MethodConfig):
    """DataDAM's settings. Defaults come from the authors' released script (CIFAR-10/100):
    20,000 iterations; image lr 1 up to IPC 50 and 10 from IPC 100 (interpolated between);
    momentum 0.5; 64 real images per class; attention power 1 with L2 normalisation; loss =
    100 x SAM + 100 x 0.01 x MMD; DSA augmentation."""

    batch_real: int = option(64, "real images per class per iteration (capped at the "
                                 "smallest class); DataDAM uses 64")
    power: float = option(1.0, "exponent p of the attention map mean_c |f_c|^p (> 0)")
    weight_attention: float = option(100.0, "weight of the spatial attention matching loss")
    weight_embedding: float = option(1.0, "weight of the final-embedding MMD loss "
                                          "(the script's 100 x task_balance 0.01)")
    augmentation: str | None = option(None, "siamese augmentation strategy; null: DSA's "
                                            "published strategy (no flip on digit datasets); "
                                            "'none' turns it off")

    def problems(self) -> list[str]:
        out = super().problems()
        if not self.power > 0:
            out.append(f"power must be > 0, got {self.power}")
        for name in ("weight_attention", "weight_embedding"):
            if not getattr(self, name) >= 0:
                out.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.weight_attention == 0 and self.weight_embedding == 0:
            out.append("weight_attention and weight_embedding are both 0; at least one "
                       "must be > 0")
        return out

    def resolve(self, *, dataset: str) -> "DataDAMConfig":
        return replace(
            self,
            iterations=20000 if self.iterations is None else self.iterations,
            lr_images=(interpolate_anchors(LR_IMAGES_ANCHORS, self.ipc)
                       if self.lr_images is None else self.lr_images),
            augmentation=(strategy_for_dataset(dataset) if self.augmentation is None
                          else self.augmentation),
        )


def attention_map(features: Tensor, *, power: float) -> Tensor:
    """Spatial attention of feature maps: channel mean of ``|f|^p``, L2-normalised per image.

    Args:
        features: (B, C, H, W) feature maps.
        power: the exponent p (> 0).

    Returns:
        (B, H * W) attention maps of unit L2 norm (an all-zero map stays zero). Scaling the
        features by any c > 0 leaves the result unchanged.
    """
    attention = features.abs().pow(power).mean(dim=1).flatten(1)  # (B, H * W)
    return F.normalize(attention, p=2.0, dim=1, eps=1e-12)


def _class_mean(x: Tensor, classes: int) -> Tensor:
    """(classes * n, ...) class-major rows -> (classes, prod(...)) per-class means."""
    return x.reshape(classes, x.shape[0] // classes, -1).mean(dim=1)


def attention_matching_loss(maps_real: list[Tensor], maps_syn: list[Tensor], *,
                            classes: int, power: float) -> Tensor:
    """Sum over layers and classes of the squared distance of the mean attention maps.

    Each list holds (classes * n, C, H, W) maps, class-major (n may differ between lists).
    """
    total = maps_syn[0].new_zeros(())
    for real, syn in zip(maps_real, maps_syn):
        mean_real = _class_mean(attention_map(real, power=power), classes)  # (classes, HW)
        mean_syn = _class_mean(attention_map(syn, power=power), classes)
        total = total + ((mean_real - mean_syn) ** 2).sum()
    return total


@register_method
class DataDAM(Distiller):
    name = "datadam"
    family = "distribution matching"
    summary = ("match per-layer spatial attention maps and final embeddings of random "
               "networks (Sajedi et al. 2023)")
    Config = DataDAMConfig

    def __init__(self, config: DataDAMConfig, **kwargs):
        super().__init__(config, **kwargs)
        strategy = config.augmentation or "none"
        self.augment = DiffAugment(strategy) if strategy != "none" else None

    @staticmethod
    def _spatial(maps: list[Tensor]) -> list[Tensor]:
        """The intermediate maps SAM compares: all but the last activation, spatial only."""
        return [m for m in maps[:-1] if m.ndim == 4]

    def step(self, syn: SyntheticSet, *, iteration: int,
             generator: torch.Generator) -> dict[str, float]:
        config = self.config
        net = self.fresh_model()
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        classes, b = syn.num_classes, self.batch_real()

        real, images_syn = self.siamese_batches(syn, b, generator, self.augment)

        with torch.no_grad():
            maps_real, embed_real = intermediate_features(net, real)
        maps_syn, embed_syn = intermediate_features(net, images_syn)
        maps_real, maps_syn = self._spatial(maps_real), self._spatial(maps_syn)
        if iteration == 0:
            logger.debug("datadam: attention matched at %d layers, shapes %s", len(maps_syn),
                         [tuple(m.shape[1:]) for m in maps_syn])
        if not maps_syn and config.weight_attention > 0:
            raise UnsupportedFeatureError(
                f"model {config.model!r} has no intermediate spatial feature map before its "
                "last activation, so DataDAM has no attention to match; use a convolutional "
                "model (convnet, lenet, alexnet, vgg11, resnet18) or set weight_attention=0"
            )

        loss_attention = (attention_matching_loss(maps_real, maps_syn, classes=classes,
                                                  power=config.power)
                          if maps_syn else embed_syn.new_zeros(()))
        loss_embedding = ((_class_mean(embed_real, classes)
                           - _class_mean(embed_syn, classes)) ** 2).sum()
        loss = config.weight_attention * loss_attention + config.weight_embedding * loss_embedding
        self.update_images(loss, iteration=iteration)
        return {"loss": float(loss.detach()), "loss_attention": float(loss_attention.detach()),
                "loss_embedding": float(loss_embedding.detach())}

    @classmethod
    def eval_protocol(cls, config: MethodConfig) -> EvaluationProtocol:
        """DataDAM reports networks trained with DSA augmentation, as DM does."""
        return EvaluationProtocol(name="dc-dsa", models=(config.model,),
                                  augmentation=config.augmentation or "none")
