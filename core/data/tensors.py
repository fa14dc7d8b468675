"""In-memory tensors as a dataset: `from_tensors`.

Use it for data a caller already holds (a custom loader, a federated client's shard, a test
fixture). It goes through the same remapping, fingerprinting and input-space fitting as a
registered dataset. The name "tensors" is registered so that it shows in `list_datasets()`,
but it cannot be loaded by name: there are no tensors to read without the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from .registry import DatasetSplits, RawSplits, SourceRequest, build_splits, register_dataset

__all__ = ["from_tensors"]


def from_tensors(
    images_train: torch.Tensor,
    labels_train: torch.Tensor,
    images_test: torch.Tensor,
    labels_test: torch.Tensor,
    *,
    name: str = "tensors",
    device: torch.device | str = "cpu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    zca: bool = False,
    zca_epsilon: float = 0.1,
) -> DatasetSplits:
    """Build `DatasetSplits` from in-memory tensors.

    Labels may be any integers: when they are not 0..C-1 they are remapped in sorted order
    and the original value of each class is kept in ``identity.class_map``.

    Args:
        images_train: (N, C, H, W) float in [0, 1] or uint8 in [0, 255].
        labels_train: (N,) integer labels.
        images_test: (M, C, H, W) like `images_train`.
        labels_test: (M,) integer labels, each present in `labels_train`.
        name: the name recorded in the dataset identity.
        device: where the splits are kept.
        mean: per-channel mean (in [0, 1] units); fitted on the train split when None.
        std: per-channel std; fitted on the train split when None.
        zca: fit and apply ZCA whitening on the normalised train split.
        zca_epsilon: the ZCA regulariser.

    Returns:
        The splits, their identity (source "tensors") and their input space.

    Raises:
        ConfigError: listing every shape, dtype, range or label problem found.
    """
    raw = RawSplits(
        images_train=images_train.detach().cpu(),
        labels_train=torch.as_tensor(labels_train).detach().cpu(),
        images_test=images_test.detach().cpu(),
        labels_test=torch.as_tensor(labels_test).detach().cpu(),
        source="tensors",
        mean=mean,
        std=std,
    )
    return build_splits(raw, name=name, device=device, zca=zca, zca_epsilon=zca_epsilon)


@register_dataset("tensors")
def _tensors_by_name(request: SourceRequest) -> RawSplits:
    raise ConfigError(
        [
            f"dataset {request.name!r} holds in-memory tensors and cannot be loaded by name; "
            "call ddsuite.core.data.from_tensors(images_train, labels_train, images_test, "
            "labels_test) instead"
        ]
    )
