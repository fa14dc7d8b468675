"""Ground truth: each candidate's accuracy after training on the real training split.

Training every candidate on the real data is the expensive step a proxy is meant to avoid,
so its results are cached on disk, one JSON file per candidate, keyed by the candidate spec,
the dataset's fingerprint and input space, the validation hold-out and the training budget.
A later run with the same key reads the file instead of training again. Files are written
atomically and carry their provenance (versions, device, time, seconds spent).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddsuite.core.atomic import write_json
from ddsuite.core.data import DatasetSplits
from ddsuite.core.errors import ArtifactError
from ddsuite.core.provenance import library_versions, timestamp

from .proxy import CandidateScore, TrainingBudget, train_and_score

__all__ = ["GROUND_TRUTH_FORMAT", "GroundTruth", "GroundTruthCache", "measure_ground_truth"]

logger = logging.getLogger(__name__)

GROUND_TRUTH_FORMAT = "ddsuite.nas-ground-truth/1"


@dataclass
class GroundTruth:
    """One candidate's real-data result: validation and test accuracy (%) per network."""

    candidate: str
    validation: list[float]
    test: list[float]
    seconds: float
    failed: str | None
    cached: bool
    record: dict[str, Any]

    @property
    def test_mean(self) -> float | None:
        return None if self.failed else sum(self.test) / len(self.test)

    @property
    def validation_mean(self) -> float | None:
        return None if self.failed else sum(self.validation) / len(self.validation)


class GroundTruthCache:
    """A folder of ground-truth records, one JSON file per key.

    Args:
        folder: where the records live (created on first write).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def digest(key: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def path(self, key: dict[str, Any]) -> Path:
        return self.folder / f"{self.digest(key)}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The record stored under `key`, or None; a damaged or foreign file is an error."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"ground-truth record {path} is not valid JSON ({exc}); "
                                "delete it to recompute") from None
        if record.get("format") != GROUND_TRUTH_FORMAT or record.get("key") != key:
            raise ArtifactError(f"ground-truth record {path} does not hold the key it is filed "
                                "under (edited or written by another version); delete it")
        return record

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        record = {"format": GROUND_TRUTH_FORMAT, "key": key, "created": timestamp(),
                  "versions": library_versions(), **result}
        write_json(self.path(key), record)
        return record


def _key(candidate: str, splits: DatasetSplits, *, budget: TrainingBudget,
         validation: dict[str, Any], seed: int) -> dict[str, Any]:
    return {
        "candidate": candidate,
        "dataset": {"name": splits.identity.name,
                    "fingerprint": splits.identity.fingerprint},
        "input_space": splits.input_space.to_dict(),
        "validation": validation,
        "budget": budget.to_dict(),
        "seed": seed,
    }


def measure_ground_truth(candidates: Sequence[str], splits: DatasetSplits, *,
                 validation: tuple[Tensor, Tensor], validation_key: dict[str, Any],
                 budget: TrainingBudget, cache: GroundTruthCache,
                 device: torch.device | str, seed: int = 0,
                 train_subset: Tensor | None = None,
                 on_result: Callable[[GroundTruth], None] | None = None) -> list[GroundTruth]:
    """Real-data accuracy of each candidate, read from `cache` or trained once and stored.

    Args:
        candidates: ConvNet spec strings.
        splits: the dataset; candidates train on `splits.train` and are tested on
            `splits.test`.
        validation: the held-out ``(images, labels)`` the proxies are scored on; the real-data
            search scores on it too.
        validation_key: what identifies the hold-out (e.g. {"per_class": 20, "seed": 0}).
        budget: the training budget; part of the cache key.
        cache: where results are read from and written to.
        train_subset: indices into `splits.train` to train on (a stated, smaller budget);
            None trains on the whole split. Part of the cache key.
        on_result: called after each candidate (progress reporting).
    """
    images, labels = splits.train.images, splits.train.labels
    subset_key = None
    if train_subset is not None:
        images, labels = images[train_subset], labels[train_subset]
        subset_key = {"images": int(train_subset.numel()),
                      "indices_sha256": hashlib.sha256(
                          train_subset.cpu().numpy().tobytes()).hexdigest()}
    scoring = {"validation": validation, "test": (splits.test.images, splits.test.labels)}
    out = []
    for candidate in candidates:
        key = _key(candidate, splits, budget=budget,
                   validation={**validation_key, "train_subset": subset_key}, seed=seed)
        record = cache.get(key)
        cached = record is not None
        if record is None:
            scores: dict[str, CandidateScore] = train_and_score(
                candidate, images, labels, num_classes=splits.train.num_classes,
                budget=budget, scoring=scoring, device=device, seed=seed)
            if scores["test"].failed:
                logger.warning("ground truth: %s %s; it is left out of every ranking",
                               candidate, scores["test"].failed)
            record = cache.put(key, {
                "validation": scores["validation"].accuracies,
                "test": scores["test"].accuracies,
                "seconds": scores["test"].seconds, "failed": scores["test"].failed,
                "device": str(device), "num_train_images": int(images.shape[0])})
        result = GroundTruth(candidate=candidate, validation=record["validation"],
                             test=record["test"], seconds=float(record["seconds"]),
                             failed=record["failed"], cached=cached, record=record)
        if on_result is not None:
            on_result(result)
        out.append(result)
    return out
