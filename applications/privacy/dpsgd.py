"""The DP-SGD baseline: Opacus's `PrivacyEngine` training a network on the real data."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddsuite.core.models import build_model

from .accounting import budget_problems, clip_norm_problems
from .errors import PrivacyBudgetError
from .models import check_private_model, fix_private_model

__all__ = ["DPSGDConfig", "DPSGDResult", "train_dp_sgd"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DPSGDConfig:
    """DP-SGD settings; the noise multiplier is derived from (epsilon, delta) by Opacus."""

    epsilon: float = 1.0
    """Target epsilon after all epochs."""
    delta: float = 1e-5
    """Target delta; must be below 1/n."""
    epochs: int = 5
    """Passes over the data (each of about n / batch_size Poisson-sampled steps)."""
    batch_size: int = 256
    """Expected batch size; the sample rate is batch_size / n."""
    lr: float = 0.5
    """SGD learning rate."""
    momentum: float = 0.0
    """SGD momentum."""
    clip_norm: float = 1.0
    """Per-sample gradient L2 bound (Opacus's max_grad_norm)."""
    accountant: str = "rdp"
    """Opacus accountant: rdp or prv."""
    fix_model: bool = False
    """Let Opacus's ModuleValidator.fix replace BatchNorm (by GroupNorm) instead of refusing."""

    def problems(self) -> list[str]:
        out = budget_problems(epsilon=self.epsilon, delta=self.delta,
                              accountant=self.accountant)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            out.append(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            out.append(f"momentum: must be in [0, 1), got {self.momentum}")
        out.extend(clip_norm_problems(self.clip_norm, name="clip_norm:"))
        return out


@dataclass
class DPSGDResult:
    """The trained network (plain module, Opacus's wrapper removed) and its privacy."""

    model: nn.Module
    privacy: dict[str, Any]
    seconds: float


def build_private_model(spec: str, *, image_shape: tuple[int, int, int], num_classes: int,
                        device: torch.device | str, fix: bool, what: str) -> nn.Module:
    """Build `spec` and check (or, with `fix`, repair) it for Opacus."""
    c, h, w = image_shape
    model = build_model(spec, in_channels=c, num_classes=num_classes, image_size=(h, w),
                        device=device)
    if fix:
        return fix_private_model(model, spec=spec, what=what).to(device)
    check_private_model(model, spec=spec, what=what)
    return model


def train_dp_sgd(images: Tensor, labels: Tensor, *, model: str, num_classes: int,
                 config: DPSGDConfig, device: torch.device | str, seed: int = 0
                 ) -> DPSGDResult:
    """Train `model` on (images, labels) with DP-SGD at `config.epsilon`.

    Opacus's `make_private_with_epsilon` derives the noise multiplier for the epochs and the
    Poisson sample rate; the epsilon recorded is the engine's accountant's after the steps
    actually taken.

    Raises:
        PrivacyBudgetError: a malformed budget, delta >= 1/n, or an unreachable target.
        PrivateModelError: a model Opacus cannot train (BatchNorm, unsupported modules).
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    device = torch.device(device)
    n = images.shape[0]
    problems = config.problems() + budget_problems(epsilon=config.epsilon, delta=config.delta,
                                                   dataset_size=n)
    if problems:
        raise PrivacyBudgetError(sorted(set(problems), key=problems.index),
                                 source="DP-SGD baseline")
    torch.manual_seed(seed)
    net = build_private_model(model, image_shape=tuple(images.shape[1:]),
                              num_classes=num_classes, device=device, fix=config.fix_model,
                              what="DP-SGD baseline")
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum)
    loader = DataLoader(TensorDataset(images.detach().to(device), labels.detach().to(device)),
                        batch_size=min(config.batch_size, n),
                        generator=torch.Generator().manual_seed(seed))
    engine = PrivacyEngine(accountant=config.accountant)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    try:
        private, optimizer, loader = engine.make_private_with_epsilon(
            module=net, optimizer=optimizer, data_loader=loader,
            target_epsilon=config.epsilon, target_delta=config.delta, epochs=config.epochs,
            max_grad_norm=config.clip_norm, poisson_sampling=True, noise_generator=noise)
    except ValueError as exc:
        if "budget is too low" not in str(exc):
            raise
        raise PrivacyBudgetError([
            f"target epsilon {config.epsilon:g} cannot be reached at delta {config.delta:g} "
            f"in {config.epochs} epoch(s) of batch {config.batch_size} on {n} examples, even "
            "with the largest noise Opacus tries; raise epsilon or delta, or train fewer "
            "epochs"], source="DP-SGD baseline") from None

    start = time.perf_counter()
    private.train()
    for _ in range(config.epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            # An empty Poisson batch (x of shape (0, C, H, W)) still goes through the
            # wrapped model, as Opacus expects: its hooks then record per-sample gradients
            # of zero rows, and the step adds the noise to a zero sum and counts the step.
            # Summing keeps an empty batch's loss finite (a mean over nothing is NaN).
            logits = private(x)  # (B, classes)
            if len(y):
                loss = F.cross_entropy(logits, y)
            else:
                loss = F.cross_entropy(logits, y, reduction="sum")
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    steps = sum(count for _, _, count in engine.accountant.history)
    privacy = {
        "accountant": config.accountant,
        "epsilon": float(engine.get_epsilon(config.delta)),
        "target_epsilon": config.epsilon,
        "delta": config.delta,
        "noise_multiplier": float(optimizer.noise_multiplier),
        "clip_norm": config.clip_norm,
        "sample_rate": float(engine.accountant.history[0][1]) if steps else 0.0,
        "steps": steps,
        "dataset_size": n,
    }
    module = private._module if hasattr(private, "_module") else private
    module.eval()
    return DPSGDResult(model=module, privacy=privacy, seconds=seconds)
