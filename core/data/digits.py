"""The embedded `digits` dataset: scikit-learn's 1,797 real 8x8 handwritten digits.

It ships inside scikit-learn, so it needs no data root and no download; it is the default
for unit tests and the main command's embedded demo.

The split is fixed: a stratified 75% / 25% train/test split with ``random_state=0``
(sklearn's `train_test_split`), giving 1,347 train and 450 test images. Pixels (0..16 in the
source) are divided by 16 to lie in [0, 1]. Normalisation is fitted on the train split.
"""

from __future__ import annotations

import torch

from .registry import RawSplits, SourceRequest, register_dataset

__all__ = ["DIGITS_TEST_FRACTION", "DIGITS_SPLIT_SEED", "load_digits_raw"]

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


@register_dataset("digits")
def load_digits_raw(request: SourceRequest) -> RawSplits:
    """Read sklearn's digits into (N, 1, 8, 8) float32 images in [0, 1].

    Args:
        request: ignored apart from the name; digits needs no root and no download.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images / 16.0).to(torch.float32).unsqueeze(1)  # (N,1,8,8)
    labels = torch.from_numpy(bunch.target).to(torch.int64)  # (N,)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_TEST_FRACTION,
        stratify=bunch.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    train_idx = torch.from_numpy(train_idx)
    test_idx = torch.from_numpy(test_idx)
    return RawSplits(
        images_train=images[train_idx],
        labels_train=labels[train_idx],
        images_test=images[test_idx],
        labels_test=labels[test_idx],
        source="sklearn.datasets.load_digits",
        class_names=[str(d) for d in range(10)],
    )
