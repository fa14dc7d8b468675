"""Train and score one model: the server's global model, a FedAvg/FedProx client's copy.

One SGD loop serves every method of the federated harness, so the server trains on distilled
payloads, a FedAvg client trains on its shard and the centralised bound trains on all data
through the same code. FedProx adds ``mu / 2 * ||w - w_global||^2`` to the loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddsuite.core.augment import DiffAugment

__all__ = ["TrainSpec", "fit_model", "model_accuracy", "state_bytes", "state_is_finite",
           "tensor_bytes"]


@dataclass(kw_only=True)
class TrainSpec:
    """How a model is trained on one set of images (SGD, step decay at half-way)."""

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    augmentation: str = "none"

    def problems(self) -> list[str]:
        out = []
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            out.append(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            out.append(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            out.append(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.augmentation != "none":
            try:
                DiffAugment(self.augmentation)
            except ValueError as exc:
                out.append(f"augmentation: {exc}")
        return out


def tensor_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Exact size of the tensors' data as sent: sum of numel * element_size."""
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


def state_bytes(state: Mapping[str, Tensor]) -> int:
    """Exact size of a model state (parameters and buffers) as sent."""
    return tensor_bytes(state)


def state_is_finite(state: Mapping[str, Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def fit_model(model: nn.Module, images: Tensor, targets: Tensor, *, spec: TrainSpec,
              seed: int, prox_mu: float = 0.0, anchor: Mapping[str, Tensor] | None = None
              ) -> float:
    """Train `model` in place on (images, targets); return the mean loss of the last epoch.

    Args:
        model: the network, on the images' device.
        images: (N, C, H, W) in the dataset's input space.
        targets: (N,) hard labels, or (N, classes) soft-label logits.
        spec: epochs, optimiser and batch size.
        seed: the data order and augmentation draws.
        prox_mu: FedProx's proximal weight (0: plain SGD).
        anchor: the parameters the proximal term pulls towards (the round's global model).
    """
    device = images.device
    n = images.shape[0]
    if n == 0:
        return float("nan")
    soft = targets.is_floating_point()
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(params.values(), lr=spec.lr, momentum=spec.momentum,
                                weight_decay=spec.weight_decay)
    augment = DiffAugment(spec.augmentation) if spec.augmentation != "none" else None
    generator = torch.Generator().manual_seed(seed)
    anchor = {k: anchor[k].detach().to(device) for k in params} if prox_mu and anchor else None
    model.train()
    last = float("nan")
    for epoch in range(spec.epochs):
        if epoch == spec.epochs // 2 and epoch > 0:
            for group in optimizer.param_groups:
                group["lr"] = spec.lr * 0.1
        order = torch.randperm(n, generator=generator).to(device)
        total, seen = 0.0, 0
        for lo in range(0, n, spec.batch_size):
            index = order[lo:lo + spec.batch_size]
            if index.numel() < 2 and n > 1:
                continue  # a lone image cannot pass a BatchNorm in training mode
            x, y = images[index], targets[index]
            if augment is not None:
                x = augment(x, generator=generator)
            logits = model(x)
            if soft:
                loss = -(y.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
            else:
                loss = F.cross_entropy(logits, y)
            if anchor is not None:
                loss = loss + 0.5 * prox_mu * sum(
                    (p - anchor[k]).square().sum() for k, p in params.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * index.numel()
            seen += index.numel()
        last = total / max(seen, 1)
    return last


@torch.no_grad()
def model_accuracy(model: nn.Module, images: Tensor, labels: Tensor, *,
                   batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on (images, labels), in [0, 1]."""
    model.eval()
    correct = 0
    for lo in range(0, images.shape[0], batch_size):
        logits = model(images[lo:lo + batch_size])
        correct += int((logits.argmax(dim=-1) == labels[lo:lo + batch_size]).sum())
    return correct / max(images.shape[0], 1)
