"""Coreset selection: choose real images per class (random, herding, k-center).

Used by the coreset baselines in `ddsuite.core.methods` and to initialise synthetic sets.
"""

from .features import FEATURE_KINDS, extract_features
from .selectors import SELECTORS, herding, k_center, list_selectors, random_subset, select

__all__ = [
    "FEATURE_KINDS",
    "SELECTORS",
    "extract_features",
    "herding",
    "k_center",
    "list_selectors",
    "random_subset",
    "select",
]
