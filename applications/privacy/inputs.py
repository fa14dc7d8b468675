"""What a private run assumes about its input space: which constants are public.

Every image a private distiller sees has been normalised by the dataset's input space
(per-channel mean and std, optionally ZCA whitening). Those constants are not released
through the accounted mechanism, so they must be public:

- published constants (torchvision's MNIST, CIFAR-10, ...: the values in
  `ddsuite.core.data.torchvision_sets.TORCHVISION_SETS`) are public by construction;
- a mean and std fitted on the training split (digits, image folders, tensors) are a
  2 * C-number statistic of the private data that this package treats as public without
  accounting for it: the privacy record says so, and a warning is logged;
- a ZCA matrix fitted on the training split is a (D, D) statistic of the private images,
  far too rich to wave through, so a private run refuses it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ddsuite.core.data import DatasetSplits

__all__ = ["input_space_problems", "normalisation_record"]

logger = logging.getLogger(__name__)

_warned: set[tuple[str, tuple[float, ...], tuple[float, ...]]] = set()


def _base_name(splits: DatasetSplits) -> str:
    """The dataset's registered name, without a subset tag ("digits[members]" -> digits)."""
    return splits.identity.name.split("[", 1)[0].lower()


def _published(splits: DatasetSplits) -> bool:
    """Whether the mean and std are the published constants of a torchvision set."""
    from ddsuite.core.data.torchvision_sets import TORCHVISION_SETS

    spec = TORCHVISION_SETS.get(_base_name(splits))
    space = splits.input_space
    return (spec is not None and len(spec.mean) == len(space.mean)
            and np.allclose(spec.mean, space.mean, rtol=0, atol=1e-9)
            and np.allclose(spec.std, space.std, rtol=0, atol=1e-9))


def input_space_problems(splits: DatasetSplits, *, what: str) -> list[str]:
    """Every reason the input space cannot feed a private run (empty when it can)."""
    zca = splits.input_space.zca
    if zca is None:
        return []
    return [f"{what}: the input space is ZCA-whitened (epsilon {zca.epsilon:g}, fingerprint "
            f"{zca.fingerprint[:12]}...) by a matrix fitted on the training split, i.e. on "
            "the private images, and that matrix is not covered by any privacy accounting; "
            "load the dataset without ZCA (drop --zca, or dataset.zca: false)"]


def normalisation_record(splits: DatasetSplits, *, what: str) -> dict[str, Any]:
    """Where the normalisation constants come from, for the privacy record; logs a warning
    (once per dataset and constants) when they were fitted on the private data."""
    space = splits.input_space
    published = _published(splits)
    if published:
        origin = f"the published constants of {_base_name(splits)} (not fitted on this data)"
    else:
        origin = ("fitted on the training split, which holds the private examples "
                  "(or of unknown origin)")
    key = (_base_name(splits), space.mean, space.std)
    if not published and key not in _warned:
        _warned.add(key)
        logger.warning(
            "%s: the input normalisation (mean %s, std %s) was fitted on the training split, "
            "which holds the private examples; these %d numbers are treated as public and "
            "are not covered by the privacy accounting", what,
            [round(m, 4) for m in space.mean], [round(s, 4) for s in space.std],
            2 * len(space.mean))
    return {"mean": list(space.mean), "std": list(space.std), "zca": None,
            "fitted_on_private_data": not published, "origin": origin,
            "treated_as": "public (not accounted)"}
