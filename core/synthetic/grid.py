"""PNG grids of a synthetic set: one row per class, in display space."""

from __future__ import annotations

import math
from pathlib import Path

import torch.nn.functional as F

from torchvision.utils import save_image

from ..atomic import atomic_write
from ..data import InputSpace
from .syn_set import SyntheticSet

__all__ = ["save_grid"]


def save_grid(syn: SyntheticSet, input_space: InputSpace, path: str | Path, *,
              max_classes: int = 20, min_side: int = 32) -> Path:
    """Save the first `max_classes` classes of `syn` as a grid PNG, one row per class.

    Images smaller than `min_side` pixels are enlarged by an integer factor (nearest
    neighbour) so that they can be seen. The write is atomic.
    """
    classes = min(syn.num_classes, max_classes)
    images = syn.images_syn.detach()[: classes * syn.ipc].cpu()
    shown = input_space.to_display(images).clamp(0, 1)  # (classes * ipc, C, H, W)
    factor = math.ceil(min_side / min(shown.shape[-2:]))
    if factor > 1:  # small images (8x8 digits) are enlarged, pixel for pixel
        shown = F.interpolate(shown, scale_factor=factor, mode="nearest")
    return atomic_write(path, lambda tmp: save_image(shown, str(tmp), nrow=syn.ipc,
                                                     padding=1, format="png"))
