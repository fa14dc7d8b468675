"""Trajectory matching: MTT (Cazenavette et al., CVPR 2022) and TESLA (Cui et al., ICML 2023).

Experts are networks trained on the real data with one parameter snapshot per epoch (see
`ddsuite.core.experts`). Each iteration picks a random expert and a random start epoch
``t < max_start_epoch``, trains a student from the expert's snapshot at ``t`` for `syn_steps`
SGD steps on minibatches of the synthetic set (with DSA augmentation and a learnable step
size), and minimises the normalised distance to the expert's snapshot at
``t + expert_epochs``::

    L = ||theta_student - theta_expert[t + M]||^2 / ||theta_expert[t] - theta_expert[t + M]||^2

`mtt` back-propagates through the whole unrolled graph, so its memory grows with
`syn_steps`. `tesla` computes the same gradient with memory flat in `syn_steps`: the forward
pass keeps only the parameter vector of every step (not the activations); the backward pass
walks the steps in reverse, recomputes one step's graph at a time, and carries the adjoint
``dL/dtheta_j`` from step to step (one Hessian-vector product per step). The gradient w.r.t.
the images then decomposes into one term per step,
``-step_size * (d g_j / d X_j)^T dL/dtheta_{j+1}``, accumulated batch by batch. Unlike
TESLA's published code, which drops the terms that reach an image through the later student
parameters, this keeps them: the result equals `mtt`'s gradient for the same draws (tested
to tolerance). The kept parameter vectors (4 bytes per parameter per step, as in TESLA's
code) go to the host when distilling on CUDA; on the CPU they are the only part of tesla's
memory that grows with syn_steps. TESLA can also label the synthetic images with an expert's
soft labels (fixed or learnable).

Memory is estimated before anything runs (`estimate_step_memory`); a configuration that will
not fit stops at once with `MemoryEstimateError`, stating the estimate and the options that
lower it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..augment import (
    MNIST_FAMILY,
    AugmentDraw,
    DiffAugment,
    dataset_key,
    strategy_for_dataset,
)
from ..errors import ConfigError, MemoryEstimateError, NonFiniteError
from ..evaluation import EvaluationProtocol
from ..experts import ExpertSpec, ExpertTrajectories, get_experts
from ..models import build_model
from ..synthetic import SyntheticSet
from .base import Distiller, register_method
from .config import MethodConfig, interpolate_anchors, option

__all__ = [
    "MTTConfig",
    "MatchingGradients",
    "MemoryEstimate",
    "PUBLISHED_SETTINGS",
    "StudentModel",
    "TESLAConfig",
    "TESLA",
    "TrajectoryMatching",
    "UnrollDraws",
    "available_memory",
    "draw_unroll",
    "estimate_step_memory",
    "measure_activation_bytes",
    "recomputed_matching_gradients",
    "student_loss",
    "unrolled_matching_loss",
]

logger = logging.getLogger(__name__)

# MTT's published settings (Cazenavette et al. 2022, hyper-parameter table and README), per
# dataset and IPC: syn_steps (N), expert_epochs (M), max_start_epoch (T+), lr_images
# (lr_img), lr_step_size (lr_lr) and, where published, batch_syn. The initial step size
# (lr_teacher) is 0.01 throughout. Digit datasets use DIGIT_SETTINGS (ours, below); others
# without published settings (SVHN, image folders) use CIFAR-10's. Other IPCs are
# interpolated.
PUBLISHED_SETTINGS: dict[str, dict[int, dict[str, float]]] = {
    "cifar10": {
        1: {"syn_steps": 50, "expert_epochs": 2, "max_start_epoch": 2, "lr_images": 1000,
            "lr_step_size": 1e-7},
        10: {"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 20, "lr_images": 1000,
             "lr_step_size": 1e-5},
        50: {"syn_steps": 30, "expert_epochs": 2, "max_start_epoch": 40, "lr_images": 1000,
             "lr_step_size": 1e-5},
    },
    "cifar100": {
        1: {"syn_steps": 20, "expert_epochs": 3, "max_start_epoch": 20, "lr_images": 1000,
            "lr_step_size": 1e-5},
        10: {"syn_steps": 20, "expert_epochs": 2, "max_start_epoch": 20, "lr_images": 1000,
             "lr_step_size": 1e-5},
        50: {"syn_steps": 80, "expert_epochs": 2, "max_start_epoch": 40, "lr_images": 1000,
             "lr_step_size": 1e-5, "batch_syn": 125},
    },
}
FALLBACK_DATASET = "cifar10"
# Ours, not published (MTT reports no digit dataset): CIFAR-10's lr_images of 1000 blows the
# pixels of digit sets up (digits, IPC 1: pixel std 268, 1.1 % test accuracy), lr_images 10
# keeps them near the data's scale (91.6 %; 100 gives 88.0 %). Measured on digits with 2
# experts of 10 epochs and 100 iterations; the MNIST family takes the same rate. digits has
# 1,347 training images (6 expert steps per epoch at batch 256), so its student takes 10 steps,
# not CIFAR-10's 30-50, and starts within the first 4 (IPC 1) or 10 (IPC 10) epochs.
DIGIT_SETTINGS: dict[str, dict[int, dict[str, float]]] = {
    "digits": {
        1: {"syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 4, "lr_images": 10,
            "lr_step_size": 1e-7},
        10: {"syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 10, "lr_images": 10,
             "lr_step_size": 1e-5},
    },
    "mnist": {ipc: {**row, "lr_images": 10}
              for ipc, row in PUBLISHED_SETTINGS["cifar10"].items()},
}
PUBLISHED_ITERATIONS = 5000
PUBLISHED_STEP_SIZE = 0.01
_INTEGER_SETTINGS = ("syn_steps", "expert_epochs", "max_start_epoch")
_LOG_SCALE_SETTINGS = ("lr_images", "lr_step_size")


def _settings_for(dataset: str) -> dict[int, dict[str, float]]:
    key = dataset_key(dataset)
    if key in MNIST_FAMILY:
        return DIGIT_SETTINGS["mnist"]
    if key in DIGIT_SETTINGS:
        return DIGIT_SETTINGS[key]
    return PUBLISHED_SETTINGS.get(key, PUBLISHED_SETTINGS[FALLBACK_DATASET])


def published_setting(dataset: str, ipc: int, name: str) -> float | None:
    """The published value of `name` at `ipc`, interpolated between the listed IPCs.

    Learning rates are interpolated in log space, counts linearly (then rounded). Returns
    None for a setting the paper lists at no IPC of this dataset (e.g. batch_syn).
    """
    table = _settings_for(dataset)
    anchors = {k: v[name] for k, v in table.items() if name in v}
    if not anchors:
        return None
    if len(anchors) < len(table):  # listed at some IPCs only: use it from the nearest up
        listed = min(anchors)
        return anchors[listed] if ipc >= listed else None
    if ipc in anchors:
        return anchors[ipc]
    if name in _LOG_SCALE_SETTINGS:
        logs = {k: math.log(v) for k, v in anchors.items()}
        return float(f"{math.exp(interpolate_anchors(logs, ipc)):.6g}")
    value = interpolate_anchors(anchors, ipc)
    return round(value) if name in _INTEGER_SETTINGS else value


@dataclass(kw_only=True)
class MTTConfig(MethodConfig):
    """MTT's published settings: 5,000 iterations; images and step size learned by SGD
    (momentum 0.5); initial step size 0.01; per dataset and IPC, syn_steps, expert_epochs,
    max_start_epoch, lr_images and lr_step_size from the paper (other IPCs interpolated);
    experts: 100 ConvNets trained 50 epochs by SGD (lr 0.01, batch 256) under DSA."""

    momentum: float = option(0.5, "SGD momentum of the images, the step size and learnable "
                                  "labels (MTT: 0.5)")
    batch_real: int = option(256, "unused: trajectory matching reads no real batch per "
                                  "iteration (experts use expert_batch)")
    syn_steps: int | None = option(None, "student SGD steps on the synthetic set per iteration;"
                                         " null: published by dataset and IPC")
    expert_epochs: int | None = option(None, "expert epochs between the start and the target "
                                             "snapshot; null: published")
    max_start_epoch: int | None = option(None, "start epochs are drawn from 0..this-1; null: "
                                               "published")
    batch_syn: int | None = option(None, "synthetic images per student step; null: the "
                                         "whole set, or the published size where one exists")
    lr_step_size: float | None = option(None, "learning rate of the step size (MTT's lr_lr, "
                                              "applied to the raw step size at its initial "
                                              "value); null: published")
    step_size_init: float | None = option(None, "initial student step size (MTT's "
                                                "lr_teacher); null: 0.01")
    augmentation: str | None = option(None, "DSA strategy for experts and student steps; "
                                            "null: DSA's published strategy (no flip on "
                                            "digit datasets); 'none' turns it off")
    num_experts: int = option(100, "expert trajectories to train (MTT: 100)")
    expert_epochs_train: int = option(50, "epochs each expert is trained, one snapshot per "
                                          "epoch (MTT: 50)")
    expert_lr: float = option(0.01, "SGD learning rate of the experts (MTT: 0.01)")
    expert_batch: int = option(256, "real images per expert SGD step (MTT: 256)")
    expert_seed: int = option(0, "seed of the experts (part of their cache key)")
    experts_dir: str | None = option(None, "cache of expert trajectories, reused across runs "
                                           "with the same settings; null: "
                                           "$XDG_CACHE_HOME/ddsuite/experts (default "
                                           "~/.cache/ddsuite/experts); 'none': train in "
                                           "memory, store nothing")
    memory_limit_gb: float | None = option(None, "memory one iteration may use, in GiB; null: "
                                                 "free CUDA memory, or available RAM on CPU")

    def problems(self) -> list[str]:
        out = super().problems()
        for name in ("syn_steps", "expert_epochs", "max_start_epoch", "batch_syn"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"{name} must be >= 1, got {value}")
        for name in ("lr_step_size", "step_size_init", "expert_lr", "memory_limit_gb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                out.append(f"{name} must be > 0, got {value}")
        for name in ("num_experts", "expert_epochs_train", "expert_batch"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.expert_epochs is not None and self.max_start_epoch is not None
                and self.max_start_epoch - 1 + self.expert_epochs > self.expert_epochs_train):
            out.append(
                f"max_start_epoch ({self.max_start_epoch}) - 1 + expert_epochs "
                f"({self.expert_epochs}) exceeds expert_epochs_train "
                f"({self.expert_epochs_train}): the target snapshot would not exist; lower "
                "max_start_epoch or expert_epochs, or train the experts longer")
        return out

    def resolve(self, *, dataset: str) -> "MTTConfig":
        def pick(name: str, current: Any) -> Any:
            return published_setting(dataset, self.ipc, name) if current is None else current

        resolved = replace(
            self,
            iterations=PUBLISHED_ITERATIONS if self.iterations is None else self.iterations,
            lr_images=pick("lr_images", self.lr_images),
            syn_steps=pick("syn_steps", self.syn_steps),
            expert_epochs=pick("expert_epochs", self.expert_epochs),
            max_start_epoch=pick("max_start_epoch", self.max_start_epoch),
            batch_syn=pick("batch_syn", self.batch_syn),
            lr_step_size=pick("lr_step_size", self.lr_step_size),
            step_size_init=(PUBLISHED_STEP_SIZE if self.step_size_init is None
                            else self.step_size_init),
            augmentation=(strategy_for_dataset(dataset) if self.augmentation is None
                          else self.augmentation),
        )
        problems = resolved.problems()
        if problems:
            raise ConfigError(problems, source=f"trajectory-matching config for {dataset}")
        return resolved


@dataclass(kw_only=True)
class TESLAConfig(MTTConfig):
    """TESLA: MTT's objective and settings (TESLA reuses MTT's per-dataset settings), its
    gradient computed with memory flat in syn_steps, optional soft labels from an expert."""

    soft_labels: bool = option(False, "label the synthetic images with an expert's logits "
                                      "(its final snapshot, on the initial images)")
    learn_labels: bool = option(False, "learn the soft labels with the images (needs "
                                       "soft_labels)")
    lr_labels: float = option(1.0, "learning rate of learnable soft labels (not published; "
                                   "TESLA keeps its labels fixed)")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.learn_labels and not self.soft_labels:
            out.append("learn_labels needs soft_labels: true")
        if not self.lr_labels > 0:
            out.append(f"lr_labels must be > 0, got {self.lr_labels}")
        return out


# -- the unrolled student ---------------------------------------------------------------------


class StudentModel:
    """A network evaluated at a flat parameter vector (torch.func.functional_call)."""

    def __init__(self, net: nn.Module):
        self.net = net
        named = list(net.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)
        self.buffers = dict(net.named_buffers())

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(zip(self.names, self.shapes))

    def __call__(self, theta: Tensor, images: Tensor) -> Tensor:
        """Logits (B, classes) of the network with parameters `theta` (num_params,)."""
        views = theta.split(self.numels)
        params = {n: v.view(s) for n, v, s in zip(self.names, views, self.shapes)}
        return functional_call(self.net, (params, self.buffers), (images,))


def student_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy on hard labels (int) or on soft labels given as logits (float)."""
    if targets.is_floating_point():
        return -(targets.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    return F.cross_entropy(logits, targets)


@dataclass
class UnrollDraws:
    """The randomness of one unroll: each step's image indices and augmentation draw."""

    indices: list[Tensor]
    augment: list[AugmentDraw | None]

    def __len__(self) -> int:
        return len(self.indices)


def draw_unroll(num_images: int, *, syn_steps: int, batch_syn: int,
                augment: DiffAugment | None, generator: torch.Generator,
                device: torch.device | str) -> UnrollDraws:
    """Minibatches of the synthetic set for `syn_steps` steps (a fresh permutation whenever
    the previous one is used up) and one augmentation draw per image of each batch."""
    indices, draws, queue = [], [], []
    for _ in range(syn_steps):
        if not queue:
            queue = list(torch.randperm(num_images, generator=generator).split(batch_syn))
        index = queue.pop(0).to(device)
        indices.append(index)
        draws.append(None if augment is None else
                     augment.draw(index.numel(), generator=generator, device=device))
    return UnrollDraws(indices, draws)


def _batch(images: Tensor, targets: Tensor, draws: UnrollDraws, step: int,
           augment: DiffAugment | None) -> tuple[Tensor, Tensor]:
    index = draws.indices[step]
    x = images[index]  # (batch_syn, C, H, W)
    if draws.augment[step] is not None:
        x = augment.apply(x, draws.augment[step])
    return x, targets[index]


def normalised_distance(theta: Tensor, theta_start: Tensor, theta_target: Tensor) -> Tensor:
    return ((theta - theta_target) ** 2).sum() / ((theta_start - theta_target) ** 2).sum()


def unrolled_matching_loss(student: StudentModel, images: Tensor, targets: Tensor,
                           step_size: Tensor, theta_start: Tensor, theta_target: Tensor, *,
                           draws: UnrollDraws, augment: DiffAugment | None) -> Tensor:
    """MTT's loss with the whole unrolled graph kept (differentiable in images, targets and
    step size); memory grows with the number of steps."""
    theta = theta_start.detach().requires_grad_(True)  # (num_params,)
    for step in range(len(draws)):
        x, y = _batch(images, targets, draws, step, augment)
        loss = student_loss(student(theta, x), y)
        grad = torch.autograd.grad(loss, theta, create_graph=True)[0]
        theta = theta - step_size * grad
    return normalised_distance(theta, theta_start, theta_target)


@dataclass
class MatchingGradients:
    """The matching loss and its gradients w.r.t. the learnable tensors."""

    loss: Tensor
    images: Tensor
    step_size: Tensor
    targets: Tensor | None = None


def recomputed_matching_gradients(student: StudentModel, images: Tensor, targets: Tensor,
                                  step_size: Tensor, theta_start: Tensor,
                                  theta_target: Tensor, *, draws: UnrollDraws,
                                  augment: DiffAugment | None, learn_targets: bool = False,
                                  snapshot_device: torch.device | str | None = None,
                                  ) -> MatchingGradients:
    """The loss of `unrolled_matching_loss` and its exact gradients, in memory flat in the
    number of steps (only one step's graph exists at a time).

    Forward: plain SGD steps without a graph, keeping each step's parameter vector (on
    `snapshot_device`, e.g. the CPU, so the device memory stays flat). Backward, for
    j = N-1 .. 0, with a = dL/dtheta_{j+1} and g_j the student gradient of step j::

        dL/dX_j    += -step_size * (d g_j / d X_j)^T a
        dL/dstep   += -g_j . a
        dL/dtheta_j = a - step_size * H_j a

    both image and Hessian terms from one double-backward of ``g_j . a``.
    """
    alpha = step_size.detach()
    device = theta_start.device
    store = torch.device(snapshot_device) if snapshot_device is not None else device
    images_leaf = images.detach().requires_grad_(True)
    targets_leaf = targets.detach()
    if learn_targets:
        targets_leaf.requires_grad_(True)

    # forward: N plain SGD steps; keep only the parameter vectors
    snapshots = []
    theta = theta_start.detach()
    for step in range(len(draws)):
        snapshots.append(theta.to(store))
        with torch.enable_grad():
            current = theta.detach().requires_grad_(True)
            x, y = _batch(images.detach(), targets.detach(), draws, step, augment)
            grad = torch.autograd.grad(student_loss(student(current, x), y), current)[0]
        theta = theta - alpha * grad
    theta_start, theta_target = theta_start.detach(), theta_target.detach()
    denominator = ((theta_start - theta_target) ** 2).sum()
    loss = ((theta - theta_target) ** 2).sum() / denominator

    # backward: one step's graph at a time, carrying the adjoint dL/dtheta
    adjoint = 2 * (theta - theta_target) / denominator  # (num_params,)
    grad_images = torch.zeros_like(images_leaf)
    grad_targets = torch.zeros_like(targets_leaf) if learn_targets else None
    grad_step = torch.zeros((), device=device, dtype=alpha.dtype)
    inputs = [images_leaf] + ([targets_leaf] if learn_targets else [])
    for step in reversed(range(len(draws))):
        with torch.enable_grad():
            current = snapshots[step].to(device).requires_grad_(True)
            x, y = _batch(images_leaf, targets_leaf, draws, step, augment)
            grad = torch.autograd.grad(student_loss(student(current, x), y), current,
                                       create_graph=True)[0]
            dot = (grad * adjoint).sum()
            terms = torch.autograd.grad(dot, [current, *inputs], allow_unused=True)
        grad_step -= dot.detach()
        if terms[1] is not None:
            grad_images -= alpha * terms[1]
        if learn_targets and terms[2] is not None:
            grad_targets -= alpha * terms[2]
        adjoint = adjoint - alpha * terms[0]
        snapshots[step] = None  # free as we go
    return MatchingGradients(loss=loss, images=grad_images, step_size=grad_step,
                             targets=grad_targets)


# -- memory -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of one iteration, by part."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def __str__(self) -> str:
        listed = ", ".join(f"{k} {_gib(v)}" for k, v in self.parts.items())
        return f"{_gib(self.total)} ({listed})"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def measure_activation_bytes(model: str, *, image_shape: tuple[int, int, int],
                             num_classes: int) -> int:
    """Bytes the autograd graph saves per image for one forward pass and loss.

    Measured with a forward of two images on the meta device (no memory is allocated);
    falls back to a real CPU forward for layers the meta device cannot run.
    """
    c, h, w = image_shape
    batch = 2
    for device in ("meta", "cpu"):
        saved: dict[int, int] = {}
        try:
            with torch.random.fork_rng(devices=[]):
                net = build_model(model, in_channels=c, num_classes=num_classes,
                                  image_size=(h, w), device=device)
            params = {id(p) for p in net.parameters()}

            def pack(t: Tensor) -> Tensor:
                if id(t) not in params:
                    saved[id(t)] = t.numel() * t.element_size()
                return t

            x = torch.zeros((batch, c, h, w), device=device, requires_grad=True)
            y = torch.zeros(batch, dtype=torch.long, device=device)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                F.cross_entropy(net(x), y)
            return max(1, sum(saved.values()) // batch)
        except (NotImplementedError, RuntimeError) as exc:
            logger.debug("meta-device forward failed (%s); measuring on the CPU", exc)
    raise AssertionError("unreachable")


# Multipliers on one forward's saved activations, calibrated on the CPU with
# scripts/benchmark_trajectory_memory.py (ConvNet-3, 32x32x3, 50 images per step): each `mtt`
# step keeps its forward and the graph of the gradient it created (~2.1x); the final
# backward, like each of `tesla`'s reverse steps (a double backward), needs a few more
# step-sized buffers at once.
_MTT_ACTIVATIONS_PER_STEP = 2.2
_BACKWARD_ACTIVATIONS = 5.0
_TESLA_ACTIVATIONS = 7.0


def estimate_step_memory(*, method: str, num_params: int, activation_bytes: int,
                         batch_syn: int, syn_steps: int, num_images: int, image_numel: int,
                         snapshots_on_device: bool = True,
                         num_label_values: int = 0) -> MemoryEstimate:
    """Estimated peak bytes of one iteration of `mtt` or `tesla` (float32).

    `mtt` keeps every step's activations and parameter vectors until the final backward, so
    it grows with `syn_steps`; `tesla` holds one step's graph at a time (its parameter
    vectors go to the host with `snapshots_on_device=False`, as on CUDA), so it does not.
    """
    if method not in ("mtt", "tesla"):
        raise ValueError(f"method {method!r} is not one of mtt, tesla")
    vector = 4 * num_params
    parts = {
        "synthetic set": 4 * (num_images * image_numel + num_label_values) * 3,
        "expert snapshots": 2 * vector,
    }
    if method == "mtt":
        parts["activations"] = int((_MTT_ACTIVATIONS_PER_STEP * syn_steps
                                    + _BACKWARD_ACTIVATIONS) * activation_bytes * batch_syn)
        parts["student parameters"] = 3 * vector * syn_steps + 2 * vector
    else:
        parts["activations"] = int(_TESLA_ACTIVATIONS * activation_bytes * batch_syn)
        parts["student parameters"] = (vector * syn_steps if snapshots_on_device else 0) \
            + 5 * vector
        parts["image gradients"] = 4 * num_images * image_numel * 2
    return MemoryEstimate(parts)


def _cgroup_available() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    if not limit.isdigit() or not used.isdigit():
        return None
    return max(0, int(limit) - int(used))


def available_memory(device: torch.device | str, *, limit_gb: float | None = None) -> int:
    """Bytes one iteration may use: `limit_gb` when given; free memory of a CUDA device;
    on the CPU, available RAM (psutil when installed, else sysconf) capped by the cgroup."""
    if limit_gb is not None:
        return int(limit_gb * 2**30)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except ImportError:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = _cgroup_available()
    return min(free, cgroup) if cgroup is not None else free


# -- the distillers ---------------------------------------------------------------------------


@register_method
class TrajectoryMatching(Distiller):
    name = "mtt"
    family = "trajectory matching"
    summary = "match expert training trajectories by unrolled student steps (Cazenavette " \
              "et al. 2022)"
    Config = MTTConfig
    recompute: ClassVar[bool] = False

    def __init__(self, config: MTTConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.augment = (DiffAugment(config.augmentation)
                        if config.augmentation not in (None, "none") else None)
        self.spec = ExpertSpec(model=config.model, epochs=config.expert_epochs_train,
                               num_experts=config.num_experts, lr=config.expert_lr,
                               batch_size=config.expert_batch,
                               augmentation=config.augmentation or "none",
                               seed=config.expert_seed)
        # The student trains on what the set decodes to (HaBa: bases x hallucinators).
        self.num_images = self.train.num_classes * config.ipc * self.decoded_per_stored()
        self.batch_syn = min(config.batch_syn or self.num_images, self.num_images)
        self.experts: ExpertTrajectories | None = None
        self.student: StudentModel | None = None
        self.memory = self.estimate_memory()
        self._check_memory()
        self._check_step_ratio()

    def decoded_per_stored(self) -> int:
        """Images the student trains on per stored image (1: the set is used as it is)."""
        return 1

    def _check_step_ratio(self) -> None:
        """Warn when the student takes more SGD steps than the expert did between the two
        matched snapshots (MTT's CIFAR settings: 30-50 student steps against ~390 expert
        steps); the student then overshoots the target and the images are pushed hard."""
        per_epoch = math.ceil(len(self.train) / self.config.expert_batch)
        expert_steps = self.config.expert_epochs * per_epoch
        if self.config.syn_steps > expert_steps:
            logger.warning(
                "%s: syn_steps %d exceeds the %d SGD steps the experts take in expert_epochs "
                "%d (%d per epoch on %d images); the published settings assume far fewer "
                "student than expert steps: lower syn_steps or raise expert_epochs",
                self.name, self.config.syn_steps, expert_steps, self.config.expert_epochs,
                per_epoch, len(self.train))

    # -- memory ---------------------------------------------------------------------------

    def estimate_memory(self, syn_steps: int | None = None) -> MemoryEstimate:
        """Estimated peak bytes of one iteration with this config (or another syn_steps)."""
        config, train = self.config, self.train
        c, h, w = train.image_shape
        with torch.random.fork_rng(devices=[]):
            net = build_model(config.model, in_channels=c, num_classes=train.num_classes,
                              image_size=(h, w), device="meta")
        labels = self.num_images * train.num_classes if self._uses_soft_labels() else 0
        return estimate_step_memory(
            method="tesla" if self.recompute else "mtt",
            num_params=sum(p.numel() for p in net.parameters()),
            activation_bytes=measure_activation_bytes(config.model, image_shape=(c, h, w),
                                                      num_classes=train.num_classes),
            batch_syn=self.batch_syn, syn_steps=syn_steps or config.syn_steps,
            num_images=self.num_images, image_numel=c * h * w,
            snapshots_on_device=self.device.type != "cuda", num_label_values=labels)

    def _check_memory(self) -> None:
        available = available_memory(self.device, limit_gb=self.config.memory_limit_gb)
        logger.info("%s: estimated peak memory per iteration %s; available %s", self.name,
                    self.memory, _gib(available))
        if self.memory.total <= available:
            return
        knobs = (f"lower syn_steps (now {self.config.syn_steps}), batch_syn (now "
                 f"{self.batch_syn}) or the model's width or depth (now "
                 f"{self.config.model!r})")
        if not self.recompute:
            knobs += ", or use method tesla, whose memory does not grow with syn_steps"
        if self.config.memory_limit_gb is not None:
            where, knobs = "memory_limit_gb", knobs + ", or raise memory_limit_gb"
        else:
            where = f"free memory on {self.device}"
        raise MemoryEstimateError(
            f"{self.name} needs an estimated {self.memory} per iteration, more than the "
            f"{_gib(available)} available ({where}); {knobs}")

    # -- setup ----------------------------------------------------------------------------

    def _uses_soft_labels(self) -> bool:
        return bool(getattr(self.config, "soft_labels", False))

    def _load_experts(self) -> ExpertTrajectories:
        if self.experts is None:
            where = self.config.experts_dir
            store = where is None or where.strip().lower() != "none"
            self.experts = get_experts(self.splits, self.spec, device=self.device,
                                       experts_dir=self.config.experts_dir if store else None,
                                       store=store)
        return self.experts

    def _student(self) -> StudentModel:
        if self.student is None:
            student = StudentModel(self.fresh_model())
            student.net.train()
            expected = self._load_experts().param_layout
            if student.layout != expected:
                raise ConfigError([f"the experts' parameters {expected[:3]}... do not match "
                                   f"model {self.config.model!r} ({student.layout[:3]}...)"])
            self.student = student
        return self.student

    def initialize(self, generator: torch.Generator) -> SyntheticSet:
        config, experts = self.config, self._load_experts()
        images = self.initial_images(config.init, generator)  # (classes * ipc, C, H, W)
        labels_soft = None
        if self._uses_soft_labels():
            theta = experts.snapshot(expert=0, epoch=experts.epochs, device=self.device)
            with torch.no_grad():
                labels_soft = self._student()(theta, images)  # (classes * ipc, classes)
        return SyntheticSet(images, num_classes=self.train.num_classes, ipc=config.ipc,
                            step_size=config.step_size_init, labels_soft=labels_soft,
                            learn_labels=bool(getattr(config, "learn_labels", False)))

    def setup(self, syn: SyntheticSet) -> None:
        """One SGD optimiser, one group per learnable tensor.

        The step size is learned as its logarithm; its group's rate is
        ``lr_step_size / step_size_init**2``, so the first updates of the step size itself
        equal MTT's (which learns the raw step size with rate lr_lr).
        """
        config = self.config
        self._student()
        groups = [
            {"params": [syn.images_syn], "lr": config.lr_images, "name": "synthetic images"},
            {"params": [syn.log_step_size], "lr": config.lr_step_size / config.step_size_init**2,
             "name": "step size"},
        ]
        if isinstance(syn.labels_soft, nn.Parameter):
            groups.append({"params": [syn.labels_soft], "lr": config.lr_labels,
                           "name": "soft labels"})
        self.optimizer = torch.optim.SGD(groups, lr=config.lr_images, momentum=config.momentum)

    # -- one iteration --------------------------------------------------------------------

    def step(self, syn: SyntheticSet, *, iteration: int,
             generator: torch.Generator) -> dict[str, float]:
        student = self._student()
        segment = self.draw_segment(syn, iteration=iteration, generator=generator)
        start, theta_start, theta_target, step_size, draws = segment
        targets = syn.labels_soft if syn.labels_soft is not None else syn.labels_syn

        assert self.optimizer is not None, "setup() must run before step()"
        self.optimizer.zero_grad(set_to_none=True)
        if self.recompute:
            result = recomputed_matching_gradients(
                student, syn.images_syn, targets, step_size, theta_start, theta_target,
                draws=draws, augment=self.augment,
                learn_targets=isinstance(syn.labels_soft, nn.Parameter),
                snapshot_device="cpu" if self.device.type == "cuda" else None)
            loss = result.loss
            self.check_finite(loss, iteration=iteration)
            syn.images_syn.grad = result.images
            syn.log_step_size.grad = (result.step_size * step_size.detach()).reshape(())
            if result.targets is not None:
                syn.labels_soft.grad = result.targets
        else:
            loss = unrolled_matching_loss(student, syn.images_syn, targets, step_size,
                                          theta_start, theta_target, draws=draws,
                                          augment=self.augment)
            self.check_finite(loss, iteration=iteration)
            loss.backward()
        self.step_if_finite(iteration=iteration)
        return {"loss": float(loss.detach()), "step_size": float(syn.step_size.detach()),
                "start_epoch": float(start)}

    def draw_segment(self, syn: SyntheticSet, *, iteration: int, generator: torch.Generator
                     ) -> tuple[int, Tensor, Tensor, Tensor, UnrollDraws]:
        """One iteration's draws: (start epoch, the expert's snapshots at the start and the
        target epoch, the checked step size, the student's minibatches and augmentation)."""
        config, experts = self.config, self._load_experts()
        expert = int(torch.randint(experts.num_experts, (1,), generator=generator))
        start = int(torch.randint(config.max_start_epoch, (1,), generator=generator))
        theta_start = experts.snapshot(expert=expert, epoch=start, device=self.device)
        theta_target = experts.snapshot(expert=expert, epoch=start + config.expert_epochs,
                                        device=self.device)
        step_size = syn.step_size
        if not torch.isfinite(step_size):
            raise NonFiniteError("step size", iteration,
                                 detail=f"value {float(step_size.detach())}")
        draws = draw_unroll(self.num_images, syn_steps=config.syn_steps,
                            batch_syn=self.batch_syn, augment=self.augment,
                            generator=generator, device=self.device)
        return start, theta_start, theta_target, step_size, draws

    @classmethod
    def eval_protocol(cls, config: MethodConfig) -> EvaluationProtocol:
        """MTT evaluates networks trained 1000 epochs under DSA with the learned step size as
        their learning rate; before the run the protocol holds the initial step size, and
        `final_protocol` puts in the learned one."""
        soft = bool(getattr(config, "soft_labels", False))
        return EvaluationProtocol(
            name="mtt", models=(config.model,), augmentation=config.augmentation or "none",
            lr=config.step_size_init or PUBLISHED_STEP_SIZE,
            label_loss="soft_cross_entropy" if soft else "cross_entropy",
            extra={"lr": "initial step size (replaced by the learned one when the run ends)",
                   "labels": "soft (expert logits)" if soft else "hard"})

    def final_protocol(self, syn: SyntheticSet,
                       protocol: EvaluationProtocol) -> EvaluationProtocol:
        """MTT's own protocol trains with the learned step size; other protocols (a user's
        cross-architecture one, say) keep their learning rate."""
        if protocol.name != "mtt" or syn.step_size is None:
            return protocol
        learned = float(syn.step_size.detach())
        extra = {**protocol.extra, "lr": "the learned step size (exp of log_step_size)"}
        return replace(protocol, lr=learned, extra=extra)


@register_method
class TESLA(TrajectoryMatching):
    name = "tesla"
    summary = "trajectory matching with memory flat in the unrolled steps, optional expert " \
              "soft labels (Cui et al. 2023)"
    Config = TESLAConfig
    recompute = True
