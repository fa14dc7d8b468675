"""PNG grids of a synthetic set: one row per class, in display space."""

from __future__ import annotations

from pathlib import Path

from torchvision.utils import save_image

from ..atomic import atomic_write
from ..data import InputSpace
from .syn_set import SyntheticSet

__all__ = ["save_grid"]


def save_grid(syn: SyntheticSet, input_space: InputSpace, path: str | Path, *,
              max_classes: int = 20) -> Path:
    """Save the first `max_classes` classes of `syn` as a grid PNG (atomic write)."""
    classes = min(syn.num_classes, max_classes)
    images = syn.images_syn.detach()[: classes * syn.ipc].cpu()
    shown = input_space.to_display(images).clamp(0, 1)  # (classes * ipc, C, H, W)
    return atomic_write(path, lambda tmp: save_image(shown, str(tmp), nrow=syn.ipc,
                                                     padding=1, format="png"))
