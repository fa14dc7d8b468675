"""Train several fresh networks on one set at once and test them on the real test split.

The networks are independent: each has its own initialisation, data order and augmentation
draws. Their parameters are stacked (`torch.func.stack_module_state`) and one optimiser steps
them all; because SGD and Adam act elementwise, that is exactly K separate optimisers.

How the stacked forward runs is a speed choice only, never a change of result:

- "vmap": one batched call, `torch.func.functional_call` under `torch.func.vmap`. The
  default on CUDA, where it fills the device.
- "loop": the K networks one after another on views of the stacked state. The default on
  the CPU, where vmap turns convolutions into grouped convolutions that run slower: on 2
  cores, 5 ConvNet-3 networks on a batch of 100 MNIST images took 1.19 s a step looped
  against 2.01 s vmapped (scripts/benchmark.py measures this on the machine at hand).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ..augment import DiffAugment
from ..models import build_model
from .protocol import EvaluationProtocol

__all__ = ["STACK_MODES", "TrainedNetworks", "networks_accuracy", "train_networks"]

STACK_MODES = ("auto", "vmap", "loop")

logger = logging.getLogger(__name__)


def _resolve_mode(mode: str, device: torch.device) -> str:
    if mode not in STACK_MODES:
        raise ValueError(f"stack mode {mode!r} is not one of {', '.join(STACK_MODES)}")
    if mode == "auto":
        return "vmap" if device.type == "cuda" else "loop"
    return mode


def stacked_forward(base: nn.Module, mode: str, *, shared_input: bool = False
                    ) -> Callable[[dict[str, Tensor], dict[str, Tensor], Tensor], Tensor]:
    """A function (params, buffers, x) -> logits (K, b, classes) over stacked state.

    `x` is (K, b, C, H, W), one batch per network, or (b, C, H, W) for all when
    `shared_input`.
    """

    def call(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, (params, buffers), (x,))

    if mode == "vmap":
        return vmap(call, in_dims=(0, 0, None if shared_input else 0), randomness="different")

    def loop(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        k = next(iter(params.values())).shape[0]
        outputs = []
        for i in range(k):
            inputs = x if shared_input else x[i]
            outputs.append(call({n: p[i] for n, p in params.items()},
                                {n: b[i] for n, b in buffers.items()}, inputs))
        return torch.stack(outputs)

    return loop


@dataclass
class TrainedNetworks:
    """K networks trained together: a stateless base module and their stacked state."""

    base: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    seconds: float
    final_loss: Tensor  # (K,)
    mode: str = "loop"

    @property
    def num_networks(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def forward(self, x: Tensor, *, train: bool = False) -> Tensor:
        """Logits of every network on the same batch x (b, C, H, W), as (K, b, classes)."""
        self.base.train(train)
        return stacked_forward(self.base, self.mode, shared_input=True)(
            self.params, self.buffers, x)

    def unstack(self, index: int) -> nn.Module:
        """Network `index` as an ordinary module (on the base's device)."""
        device = next(iter(self.params.values())).device
        module = copy.deepcopy(self.base).to_empty(device=device)
        state = {k: v[index].detach() for k, v in {**self.params, **self.buffers}.items()}
        module.load_state_dict(state)
        return module


def _label_loss(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-network loss over a stacked batch: logits (K, B, C), targets (K, B) or (K, B, C)."""

    def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
        k, b, c = logits.shape
        per_sample = F.cross_entropy(logits.reshape(k * b, c), targets.reshape(k * b),
                                     reduction="none")
        return per_sample.view(k, b).mean(dim=1)

    def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
        probs = targets.softmax(dim=-1)
        return -(probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean(dim=1)

    def kl(logits: Tensor, targets: Tensor) -> Tensor:
        log_p = targets.log_softmax(dim=-1)
        return (log_p.exp() * (log_p - logits.log_softmax(dim=-1))).sum(dim=-1).mean(dim=1)

    return {"cross_entropy": cross_entropy, "soft_cross_entropy": soft_cross_entropy,
            "kl": kl}[kind]


def _build_stack(model: str, *, num_networks: int, seed: int, images: Tensor,
                 num_classes: int, device: torch.device) -> tuple[nn.Module, dict, dict]:
    """K freshly initialised networks (seeds seed, seed+1, ...) as stacked state."""
    devices = [device] if device.type == "cuda" else []
    nets = []
    with torch.random.fork_rng(devices=devices):
        for k in range(num_networks):
            torch.manual_seed(seed + k)
            nets.append(build_model(model, in_channels=images.shape[1], num_classes=num_classes,
                                    image_size=tuple(images.shape[2:]), device=device))
    params, buffers = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")
    return base, params, buffers


def _batch_plan(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batch boundaries for one epoch; a trailing batch of one image is dropped.

    A lone image cannot pass through BatchNorm in training mode; shuffling gives it a place in
    other epochs, so dropping it costs nothing measurable.
    """
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds.pop()
    return bounds


def train_networks(
    images: Tensor,
    targets: Tensor,
    *,
    model: str,
    num_classes: int,
    protocol: EvaluationProtocol,
    device: torch.device | str,
    seed: int = 0,
    num_networks: int | None = None,
    mode: str = "auto",
) -> TrainedNetworks:
    """Train `num_networks` (default `protocol.num_eval`) fresh copies of `model` together.

    Args:
        images: the training images, (N, C, H, W), in the dataset's input space.
        targets: hard labels (N,) int64, or soft-label logits (N, num_classes).
        model: a model spec accepted by `ddsuite.core.models.build_model`.
        num_classes: number of classes of the classifier head.
        protocol: optimiser, schedule, batch size, augmentation and label loss.
        device: where to train.
        seed: network k is initialised from seed + k; data order and augmentation draws come
            from a generator seeded with `seed`.
        num_networks: how many networks; default `protocol.num_eval`.
        mode: "vmap", "loop", or "auto" (vmap on CUDA, loop on CPU); the result does not
            depend on it.
    """
    device = torch.device(device)
    mode = _resolve_mode(mode, device)
    k = num_networks or protocol.num_eval
    images = images.detach().to(device)
    targets = targets.detach().to(device)
    n = images.shape[0]
    soft = targets.is_floating_point()
    if soft and protocol.label_loss == "cross_entropy":
        raise ValueError("soft-label targets need label_loss 'soft_cross_entropy' or 'kl'")
    if not soft and protocol.label_loss != "cross_entropy":
        raise ValueError(f"label_loss {protocol.label_loss!r} needs soft-label targets")

    start = time.perf_counter()
    base, params, buffers = _build_stack(model, num_networks=k, seed=seed, images=images,
                                         num_classes=num_classes, device=device)
    leaves = [p.requires_grad_() for p in params.values()]
    if protocol.optimizer == "sgd":
        optimizer = torch.optim.SGD(leaves, lr=protocol.lr, momentum=protocol.momentum,
                                    weight_decay=protocol.weight_decay)
    else:
        optimizer = torch.optim.Adam(leaves, lr=protocol.lr, weight_decay=protocol.weight_decay)
    augment = DiffAugment(protocol.augmentation) if protocol.uses_augmentation else None
    loss_fn = _label_loss(protocol.label_loss)
    generator = torch.Generator().manual_seed(seed)
    epochs = protocol.resolved_epochs
    decay_epoch = int(epochs * protocol.lr_decay_at)

    forward = stacked_forward(base, mode)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    base.train()
    loss = torch.full((k,), math.nan)
    for epoch in range(epochs):
        if epoch == decay_epoch and epoch > 0:
            for group in optimizer.param_groups:
                group["lr"] *= protocol.lr_decay
        order = torch.stack([torch.randperm(n, generator=generator) for _ in range(k)])
        order = order.to(device)  # (K, N)
        for lo, hi in _batch_plan(n, protocol.batch_size):
            index = order[:, lo:hi]  # (K, b)
            x = images[index]  # (K, b, C, H, W)
            y = targets[index]  # (K, b) or (K, b, classes)
            if augment is not None:
                x = torch.stack([augment(x[i], generator=generator) for i in range(k)])
            with autocast:
                logits = forward(params, buffers, x)
            loss = loss_fn(logits.float(), y)  # (K,)
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    for p in params.values():
        p.requires_grad_(False)
    logger.debug("trained %d x %s for %d epochs in %.1fs", k, model, epochs, seconds)
    return TrainedNetworks(base=base, params=params, buffers=buffers, seconds=seconds,
                           final_loss=loss.detach().cpu(), mode=mode)


@torch.no_grad()
def networks_accuracy(networks: TrainedNetworks, images: Tensor, labels: Tensor, *,
                  batch_size: int = 1024) -> Tensor:
    """Accuracy of each network on (images, labels), (K,) in [0, 1]."""
    correct = torch.zeros(networks.num_networks, device=images.device)
    device = images.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for lo in range(0, images.shape[0], batch_size):
        x = images[lo:lo + batch_size]
        with autocast:
            logits = networks.forward(x, train=False)  # (K, b, classes)
        correct += (logits.argmax(dim=-1) == labels[lo:lo + batch_size]).sum(dim=1)
    return (correct / images.shape[0]).cpu()
