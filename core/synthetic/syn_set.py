"""The learnable synthetic set: images, labels and an optional learnable step size."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .decode import decode_set

__all__ = ["SyntheticSet"]


class SyntheticSet(nn.Module):
    """A distilled set of `ipc` images for each of `num_classes` classes.

    Images are stored class-major: rows ``c * ipc`` to ``(c + 1) * ipc - 1`` belong to class
    ``c``. Hard labels are always kept; soft labels (logits, one row per image) and a
    learnable step size are optional, so methods that learn them share this one container.

    Args:
        images: initial images, (num_classes * ipc, C, H, W), in the dataset's input space.
        num_classes: number of classes.
        ipc: images per class.
        labels_soft: optional logits, (num_classes * ipc, num_classes).
        learn_labels: whether `labels_soft` is a learnable parameter.
        step_size: optional initial learnable step size (stored as its logarithm, so it
            stays positive by construction).
    """

    def __init__(
        self,
        images: Tensor,
        *,
        num_classes: int,
        ipc: int,
        labels_soft: Tensor | None = None,
        learn_labels: bool = False,
        step_size: float | None = None,
    ):
        super().__init__()
        if images.shape[0] != num_classes * ipc:
            raise ValueError(
                f"expected {num_classes} * {ipc} = {num_classes * ipc} images, "
                f"got {images.shape[0]}"
            )
        self.num_classes = num_classes
        self.ipc = ipc
        # How the stored images decode to training images (see synthetic.decode); None: as is.
        self.decode: dict | None = None
        # A learnable decoder whose weights are part of the set (HaBa's hallucinators).
        self.decoder: nn.Module | None = None
        self.images_syn = nn.Parameter(images.detach().clone().float())
        labels = torch.arange(num_classes, device=images.device).repeat_interleave(ipc)
        self.register_buffer("labels_syn", labels)
        if labels_soft is None:
            self.labels_soft = None
        elif learn_labels:
            self.labels_soft = nn.Parameter(labels_soft.detach().clone().float())
        else:
            self.register_buffer("labels_soft", labels_soft.detach().clone().float())
        if step_size is None:
            self.log_step_size = None
        else:
            if not step_size > 0:
                raise ValueError(f"step_size must be > 0, got {step_size}")
            value = torch.tensor(math.log(step_size), device=images.device)
            self.log_step_size = nn.Parameter(value)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images_syn.shape[1:])  # type: ignore[return-value]

    @property
    def step_size(self) -> Tensor | None:
        """The learnable step size, positive by construction (exp of a free parameter)."""
        return None if self.log_step_size is None else self.log_step_size.exp()

    def images_by_class(self) -> Tensor:
        """A view of the images as (num_classes, ipc, C, H, W)."""
        return self.images_syn.view(self.num_classes, self.ipc, *self.image_shape)

    def class_images(self, c: int) -> Tensor:
        """The `ipc` images of class `c`, (ipc, C, H, W)."""
        return self.images_syn[c * self.ipc : (c + 1) * self.ipc]

    def tensors(self) -> dict[str, Tensor]:
        """Detached CPU copies of every tensor worth saving."""
        out = {
            "images_syn": self.images_syn.detach().cpu().contiguous(),
            "labels_syn": self.labels_syn.detach().cpu().contiguous(),
        }
        if self.labels_soft is not None:
            out["labels_soft"] = self.labels_soft.detach().cpu().contiguous()
        if self.log_step_size is not None:
            out["log_step_size"] = self.log_step_size.detach().cpu().reshape(1)
        if self.decoder is not None:
            out.update(self.decoder.tensors())
        return out

    def decoded(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Detached (images, labels, soft labels) a network trains on: the set, decoded."""
        soft = None if self.labels_soft is None else self.labels_soft.detach()
        weights = None if self.decoder is None else self.decoder.tensors(cpu=False)
        return decode_set(self.images_syn.detach(), self.labels_syn, soft, self.decode, weights)

    def non_finite(self) -> list[str]:
        """Names of the learnable tensors that hold a NaN or an infinity."""
        names = []
        for name, tensor in self.tensors().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                names.append(name)
        return names

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy saved tensors (from `tensors()`) back in place, e.g. on resume."""
        self.images_syn.copy_(tensors["images_syn"])
        if self.labels_soft is not None and "labels_soft" in tensors:
            self.labels_soft.copy_(tensors["labels_soft"])
        if self.log_step_size is not None and "log_step_size" in tensors:
            self.log_step_size.copy_(tensors["log_step_size"].reshape(()))
        if self.decoder is not None:
            self.decoder.load_tensors(tensors)
