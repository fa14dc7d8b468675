"""Per-class selection rules over feature vectors.

Each selector takes the features of one class, (n, D), the number to keep and a generator,
and returns the chosen row indices in selection order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..registry import Registry

__all__ = ["SELECTORS", "herding", "k_center", "list_selectors", "random_subset", "select"]

Selector = Callable[[Tensor, int, torch.Generator], Tensor]
SELECTORS: Registry[Selector] = Registry("coreset selector")


@SELECTORS.register("random")
def random_subset(features: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k rows drawn uniformly without replacement."""
    perm = torch.randperm(features.shape[0], generator=generator, device=generator.device)
    return perm[:k].to(features.device)


@SELECTORS.register("herding")
def herding(features: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Welling's herding: greedily keep the running mean of the chosen rows near the class mean.

    Deterministic; `generator` is unused and accepted for a uniform signature.
    """
    del generator
    mean = features.mean(dim=0)  # (D,)
    chosen: list[int] = []
    running_sum = torch.zeros_like(mean)
    taken = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    for t in range(1, k + 1):
        candidate_means = (running_sum.unsqueeze(0) + features) / t  # (n, D)
        distance = (candidate_means - mean).norm(dim=1)
        distance[taken] = float("inf")
        index = int(distance.argmin())
        chosen.append(index)
        taken[index] = True
        running_sum += features[index]
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


@SELECTORS.register("k-center")
def k_center(features: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Greedy k-center (farthest-first traversal), started at the row nearest the class mean.

    Deterministic; `generator` is unused and accepted for a uniform signature.
    """
    del generator
    first = int((features - features.mean(dim=0)).norm(dim=1).argmin())
    chosen = [first]
    min_distance = (features - features[first]).norm(dim=1)  # (n,)
    min_distance[first] = -1.0  # chosen rows never win again, even among duplicates
    for _ in range(1, k):
        index = int(min_distance.argmax())
        chosen.append(index)
        min_distance = torch.minimum(min_distance, (features - features[index]).norm(dim=1))
        min_distance[chosen] = -1.0
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def list_selectors() -> list[str]:
    return SELECTORS.names()


def select(
    name: str,
    features: Tensor,
    class_index: Sequence[Tensor],
    ipc: int,
    *,
    generator: torch.Generator,
) -> Tensor:
    """Choose `ipc` rows of every class; returns dataset indices, class-major, (C * ipc,).

    Args:
        name: a registered selector ("random", "herding", "k-center").
        features: features of the whole split, (N, D), on any device.
        class_index: the split's per-class indices.
        ipc: rows to keep per class.
        generator: the only source of randomness.
    """
    selector = SELECTORS.get(name)
    chosen = []
    for indices in class_index:
        local = selector(features[indices], ipc, generator)
        chosen.append(indices[local.to(indices.device)])
    return torch.cat(chosen)
