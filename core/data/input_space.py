"""The input space of a dataset: per-channel normalisation and optional ZCA whitening.

Networks, real images and synthetic images must all live in the same input space. The space
is fitted on the train split (or uses published constants) and travels with every distilled
set as `InputSpace.to_dict()`; `InputSpace.differences` explains any mismatch in plain words
so that a set is never evaluated under a space it was not made in.

ZCA follows the field's usual recipe: it is fitted on the *normalised* train images, in
float64 on the CPU. With X the (N, D) centred features (D = C*H*W) and
``cov = X^T X / (N - 1) = U diag(S) U^T``, the whitening matrix is
``W = U diag(1 / sqrt(S + epsilon)) U^T``, applied as ``(x - feature_mean) @ W``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["InputSpace", "ZCAWhitening", "MAX_ZCA_FEATURES"]

logger = logging.getLogger(__name__)

# A (D, D) float64 matrix of this size is ~1.2 GB and its eigendecomposition takes minutes
# on a CPU; ZCA is a tool for small images (the field uses it on 32x32 sets).
MAX_ZCA_FEATURES = 64 * 64 * 3

_FIT_CHUNK_ROWS = 4096
_ATOL = 1e-6


@dataclass(eq=False)
class ZCAWhitening:
    """A fitted ZCA transform, or only its description when loaded without its tensors.

    Attributes:
        epsilon: the regulariser added to the eigenvalues.
        dim: the number of features D = C*H*W.
        fingerprint: sha256 hex of the float32 matrix bytes (C order).
        matrix: (D, D) float64 whitening matrix on the CPU, or None when only described.
        feature_mean: (D,) float64 mean of the normalised train features, or None.
    """

    epsilon: float
    dim: int
    fingerprint: str
    matrix: torch.Tensor | None = None
    feature_mean: torch.Tensor | None = None
    _inverse: torch.Tensor | None = field(default=None, repr=False)
    _cache: dict[tuple[str, str], tuple[torch.Tensor, ...]] = field(
        default_factory=dict, repr=False
    )

    @property
    def has_matrix(self) -> bool:
        """Whether the matrix and mean are present, so the transform can be applied."""
        return self.matrix is not None and self.feature_mean is not None

    def _tensors(self, like: torch.Tensor, *, inverse: bool = False) -> tuple[torch.Tensor, ...]:
        """(matrix, feature_mean) or (inverse, feature_mean) on `like`'s device and dtype."""
        if not self.has_matrix:
            raise ConfigError(
                [
                    "this input space describes a ZCA transform (fingerprint "
                    f"{self.fingerprint[:12]}...) but does not hold its matrix; rebuild it "
                    "with InputSpace.from_dict(data, zca_tensors=...) or reload the dataset "
                    "with zca=True"
                ]
            )
        key = (f"{like.device}|{like.dtype}", "inv" if inverse else "fwd")
        if key not in self._cache:
            if inverse:
                if self._inverse is None:
                    self._inverse = torch.linalg.inv(self.matrix)  # (D, D) float64
                mat = self._inverse
            else:
                mat = self.matrix
            self._cache[key] = (
                mat.to(device=like.device, dtype=like.dtype),
                self.feature_mean.to(device=like.device, dtype=like.dtype),
            )
        return self._cache[key]


class InputSpace:
    """Per-channel normalisation, optionally followed by ZCA whitening.

    Args:
        mean: per-channel mean of images in [0, 1].
        std: per-channel standard deviation of images in [0, 1]; every entry > 0.
        zca: a fitted `ZCAWhitening`, or None for no whitening.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        zca: ZCAWhitening | None = None,
    ):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        problems = []
        if len(self.mean) != len(self.std):
            problems.append(
                f"mean has {len(self.mean)} channels but std has {len(self.std)}; give one "
                "value per image channel in both"
            )
        bad = [i for i, s in enumerate(self.std) if not (s > 0 and math.isfinite(s))]
        if bad:
            problems.append(
                f"std must be finite and > 0 in every channel; channel(s) {bad} have "
                f"{[self.std[i] for i in bad]} (a constant channel cannot be normalised: "
                "pass std= explicitly)"
            )
        if problems:
            raise ConfigError(problems, source="InputSpace")
        self.zca = zca

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        images01: torch.Tensor,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        zca: bool = False,
        zca_epsilon: float = 0.1,
    ) -> InputSpace:
        """Fit the space on training images.

        Args:
            images01: (N, C, H, W) train images in [0, 1] (float) or uint8 in [0, 255].
            mean: per-channel mean to use instead of computing it (published constants).
            std: per-channel std to use instead of computing it.
            zca: also fit ZCA whitening on the normalised images.
            zca_epsilon: the ZCA regulariser; must be > 0.

        Returns:
            The fitted input space.
        """
        channels = images01.shape[1]
        if mean is None or std is None:
            fitted_mean, fitted_std = _channel_stats(images01)  # (C,), (C,) float64
            mean = fitted_mean.tolist() if mean is None else mean
            std = fitted_std.tolist() if std is None else std
        space = cls(mean, std)
        if len(space.mean) != channels:
            raise ConfigError(
                [f"the input space has {len(space.mean)} channels but the images have {channels}"]
            )
        if zca:
            space.zca = _fit_zca(space, images01, epsilon=zca_epsilon)
        return space

    # ------------------------------------------------------------------ applying

    @property
    def num_channels(self) -> int:
        """The number of image channels this space expects."""
        return len(self.mean)

    def normalize(self, images01: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """Map images in [0, 1] to the normalised space: ``(x - mean) / std`` per channel.

        Args:
            images01: (..., C, H, W) float images in [0, 1], or uint8 in [0, 255] (converted).
            inplace: overwrite `images01` (float input only); saves memory when loading.

        Returns:
            (..., C, H, W) normalised float images.
        """
        x = _as_float01(images01)
        self._check_channels(x)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(-1, 1, 1)  # (C,1,1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(-1, 1, 1)  # (C,1,1)
        if inplace or x is not images01:  # a converted uint8 input is already a fresh copy
            return x.sub_(mean).div_(std)
        return (x - mean) / std

    def whiten(self, images: torch.Tensor) -> torch.Tensor:
        """Apply only the ZCA step to already normalised images (identity when ZCA is off).

        Args:
            images: (..., C, H, W) normalised images.
        """
        if self.zca is None:
            return images
        matrix, feature_mean = self.zca._tensors(images)  # (D, D), (D,)
        flat = images.reshape(-1, self.zca.dim)  # (N, D)
        return ((flat - feature_mean) @ matrix).reshape(images.shape)

    def apply(self, images01: torch.Tensor) -> torch.Tensor:
        """Normalise images in [0, 1], then ZCA-whiten them when ZCA is on.

        Args:
            images01: (..., C, H, W) float images in [0, 1], or uint8.

        Returns:
            (..., C, H, W) images in this input space; differentiable in `images01`.
        """
        return self.whiten(self.normalize(images01))

    def to_display(self, images: torch.Tensor) -> torch.Tensor:
        """Map images of this space back to [0, 1], for image grids.

        Normalisation is inverted exactly. ZCA is inverted through the inverse of the
        whitening matrix (``U diag(sqrt(S + epsilon)) U^T``), which is exact up to float
        round-off; the result is then clamped to [0, 1], so synthetic images that left the
        range of real ones display only approximately.

        Args:
            images: (..., C, H, W) images in this input space.

        Returns:
            (..., C, H, W) images in [0, 1], detached.
        """
        x = images.detach()
        if not x.is_floating_point():
            x = x.float()
        if self.zca is not None:
            inverse, feature_mean = self.zca._tensors(x, inverse=True)  # (D, D), (D,)
            x = (x.reshape(-1, self.zca.dim) @ inverse + feature_mean).reshape(x.shape)
        self._check_channels(x)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(-1, 1, 1)  # (C,1,1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(-1, 1, 1)  # (C,1,1)
        return (x * std + mean).clamp_(0.0, 1.0)

    # ------------------------------------------------------------------ describing

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description: ``{"mean", "std", "zca": None | {epsilon, fingerprint, dim}}``.

        The ZCA matrix itself is not in the dict; store `zca_tensors()` beside it.
        """
        zca = None
        if self.zca is not None:
            zca = {
                "epsilon": float(self.zca.epsilon),
                "fingerprint": self.zca.fingerprint,
                "dim": int(self.zca.dim),
            }
        return {"mean": list(self.mean), "std": list(self.std), "zca": zca}

    def zca_tensors(self) -> dict[str, torch.Tensor]:
        """The ZCA tensors to save beside `to_dict()` (e.g. in safetensors); {} without ZCA."""
        if self.zca is None or not self.zca.has_matrix:
            return {}
        return {
            "zca_matrix": self.zca.matrix.contiguous(),
            "zca_feature_mean": self.zca.feature_mean.contiguous(),
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        zca_tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> InputSpace:
        """Rebuild a space from `to_dict()` output, with the ZCA tensors when given.

        Args:
            data: a dict from `to_dict()`.
            zca_tensors: the dict from `zca_tensors()`. Without it a ZCA space is only
                described: it can be compared and serialised but not applied.

        Raises:
            ConfigError: when keys are missing or the tensors do not match the fingerprint.
        """
        missing = [key for key in ("mean", "std", "zca") if key not in data]
        if missing:
            raise ConfigError(
                [f"input space is missing key {key!r}" for key in missing],
                source="InputSpace.from_dict",
            )
        zca_data = data["zca"]
        zca = None
        if zca_data is not None:
            zca = ZCAWhitening(
                epsilon=float(zca_data["epsilon"]),
                dim=int(zca_data["dim"]),
                fingerprint=str(zca_data["fingerprint"]),
            )
            if zca_tensors:
                matrix = zca_tensors["zca_matrix"].detach().cpu().to(torch.float64)
                found = _matrix_fingerprint(matrix)
                if found != zca.fingerprint:
                    raise ConfigError(
                        [
                            f"the ZCA matrix given has fingerprint {found[:12]}... but the "
                            f"description expects {zca.fingerprint[:12]}...; the tensors belong "
                            "to another input space"
                        ],
                        source="InputSpace.from_dict",
                    )
                zca.matrix = matrix
                zca.feature_mean = zca_tensors["zca_feature_mean"].detach().cpu().double()
        return cls(data["mean"], data["std"], zca)

    def differences(self, other: Mapping[str, Any] | InputSpace) -> list[str]:
        """Describe in plain words every way `other` differs from this space.

        Args:
            other: another space's `to_dict()` (or the space itself).

        Returns:
            One sentence per mismatch; empty when the spaces are the same.
        """
        theirs = other.to_dict() if isinstance(other, InputSpace) else dict(other)
        ours = self.to_dict()
        found = []
        for key, word in (("mean", "mean"), ("std", "standard deviation")):
            a, b = list(ours[key]), list(theirs.get(key) or [])
            if len(a) != len(b):
                found.append(
                    f"normalisation {word} has {len(a)} channel(s) here but {len(b)} in the "
                    f"other space ({_fmt(a)} vs {_fmt(b)})"
                )
            elif not np.allclose(a, b, rtol=1e-5, atol=_ATOL):
                found.append(
                    f"normalisation {word} differs: {_fmt(a)} here, {_fmt(b)} in the other space"
                )
        za, zb = ours["zca"], theirs.get("zca")
        if za is None and zb is not None:
            found.append(
                f"ZCA whitening is off here but on in the other space (epsilon {zb['epsilon']})"
            )
        elif za is not None and zb is None:
            found.append(
                f"ZCA whitening is on here (epsilon {za['epsilon']}) but off in the other space"
            )
        elif za is not None and zb is not None:
            if not math.isclose(za["epsilon"], zb["epsilon"], rel_tol=1e-9):
                found.append(
                    f"ZCA epsilon differs: {za['epsilon']} here, {zb['epsilon']} in the other "
                    "space"
                )
            if za["dim"] != zb["dim"]:
                found.append(
                    f"ZCA feature dimension differs: {za['dim']} here, {zb['dim']} in the other "
                    "space (different image shapes)"
                )
            if za["fingerprint"] != zb["fingerprint"]:
                found.append(
                    f"ZCA matrices differ (fingerprint {za['fingerprint'][:12]}... here, "
                    f"{zb['fingerprint'][:12]}... in the other space): they were fitted on "
                    "different data or settings"
                )
        return found

    def __repr__(self) -> str:
        zca = "off" if self.zca is None else f"on(epsilon={self.zca.epsilon}, dim={self.zca.dim})"
        return f"InputSpace(mean={_fmt(self.mean)}, std={_fmt(self.std)}, zca={zca})"

    def _check_channels(self, x: torch.Tensor) -> None:
        if x.dim() < 3 or x.shape[-3] != self.num_channels:
            raise ConfigError(
                [
                    f"images of shape {tuple(x.shape)} do not have {self.num_channels} "
                    "channel(s) in dimension -3, as this input space expects (..., C, H, W)"
                ]
            )


# ---------------------------------------------------------------------- helpers


def _as_float01(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; float tensors are returned unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise ConfigError(
            [f"images must be float in [0, 1] or uint8, got dtype {images.dtype}"]
        )
    return images


def _as_float64_cpu(images: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy in [0, 1] of uint8 or float images (never aliases the input)."""
    if images.dtype == torch.uint8:
        return images.to("cpu", torch.float64).div_(255.0)
    return _as_float01(images).to("cpu", torch.float64, copy=True)


def _channel_stats(images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std in float64, computed in slices of images."""
    channels = images01.shape[1]
    if images01.dtype == torch.uint8 and images01.numel():
        # Exact and fast: a 256-bin histogram per channel.
        levels = torch.arange(256, dtype=torch.float64) / 255.0  # (256,)
        means, stds = [], []
        for c in range(channels):
            counts = torch.bincount(images01[:, c].reshape(-1), minlength=256)  # (256,)
            counts = counts.to("cpu", torch.float64)
            mean = (counts * levels).sum() / counts.sum()
            var = (counts * (levels - mean).square()).sum() / counts.sum()
            means.append(mean)
            stds.append(var.sqrt())
        return torch.stack(means), torch.stack(stds)
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, images01.shape[0], _FIT_CHUNK_ROWS):
        chunk = _as_float64_cpu(images01[start : start + _FIT_CHUNK_ROWS])
        total += chunk.sum(dim=(0, 2, 3))  # (C,)
        total_sq += chunk.square().sum(dim=(0, 2, 3))  # (C,)
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    if count == 0:
        raise ConfigError(["cannot fit an input space on an empty training split"])
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return mean, var.sqrt()


def _fit_zca(space: InputSpace, images01: torch.Tensor, *, epsilon: float) -> ZCAWhitening:
    """Fit ZCA on the normalised images, in float64 on the CPU (two passes over slices)."""
    n = images01.shape[0]
    dim = int(np.prod(images01.shape[1:]))
    problems = []
    if not (epsilon > 0 and math.isfinite(epsilon)):
        problems.append(f"zca_epsilon must be a finite number > 0, got {epsilon}")
    if n < 2:
        problems.append(f"ZCA needs at least 2 training images, got {n}")
    if dim > MAX_ZCA_FEATURES:
        gigabytes = dim * dim * 8 / 1e9
        problems.append(
            f"ZCA on {dim} features needs a {dim}x{dim} float64 matrix ({gigabytes:.1f} GB) "
            f"and its eigendecomposition; the limit is {MAX_ZCA_FEATURES} features (64x64x3). "
            "Resize the images or turn zca off"
        )
    if problems:
        raise ConfigError(problems, source="ZCA")

    def slices():
        for start in range(0, n, _FIT_CHUNK_ROWS):
            chunk = _as_float64_cpu(images01[start : start + _FIT_CHUNK_ROWS])
            yield space.normalize(chunk, inplace=True).reshape(-1, dim)  # (rows, D)

    feature_mean = torch.zeros(dim, dtype=torch.float64)
    for flat in slices():
        feature_mean += flat.sum(dim=0)
    feature_mean /= n
    cov = torch.zeros(dim, dim, dtype=torch.float64)
    for flat in slices():
        centred = flat - feature_mean  # (rows, D)
        cov.addmm_(centred.T, centred)
    cov /= n - 1  # (D, D)

    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # (D,), (D, D)
    eigenvalues = eigenvalues.clamp_min(0.0)
    scale = (eigenvalues + epsilon).rsqrt()  # (D,)
    matrix = (eigenvectors * scale) @ eigenvectors.T  # (D, D)
    inverse = (eigenvectors / scale) @ eigenvectors.T  # (D, D)
    logger.info("fitted ZCA on %d images, %d features, epsilon %g", n, dim, epsilon)
    return ZCAWhitening(
        epsilon=float(epsilon),
        dim=dim,
        fingerprint=_matrix_fingerprint(matrix),
        matrix=matrix,
        feature_mean=feature_mean,
        _inverse=inverse,
    )


def _matrix_fingerprint(matrix: torch.Tensor) -> str:
    """sha256 hex of the float32 matrix bytes in C order."""
    array = np.ascontiguousarray(matrix.detach().cpu().to(torch.float32).numpy())
    return hashlib.sha256(array.data).hexdigest()


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ("," if len(values) == 1 else "") + ")"
