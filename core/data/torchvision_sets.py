"""torchvision's standard sets: MNIST, FashionMNIST, CIFAR-10/100 and SVHN.

Each is read with torchvision (``root=data_root``, ``download=download``) and kept as uint8
tensors until `load_dataset` normalises them with the published per-channel constants below.
Online users pass ``download=True``; offline users point ``data_root`` at a folder that
already holds the files in torchvision's layout (e.g. ``ROOT/MNIST/raw/``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .registry import RawSplits, SourceRequest, register_dataset

__all__ = ["DEFAULT_DATA_ROOT", "TORCHVISION_SETS", "TorchvisionSet"]

logger = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = Path("~/.cache/ddsuite/data")


@dataclass(frozen=True)
class TorchvisionSet:
    """How to read one torchvision dataset.

    Attributes:
        class_name: the class in `torchvision.datasets`.
        mean: the published per-channel mean of the train split, in [0, 1] units.
        std: the published per-channel standard deviation.
        split_keyword: True when the class takes ``split="train"/"test"`` (SVHN) rather
            than ``train=True/False``.
    """

    class_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split_keyword: bool = False


TORCHVISION_SETS: dict[str, TorchvisionSet] = {
    "mnist": TorchvisionSet("MNIST", (0.1307,), (0.3081,)),
    "fashion-mnist": TorchvisionSet("FashionMNIST", (0.2861,), (0.3530,)),
    "cifar10": TorchvisionSet("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": TorchvisionSet("CIFAR100", (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": TorchvisionSet(
        "SVHN", (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), split_keyword=True
    ),
}


def _read_split(spec: TorchvisionSet, request: SourceRequest, root: Path, train: bool):
    """Construct the torchvision dataset for one split, turning 'not found' into advice."""
    import torchvision.datasets as tv

    cls = getattr(tv, spec.class_name)
    if spec.split_keyword:
        split_kwargs = {"split": "train" if train else "test"}
    else:
        split_kwargs = {"train": train}
    try:
        return cls(root=str(root), download=request.download, **split_kwargs)
    except RuntimeError as error:
        if request.download:
            raise
        raise ConfigError(
            [
                f"dataset {request.name!r} ({spec.class_name}) was not found under data root "
                f"{str(root)!r} (torchvision said: {error}). Pass --data-root (data_root=) "
                "pointing at the folder that holds it in torchvision's layout, or "
                "download=True to fetch it (needs internet)"
            ],
            source=f"torchvision.datasets.{spec.class_name}",
        ) from error


def _pixels(dataset) -> torch.Tensor:
    """The dataset's images as (N, C, H, W) uint8, whatever layout torchvision keeps."""
    data = dataset.data
    data = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    if data.dim() == 3:  # MNIST-like (N, H, W)
        return data.unsqueeze(1).contiguous()  # (N, 1, H, W)
    if data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):  # CIFAR (N, H, W, C)
        return data.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    return data.contiguous()  # SVHN is already (N, C, H, W)


def _targets(dataset) -> torch.Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = dataset.labels  # SVHN; torchvision maps its label 10 to 0
    return torch.as_tensor(np.asarray(targets), dtype=torch.int64)


def _make_loader(key: str, spec: TorchvisionSet):
    def load(request: SourceRequest) -> RawSplits:
        root = (request.data_root or DEFAULT_DATA_ROOT).expanduser()
        train = _read_split(spec, request, root, train=True)
        test = _read_split(spec, request, root, train=False)
        classes = getattr(train, "classes", None)
        return RawSplits(
            images_train=_pixels(train),
            labels_train=_targets(train),
            images_test=_pixels(test),
            labels_test=_targets(test),
            source=f"torchvision.datasets.{spec.class_name}",
            class_names=list(classes) if classes else None,
            mean=spec.mean,
            std=spec.std,
        )

    load.__name__ = f"load_{key.replace('-', '_')}_raw"
    load.__doc__ = f"Read torchvision.datasets.{spec.class_name} (both splits) as uint8 tensors."
    return load


for _key, _spec in TORCHVISION_SETS.items():
    register_dataset(_key)(_make_loader(_key, _spec))
