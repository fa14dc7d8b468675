"""HaBa: dataset distillation via factorisation into bases and hallucinators (Liu et al.,
NeurIPS 2022).

The set stores ``ipc`` bases per class and `hallucinators` small networks shared by every
class (`ddsuite.core.synthetic.hallucinate`); each base decodes to one image per
hallucinator, with the base's label, so networks train on ``ipc * hallucinators`` images per
class. Bases and hallucinators are learned together by trajectory matching: the student of
`mtt` unrolls on the decoded images (the whole graph is kept, so gradients reach the
hallucinators' weights) and matches a later expert snapshot.

HaBa also keeps the hallucinations of one base apart with an adversarial contrastive term (a
feature extractor trained against the hallucinators). Ours is a simpler diversity penalty
in its place: the mean cosine similarity between the embeddings, by a freshly drawn network,
of the different hallucinations of the same base, weighted by `diversity_weight`.

Storage is counted honestly: the artifact's ``size_bytes`` holds the bases, the labels and
the hallucinators' weights, ``storage_ipc`` those bytes in images per class, and
``decoded_ipc`` the images per class networks train on. ``ipc`` counts bases, so at the same
``ipc`` a HaBa set is slightly larger than an image set (5 hallucinators with 3 feature maps
on 3-channel images add 870 numbers, 0.3 % of one CIFAR image per class).

Defaults: 5 hallucinators (HaBa's released scripts), 3 feature maps each (ours), and MTT's
published per-dataset settings for the matching (HaBa's scripts change lr_images and the
initial step size on CIFAR-10 with ZCA; ddsuite keeps MTT's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..synthetic import SyntheticSet
from ..synthetic.hallucinate import Hallucinators
from .base import register_method
from .config import option
from .trajectory import MTTConfig, TrajectoryMatching, unrolled_matching_loss

__all__ = ["HaBa", "HaBaConfig"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class HaBaConfig(MTTConfig):
    """HaBa: MTT's settings for the matching, plus the hallucinators'. ``ipc`` counts bases;
    networks train on ``ipc * hallucinators`` images per class."""

    hallucinators: int = option(5, "hallucinators shared by every class; each base decodes "
                                   "to one image per hallucinator (HaBa: 5)")
    hallucinator_channels: int = option(3, "feature maps of each hallucinator's encoder")
    lr_hallucinators: float = option(0.01, "SGD learning rate of the hallucinators' weights")
    diversity_weight: float = option(0.1, "weight of the penalty on the cosine similarity "
                                          "between one base's hallucinations (0 turns it off)")

    def problems(self) -> list[str]:
        out = super().problems()
        for name in ("hallucinators", "hallucinator_channels"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr_hallucinators > 0:
            out.append(f"lr_hallucinators must be > 0, got {self.lr_hallucinators}")
        if not self.diversity_weight >= 0:
            out.append(f"diversity_weight must be >= 0, got {self.diversity_weight}")
        return out


def hallucination_similarity(embeddings: Tensor, count: int) -> Tensor:
    """Mean cosine similarity between the `count` hallucinations of each base.

    Args:
        embeddings: (bases * count, D), each base's hallucinations consecutive.
        count: hallucinations per base (>= 2).
    """
    unit = F.normalize(embeddings, dim=1).view(-1, count, embeddings.shape[1])
    gram = unit @ unit.transpose(1, 2)  # (bases, count, count)
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    return off_diagonal.mean() / (count * (count - 1))


@register_method
class HaBa(TrajectoryMatching):
    name = "haba"
    family = "parameterised sets"
    summary = "bases decoded by shared hallucinator networks, learned by trajectory matching " \
              "(Liu et al. 2022)"
    Config = HaBaConfig
    recompute = False  # the unroll keeps its graph, so the hallucinators get their gradient

    def __init__(self, config: HaBaConfig, **kwargs):
        super().__init__(config, **kwargs)
        if config.hallucinators == 1:
            logger.warning("haba with one hallucinator decodes each base to one image: the set "
                           "stores more than plain images for nothing, and diversity_weight "
                           "has no pair to act on; use 2 or more, or mtt")

    def decoded_per_stored(self) -> int:
        return self.config.hallucinators

    def initialize(self, generator: torch.Generator) -> SyntheticSet:
        syn = super().initialize(generator)
        config = self.config
        syn.decoder = Hallucinators(config.hallucinators, image_channels=self.train.image_shape[0],
                                    channels=config.hallucinator_channels).to(self.device)
        syn.decode = {"kind": "hallucinate", "count": config.hallucinators,
                      "channels": config.hallucinator_channels}
        return syn

    def setup(self, syn: SyntheticSet) -> None:
        super().setup(syn)
        self.optimizer.add_param_group({"params": list(syn.decoder.parameters()),
                                        "lr": self.config.lr_hallucinators,
                                        "name": "hallucinators"})

    def step(self, syn: SyntheticSet, *, iteration: int,
             generator: torch.Generator) -> dict[str, float]:
        config, student = self.config, self._student()
        start, theta_start, theta_target, step_size, draws = self.draw_segment(
            syn, iteration=iteration, generator=generator)
        images = syn.decoder(syn.images_syn)  # (classes * ipc * hallucinators, C, H, W)
        targets = syn.labels_syn.repeat_interleave(config.hallucinators)

        assert self.optimizer is not None, "setup() must run before step()"
        self.optimizer.zero_grad(set_to_none=True)
        matching = unrolled_matching_loss(student, images, targets, step_size, theta_start,
                                          theta_target, draws=draws, augment=self.augment)
        loss, similarity = matching, torch.zeros((), device=self.device)
        if config.diversity_weight > 0 and config.hallucinators > 1:
            net = self.fresh_model()
            net.requires_grad_(False)
            similarity = hallucination_similarity(net.embed(images), config.hallucinators)
            loss = matching + config.diversity_weight * similarity
        self.check_finite(loss, iteration=iteration)
        loss.backward()
        self.step_if_finite(iteration=iteration)
        return {"loss": float(matching.detach()), "similarity": float(similarity.detach()),
                "step_size": float(syn.step_size.detach()), "start_epoch": float(start)}
