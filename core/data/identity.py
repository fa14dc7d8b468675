"""What a dataset is: its name, source, shapes, classes and a fingerprint of its raw content.

A distilled set records the `DatasetIdentity` of the real data it was made from, so a later
evaluation can tell whether it runs against the same data (same pixels, same class order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["DatasetIdentity", "fingerprint_tensors"]

# Hash in slices so that a large dataset is never copied whole into a second buffer.
_HASH_CHUNK_BYTES = 64 * 1024 * 1024


def fingerprint_tensors(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """Return the sha256 hex digest of tensors' names, dtypes, shapes and raw bytes.

    Args:
        named: (name, tensor) pairs, hashed in the given order. Tensors are moved to the CPU
            and made contiguous; their bytes are hashed as stored (no conversion).

    Returns:
        A 64-character lowercase hex string.
    """
    digest = hashlib.sha256()
    for name, tensor in named:
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        digest.update(f"{name}|{array.dtype.str}|{tuple(array.shape)};".encode())
        flat = array.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, _HASH_CHUNK_BYTES):
            digest.update(flat[start : start + _HASH_CHUNK_BYTES].data)
    return digest.hexdigest()


@dataclass(frozen=True)
class DatasetIdentity:
    """The provenance of a loaded dataset, stored with every distilled set.

    Attributes:
        name: the name the dataset was loaded under ("digits", "mnist", "imagefolder:...").
        source: where the pixels came from ("sklearn.datasets.load_digits",
            "torchvision.datasets.MNIST", "imagefolder:/abs/path", "tensors").
        num_classes: number of classes after label remapping.
        image_shape: (C, H, W) of every image.
        num_train: number of training images.
        num_test: number of test images.
        class_names: the name of each class, indexed by the remapped label.
        class_map: the original label of each remapped label (identity when the source
            already used 0..C-1).
        fingerprint: sha256 hex of the raw train and test pixels and labels as the source
            stored them, before remapping and normalisation.
    """

    name: str
    source: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    class_names: list[str]
    class_map: list[Any]
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (tuples become lists, labels become ints or strings)."""
        return {
            "name": self.name,
            "source": self.source,
            "num_classes": int(self.num_classes),
            "image_shape": [int(s) for s in self.image_shape],
            "num_train": int(self.num_train),
            "num_test": int(self.num_test),
            "class_names": [str(n) for n in self.class_names],
            "class_map": [_json_label(label) for label in self.class_map],
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetIdentity:
        """Rebuild an identity from `to_dict` output.

        Raises:
            ConfigError: listing every missing key at once.
        """
        expected = [f.name for f in fields(cls)]
        missing = [key for key in expected if key not in data]
        if missing:
            raise ConfigError(
                [f"dataset identity is missing key {key!r}" for key in missing],
                source="DatasetIdentity.from_dict",
            )
        return cls(
            name=str(data["name"]),
            source=str(data["source"]),
            num_classes=int(data["num_classes"]),
            image_shape=tuple(int(s) for s in data["image_shape"]),  # type: ignore[arg-type]
            num_train=int(data["num_train"]),
            num_test=int(data["num_test"]),
            class_names=[str(n) for n in data["class_names"]],
            class_map=list(data["class_map"]),
            fingerprint=str(data["fingerprint"]),
        )


def _json_label(label: Any) -> int | str:
    """Original labels are integers for every built-in source; keep anything else as text."""
    if isinstance(label, (bool, np.bool_)):
        return str(label)
    if isinstance(label, (int, np.integer)):
        return int(label)
    return str(label)
