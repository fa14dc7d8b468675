"""Real datasets by name, held as normalised tensors on the device.

Example:
    >>> import torch
    >>> from ddsuite.core.data import load_dataset
    >>> splits = load_dataset("digits")
    >>> splits.train.image_shape, splits.train.num_classes
    ((1, 8, 8), 10)
    >>> batch = splits.train.sample_per_class(4, generator=torch.Generator().manual_seed(0))
    >>> batch.shape
    torch.Size([10, 4, 1, 8, 8])
"""

from .identity import DatasetIdentity
from .input_space import InputSpace, ZCAWhitening
from .real import RealDataset
from .registry import (
    DatasetSplits,
    RawSplits,
    SourceRequest,
    list_datasets,
    load_dataset,
    register_dataset,
)
from .tensors import from_tensors

# Importing the source modules registers their datasets.
from . import digits as _digits  # noqa: E402,F401  isort: skip
from . import imagefolder as _imagefolder  # noqa: E402,F401  isort: skip
from . import torchvision_sets as _torchvision_sets  # noqa: E402,F401  isort: skip

__all__ = [
    "DatasetIdentity",
    "DatasetSplits",
    "InputSpace",
    "RawSplits",
    "RealDataset",
    "SourceRequest",
    "ZCAWhitening",
    "from_tensors",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]
