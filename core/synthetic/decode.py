"""Parameterised sets: stored tensors that decode to the images a network trains on.

A method that stores a compact code (IDM's and IDC's partitioned images: each stored image is
a mosaic of ``factor x factor`` smaller images) records how to decode it in
`SyntheticSet.decode` and in the artifact's metadata. Every evaluation decodes first, and the
artifact reports both its size in bytes and the number of images per class it decodes to.

Known decoders:

- ``{"kind": "partition-expand", "factor": f}``: each stored image is split into f x f tiles,
  every tile upsampled back to full size; the tiles keep their image's label.
- ``{"kind": "hallucinate", "count": k, "channels": m}``: each stored image is a base that
  k hallucinators (`ddsuite.core.synthetic.hallucinate`, m feature maps each) turn into k
  images with the base's label. The hallucinators' weights travel with the stored tensors,
  under the prefix ``decoder.``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .hallucinate import DECODER_PREFIX, Hallucinators, hallucinator_shapes

__all__ = ["DECODE_KINDS", "decode_problems", "decode_set", "decoded_per_image",
           "factor_problems", "partition_compose", "partition_expand", "real_mosaics"]

DECODE_KINDS = ("partition-expand", "hallucinate")


def partition_expand(images: Tensor, factor: int) -> Tensor:
    """Split each image into factor x factor tiles and upsample every tile to full size.

    Args:
        images: (N, C, H, W) with H and W divisible by `factor`.
        factor: tiles per side; 1 returns `images` itself.

    Returns:
        (N * factor**2, C, H, W): the tiles of image 0 first (row by row), then of image 1,
        ..., so class-major sets stay class-major. Bilinear upsampling, differentiable.
    """
    if factor == 1:
        return images
    n, c, h, w = images.shape
    th, tw = h // factor, w // factor
    tiles = images.reshape(n, c, factor, th, factor, tw).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n * factor * factor, c, th, tw)  # (N * f * f, C, H / f, W / f)
    return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False)


def partition_compose(tiles: Tensor, factor: int) -> Tensor:
    """The inverse of partitioning: put (N * factor**2, C, h, w) tiles into N mosaics.

    Tiles are taken in the order `partition_expand` produces them; the result is
    (N, C, h * factor, w * factor).
    """
    m, c, th, tw = tiles.shape
    n = m // (factor * factor)
    grid = tiles.reshape(n, factor, factor, c, th, tw).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(n, c, th * factor, tw * factor)


def real_mosaics(train, ipc: int, factor: int, generator: torch.Generator) -> Tensor:
    """The multi-formation start: each stored image a mosaic of factor**2 real images of its
    class, each downscaled by `factor` (average pooling).

    Args:
        train: the real training set (a `RealDataset`: ``sample_per_class``).
        ipc: stored images per class.
        factor: tiles per side.
        generator: the draw of real images.

    Returns:
        (classes * ipc, C, H, W), class-major, on `train`'s device.
    """
    draws = [train.sample_per_class(ipc, generator=generator) for _ in range(factor ** 2)]
    real = torch.stack(draws, dim=2).flatten(0, 2)  # (classes * ipc * f * f, C, H, W)
    small = F.avg_pool2d(real, kernel_size=factor)  # (..., C, H / f, W / f)
    return partition_compose(small, factor)


def factor_problems(factor: int, image_shape: tuple[int, ...]) -> list[str]:
    """A partition factor must divide the images' height and width; lists what does."""
    h, w = image_shape[-2:]
    if h % factor == 0 and w % factor == 0:
        return []
    side = math.gcd(h, w)
    allowed = [str(d) for d in range(1, side + 1) if side % d == 0]
    return [f"factor={factor} does not divide {h}x{w} images; allowed: {', '.join(allowed)}"]


def _positive_int(decode: dict, key: str) -> list[str]:
    value = decode.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return [f"decode.{key} must be an integer >= 1, got {value!r}"]
    return []


def decode_problems(decode: Any, image_shape: tuple[int, ...],
                    tensors: dict[str, Tensor] | None = None) -> list[str]:
    """Every problem with a decode record for images of `image_shape` (C, H, W).

    `tensors`, when given, are the stored tensors; a decoder whose weights travel with them
    (``hallucinate``) is checked against them: present, of the right shapes, finite.
    """
    if decode is None:
        return []
    if not isinstance(decode, dict) or decode.get("kind") not in DECODE_KINDS:
        return [f"decode must be null or a mapping with kind one of {', '.join(DECODE_KINDS)}, "
                f"got {decode!r}"]
    if decode["kind"] == "partition-expand":
        problems = _positive_int(decode, "factor")
        if problems:
            return problems
        factor = decode["factor"]
        h, w = image_shape[-2:]
        if h % factor or w % factor:
            return [f"decode.factor {factor} does not divide the image size {h}x{w}"]
        return []
    problems = _positive_int(decode, "count") + _positive_int(decode, "channels")
    if problems or tensors is None:
        return problems
    shapes = hallucinator_shapes(decode["count"], image_shape[0], decode["channels"])
    for name, shape in shapes.items():
        tensor = tensors.get(DECODER_PREFIX + name)
        if tensor is None:
            problems.append(f"the hallucinator tensor {DECODER_PREFIX + name} is missing")
        elif tuple(tensor.shape) != shape or not tensor.is_floating_point():
            problems.append(f"{DECODER_PREFIX + name} is {tensor.dtype} {tuple(tensor.shape)}, "
                            f"expected float {shape} for decode {decode!r}")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{DECODER_PREFIX + name} holds non-finite values")
    return problems


def decoded_per_image(decode: dict[str, Any] | None) -> int:
    """How many images one stored image decodes to."""
    if decode is None:
        return 1
    if decode["kind"] == "hallucinate":
        return int(decode["count"])
    return int(decode["factor"]) ** 2


def decode_set(images: Tensor, labels: Tensor, labels_soft: Tensor | None = None,
               decode: dict[str, Any] | None = None,
               tensors: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The images (and their labels) a network trains on, from the stored tensors.

    `tensors` are the stored tensors (a decoder's weights among them); ``hallucinate``
    needs them.
    """
    if decode is None:
        return images, labels, labels_soft
    if decode.get("kind") == "hallucinate" and tensors is None:
        raise ValueError("decode kind 'hallucinate' needs the stored tensors (the "
                         "hallucinators' weights)")
    problems = decode_problems(decode, tuple(images.shape[1:]), tensors)
    if problems:
        raise ValueError("; ".join(problems))
    repeat = decoded_per_image(decode)
    soft = None if labels_soft is None else labels_soft.repeat_interleave(repeat, dim=0)
    if decode["kind"] == "hallucinate":
        decoder = Hallucinators.from_tensors(
            {k: v.to(images.device) for k, v in tensors.items() if k.startswith(DECODER_PREFIX)},
            count=decode["count"], image_channels=images.shape[1], channels=decode["channels"])
        with torch.no_grad():
            decoded = decoder(images)
    else:
        decoded = partition_expand(images, int(decode["factor"]))
    return decoded, labels.repeat_interleave(repeat), soft
