"""Turn a set of images into comparable numbers: mean and std of K networks' test accuracy."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..data import DatasetSplits
from ..errors import ArtifactError, InputSpaceMismatchError
from ..provenance import library_versions, timestamp
from .protocol import EvaluationProtocol
from .trainer import networks_accuracy, train_networks

__all__ = ["EvaluationResult", "ModelScore", "check_input_space", "evaluate_images", "mean_std"]

logger = logging.getLogger(__name__)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (as the field reports them)."""
    mean = sum(values) / len(values)
    return float(mean), float(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))


@dataclass
class ModelScore:
    """Test accuracies (percent) of the networks of one model trained on the set."""

    model: str
    accuracies: list[float]
    seconds: float
    diverged: int = 0

    @property
    def mean(self) -> float:
        return mean_std(self.accuracies)[0]

    @property
    def std(self) -> float:
        """Population standard deviation, as the field reports it."""
        return mean_std(self.accuracies)[1]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": self.mean, "std": self.std}

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass
class EvaluationResult:
    """What `evaluate_images` measured, with the protocol that makes it comparable."""

    protocol: EvaluationProtocol
    scores: dict[str, ModelScore]
    seed: int
    num_images: int
    labels: str
    created: str = field(default_factory=timestamp)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol.to_dict(),
            "seed": self.seed,
            "num_images": self.num_images,
            "labels": self.labels,
            "created": self.created,
            "versions": library_versions(),
            "scores": {name: s.to_dict() for name, s in self.scores.items()},
        }


def evaluate_images(
    images: Tensor,
    labels: Tensor,
    splits: DatasetSplits,
    *,
    protocol: EvaluationProtocol,
    device: torch.device | str,
    seed: int = 0,
    labels_soft: Tensor | None = None,
) -> EvaluationResult:
    """Evaluate a set (synthetic or real) under `protocol` on `splits.test`.

    Args:
        images: (N, C, H, W) in the input space of `splits`.
        labels: (N,) hard labels in 0..classes-1.
        splits: the dataset; its test split is the yardstick.
        protocol: how networks are trained and which models are used.
        device: where to train and test.
        seed: base seed; model m's networks use seeds seed, seed + 1, ...
        labels_soft: optional soft-label logits (N, classes); used when the protocol's
            label_loss is a soft one.
    """
    device = torch.device(device)
    test = splits.test
    expected = tuple(test.image_shape)
    if tuple(images.shape[1:]) != expected:
        raise InputSpaceMismatchError(
            f"images of shape {tuple(images.shape[1:])} cannot be evaluated on "
            f"{splits.identity.name}, whose images are {expected}"
        )
    use_soft = protocol.label_loss != "cross_entropy"
    if use_soft and labels_soft is None:
        raise ValueError(f"protocol label_loss {protocol.label_loss!r} needs labels_soft")
    targets = labels_soft if use_soft else labels
    test_images = test.images.to(device)
    test_labels = test.labels.to(device)
    scores = {}
    for model in protocol.models:
        networks = train_networks(images, targets, model=model, num_classes=test.num_classes,
                                  protocol=protocol, device=device, seed=seed)
        accuracy = networks_accuracy(networks, test_images, test_labels)
        diverged = int((~torch.isfinite(networks.final_loss)).sum())
        if diverged:
            logger.warning("%d of %d %s networks diverged (non-finite loss); their accuracy "
                           "is counted as measured", diverged, networks.num_networks, model)
        scores[model] = ModelScore(model=model, accuracies=[100.0 * float(a) for a in accuracy],
                                   seconds=networks.seconds, diverged=diverged)
        logger.info("%s: %s (%d nets, %.1fs)", model, scores[model], networks.num_networks,
                    networks.seconds)
    return EvaluationResult(protocol=protocol, scores=scores, seed=seed,
                            num_images=images.shape[0], labels="soft" if use_soft else "hard")


def check_input_space(artifact_meta: dict[str, Any], splits: DatasetSplits) -> None:
    """Refuse to evaluate a set in another input space than the one it was made in."""
    try:
        problems = splits.input_space.differences(artifact_meta["input_space"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"the set's input_space in artifact.json is malformed ({exc!r}); "
                            "the metadata was edited or damaged") from None
    made_on = artifact_meta["dataset"]
    if made_on.get("num_classes") != splits.identity.num_classes:
        problems.append(
            f"the set has {made_on.get('num_classes')} classes, the dataset "
            f"{splits.identity.num_classes}"
        )
    if list(made_on.get("image_shape", [])) != list(splits.identity.image_shape):
        problems.append(
            f"the set's images are {made_on.get('image_shape')}, the dataset's "
            f"{list(splits.identity.image_shape)}"
        )
    fingerprint = made_on.get("fingerprint")
    if not problems and fingerprint and fingerprint != splits.identity.fingerprint:
        logger.warning("the set was made on a copy of %r whose fingerprint differs from the "
                       "one loaded now (%s… vs %s…); numbers may not compare",
                       made_on.get("name"), str(fingerprint)[:12],
                       splits.identity.fingerprint[:12])
    if problems:
        raise InputSpaceMismatchError(
            f"refusing to evaluate a set made on {made_on.get('name')!r} under the input space "
            f"of {splits.identity.name!r} ('here' is the data loaded now, 'the other space' "
            "the set's): " + "; ".join(problems)
            + ". Load the dataset with the same normalisation and ZCA setting the set was "
            "made with (see artifact.json, 'input_space')."
        )
