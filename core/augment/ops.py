"""The differentiable DSA ops, registered by name.

Each op is split in two so that one random draw can be shared by several batches:

* ``sample(num_draws, generator, params)`` draws the op's random parameters as tensors whose
  first dimension is ``num_draws``, on the generator's own device and from that generator
  only. Draws do not depend on the image size (positions are fractions in [0, 1)), so a real
  and a synthetic batch of the same resolution see the same transformation.
* ``transform(images, values, params)`` applies the op to a batch, given one row of
  parameters per image. It is built from differentiable tensor operations only, so the
  gradient reaches ``images``.

A new op is added with `register_op`; its name must not contain ``_`` (the strategy
separator) and must not be ``none``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import Registry
from .params import AugmentParams

__all__ = ["AUGMENT_OPS", "AugmentOp", "register_op"]

SampleFn = Callable[[int, torch.Generator, AugmentParams], dict[str, Tensor]]
TransformFn = Callable[[Tensor, Mapping[str, Tensor], AugmentParams], Tensor]


@dataclass(frozen=True)
class AugmentOp:
    """One differentiable augmentation, split into its random draw and its transform.

    Attributes:
        name: the name used in strategy strings (no ``_``).
        sample: draws the parameters: ``(num_draws, generator, params) -> {key: (num_draws,
            ...)}``, on ``generator.device``, using only ``generator``.
        transform: applies the op: ``(images (B, C, H, W), {key: (B, ...)}, params) ->
            images (B, C, H, W)``.
        summary: one line describing the op, for help texts and error messages.
    """

    name: str
    sample: SampleFn
    transform: TransformFn
    summary: str


AUGMENT_OPS: Registry[AugmentOp] = Registry("augmentation op")
"""Every registered op, by name."""


def register_op(op: AugmentOp) -> AugmentOp:
    """Register `op` so strategy strings can name it.

    Raises:
        ValueError: if the name contains ``_`` or is ``none``.
        DuplicateNameError: if the name is taken.
    """
    if "_" in op.name or op.name.lower() == "none" or not op.name:
        raise ValueError(
            f"augmentation op name {op.name!r} is not usable in a strategy string: it must be "
            "non-empty, contain no '_' and not be 'none'"
        )
    AUGMENT_OPS.register(op.name, op)
    return op


def _uniform(num_draws: int, generator: torch.Generator, *tail: int) -> Tensor:
    """Uniform [0, 1) samples of shape (num_draws, *tail) on the generator's device."""
    return torch.rand(
        (num_draws, *tail), generator=generator, device=generator.device, dtype=torch.float32
    )


def _per_image(value: Tensor, images: Tensor) -> Tensor:
    """Reshape a (B,) parameter to (B, 1, 1, 1) in the images' dtype."""
    return value.to(images.dtype).view(-1, 1, 1, 1)


# --------------------------------------------------------------------------------- color


def _sample_color(n: int, generator: torch.Generator, params: AugmentParams) -> dict[str, Tensor]:
    u = _uniform(n, generator, 3)  # (n, 3)
    return {
        "brightness_shift": (u[:, 0] - 0.5) * params.brightness,
        "saturation_factor": u[:, 1] * params.saturation,
        "contrast_factor": u[:, 2] + params.contrast,
    }


def _color(images: Tensor, values: Mapping[str, Tensor], params: AugmentParams) -> Tensor:
    # Brightness, then saturation, then contrast, as published.
    out = images + _per_image(values["brightness_shift"], images)  # (B, C, H, W)
    grey = out.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    out = (out - grey) * _per_image(values["saturation_factor"], images) + grey
    mean = out.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (out - mean) * _per_image(values["contrast_factor"], images) + mean


# ---------------------------------------------------------------------------------- crop


def _margin(size: int, ratio: float) -> int:
    return int(size * ratio + 0.5)


def _unit_to_shift(unit: Tensor, margin: int) -> Tensor:
    """Map uniform [0, 1) draws to integer shifts in [-margin, margin]."""
    shift = torch.floor(unit * (2 * margin + 1)).long() - margin
    return shift.clamp(-margin, margin)


def _sample_crop(n: int, generator: torch.Generator, params: AugmentParams) -> dict[str, Tensor]:
    u = _uniform(n, generator, 2)  # (n, 2)
    return {"shift_y_unit": u[:, 0], "shift_x_unit": u[:, 1]}


def _crop(images: Tensor, values: Mapping[str, Tensor], params: AugmentParams) -> Tensor:
    b, _, h, w = images.shape
    pad_y, pad_x = _margin(h, params.crop_ratio), _margin(w, params.crop_ratio)
    shift_y = _unit_to_shift(values["shift_y_unit"], pad_y)  # (B,)
    shift_x = _unit_to_shift(values["shift_x_unit"], pad_x)  # (B,)

    # Zero-pad, then read an H x W window whose corner is moved by the shift.
    padded = F.pad(images, (pad_x, pad_x, pad_y, pad_y))  # (B, C, H + 2py, W + 2px)
    device = images.device
    rows = torch.arange(h, device=device)[None, :] + (pad_y + shift_y)[:, None]  # (B, H)
    cols = torch.arange(w, device=device)[None, :] + (pad_x + shift_x)[:, None]  # (B, W)
    batch = torch.arange(b, device=device)[:, None, None]  # (B, 1, 1)
    window = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return window.permute(0, 3, 1, 2)  # (B, C, H, W)


# -------------------------------------------------------------------------------- cutout


def _sample_cutout(
    n: int, generator: torch.Generator, params: AugmentParams
) -> dict[str, Tensor]:
    u = _uniform(n, generator, 2)  # (n, 2)
    return {"centre_y_unit": u[:, 0], "centre_x_unit": u[:, 1]}


def _inside(centre_unit: Tensor, size: int, side: int) -> Tensor:
    """(B, size) mask of the positions covered by a segment of `side` around the centre."""
    centre = torch.floor(centre_unit * size).long().clamp(0, size - 1)  # (B,)
    start = (centre - side // 2)[:, None]  # (B, 1)
    positions = torch.arange(size, device=centre_unit.device)[None, :]  # (1, size)
    return (positions >= start) & (positions < start + side)  # (B, size)


def _cutout(images: Tensor, values: Mapping[str, Tensor], params: AugmentParams) -> Tensor:
    _, _, h, w = images.shape
    side_y, side_x = _margin(h, params.cutout_ratio), _margin(w, params.cutout_ratio)
    in_y = _inside(values["centre_y_unit"], h, side_y)  # (B, H)
    in_x = _inside(values["centre_x_unit"], w, side_x)  # (B, W)
    keep = ~(in_y[:, :, None] & in_x[:, None, :])  # (B, H, W)
    return images * keep[:, None].to(images.dtype)  # (B, C, H, W)


# ---------------------------------------------------------------------------------- flip


def _sample_flip(n: int, generator: torch.Generator, params: AugmentParams) -> dict[str, Tensor]:
    return {"flip": _uniform(n, generator) < params.flip_prob}  # (n,) bool


def _flip(images: Tensor, values: Mapping[str, Tensor], params: AugmentParams) -> Tensor:
    mask = values["flip"].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return torch.where(mask, images.flip(3), images)


# ------------------------------------------------------------------------ scale, rotate


def _warp(images: Tensor, theta: Tensor) -> Tensor:
    """Resample `images` (B, C, H, W) through the affine maps `theta` (B, 2, 3)."""
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=True)  # (B, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _sample_scale(n: int, generator: torch.Generator, params: AugmentParams) -> dict[str, Tensor]:
    low = 1.0 / params.scale
    u = _uniform(n, generator, 2)  # (n, 2)
    factors = low + u * (params.scale - low)  # (n, 2)
    return {"scale_y": factors[:, 0], "scale_x": factors[:, 1]}


def _scale(images: Tensor, values: Mapping[str, Tensor], params: AugmentParams) -> Tensor:
    sx, sy = values["scale_x"], values["scale_y"]  # (B,)
    zero = torch.zeros_like(sx)
    theta = torch.stack(
        [torch.stack([sx, zero, zero], dim=1), torch.stack([zero, sy, zero], dim=1)], dim=1
    )  # (B, 2, 3)
    return _warp(images, theta)


def _sample_rotate(
    n: int, generator: torch.Generator, params: AugmentParams
) -> dict[str, Tensor]:
    degrees = (_uniform(n, generator) * 2.0 - 1.0) * params.ratio_rotate  # (n,)
    return {"angle": degrees * (math.pi / 180.0)}


def _rotate(images: Tensor, values: Mapping[str, Tensor], params: AugmentParams) -> Tensor:
    _, _, h, w = images.shape
    angle = values["angle"]  # (B,)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    # Rotate in pixel space: the grid lives in [-1, 1] per axis, so a non-square image needs
    # the aspect ratio folded into the off-diagonal terms (a no-op when H == W).
    half_h, half_w = max(h - 1, 1) / 2.0, max(w - 1, 1) / 2.0
    theta = torch.stack(
        [
            torch.stack([cos, sin * (half_h / half_w), zero], dim=1),
            torch.stack([-sin * (half_w / half_h), cos, zero], dim=1),
        ],
        dim=1,
    )  # (B, 2, 3)
    return _warp(images, theta)


# ------------------------------------------------------------------------ registration

register_op(
    AugmentOp(
        "color", _sample_color, _color, "brightness, saturation and contrast, in that order"
    )
)
register_op(AugmentOp("crop", _sample_crop, _crop, "random translation with zero padding"))
register_op(AugmentOp("cutout", _sample_cutout, _cutout, "zero a rectangle at a random centre"))
register_op(AugmentOp("flip", _sample_flip, _flip, "horizontal flip with probability flip_prob"))
register_op(AugmentOp("scale", _sample_scale, _scale, "per-axis scaling in [1/scale, scale]"))
register_op(AugmentOp("rotate", _sample_rotate, _rotate, "rotation in +-ratio_rotate degrees"))
