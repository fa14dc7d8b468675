"""What clients send the server, how its size is counted, and how the server checks it.

A `Payload` is a client's distilled (or, for the centralised bound, real) data: images,
hard labels in the global class numbering and optional soft-label logits. A `ModelUpdate` is
a FedAvg/FedProx client's trained weights. Sizes are exact: the bytes of the tensors' data,
``numel * element_size`` summed, as they are carried (Flower's `Array` holds the same raw
buffer; its small per-array header is not counted for any method).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ddsuite.core.synthetic.decode import decode_problems

from .training import tensor_bytes

__all__ = ["ModelUpdate", "Payload", "payload_problems", "update_problems"]


@dataclass
class Payload:
    """One client's upload of images.

    Attributes:
        client: the client's index.
        images_syn: (n, C, H, W) in the dataset's input space.
        labels_syn: (n,) int64 labels in the global numbering 0..classes-1.
        labels_soft: optional (n, classes) logits.
        decode: how the stored images decode to training images (see
            `ddsuite.core.synthetic.decode`); None: as they are.
        decoder: a decoder's weights that travel with the images (HaBa's hallucinators,
            keys ``decoder.*``); counted in the upload's bytes.
        info: what the client reports besides (local sample count, skipped classes, ...).
    """

    client: int
    images_syn: Tensor
    labels_syn: Tensor
    labels_soft: Tensor | None = None
    decode: dict | None = None
    decoder: dict[str, Tensor] | None = None
    info: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, Tensor]:
        out = {"images_syn": self.images_syn, "labels_syn": self.labels_syn}
        if self.labels_soft is not None:
            out["labels_soft"] = self.labels_soft
        out.update(self.decoder or {})
        return out

    @property
    def num_bytes(self) -> int:
        """Exact bytes of the uploaded tensors."""
        return tensor_bytes(self.tensors())


@dataclass
class ModelUpdate:
    """One client's trained model state after local training (FedAvg, FedProx)."""

    client: int
    state: dict[str, Tensor]
    num_examples: int
    info: dict = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return tensor_bytes(self.state)


def payload_problems(payload: Payload, *, image_shape: tuple[int, ...],
                     num_classes: int) -> list[str]:
    """Everything wrong with a payload (empty when the server may train on it)."""
    out = list(decode_problems(payload.decode, tuple(image_shape), payload.tensors()))
    images, labels, soft = payload.images_syn, payload.labels_syn, payload.labels_soft
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        out.append(f"images_syn has shape {tuple(images.shape)}, expected "
                   f"(n, {', '.join(map(str, image_shape))})")
    elif images.dtype != torch.float32:
        out.append(f"images_syn must be float32 (what the global model takes), got "
                   f"{images.dtype}")
    elif not torch.isfinite(images).all():
        out.append("images_syn holds non-finite values")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        out.append(f"labels_syn has shape {tuple(labels.shape)}, expected ({images.shape[0]},)")
    elif labels.dtype != torch.int64:
        out.append(f"labels_syn must be int64 class indices, got {labels.dtype}")
    elif labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        out.append(f"labels_syn span {int(labels.min())}..{int(labels.max())}, outside the "
                   f"{num_classes} classes 0..{num_classes - 1}")
    if soft is not None:
        if tuple(soft.shape) != (images.shape[0], num_classes):
            out.append(f"labels_soft has shape {tuple(soft.shape)}, expected "
                       f"({images.shape[0]}, {num_classes})")
        elif soft.dtype != torch.float32:
            out.append(f"labels_soft must be float32, got {soft.dtype}")
        elif not torch.isfinite(soft).all():
            out.append("labels_soft holds non-finite values")
    return out


def update_problems(update: ModelUpdate, *, reference: Mapping[str, Tensor]) -> list[str]:
    """Everything wrong with a model update against the global model's state."""
    out = []
    missing = sorted(set(reference) - set(update.state))
    extra = sorted(set(update.state) - set(reference))
    if missing or extra:
        out.append(f"state keys differ from the global model (missing {missing[:4]}, "
                   f"unexpected {extra[:4]})")
        return out
    for key, ref in reference.items():
        value = update.state[key]
        if value.shape != ref.shape:
            out.append(f"{key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        elif value.dtype != ref.dtype:
            out.append(f"{key} has dtype {value.dtype}, expected {ref.dtype}")
        elif value.is_floating_point() and not torch.isfinite(value).all():
            out.append(f"{key} holds non-finite values")
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int) \
            or update.num_examples < 1 or not math.isfinite(update.num_examples):
        out.append(f"num_examples must be an integer >= 1, got {update.num_examples!r}")
    return out
