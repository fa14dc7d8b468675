"""Training expert trajectories on the real data, and the cache that reuses them."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import DiffAugment
from ..data import DatasetSplits
from ..errors import ConfigError, ExpertTrajectoryError
from ..models import build_model
from .store import (
    META_FILE,
    ExpertSpec,
    ExpertTrajectories,
    build_meta,
    default_experts_dir,
    expert_key,
    load_experts,
    save_experts,
)

__all__ = ["ExpertSpec", "get_experts", "train_experts"]

logger = logging.getLogger(__name__)

_EVAL_BATCH = 1024


def _expert_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 104_729 + 17) % (2**63 - 1)


def flatten_params(net: torch.nn.Module) -> Tensor:
    """The parameters of `net` as one detached float32 vector, in `named_parameters` order."""
    return torch.cat([p.detach().reshape(-1).float() for p in net.parameters()])


@torch.no_grad()
def _accuracy(net: torch.nn.Module, images: Tensor, labels: Tensor) -> float:
    net.eval()
    correct = 0
    for lo in range(0, images.shape[0], _EVAL_BATCH):
        logits = net(images[lo:lo + _EVAL_BATCH])
        correct += int((logits.argmax(dim=1) == labels[lo:lo + _EVAL_BATCH]).sum())
    net.train()
    return 100.0 * correct / max(1, images.shape[0])


def train_experts(splits: DatasetSplits, spec: ExpertSpec, *,
                  device: torch.device | str) -> tuple[list[Tensor], dict]:
    """Train `spec.num_experts` networks on `splits.train`, snapshotting every epoch.

    Each expert is initialised and shuffled from its own seed (derived from `spec.seed`), so
    the result depends on the settings alone; the caller's RNG state is left as it was.

    Returns:
        One (epochs + 1, num_params) float32 CPU tensor per expert, and metrics (each
        expert's final training loss and test accuracy).

    Raises:
        ConfigError: a bad spec.
        ExpertTrajectoryError: an expert's training loss became non-finite.
    """
    problems = spec.problems()
    if problems:
        raise ConfigError(problems, source="expert settings")
    device = torch.device(device)
    train, test = splits.train, splits.test
    c, h, w = train.image_shape
    augment = DiffAugment(spec.augmentation) if spec.augmentation != "none" else None
    images, labels = train.images.to(device), train.labels.to(device)
    n = images.shape[0]
    trajectories, losses, accuracies = [], [], []
    start = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    for index in range(spec.num_experts):
        seed = _expert_seed(spec.seed, index)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            net = build_model(spec.model, in_channels=c, num_classes=train.num_classes,
                              image_size=(h, w), device=device)
            net.train()
            optimizer = torch.optim.SGD(net.parameters(), lr=spec.lr, momentum=spec.momentum,
                                        weight_decay=spec.weight_decay)
            snapshots = [flatten_params(net).cpu()]
            for epoch in range(spec.epochs):
                order = torch.randperm(n, generator=generator).to(device)
                total, count = 0.0, 0
                for lo in range(0, n, spec.batch_size):
                    index_batch = order[lo:lo + spec.batch_size]
                    x = images[index_batch]
                    if augment is not None:
                        x = augment(x, generator=generator)
                    loss = F.cross_entropy(net(x), labels[index_batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * index_batch.numel()
                    count += index_batch.numel()
                if not torch.isfinite(torch.tensor(total)):
                    raise ExpertTrajectoryError(
                        f"expert {index} diverged at epoch {epoch + 1} (non-finite training "
                        f"loss); lower the expert lr ({spec.lr}) or check the normalisation")
                snapshots.append(flatten_params(net).cpu())
            losses.append(total / max(1, count))
            accuracies.append(_accuracy(net, test.images.to(device), test.labels.to(device)))
        trajectories.append(torch.stack(snapshots))  # (epochs + 1, num_params)
        logger.info("expert %d/%d: train loss %.4f, test accuracy %.2f%%", index + 1,
                    spec.num_experts, losses[-1], accuracies[-1])
    metrics = {"train_loss": losses, "test_accuracy": accuracies,
               "seconds": time.perf_counter() - start}
    return trajectories, metrics


def _param_layout(splits: DatasetSplits, model: str) -> list[tuple[str, tuple[int, ...]]]:
    c, h, w = splits.train.image_shape
    with torch.random.fork_rng(devices=[]):
        net = build_model(model, in_channels=c, num_classes=splits.train.num_classes,
                          image_size=(h, w), device="meta")
    return [(name, tuple(p.shape)) for name, p in net.named_parameters()]


def get_experts(splits: DatasetSplits, spec: ExpertSpec, *, device: torch.device | str,
                experts_dir: str | Path | None = None,
                store: bool = True) -> ExpertTrajectories:
    """The experts for `spec` on `splits`: reused from the cache, or trained (and stored).

    Args:
        splits: the real data (its identity and input space are part of the cache key).
        spec: the training settings.
        device: where to train experts that are not cached.
        experts_dir: the cache root; None: `default_experts_dir()`. Entries are folders
            named by `expert_key`.
        store: False trains in memory and writes nothing (the cache is not read either).
    """
    layout = _param_layout(splits, spec.model)
    if not store:
        trajectories, metrics = train_experts(splits, spec, device=device)
        meta = build_meta(spec, dataset=splits.identity, input_space=splits.input_space,
                          params=layout, metrics=metrics)
        return ExpertTrajectories(meta=meta, trajectories=trajectories)

    root = Path(experts_dir).expanduser() if experts_dir is not None else default_experts_dir()
    key = expert_key(spec, dataset=splits.identity, input_space=splits.input_space)
    folder = root / key[:24]
    if (folder / META_FILE).is_file():
        experts = load_experts(folder, dataset=splits.identity,
                               input_space=splits.input_space, model=spec.model)
        if experts.meta.get("key") != key:
            raise ExpertTrajectoryError(f"{folder} holds trajectories with key "
                                        f"{experts.meta.get('key')!r}, expected {key!r}; "
                                        "delete the folder to train them again")
        logger.info("reusing %d expert trajectories from %s", experts.num_experts, folder)
        return experts
    logger.info("training %d experts (%s, %d epochs) into %s", spec.num_experts, spec.model,
                spec.epochs, folder)
    trajectories, metrics = train_experts(splits, spec, device=device)
    meta = build_meta(spec, dataset=splits.identity, input_space=splits.input_space,
                      params=layout, metrics=metrics)
    save_experts(folder, trajectories, meta)
    return load_experts(folder, dataset=splits.identity, input_space=splits.input_space,
                        model=spec.model)
