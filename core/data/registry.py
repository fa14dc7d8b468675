"""The dataset registry: sources registered by name, loaded into normalised device tensors.

A *source* is a function registered with `register_dataset` that reads raw pixels and labels
into a `RawSplits`. `load_dataset` looks the source up, then does what every dataset shares:
remap labels to 0..C-1, fingerprint the raw content, fit the input space on the train split,
normalise (and ZCA-whiten) both splits, and index them by class on the device.

A source registered as ``"name:ARG"`` takes an argument: ``load_dataset("name:value")``
passes ``"value"`` to it as `SourceRequest.argument` (``imagefolder:PATH`` works this way).

Example:
    >>> import torch
    >>> from ddsuite.core.data import load_dataset
    >>> splits = load_dataset("digits")
    >>> splits.train.sample_per_class(5, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([10, 5, 1, 8, 8])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, UnknownNameError
from ..registry import Registry
from .identity import DatasetIdentity, fingerprint_tensors
from .input_space import InputSpace
from .real import RealDataset

__all__ = [
    "DatasetSplits",
    "RawSplits",
    "SourceRequest",
    "build_splits",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceRequest:
    """What `load_dataset` passes to a registered source.

    Attributes:
        name: the full name asked for, e.g. "mnist" or "imagefolder:/data/pets".
        argument: the part after the first ":" for sources registered as "name:ARG".
        data_root: the folder holding the data, or None for the source's default.
        download: whether the source may download missing data.
        cache_dir: where a source that decodes files may cache decoded tensors, or None.
    """

    name: str
    argument: str | None
    data_root: Path | None
    download: bool
    cache_dir: Path | None


@dataclass
class RawSplits:
    """Raw pixels and labels of both splits, as a source read them.

    Attributes:
        images_train: (N, C, H, W) uint8 in [0, 255] or float in [0, 1], on the CPU.
        labels_train: (N,) integer labels, any values.
        images_test: (M, C, H, W) like `images_train`.
        labels_test: (M,) integer labels; each must occur in `labels_train`.
        source: where the data came from, e.g. "torchvision.datasets.MNIST".
        class_names: name of each original label value (indexed by it), or None to use the
            label values themselves.
        mean: published per-channel mean to use instead of fitting one, or None.
        std: published per-channel std, or None.
    """

    images_train: torch.Tensor
    labels_train: torch.Tensor
    images_test: torch.Tensor
    labels_test: torch.Tensor
    source: str
    class_names: Sequence[str] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None


@dataclass
class DatasetSplits:
    """A loaded dataset: both splits, where they came from, and their input space."""

    train: RealDataset
    test: RealDataset
    identity: DatasetIdentity
    input_space: InputSpace

    def to(self, device: torch.device | str) -> DatasetSplits:
        """Return these splits on `device`."""
        return DatasetSplits(
            self.train.to(device), self.test.to(device), self.identity, self.input_space
        )


SourceFn = Callable[[SourceRequest], RawSplits]


@dataclass(frozen=True)
class _Source:
    display_name: str
    takes_argument: bool
    load: SourceFn


_SOURCES: Registry[_Source] = Registry("dataset")


def register_dataset(name: str) -> Callable[[SourceFn], SourceFn]:
    """Register a dataset source under `name` (decorator).

    Args:
        name: the dataset name, case-insensitive. ``"prefix:ARG"`` registers a source that
            takes an argument after the colon (``ARG`` is only the placeholder shown by
            `list_datasets`).

    Returns:
        A decorator for a function ``(SourceRequest) -> RawSplits``.

    Raises:
        DuplicateNameError: when the name (prefix) is taken.
    """
    prefix, sep, placeholder = name.partition(":")
    if not prefix or (sep and not placeholder):
        raise ConfigError([f"dataset name {name!r} must be 'name' or 'name:ARG'"])

    def add(load: SourceFn) -> SourceFn:
        _SOURCES.register(prefix, _Source(name, bool(sep), load))
        return load

    return add


def list_datasets() -> list[str]:
    """The registered dataset names, sorted; argument-taking ones as "prefix:ARG"."""
    return sorted(_SOURCES.get(key).display_name for key in _SOURCES.names())


def load_dataset(
    name: str,
    *,
    data_root: str | Path | None = None,
    device: torch.device | str = "cpu",
    zca: bool = False,
    zca_epsilon: float = 0.1,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> DatasetSplits:
    """Load a registered dataset into normalised tensors on `device`.

    Args:
        name: a name from `list_datasets()`: "digits", "mnist", "fashion-mnist", "cifar10",
            "cifar100", "svhn", or "imagefolder:PATH".
        data_root: the folder torchvision datasets live in (torchvision's `root`); None
            means ``~/.cache/ddsuite/data``. Not used by "digits" and "imagefolder:PATH".
        device: where the images and class index are kept.
        zca: ZCA-whiten the images after normalisation (fitted on the train split).
        zca_epsilon: the ZCA regulariser added to the covariance eigenvalues.
        download: let torchvision download a missing dataset (needs internet).
        cache_dir: a folder where sources that decode image files ("imagefolder:PATH")
            cache the decoded uint8 tensors; sources already stored as tensors ignore it.

    Returns:
        The train and test splits, the dataset identity and the fitted input space.

    Raises:
        UnknownNameError: listing the valid names when `name` is not registered.
        ConfigError: when the data is missing or inconsistent (the message says how to fix).
    """
    prefix, sep, argument = name.partition(":")
    if prefix.lower() not in _SOURCES:
        raise UnknownNameError("dataset", name, list_datasets())
    source = _SOURCES.get(prefix)
    if source.takes_argument and not argument:
        raise ConfigError(
            [f"dataset {prefix!r} needs an argument: use {source.display_name!r}, got {name!r}"]
        )
    if not source.takes_argument and sep:
        raise ConfigError([f"dataset {prefix!r} takes no ':' argument, got {name!r}"])

    request = SourceRequest(
        name=name,
        argument=argument or None,
        data_root=Path(data_root).expanduser() if data_root is not None else None,
        download=download,
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
    )
    raw = source.load(request)
    return build_splits(raw, name=name, device=device, zca=zca, zca_epsilon=zca_epsilon)


def build_splits(
    raw: RawSplits,
    *,
    name: str,
    device: torch.device | str = "cpu",
    zca: bool = False,
    zca_epsilon: float = 0.1,
) -> DatasetSplits:
    """Turn raw splits into `DatasetSplits`: remap, fingerprint, fit, normalise, index.

    Args:
        raw: pixels and labels as a source read them.
        name: the dataset name recorded in the identity.
        device: where the splits are kept.
        zca: fit and apply ZCA whitening.
        zca_epsilon: the ZCA regulariser.
    """
    _check_raw(raw)
    labels_train, labels_test, class_map = remap_labels(raw.labels_train, raw.labels_test)
    fingerprint = fingerprint_tensors(
        [
            ("images_train", raw.images_train),
            ("labels_train", raw.labels_train.to(torch.int64)),
            ("images_test", raw.images_test),
            ("labels_test", raw.labels_test.to(torch.int64)),
        ]
    )
    names_by_label = raw.class_names
    class_names = [
        str(names_by_label[label])
        if names_by_label is not None and 0 <= label < len(names_by_label)
        else str(label)
        for label in class_map
    ]

    # Fit on the raw train split (uint8 stays compact), then convert on the device.
    device = torch.device(device)
    space = InputSpace.fit(
        raw.images_train, mean=raw.mean, std=raw.std, zca=zca, zca_epsilon=zca_epsilon
    )
    splits = []
    for split, images, labels in (
        ("train", raw.images_train, labels_train),
        ("test", raw.images_test, labels_test),
    ):
        images = _to_float01(images.to(device))  # (N, C, H, W) float32 in [0, 1]
        images = space.whiten(space.normalize(images, inplace=True))
        splits.append(
            RealDataset(
                images,
                labels.to(device),
                num_classes=len(class_map),
                class_names=class_names,
                split=split,
            )
        )
    train, test = splits

    identity = DatasetIdentity(
        name=name,
        source=raw.source,
        num_classes=len(class_map),
        image_shape=train.image_shape,
        num_train=len(train),
        num_test=len(test),
        class_names=class_names,
        class_map=class_map,
        fingerprint=fingerprint,
    )
    logger.info(
        "loaded %s: %d train / %d test images of shape %s, %d classes, %r",
        name, len(train), len(test), train.image_shape, len(class_map), space,
    )
    return DatasetSplits(train=train, test=test, identity=identity, input_space=space)


def remap_labels(
    labels_train: torch.Tensor, labels_test: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Map the distinct train labels, in sorted order, to 0..C-1.

    Args:
        labels_train: (N,) integer labels.
        labels_test: (M,) integer labels; each must occur in `labels_train`.

    Returns:
        The remapped train and test labels (int64) and the class map: the original label
        of each new index.

    Raises:
        ConfigError: when the test split has labels the train split lacks.
    """
    labels_train = labels_train.to(torch.int64)
    labels_test = labels_test.to(torch.int64)
    class_values = torch.unique(labels_train)  # (C,) sorted
    if class_values.numel() < 2:
        raise ConfigError([
            f"the training split has {class_values.numel()} class(es) "
            f"({class_values.tolist()}); classification needs at least 2"
        ])
    class_map = [int(v) for v in class_values.tolist()]

    absent = sorted(set(torch.unique(labels_test).tolist()) - set(class_map))
    if absent:
        shown = ", ".join(str(a) for a in absent[:20]) + (" ..." if len(absent) > 20 else "")
        raise ConfigError(
            [
                f"the test split has label(s) {shown} that never occur in the train split "
                f"(train labels: {_short(class_map)}); a model cannot be scored on classes it "
                "never saw. Remove those test images or add training images of those classes"
            ]
        )
    if class_map == list(range(len(class_map))):
        return labels_train, labels_test, class_map

    logger.info(
        "remapped %d labels to 0..%d in sorted order (original label of each index: %s)",
        len(class_map), len(class_map) - 1, _short(class_map),
    )
    new_train = torch.searchsorted(class_values, labels_train)  # (N,)
    new_test = torch.searchsorted(class_values, labels_test)  # (M,)
    return new_train, new_test, class_map


def _check_raw(raw: RawSplits) -> None:
    """Report every shape, dtype and range problem of raw splits at once."""
    problems = []
    for split, images, labels in (
        ("train", raw.images_train, raw.labels_train),
        ("test", raw.images_test, raw.labels_test),
    ):
        if images.dim() != 4:
            problems.append(f"{split} images must be (N, C, H, W), got {tuple(images.shape)}")
            continue
        if images.dtype != torch.uint8 and not images.is_floating_point():
            problems.append(f"{split} images must be uint8 or float, got {images.dtype}")
        elif images.is_floating_point() and images.numel():
            low, high = float(images.min()), float(images.max())
            if low < 0.0 or high > 1.0 or low != low or high != high:
                problems.append(
                    f"{split} float images must lie in [0, 1], got {low:.4g}..{high:.4g}; "
                    "divide by 255 (or pass uint8)"
                )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            problems.append(
                f"{split} labels must be (N,) with N = {images.shape[0]}, "
                f"got shape {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            problems.append(f"{split} labels must be integers, got {labels.dtype}")
    if not problems and raw.images_train.shape[1:] != raw.images_test.shape[1:]:
        problems.append(
            f"train images are {tuple(raw.images_train.shape[1:])} but test images are "
            f"{tuple(raw.images_test.shape[1:])}; both splits need one (C, H, W)"
        )
    if not problems and raw.images_train.shape[0] == 0:
        problems.append("the train split is empty")
    if problems:
        raise ConfigError(problems, source=raw.source)


def _to_float01(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 / 255; float -> a float32 copy (never aliases the source's tensor)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32, copy=True)


def _short(values: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return "[" + shown + (", ..." if len(values) > limit else "") + "]"
