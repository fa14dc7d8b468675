"""Kernel ridge regression shared by the kernel family (KIP, RFAD, FRePo).

The support set (the synthetic images, with labels ``Y_s``) predicts a target batch of real
images through a kernel::

    alpha = (K_ss + ridge * tr(K_ss) / n * I)^{-1} Y_s        # (n, classes)
    prediction = K_ts alpha                                     # (b, classes)

The regulariser scales with the mean of the kernel's diagonal, so one `ridge` means the same
for kernels of any magnitude. The kernels are computed in the images' dtype (float32); the
system is solved in float64 by a Cholesky factorisation; when the factorisation fails (a
matrix that is numerically not positive definite), a growing jitter is added and the
attempt logged. A non-finite kernel, or a solve that stays non-finite, raises
`NonFiniteError`: a NaN never reaches the optimiser.

Also here: the analytic NNGP and NTK of fully connected ReLU networks (the arc-cosine
recursion, infinite width), the regression targets of a synthetic set, and
`KernelRegressionDistiller`, the base the three distillers share.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, NonFiniteError
from ..evaluation import EvaluationProtocol
from ..synthetic import SyntheticSet
from .base import Distiller
from .config import MethodConfig, option

__all__ = [
    "KERNEL_KINDS",
    "KernelConfig",
    "KernelRegressionDistiller",
    "centred_one_hot",
    "fc_relu_kernel",
    "initial_label_logits",
    "krr_predict",
    "krr_solve",
    "regression_targets",
]

logger = logging.getLogger(__name__)

KERNEL_KINDS = ("nngp", "ntk")
# Conditioning (from the Cholesky factor) above which a solve is logged as ill-conditioned.
CONDITION_WARNING = 1e12
_JITTERS = (1e-10, 1e-8, 1e-6, 1e-4)  # relative to the mean diagonal, tried in turn


def krr_solve(k_ss: Tensor, y_s: Tensor, *, ridge: float, iteration: int = 0) -> Tensor:
    """``alpha = (K_ss + ridge * tr(K_ss)/n * I)^{-1} Y_s`` in float64, differentiable.

    Args:
        k_ss: support kernel, (n, n), symmetric positive semi-definite.
        y_s: support targets, (n, classes).
        ridge: regulariser relative to the mean diagonal of `k_ss` (>= 0).
        iteration: the outer iteration, for the error message.

    Raises:
        NonFiniteError: the kernel or the solution holds a NaN or an infinity, or the kernel's
            trace is not positive, or no jitter up to 1e-4 * tr/n makes it factorisable.
    """
    if not torch.isfinite(k_ss).all():
        bad = int((~torch.isfinite(k_ss)).sum())
        raise NonFiniteError("support kernel", iteration,
                             detail=f"{bad} of {k_ss.numel()} entries are NaN or infinite")
    n = k_ss.shape[0]
    k64 = k_ss.double()
    scale = torch.diagonal(k64).sum() / n  # mean diagonal: tr(K)/n
    if not float(scale.detach()) > 0:
        trace = float(scale.detach()) * n
        raise NonFiniteError("support kernel", iteration,
                             detail=f"trace {trace:.3g} is not positive; the synthetic "
                                    "features are all zero")
    eye = torch.eye(n, dtype=torch.float64, device=k_ss.device)
    system = k64 + ridge * scale * eye
    factor, info = torch.linalg.cholesky_ex(system)
    for jitter in _JITTERS:
        if int(info) == 0:
            break
        logger.info("kernel ridge: Cholesky failed at iteration %d; adding jitter %.0e * tr/n",
                    iteration, jitter)
        factor, info = torch.linalg.cholesky_ex(system + jitter * scale * eye)
    if int(info) != 0:
        raise NonFiniteError("kernel ridge solve", iteration,
                             detail=f"the support kernel is not positive definite even with "
                                    f"jitter {_JITTERS[-1]:.0e} * tr/n; raise ridge "
                                    f"(now {ridge:g})")
    diag = torch.diagonal(factor).detach()
    condition = float((diag.max() / diag.min()) ** 2)
    if condition > CONDITION_WARNING:
        logger.warning("kernel ridge: condition number about %.1e at iteration %d; raise "
                       "ridge (now %g) if the loss stalls", condition, iteration, ridge)
    alpha = torch.cholesky_solve(y_s.double(), factor)  # (n, classes)
    if not torch.isfinite(alpha).all():
        raise NonFiniteError("kernel ridge solution", iteration,
                             detail=f"condition number about {condition:.1e}")
    return alpha


def krr_predict(k_ts: Tensor, k_ss: Tensor, y_s: Tensor, *, ridge: float,
                iteration: int = 0) -> Tensor:
    """Predictions on the target batch, ``K_ts alpha``, (b, classes), in `k_ts`'s dtype."""
    if not torch.isfinite(k_ts).all():
        raise NonFiniteError("target-support kernel", iteration,
                             detail="NaN or infinite entries")
    alpha = krr_solve(k_ss, y_s, ridge=ridge, iteration=iteration)
    return (k_ts.double() @ alpha).to(k_ts.dtype)


def fc_relu_kernel(x1: Tensor, x2: Tensor, *, depth: int, kind: str = "ntk",
                   weight_var: float = 2.0, bias_var: float = 0.01) -> Tensor:
    """Infinite-width NNGP or NTK of a fully connected ReLU network, in closed form.

    The network has `depth` hidden ReLU layers and a linear readout; weights are drawn
    N(0, weight_var / fan_in) and biases N(0, bias_var) (standard parameterisation's limit,
    as in the NTK parameterisation). With ``c = K(x, x') / sqrt(K(x, x) K(x', x'))`` and
    ``theta = arccos c``, each ReLU layer maps the covariance by the arc-cosine kernel of
    degree one, ``K <- weight_var * sqrt(K(x,x) K(x',x')) (sin theta + (pi - theta) c) /
    (2 pi) + bias_var``, and its derivative kernel is ``weight_var (pi - theta) / (2 pi)``;
    the NTK accumulates ``Theta <- K + Theta * Kdot``.

    Args:
        x1: (n1, ...) inputs, flattened.
        x2: (n2, ...) inputs, flattened.
        depth: hidden layers (>= 1).
        kind: "nngp" (the readout's covariance) or "ntk".

    Returns:
        (n1, n2) kernel.
    """
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kernel kind {kind!r} is not one of {', '.join(KERNEL_KINDS)}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    a, b = x1.flatten(1), x2.flatten(1)
    dim = a.shape[1]
    # Input layer: covariance of the first pre-activations.
    cross = weight_var * (a @ b.T) / dim + bias_var  # (n1, n2)
    diag1 = weight_var * a.square().sum(1) / dim + bias_var  # (n1,)
    diag2 = weight_var * b.square().sum(1) / dim + bias_var  # (n2,)
    ntk = cross
    for _ in range(depth):
        norms = torch.sqrt(diag1[:, None] * diag2[None, :])
        cos = (cross / norms).clamp(-1 + 1e-6, 1 - 1e-6)
        theta = torch.arccos(cos)
        cross = weight_var * norms * (torch.sin(theta) + (math.pi - theta) * cos) \
            / (2 * math.pi) + bias_var
        derivative = weight_var * (math.pi - theta) / (2 * math.pi)
        ntk = cross + ntk * derivative
        # On the diagonal theta = 0: E[relu(u)^2] = K/2.
        diag1 = weight_var * diag1 / 2 + bias_var
        diag2 = weight_var * diag2 / 2 + bias_var
    return ntk if kind == "ntk" else cross


def centred_one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """One-hot rows minus 1/classes, (n, classes): the regression targets of hard labels."""
    return F.one_hot(labels, num_classes).float() - 1.0 / num_classes


def initial_label_logits(labels: Tensor, num_classes: int, *, confidence: float) -> Tensor:
    """Logits whose softmax puts `confidence` on the given class, the rest spread evenly."""
    gap = math.log(confidence * (num_classes - 1) / (1 - confidence))
    return F.one_hot(labels, num_classes).float() * gap


def regression_targets(syn: SyntheticSet) -> Tensor:
    """The synthetic set's KRR targets, (classes * ipc, classes).

    Hard labels give centred one-hot rows. Soft labels are stored as logits (what the
    evaluation's soft label losses read), so the regression target is their softmax, centred
    the same way; learnable labels are learned through it.
    """
    classes = syn.num_classes
    if syn.labels_soft is None:
        return centred_one_hot(syn.labels_syn, classes)
    return syn.labels_soft.softmax(dim=-1) - 1.0 / classes


# -- what the three distillers share ---------------------------------------------------------


@dataclass(kw_only=True)
class KernelConfig(MethodConfig):
    """Fields the kernel family shares: the ridge, Adam on the images, learnable labels."""

    momentum: float = option(0.5, "unused: the kernel family optimises with Adam")
    batch_real: int = option(64, "real target images per class per iteration (capped at "
                                 "the smallest class)")
    ridge: float | None = option(None, "KRR regulariser relative to tr(K_ss)/n; null: the "
                                       "method's published value")
    learn_labels: bool | None = option(None, "learn soft labels (logits) with the images; "
                                             "null: the method's published choice")
    lr_labels: float | None = option(None, "Adam learning rate of learnable labels; null: "
                                           "the method's published value")
    label_confidence: float = option(0.9, "softmax mass on the true class of the initial "
                                          "learnable labels (ddsuite's choice)")

    def problems(self) -> list[str]:
        out = super().problems()
        if self.ridge is not None and self.ridge < 0:
            out.append(f"ridge must be >= 0, got {self.ridge}")
        if self.lr_labels is not None and not self.lr_labels > 0:
            out.append(f"lr_labels must be > 0, got {self.lr_labels}")
        if not 0 < self.label_confidence < 1:
            out.append(f"label_confidence must be in (0, 1), got {self.label_confidence}")
        return out

    def _with_defaults(self: K, dataset: str, *, iterations: int, lr: float, ridge: float,
                       learn_labels: bool) -> K:
        """Fill every unset shared field with the method's published value, then check."""
        return replace(
            self,
            iterations=iterations if self.iterations is None else self.iterations,
            lr_images=lr if self.lr_images is None else self.lr_images,
            lr_labels=lr if self.lr_labels is None else self.lr_labels,
            ridge=ridge if self.ridge is None else self.ridge,
            learn_labels=learn_labels if self.learn_labels is None else self.learn_labels,
        )._checked(dataset)

    def _checked(self: K, dataset: str) -> K:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source=f"{type(self).__name__} for {dataset}")
        return self


K = TypeVar("K", bound=KernelConfig)


class KernelRegressionDistiller(Distiller):
    """Base of the kernel family: Adam on the images (and on learnable label logits), a real
    target batch per iteration, and a soft-label evaluation when labels are learned."""

    config: KernelConfig

    def initialize(self, generator: torch.Generator) -> SyntheticSet:
        config, classes = self.config, self.train.num_classes
        images = self.initial_images(config.init, generator)  # (classes * ipc, C, H, W)
        logits = None
        if config.learn_labels:
            labels = torch.arange(classes, device=self.device).repeat_interleave(config.ipc)
            logits = initial_label_logits(labels, classes, confidence=config.label_confidence)
        return SyntheticSet(images, num_classes=classes, ipc=config.ipc, labels_soft=logits,
                            learn_labels=bool(config.learn_labels))

    def setup(self, syn: SyntheticSet) -> None:
        groups = [{"params": [syn.images_syn], "lr": self.config.lr_images,
                   "name": "synthetic images"}]
        if isinstance(syn.labels_soft, nn.Parameter):
            groups.append({"params": [syn.labels_soft], "lr": self.config.lr_labels,
                           "name": "soft labels"})
        groups.extend(self.extra_parameter_groups())
        self.optimizer = torch.optim.Adam(groups, lr=self.config.lr_images)

    def extra_parameter_groups(self) -> list[dict]:
        """Further learnable tensors of a subclass (e.g. RFAD's Platt scale)."""
        return []

    def target_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`batch_real` real images per class, (classes * b, C, H, W), and their labels."""
        b, classes = self.batch_real(), self.train.num_classes
        real = self.train.sample_per_class(b, generator=generator).to(self.device)
        labels = torch.arange(classes, device=self.device).repeat_interleave(b)
        return real.flatten(0, 1), labels

    @classmethod
    def eval_protocol(cls, config: MethodConfig) -> EvaluationProtocol:
        """Networks trained on the set (the DC protocol); on the learned label distributions
        (soft cross-entropy on the stored logits) when labels are learned. The papers also
        report KRR test accuracy, which this protocol does not measure."""
        soft = bool(getattr(config, "learn_labels", False))
        return EvaluationProtocol(
            name="dc-soft-labels" if soft else "dc", models=(config.model,),
            label_loss="soft_cross_entropy" if soft else "cross_entropy",
            extra={"labels": "learned soft labels (logits)" if soft else "hard"})
