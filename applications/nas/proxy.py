"""Proxy training sets and the fixed budget a candidate is trained under.

A proxy is a small training set on which every candidate is trained instead of the real
training split: a distilled artifact, a random or herding subset of the same size, or the
full training split itself. `hold_out` sets aside a validation split from the real training
images; proxies are made from the rest and scored on it, and the real test split is kept
for the final, real accuracy of the architecture a proxy picks.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddsuite.core.augment import DiffAugment
from ddsuite.core.data import DatasetSplits, RealDataset
from ddsuite.core.errors import ConfigError, InputSpaceMismatchError
from ddsuite.core.evaluation import EvaluationProtocol, check_input_space, networks_accuracy
from ddsuite.core.evaluation import train_networks

__all__ = ["CandidateScore", "ProxySet", "TrainingBudget", "hold_out", "load_proxy",
           "make_proxy", "train_and_score"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainingBudget:
    """How every candidate is trained on a proxy (or on the real data): fixed and recorded."""

    epochs: int = 300
    """Training epochs over the set."""
    lr: float = 0.01
    """Initial SGD learning rate (divided by 10 half-way, as in the DC protocol)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    batch_size: int = 256
    """Training batch size."""
    augmentation: str = "none"
    """"none", or a differentiable-augmentation strategy such as "crop_scale_rotate"."""
    num_eval: int = 1
    """Networks trained per candidate (seeds seed, seed + 1, ...); the score is their mean."""

    def problems(self) -> list[str]:
        try:
            self.protocol("convnet")
        except ConfigError as exc:
            return list(exc.problems)
        return []

    def protocol(self, model: str) -> EvaluationProtocol:
        """This budget as ddsuite's evaluation protocol for `model`."""
        return EvaluationProtocol(
            name="nas-budget", num_eval=self.num_eval, models=(model,), epochs=self.epochs,
            lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
            batch_size=self.batch_size, augmentation=self.augmentation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ProxySet:
    """A training set that stands in for the real one while candidates are ranked."""

    name: str
    kind: str
    """"distilled" (any ddsuite method), "coreset", "artifact" or "full"."""
    images: Tensor
    """(N, C, H, W) in the dataset's input space."""
    labels: Tensor
    """(N,) hard labels in 0..classes-1."""
    num_classes: int
    make_seconds: float = 0.0
    """Time spent making the set (distilling or selecting); 0 for a loaded artifact."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ipc(self) -> float:
        return self.images.shape[0] / self.num_classes

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "images": int(self.images.shape[0]),
                "num_classes": self.num_classes, "make_seconds": self.make_seconds,
                **self.meta}


@dataclass
class CandidateScore:
    """What training one candidate on one set gave: accuracies, or the reason it failed."""

    accuracies: list[float]
    """Accuracy (%) of each network on the scoring split; empty when the candidate failed."""
    seconds: float
    failed: str | None = None
    """Why the candidate is not ranked (e.g. a non-finite loss), else None."""
    extra: dict[str, list[float]] = field(default_factory=dict)
    """Accuracies (%) on further splits, e.g. {"test": [...]}."""

    @property
    def mean(self) -> float | None:
        if self.failed or not self.accuracies:
            return None
        return sum(self.accuracies) / len(self.accuracies)


def hold_out(splits: DatasetSplits, *, per_class: int, seed: int
             ) -> tuple[DatasetSplits, tuple[Tensor, Tensor]]:
    """Set aside `per_class` training images per class as a validation split (seeded).

    Returns:
        The splits with the remaining training images (same identity and input space,
        ``num_train`` updated), and the validation ``(images, labels)``.
    """
    train = splits.train
    counts = train.class_counts
    smallest = min(range(len(counts)), key=counts.__getitem__)
    if per_class >= counts[smallest]:  # at least one image per class must stay for training
        raise ConfigError([f"validation_per_class {per_class} would hold out every training "
                           f"image of class {smallest} ({counts[smallest]} images); allowed: "
                           f"1..{counts[smallest] - 1}"])
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(train), dtype=torch.bool)
    for indices in train.class_index:
        pick = torch.randperm(len(indices), generator=generator)[:per_class]
        held[indices.cpu()[pick]] = True
    held = held.to(train.images.device)
    rest = RealDataset(train.images[~held], train.labels[~held], num_classes=train.num_classes,
                       class_names=train.class_names, split="train")
    identity = dataclasses.replace(splits.identity, num_train=len(rest))
    search = DatasetSplits(rest, splits.test, identity, splits.input_space)
    return search, (train.images[held], train.labels[held])


def load_proxy(path: str | Path, splits: DatasetSplits, *, name: str | None = None
               ) -> ProxySet:
    """Load a distilled artifact folder as a proxy for `splits`.

    Raises:
        ArtifactError: the folder is not a readable artifact.
        InputSpaceMismatchError: its classes, image size, channels or normalisation differ
            from the dataset's (the message names each difference).
    """
    from ddsuite.core.synthetic import load_artifact

    artifact = load_artifact(path)
    classes = splits.test.num_classes
    if artifact.num_classes < classes:
        raise InputSpaceMismatchError(
            f"the proxy {str(path)!r} has {artifact.num_classes} classes but the test split of "
            f"{splits.identity.name!r} has {classes}; a proxy must cover every test class "
            "(distil it from the whole dataset)")
    check_input_space(artifact.meta, splits)
    images, labels, _ = artifact.decoded()  # a parameterised set trains on what it decodes to
    return ProxySet(
        name=name or Path(path).name, kind="artifact", images=images,
        labels=labels, num_classes=artifact.num_classes,
        meta={"path": str(path), "method": artifact.method, "ipc": artifact.ipc,
              "tensors_sha256": artifact.meta["tensors_sha256"]})


def make_proxy(method: str, splits: DatasetSplits, *, ipc: int | None = None,
               config: dict[str, Any] | None = None, seed: int = 0,
               device: torch.device | str = "cpu", name: str | None = None,
               out_dir: str | Path | None = None) -> ProxySet:
    """Make a proxy from `splits.train`: ``"full"``, or any registered ddsuite method.

    Coresets (``random``, ``herding``, ``k-center``) select real images; the other methods
    distil with `ddsuite.core.engine.distill`. With `out_dir`, the set is also written there
    as an artifact.
    """
    if method == "full":
        return ProxySet(name=name or "full", kind="full", images=splits.train.images,
                        labels=splits.train.labels, num_classes=splits.train.num_classes)
    from ddsuite.core.engine import distill
    from ddsuite.core.methods import get_method

    if ipc is None:
        raise ConfigError([f"proxy {name or method!r}: give ipc (images per class)"])
    family = get_method(method).family
    start = time.perf_counter()
    result = distill(method, splits=splits, config={**(config or {}), "ipc": ipc}, seed=seed,
                     device=device, out_dir=out_dir, checkpoint_every=0)
    images, labels, _ = result.syn.decoded()  # what a parameterised set decodes to
    images, labels = images.cpu(), labels.cpu()
    return ProxySet(
        name=name or method, kind="coreset" if family == "coreset" else "distilled",
        images=images, labels=labels,
        num_classes=splits.train.num_classes, make_seconds=time.perf_counter() - start,
        meta={"method": method, "ipc": ipc, "seed": seed, "config": result.config.to_dict()})


def _reset(module: nn.Module, seed: int) -> nn.Module:
    """A fresh copy of `module`: every layer with `reset_parameters` re-initialised."""
    fresh = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in fresh.modules():
            if layer is not fresh and callable(getattr(layer, "reset_parameters", None)):
                layer.reset_parameters()
    return fresh


def _train_module(module: nn.Module, images: Tensor, labels: Tensor, *,
                  budget: TrainingBudget, seed: int) -> tuple[nn.Module, float]:
    """Train one network (any nn.Module giving logits) under `budget`; (net, last loss)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=budget.lr, momentum=budget.momentum,
                                weight_decay=budget.weight_decay)
    augment = DiffAugment(budget.augmentation) if budget.augmentation != "none" else None
    generator = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    loss = torch.tensor(math.nan)
    module.train()
    for epoch in range(budget.epochs):
        if epoch == budget.epochs // 2 and epoch > 0:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        order = torch.randperm(n, generator=generator).to(images.device)
        for lo in range(0, n, budget.batch_size):
            index = order[lo:lo + budget.batch_size]
            if index.numel() < 2 and n > 1:
                continue  # a lone image cannot pass BatchNorm in training mode
            x = images[index]
            if augment is not None:
                x = augment(x, generator=generator)
            loss = F.cross_entropy(module(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return module, float(loss.detach())


@torch.no_grad()
def _module_accuracy(module: nn.Module, images: Tensor, labels: Tensor) -> float:
    module.eval()
    correct = 0
    for lo in range(0, images.shape[0], 1024):
        logits = module(images[lo:lo + 1024])
        correct += int((logits.argmax(dim=-1) == labels[lo:lo + 1024]).sum())
    return 100.0 * correct / images.shape[0]


def train_and_score(candidate: str | nn.Module, images: Tensor, labels: Tensor, *,
                    num_classes: int, budget: TrainingBudget,
                    scoring: dict[str, tuple[Tensor, Tensor]], device: torch.device | str,
                    seed: int = 0) -> dict[str, CandidateScore]:
    """Train `budget.num_eval` fresh networks of `candidate` and score them on each split.

    Args:
        candidate: a ddsuite model spec (trained by `train_networks`), or an nn.Module whose
            copies are re-initialised (layers' `reset_parameters`, seeds seed, seed + 1, ...).
        images, labels: the training set.
        scoring: named ``(images, labels)`` splits, e.g. {"validation": ..., "test": ...}.

    Returns:
        One `CandidateScore` per scoring split, all failed when any network diverged (a
        non-finite loss or weight): a diverged candidate is never given a number.
    """
    device = torch.device(device)
    images, labels = images.to(device), labels.to(device)
    scoring = {k: (x.to(device), y.to(device)) for k, (x, y) in scoring.items()}
    start = time.perf_counter()
    accuracies: dict[str, list[float]] = {k: [] for k in scoring}
    if isinstance(candidate, str):
        networks = train_networks(images, labels, model=candidate, num_classes=num_classes,
                                  protocol=budget.protocol(candidate), device=device,
                                  seed=seed, num_networks=budget.num_eval)
        finite = bool(torch.isfinite(networks.final_loss).all()) and all(
            bool(torch.isfinite(p).all()) for p in networks.params.values())
        if finite:
            for key, (x, y) in scoring.items():
                accuracies[key] = [100.0 * float(a) for a in networks_accuracy(networks, x, y)]
    else:
        finite = True
        for k in range(budget.num_eval):
            net = _reset(candidate, seed + k).to(device)
            net, last_loss = _train_module(net, images, labels, budget=budget, seed=seed + k)
            finite = math.isfinite(last_loss) and all(
                bool(torch.isfinite(p).all()) for p in net.parameters())
            if not finite:
                break
            for key, (x, y) in scoring.items():
                accuracies[key].append(_module_accuracy(net, x, y))
    seconds = time.perf_counter() - start
    failed = None if finite else "diverged: non-finite training loss or weights"
    return {key: CandidateScore(accuracies=[] if failed else accuracies[key], seconds=seconds,
                                failed=failed) for key in scoring}
