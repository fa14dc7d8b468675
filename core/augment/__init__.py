"""Differentiable siamese augmentation (DSA): one random draw, shared by real and synthetic.

Public surface:

* `DiffAugment`: the augmenter (`draw`, `apply`, `__call__`, `siamese`, `to_dict`).
* `AugmentDraw` / `OpDraw`: the randomness of one call, shareable between batches.
* `AugmentParams`: op strengths, published defaults.
* `DEFAULT_STRATEGY`, `default_strategy`, `strategy_for_dataset`: the published strategies.
* `AUGMENT_OPS`, `AugmentOp`, `register_op`: the registry of ops, open to new ones.
"""

from .ops import AUGMENT_OPS, AugmentOp, register_op
from .params import (
    DEFAULT_STRATEGY,
    NO_FLIP_DATASETS,
    AugmentParams,
    MNIST_FAMILY,
    dataset_key,
    default_strategy,
    strategy_for_dataset,
)
from .siamese import AUGMENT_MODES, AugmentDraw, DiffAugment, OpDraw

__all__ = [
    "AUGMENT_MODES",
    "AUGMENT_OPS",
    "DEFAULT_STRATEGY",
    "NO_FLIP_DATASETS",
    "AugmentDraw",
    "AugmentOp",
    "AugmentParams",
    "DiffAugment",
    "OpDraw",
    "MNIST_FAMILY",
    "dataset_key",
    "default_strategy",
    "register_op",
    "strategy_for_dataset",
]
