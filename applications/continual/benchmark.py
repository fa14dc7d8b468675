"""Continual-learning benchmarks built from ddsuite's local datasets with Avalanche's generators.

Nothing is downloaded: the pixels come from `ddsuite.core.data.load_dataset` (scikit-learn's
digits, the MNIST and CIFAR-10 copies under a data root), already normalised in the dataset's
input space, and are handed to Avalanche's `nc_benchmark` as tensor datasets.

- ``split``: class-incremental. The classes are shuffled by the benchmark seed and dealt to
  `n_experiences` experiences of equal size (Split MNIST: 5 experiences of 2 classes).
- ``permuted``: domain-incremental. Every experience holds all classes; experience k sees the
  pixels in a fixed random order drawn from the seed (experience 0 included, as in Permuted
  MNIST).

Every experience carries task label 0: the scenarios are task-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch

from ddsuite.core.data import DatasetSplits
from ddsuite.core.errors import ConfigError

__all__ = ["BENCHMARK_KINDS", "ContinualBenchmark", "make_benchmark", "tensor_dataset"]

logger = logging.getLogger(__name__)

BENCHMARK_KINDS = ("split", "permuted")


def tensor_dataset(images: torch.Tensor, labels: torch.Tensor, task_label: int = 0):
    """An Avalanche classification dataset over in-memory tensors (targets, task labels)."""
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    labels = labels.detach().cpu().to(torch.int64)
    return _make_taskaware_tensor_classification_dataset(
        images.detach().cpu(), labels, targets=labels.tolist(), task_labels=task_label)


@dataclass
class ContinualBenchmark:
    """An Avalanche benchmark and what it was made from.

    Attributes:
        benchmark: the Avalanche benchmark (its `train_stream` and `test_stream`).
        kind: "split" or "permuted".
        seed: the seed that drew the class order or the permutations.
        class_order: the classes in the order they arrive (split; all classes for permuted).
        classes_per_experience: the classes each experience holds.
        num_classes: classes of the whole dataset (the width of a model's head).
        image_shape: (C, H, W).
        splits: the ddsuite splits the experiences were cut from.
    """

    benchmark: Any
    kind: str
    seed: int
    class_order: list[int]
    classes_per_experience: list[list[int]]
    num_classes: int
    image_shape: tuple[int, int, int]
    splits: DatasetSplits

    @property
    def n_experiences(self) -> int:
        return len(self.classes_per_experience)

    def to_dict(self) -> dict[str, Any]:
        """The benchmark's provenance: dataset identity, kind, seed and class order."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "n_experiences": self.n_experiences,
            "class_order": self.class_order,
            "classes_per_experience": self.classes_per_experience,
            "dataset": self.splits.identity.to_dict(),
            "input_space": self.splits.input_space.to_dict(),
        }


def make_benchmark(splits: DatasetSplits, *, kind: str = "split", n_experiences: int = 5,
                   seed: int = 0) -> ContinualBenchmark:
    """Cut `splits` into a stream of experiences.

    Args:
        splits: a loaded dataset (its tensors are copied to the CPU for Avalanche's loaders).
        kind: "split" (class-incremental) or "permuted" (domain-incremental).
        n_experiences: number of experiences; for "split" it must divide the classes.
        seed: draws the class order (split) or the pixel permutations (permuted).

    Raises:
        ConfigError: an unknown kind, or a number of experiences the classes cannot fill.
    """
    from avalanche.benchmarks import nc_benchmark

    num_classes = splits.train.num_classes
    problems = []
    if kind not in BENCHMARK_KINDS:
        problems.append(f"kind {kind!r} is not one of {', '.join(BENCHMARK_KINDS)}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2 ** 63:
        problems.append(f"seed must be an integer in 0..2**63-1, got {seed!r}")
    if isinstance(n_experiences, bool) or not isinstance(n_experiences, int) \
            or n_experiences < 1:
        problems.append(f"n_experiences must be an integer >= 1, got {n_experiences!r}")
    elif kind == "split" and num_classes % n_experiences:
        divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
        problems.append(f"a split benchmark deals the {num_classes} classes of "
                        f"{splits.identity.name} evenly: n_experiences must be one of "
                        f"{', '.join(map(str, divisors))}, got {n_experiences}")
    if problems:
        raise ConfigError(problems, source="continual benchmark")

    seed = int(seed)  # numpy integers too
    generator = torch.Generator().manual_seed(seed)
    train, test = splits.train, splits.test
    images_train, images_test = train.images.cpu(), test.images.cpu()
    if kind == "split":
        class_order = torch.randperm(num_classes, generator=generator).tolist()
        per_exp = num_classes // n_experiences
        classes = [sorted(class_order[i * per_exp:(i + 1) * per_exp])
                   for i in range(n_experiences)]
        benchmark = nc_benchmark(
            tensor_dataset(images_train, train.labels), tensor_dataset(images_test, test.labels),
            n_experiences=n_experiences, task_labels=False, fixed_class_order=class_order)
    else:
        class_order = list(range(num_classes))
        classes = [list(range(num_classes)) for _ in range(n_experiences)]
        numel = images_train[0].numel()
        perms = [torch.randperm(numel, generator=generator) for _ in range(n_experiences)]
        benchmark = nc_benchmark(
            [tensor_dataset(_permute(images_train, p), train.labels) for p in perms],
            [tensor_dataset(_permute(images_test, p), test.labels) for p in perms],
            n_experiences=n_experiences, task_labels=False, shuffle=False,
            one_dataset_per_exp=True, class_ids_from_zero_in_each_exp=True)
    logger.info("%s benchmark on %s: %d experiences, classes %s", kind, splits.identity.name,
                n_experiences, classes)
    return ContinualBenchmark(
        benchmark=benchmark, kind=kind, seed=seed, class_order=class_order,
        classes_per_experience=classes, num_classes=num_classes,
        image_shape=train.image_shape, splits=splits)


def _permute(images: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The same pixel permutation (over C*H*W positions) applied to every image."""
    return images.flatten(1)[:, perm].reshape(images.shape)
