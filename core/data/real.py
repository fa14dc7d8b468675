"""A real split held as tensors on the device, with a per-class index for fast sampling.

Distillers draw class batches many thousands of times; here a draw is one random-key index
operation on the device, never a DataLoader.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..errors import ConfigError, IPCError

__all__ = ["RealDataset"]

logger = logging.getLogger(__name__)


class RealDataset:
    """Images and labels of one split, normalised, on one device.

    Args:
        images: (N, C, H, W) float images, already in the dataset's input space.
        labels: (N,) integer labels in 0..num_classes-1.
        num_classes: the number of classes (classes may be empty in a test split).
        class_names: the name of each class; defaults to "0", "1", ...
        split: "train" or "test", used in messages.

    Attributes:
        images: (N, C, H, W) float32 on the device.
        labels: (N,) int64 on the device.
        class_index: for each class, a LongTensor of the indices of its images.
        class_names: the name of each class.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        split: str = "train",
    ):
        problems = []
        if images.dim() != 4:
            problems.append(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            problems.append(
                f"labels must be (N,) with N = {images.shape[0]} images, "
                f"got shape {tuple(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            problems.append(
                f"labels must lie in 0..{num_classes - 1}, got "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        if class_names is not None and len(class_names) != num_classes:
            problems.append(f"got {len(class_names)} class names for {num_classes} classes")
        if problems:
            raise ConfigError(problems, source=f"RealDataset({split})")

        self.images = images if images.dtype == torch.float32 else images.float()
        self.labels = labels.to(device=self.images.device, dtype=torch.int64)
        self.num_classes = int(num_classes)
        self.class_names = (
            [str(n) for n in class_names]
            if class_names is not None
            else [str(c) for c in range(self.num_classes)]
        )
        self.split = split
        self._build_index()

    def _build_index(self) -> None:
        """Sort indices by class once; keep per-class views and a padded (C, M) table."""
        device = self.labels.device
        order = torch.argsort(self.labels, stable=True)  # (N,)
        counts = torch.bincount(self.labels, minlength=self.num_classes)  # (C,)
        self.class_counts: list[int] = counts.tolist()
        self.class_index: list[torch.Tensor] = list(torch.split(order, self.class_counts))

        # Padded table: row c holds class c's indices, then -1 where the class is shorter.
        width = max(self.class_counts, default=0)
        starts = torch.cumsum(counts, 0) - counts  # (C,)
        sorted_labels = self.labels[order]  # (N,)
        rank = torch.arange(order.numel(), device=device) - starts[sorted_labels]  # (N,)
        self._padded_index = torch.full(
            (self.num_classes, width), -1, dtype=torch.int64, device=device
        )  # (C, M)
        self._padded_index[sorted_labels, rank] = order
        self._padding = self._padded_index < 0  # (C, M)

    # ------------------------------------------------------------------ facts

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """The device the images live on."""
        return self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (
            f"RealDataset(split={self.split!r}, n={len(self)}, classes={self.num_classes}, "
            f"image_shape={self.image_shape}, device={self.device})"
        )

    # ------------------------------------------------------------------ ipc checks

    def check_ipc(self, ipc: int) -> None:
        """Raise IPCError unless every class can supply `ipc` distinct images.

        Raises:
            IPCError: for ipc <= 0, a non-integer ipc, or ipc above the smallest class.
        """
        if isinstance(ipc, bool) or not isinstance(ipc, int):
            raise IPCError(f"ipc must be an integer >= 1, got {ipc!r}")
        if ipc <= 0:
            raise IPCError(f"ipc must be >= 1, got {ipc}")
        smallest = min(range(self.num_classes), key=self.class_counts.__getitem__)
        if ipc > self.class_counts[smallest]:
            raise IPCError(self._too_many(ipc, smallest))

    def _too_many(self, n: int, c: int) -> str:
        kind = "training" if self.split == "train" else f"{self.split}"
        return (
            f"ipc {n} exceeds class {c} ({self.class_names[c]!r}) which has "
            f"{self.class_counts[c]} {kind} images"
        )

    # ------------------------------------------------------------------ sampling

    def sample_class(self, c: int, n: int, *, generator: torch.Generator) -> torch.Tensor:
        """Draw `n` distinct random images of class `c`.

        Args:
            c: the class, in 0..num_classes-1.
            n: how many images; at most the class size.
            generator: the only source of randomness; may live on any device.

        Returns:
            (n, C, H, W) images on the data device.
        """
        if not 0 <= c < self.num_classes:
            raise ConfigError([f"class {c} is out of range 0..{self.num_classes - 1}"])
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise IPCError(f"the number of images to sample must be an integer >= 1, got {n!r}")
        if n > self.class_counts[c]:
            raise IPCError(self._too_many(n, c))
        perm = torch.randperm(self.class_counts[c], generator=generator, device=generator.device)
        chosen = self.class_index[c][perm[:n].to(self.device)]  # (n,)
        return self.images[chosen]  # (n, C, H, W)

    def sample_indices_per_class(self, n: int, *, generator: torch.Generator) -> torch.Tensor:
        """Indices of `n` distinct random images of every class, drawn in one batched op.

        Each class row gets an independent uniform random subset: every padded slot gets a
        uniform random key, padding gets a key above 1, and the `n` smallest keys win.

        Returns:
            (num_classes, n) int64 indices into `images`, on the data device.
        """
        self.check_ipc(n)
        keys = torch.rand(
            self._padded_index.shape, generator=generator, device=generator.device
        ).to(self.device)  # (C, M)
        keys.masked_fill_(self._padding, 2.0)
        slots = keys.topk(n, dim=1, largest=False).indices  # (C, n)
        return self._padded_index.gather(1, slots)  # (C, n)

    def sample_per_class(self, n: int, *, generator: torch.Generator) -> torch.Tensor:
        """Draw `n` distinct random images of every class.

        Args:
            n: images per class (an ipc); at most the smallest class size.
            generator: the only source of randomness; may live on any device.

        Returns:
            (num_classes, n, C, H, W) images on the data device; row c is class c.
        """
        index = self.sample_indices_per_class(n, generator=generator)  # (classes, n)
        return self.images[index.reshape(-1)].reshape(self.num_classes, n, *self.image_shape)

    # ------------------------------------------------------------------ moving

    def to(self, device: torch.device | str) -> RealDataset:
        """Return this split on `device` (self when it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return RealDataset(
            self.images.to(device),
            self.labels.to(device),
            num_classes=self.num_classes,
            class_names=self.class_names,
            split=self.split,
        )
