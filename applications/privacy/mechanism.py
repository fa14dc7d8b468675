"""The subsampled Gaussian mechanism over per-class sums: Poisson sampling, per-sample
clipping, noisy sums.

The whole real training set is one population. At each step every example is included
independently with probability q (so a batch may be empty), each included example's
contribution is clipped to L2 norm `clip_norm` and added to the sum of its own class, and
every class's sum gets Gaussian noise of standard deviation `noise_multiplier * clip_norm`.
Adding or removing one example changes one class's sum by at most `clip_norm`, so the
per-step L2 sensitivity of the (classes, D) release is `clip_norm`, exactly what Opacus's
accountants assume.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clip_per_sample", "gaussian_noise", "noisy_class_sums", "poisson_sample"]

_CLIP_EPS = 1e-6


def poisson_sample(n: int, sample_rate: float, *, generator: torch.Generator,
                   device: torch.device | str) -> Tensor:
    """Indices of a Poisson-sampled batch: each of `n` examples in with prob `sample_rate`.

    Returns:
        (B,) int64 indices on `device`, sorted; B is random and may be 0.
    """
    keep = torch.rand(n, generator=generator, device=generator.device) < sample_rate  # (n,)
    return keep.nonzero().squeeze(1).to(device)


def clip_per_sample(values: Tensor, clip_norm: float) -> Tensor:
    """Scale each row of `values` (B, D) to L2 norm at most `clip_norm` (rows below it stay).

    The factor is min(1, clip_norm / (norm + 1e-6)), so a clipped row's norm is strictly
    below `clip_norm` and a zero row stays zero.
    """
    norms = values.norm(dim=1, keepdim=True)  # (B, 1)
    return values * (clip_norm / (norms + _CLIP_EPS)).clamp(max=1.0)


def noisy_class_sums(clipped: Tensor, labels: Tensor, *, num_classes: int, noise_std: float,
                     generator: torch.Generator) -> Tensor:
    """Per-class sums of clipped rows plus Gaussian noise, (num_classes, D).

    Args:
        clipped: (B, D) contributions, each of norm at most the clip norm; B may be 0.
        labels: (B,) class of each row.
        num_classes: rows of the result; every class gets noise, sampled or not.
        noise_std: standard deviation of the noise on every coordinate
            (noise_multiplier * clip_norm).
        generator: the source of the noise (drawn where the generator lives, then moved).
    """
    sums = torch.zeros(num_classes, clipped.shape[1], device=clipped.device,
                       dtype=clipped.dtype)
    sums.index_add_(0, labels, clipped)
    return sums + gaussian_noise(sums, noise_std=noise_std, generator=generator)


def gaussian_noise(like: Tensor, *, noise_std: float, generator: torch.Generator) -> Tensor:
    """Gaussian noise of standard deviation `noise_std`, shaped like `like` and on its device
    and dtype (drawn where the generator lives, then moved)."""
    noise = torch.randn(like.shape, generator=generator, device=generator.device,
                        dtype=like.dtype)
    return noise_std * noise.to(like.device)
