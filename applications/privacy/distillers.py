"""Differentially private distillers: DP distribution matching ("dp-dm") and DP gradient
matching ("dp-dc").

Each iteration releases one noisy statistic of the real data per private query (see
`mechanism`): DP-DM releases the per-class sums of clipped embeddings of a Poisson-sampled
batch through a freshly drawn network; DP-DC releases, at each of its outer steps, the
per-class sums of clipped per-sample gradients (computed with `torch.func`). Everything else,
the synthetic images, the random networks and the network trained on the synthetic set
between DP-DC's outer steps, is post-processing of those releases, so the set's privacy is
exactly what Opacus's accountant gives for `steps` releases.

The per-class means divide the noisy sums by the expected per-class batch, q * n / classes:
only n, the size of the private set, is treated as public, as Opacus does with the dataset
size. The synthetic set starts from noise; starting it from real images would publish them
without any accounting, so any other `init` is refused, by the config and again by the
distiller itself (a config object built in code skips the config's checks). For the same
reason an input space ZCA-whitened by a matrix fitted on the private images is refused; a
per-channel mean and std are treated as public, and the privacy record says whether they are
published constants or were fitted on the private data (see `inputs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ddsuite.core.methods import register_method
from ddsuite.core.methods.config import option
from ddsuite.core.methods.dm import DMConfig, DistributionMatching
from ddsuite.core.methods.gradient_matching import (
    DCConfig,
    GradientMatchingBase,
    gradient_distance,
)
from ddsuite.core.synthetic import SyntheticSet

from .accounting import (
    PrivacyPlan,
    budget_problems,
    clip_norm_problems,
    plan_privacy,
    spent_epsilon,
)
from .errors import PrivacyBudgetError, UnaccountedReleaseError
from .inputs import input_space_problems, normalisation_record
from .mechanism import clip_per_sample, gaussian_noise, noisy_class_sums, poisson_sample
from .models import check_private_model

__all__ = ["DPDCConfig", "DPDMConfig", "PrivateDC", "PrivateDM", "PrivacyOptions"]

logger = logging.getLogger(__name__)

_GRAD_CHUNK = 256  # real examples per vmap call when computing per-sample gradients


@dataclass(kw_only=True)
class PrivacyOptions:
    """The privacy fields every DP distiller shares."""

    epsilon: float | None = option(1.0, "target epsilon; the noise multiplier is derived "
                                        "from it (null: give noise_multiplier instead)")
    delta: float = option(1e-5, "target delta; must be below 1/n for n real training images")
    noise_multiplier: float | None = option(None, "noise std / clip norm; null: derived from "
                                                  "epsilon by the accountant")
    clip_norm: float = option(1.0, "L2 bound on each real example's contribution")
    accountant: str = option("rdp", "Opacus accountant: rdp or prv")
    sample_rate: float | None = option(None, "Poisson inclusion probability of each real "
                                             "example per query; null: batch_real * "
                                             "classes / n")

    def privacy_problems(self) -> list[str]:
        out = budget_problems(epsilon=self.epsilon, delta=self.delta,
                              accountant=self.accountant)
        if (self.epsilon is None) == (self.noise_multiplier is None):
            out.append("give exactly one of epsilon (the noise is then derived) and "
                       "noise_multiplier (the epsilon is then reported)")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            out.append(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        out.extend(clip_norm_problems(self.clip_norm))
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            out.append(f"sample_rate must lie in (0, 1], got {self.sample_rate}")
        out.extend(init_problems(getattr(self, "init", "noise")))
        if getattr(self, "iterations", None) == 0:
            out.append("iterations must be >= 1 for a private distiller")
        return out


def init_problems(init: str) -> list[str]:
    """The problem with a private distiller's `init`, if any: only "noise" is allowed."""
    if init == "noise":
        return []
    return [f"init {init!r} would start the synthetic set from real images (or a selection "
            "of them) and publish them without any privacy accounting; a private distiller "
            "starts from noise: set init: noise"]


# Above this epsilon the guarantee says practically nothing (e^50 bounds the odds ratio).
MEANINGLESS_EPSILON = 50.0


def _warn_if_meaningless(name: str, epsilon: float) -> None:
    if epsilon > MEANINGLESS_EPSILON:
        logger.warning("%s spends epsilon %.4g: above %g the guarantee gives practically no "
                       "protection; raise the noise or lower the steps", name, epsilon,
                       MEANINGLESS_EPSILON)


class _PrivateDistiller:
    """Mixin: the privacy plan, the query counter, and the ledger of what was spent."""

    config: Any
    queries_per_iteration: int = 1

    def _plan(self) -> PrivacyPlan:
        """Check the config and the data (on every path: a config object built in code has
        not been through `problems()`), then fix the noise."""
        config, train = self.config, self.train
        n = len(train)
        self._refuse_unaccounted()
        problems = config.privacy_problems() + budget_problems(
            epsilon=config.epsilon, delta=config.delta, dataset_size=n,
            accountant=config.accountant)
        if problems:
            raise PrivacyBudgetError(sorted(set(problems), key=problems.index),
                                     source=f"{self.name} on {n} images")
        self.normalisation = normalisation_record(self.splits, what=self.name)
        rate = config.sample_rate
        if rate is None:
            rate = min(1.0, config.batch_real * train.num_classes / n)
        self.expected_per_class = rate * n / train.num_classes
        check_private_model(self.fresh_model(), spec=config.model, what=self.name)
        return plan_privacy(delta=config.delta, sample_rate=rate,
                            steps=self.iterations * self.queries_per_iteration,
                            clip_norm=config.clip_norm, target_epsilon=config.epsilon,
                            noise_multiplier=config.noise_multiplier,
                            accountant=config.accountant, dataset_size=n)

    def _refuse_unaccounted(self) -> None:
        """Raise `UnaccountedReleaseError` for a real-image init or a ZCA input space."""
        problems = [f"{self.name}: {p}" for p in init_problems(self.config.init)]
        problems += input_space_problems(self.splits, what=self.name)
        if problems:
            raise UnaccountedReleaseError(problems, source=f"{self.name} on {len(self.train)} "
                                                           "images")

    def initialize(self, generator: torch.Generator) -> SyntheticSet:
        self._refuse_unaccounted()  # the config may have been changed after construction
        return super().initialize(generator)

    @property
    def noise_std(self) -> float:
        return self.plan.noise_multiplier * self.plan.clip_norm

    def _poisson_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A Poisson-sampled batch of real images and labels (possibly empty)."""
        index = poisson_sample(len(self.train), self.plan.sample_rate, generator=generator,
                               device=self.train.device)
        self.queries += 1
        return (self.train.images[index].to(self.device),
                self.train.labels[index].to(self.device))

    def privacy_record(self) -> dict[str, Any]:
        """What was spent so far: the plan with the queries actually answered and the
        accountant's epsilon for them."""
        epsilon = spent_epsilon(noise_multiplier=self.plan.noise_multiplier,
                                sample_rate=self.plan.sample_rate, steps=self.queries,
                                delta=self.plan.delta, accountant=self.plan.accountant)
        return {**replace(self.plan, steps=self.queries, epsilon=epsilon).to_dict(),
                "planned_steps": self.plan.steps, "dataset_size": len(self.train),
                "expected_per_class": self.expected_per_class,
                "adjacency": "add/remove one example",
                "public": "n, the number of private examples, and the input normalisation "
                          "constants (mean, std), which are not accounted",
                "normalisation": self.normalisation}

    def artifact_meta(self) -> dict[str, Any]:
        """Every artifact of a private run carries what it spent, however it was started."""
        return {**super().artifact_meta(), "privacy": self.privacy_record()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "queries": self.queries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.queries = int(state.get("queries", 0))


@dataclass(kw_only=True)
class DPDMConfig(DMConfig, PrivacyOptions):
    """DP-DM: DM's objective on clipped, noised class sums. ddsuite's defaults: 1,000
    iterations (every iteration spends budget, unlike DM's 20,000) and image lr 100, because
    clipped embeddings (norm <= clip_norm) give far smaller gradients than DM's raw ones.
    Measured on digits (IPC 10, 200 iterations, ConvNet width 32, 2 networks x 100 epochs):
    lr 1 / 100 / 1000 give 22 / 78 / 78 % at epsilon 10; lr 100 / 1000 give 40 / 37 % at
    epsilon 1."""

    # DM's default lr 1.0 barely moves a noise start through clipped embeddings.
    DEFAULT_LR_IMAGES: ClassVar[float] = 100.0

    init: str = option("noise", "initial images: noise only (real images would leak)")

    def problems(self) -> list[str]:
        return super().problems() + self.privacy_problems()

    def resolve(self, *, dataset: str) -> "DPDMConfig":
        base = replace(self, iterations=1000 if self.iterations is None else self.iterations,
                       lr_images=(self.DEFAULT_LR_IMAGES if self.lr_images is None
                                  else self.lr_images))
        return DMConfig.resolve(base, dataset=dataset)


@register_method
class PrivateDM(_PrivateDistiller, DistributionMatching):
    name = "dp-dm"
    family = "private distribution matching"
    summary = "DM on clipped, Gaussian-noised class sums of embeddings, accounted by Opacus"
    Config = DPDMConfig

    def __init__(self, config: DPDMConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.queries = 0
        self.plan = self._plan()
        _warn_if_meaningless(self.name, self.plan.epsilon)

    def step(self, syn: SyntheticSet, *, iteration: int,
             generator: torch.Generator) -> dict[str, float]:
        net = self.fresh_model()
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        classes, ipc, clip = syn.num_classes, syn.ipc, self.config.clip_norm
        real, labels = self._poisson_batch(generator)  # (B, C, H, W), (B,)
        images_syn = syn.images_syn  # (classes * ipc, C, H, W)
        if self.augment is not None:
            draw = self.augment.draw(classes, generator=generator, device=self.device)
            groups_syn = torch.arange(classes, device=self.device).repeat_interleave(ipc)
            images_syn = self.augment.apply(images_syn, draw, groups_syn)
            if len(labels):
                real = self.augment.apply(real, draw, labels)

        with torch.no_grad():
            if len(labels):
                clipped = clip_per_sample(net.embed(real), clip)  # (B, D)
            else:
                clipped = torch.zeros(0, net.feature_dim, device=self.device)
            noisy = noisy_class_sums(clipped, labels, num_classes=classes,
                                     noise_std=self.noise_std, generator=generator)
            mean_real = noisy / self.expected_per_class  # (classes, D)
        embed_syn = clip_per_sample(net.embed(images_syn), clip)
        mean_syn = embed_syn.view(classes, ipc, -1).mean(dim=1)  # (classes, D)
        loss = ((mean_real - mean_syn) ** 2).sum()
        self.update_images(loss, iteration=iteration)
        # The batch size itself is not noised, so it is never reported.
        return {"loss": float(loss.detach())}


@dataclass(kw_only=True)
class DPDCConfig(DCConfig, PrivacyOptions):
    """DP-DC: gradient matching against clipped, noised per-class sums of per-sample
    gradients; 200 iterations by default (a ddsuite choice). Every outer step is one private
    query, so a run makes iterations * outer_loop queries."""

    init: str = option("noise", "initial images: noise only (real images would leak)")

    def problems(self) -> list[str]:
        return super().problems() + self.privacy_problems()

    def resolve(self, *, dataset: str) -> "DPDCConfig":
        base = replace(self, iterations=200 if self.iterations is None else self.iterations)
        return DCConfig.resolve(base, dataset=dataset)


def per_sample_gradients(net: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """Flattened per-example gradients of the cross-entropy, (B, P), by torch.func."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def example_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(net, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, images, labels)
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


@register_method
class PrivateDC(_PrivateDistiller, GradientMatchingBase):
    name = "dp-dc"
    family = "private gradient matching"
    summary = "gradient matching on clipped, Gaussian-noised per-sample gradients (Opacus)"
    Config = DPDCConfig

    def __init__(self, config: DPDCConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.queries = 0
        self.queries_per_iteration = config.outer_loop
        self.plan = self._plan()
        _warn_if_meaningless(self.name, self.plan.epsilon)

    def _noisy_class_gradients(self, net: nn.Module, real: Tensor, labels: Tensor,
                               generator: torch.Generator) -> dict[str, Tensor]:
        """One private query's release: noisy mean per-class gradients of a Poisson batch
        (real (B, C, H, W), labels (B,)), name -> (classes, *shape)."""
        classes, clip = self.train.num_classes, self.config.clip_norm
        names, shapes = zip(*((k, v.shape) for k, v in net.named_parameters()))
        total = sum(v.numel() for v in net.parameters())
        sums = torch.zeros(classes, total, device=self.device)
        for lo in range(0, len(labels), _GRAD_CHUNK):
            x, y = real[lo:lo + _GRAD_CHUNK], labels[lo:lo + _GRAD_CHUNK]
            clipped = clip_per_sample(per_sample_gradients(net, x, y), clip)  # (b, P)
            sums.index_add_(0, y, clipped)
        noisy = sums + gaussian_noise(sums, noise_std=self.noise_std, generator=generator)
        mean = noisy / self.expected_per_class  # (classes, P)
        parts = torch.split(mean, [s.numel() for s in shapes], dim=1)
        return {n: p.reshape(classes, *s) for n, p, s in zip(names, parts, shapes)}

    def step(self, syn: SyntheticSet, *, iteration: int,
             generator: torch.Generator) -> dict[str, float]:
        config = self.config
        net = self.fresh_model()
        net.train()
        net_optimizer = torch.optim.SGD(net.parameters(), lr=config.lr_net)
        classes, ipc = syn.num_classes, syn.ipc
        groups_syn = torch.arange(classes, device=self.device).repeat_interleave(ipc)
        losses = []
        for outer in range(config.outer_loop):
            real, labels = self._poisson_batch(generator)  # (B, C, H, W), (B,)
            images_syn = syn.images_syn  # (classes * ipc, C, H, W)
            if self.augment is not None:
                # One draw per class, shared by both sides; applied to each real example
                # before its gradient is clipped, it is part of that example's contribution.
                draw = self.augment.draw(classes, generator=generator, device=self.device)
                images_syn = self.augment.apply(images_syn, draw, groups_syn)
                if len(labels):
                    real = self.augment.apply(real, draw, labels)
            g_real = self._noisy_class_gradients(net, real, labels, generator)
            g_syn = self._per_class_gradients(
                net, images_syn.view(classes, ipc, *images_syn.shape[1:]), create_graph=True)
            loss = gradient_distance(g_real, g_syn, distance=config.distance)
            self.update_images(loss, iteration=iteration)
            losses.append(float(loss.detach()))
            if outer == config.outer_loop - 1:
                break
            net.train()
            self._train_net_on_syn(net, net_optimizer, syn, generator)
        return {"loss": sum(losses) / len(losses)}
