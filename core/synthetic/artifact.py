"""The distilled-set artifact: a folder with tensors in safetensors and metadata in JSON.

Layout of an artifact folder::

    synthetic.safetensors   images_syn (N, C, H, W) float32, labels_syn (N,) int64,
                            optional labels_soft (N, classes), log_step_size (1,)
    artifact.json           format, method and resolved config, seed, dataset identity and
                            class map, input space (normalisation, ZCA), evaluation protocol,
                            library versions, metrics, the sha256 of the tensors file, and for
                            parameterised sets how they decode (`decode`) and the images per
                            class they decode to (`decoded_ipc`) beside their `size_bytes`
                            and `storage_ipc` (those bytes in float32 images per class)
    A parameterised set's decoder weights (HaBa's hallucinators) are tensors ``decoder.*``
    in the same file.

Both files are written atomically, tensors first; the metadata records the tensors' checksum,
so a truncated, edited or mismatched pair is detected on load. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import atomic_write, write_json
from ..errors import ArtifactError
from ..provenance import library_versions, timestamp
from .decode import decode_problems, decode_set, decoded_per_image
from .hallucinate import Hallucinators
from .syn_set import SyntheticSet

__all__ = [
    "ARTIFACT_FORMAT",
    "META_FILE",
    "TENSORS_FILE",
    "Artifact",
    "is_artifact",
    "load_artifact",
    "save_artifact",
    "update_metrics",
]

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = "ddsuite.distilled-set/1"
TENSORS_FILE = "synthetic.safetensors"
META_FILE = "artifact.json"
_REQUIRED_META = (
    "format", "method", "config", "seed", "dataset", "input_space", "ipc", "num_classes",
    "protocol", "versions", "tensors_sha256",
)


@dataclass
class Artifact:
    """A loaded distilled set: its tensors and its metadata."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def images_syn(self) -> Tensor:
        return self.tensors["images_syn"]

    @property
    def labels_syn(self) -> Tensor:
        return self.tensors["labels_syn"]

    @property
    def labels_soft(self) -> Tensor | None:
        return self.tensors.get("labels_soft")

    @property
    def ipc(self) -> int:
        return int(self.meta["ipc"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def method(self) -> str:
        return str(self.meta["method"])

    @property
    def decode(self) -> dict[str, Any] | None:
        """How the stored images decode to training images; None: they are used as is."""
        return self.meta.get("decode")

    def size_bytes(self) -> int:
        """Bytes of the stored tensors (what a user ships when sharing the set)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def synthetic_set(self) -> SyntheticSet:
        """The stored set as a (frozen) `SyntheticSet`, with its soft labels, step size,
        decode record and decoder."""
        step = self.tensors.get("log_step_size")
        syn = SyntheticSet(self.images_syn, num_classes=self.num_classes, ipc=self.ipc,
                           labels_soft=self.labels_soft,
                           step_size=None if step is None else float(step.exp()))
        syn.decode = self.decode
        if self.decode is not None and self.decode["kind"] == "hallucinate":
            syn.decoder = Hallucinators.from_tensors(
                self.tensors, count=self.decode["count"],
                image_channels=self.images_syn.shape[1], channels=self.decode["channels"])
        return syn.requires_grad_(False)

    def decoded(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(images, labels, soft labels) a network trains on: the stored set, decoded."""
        return decode_set(self.images_syn, self.labels_syn, self.labels_soft, self.decode,
                          self.tensors)


# Everything artifact.json says about the set (method, config, seed, decode, storage, the
# protocol with MTT's learned step size, provenance) is sealed by a digest kept beside it, so
# an edit is caught like an edit of the tensors; only `metrics`, where evaluations are
# appended later, is left open.
_UNSEALED_META = ("metrics", "meta_sha256")


def _meta_digest(meta: dict[str, Any]) -> str:
    sealed = {key: value for key, value in meta.items() if key not in _UNSEALED_META}
    return hashlib.sha256(json.dumps(sealed, sort_keys=True).encode("utf-8")).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_artifact(
    folder: str | Path,
    tensors: dict[str, Tensor],
    *,
    method: str,
    config: dict[str, Any],
    seed: int,
    dataset: dict[str, Any],
    input_space: dict[str, Any],
    protocol: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    decode: dict[str, Any] | None = None,
) -> Path:
    """Write an artifact folder (created if needed) and return its path.

    Refuses tensors that hold NaN or infinity: a non-finite set is never written. `decode`
    records how the stored images decode to training images (parameterised sets).
    """
    folder = Path(folder)
    images = tensors["images_syn"]
    labels = tensors["labels_syn"]
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ArtifactError(f"refusing to save: tensor {name!r} holds NaN or infinity")
    num_classes = int(dataset["num_classes"])
    if images.shape[0] % num_classes:
        raise ArtifactError(
            f"{images.shape[0]} images cannot be split evenly over {num_classes} classes"
        )
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise ArtifactError(f"labels_syn must be ({images.shape[0]},) integers, got "
                            f"{tuple(labels.shape)} {labels.dtype}")
    if int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise ArtifactError(f"labels_syn outside 0..{num_classes - 1}")
    problems = decode_problems(decode, tuple(images.shape[1:]), tensors)
    if problems:
        raise ArtifactError("refusing to save: " + "; ".join(problems))
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    size_bytes = sum(t.numel() * t.element_size() for t in cpu.values())
    atomic_write(folder / TENSORS_FILE, lambda tmp: save_file(cpu, str(tmp)))
    meta = {
        "format": ARTIFACT_FORMAT,
        "created": timestamp(),
        "method": method,
        "config": config,
        "seed": seed,
        "ipc": images.shape[0] // num_classes,
        "decode": decode,
        "decoded_ipc": images.shape[0] // num_classes * decoded_per_image(decode),
        "num_classes": num_classes,
        "image_shape": list(images.shape[1:]),
        "labels": "soft" if "labels_soft" in cpu else "hard",
        "dataset": dataset,
        "input_space": input_space,
        "protocol": protocol,
        "versions": library_versions(),
        "metrics": metrics or {},
        "size_bytes": size_bytes,
        "storage_ipc": round(size_bytes / (num_classes * images[0].numel() * 4), 3),
        "tensors_sha256": _sha256(folder / TENSORS_FILE),
        **(extra or {}),
    }
    meta["meta_sha256"] = _meta_digest(meta)
    write_json(folder / META_FILE, meta)
    return folder


def is_artifact(folder: str | Path) -> bool:
    return (Path(folder) / META_FILE).is_file()


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / META_FILE
    if not folder.is_dir():
        raise ArtifactError(f"no artifact folder at {folder}")
    if not meta_path.is_file():
        raise ArtifactError(
            f"{folder} is not a distilled-set artifact: {META_FILE} is missing "
            f"(expected {META_FILE} and {TENSORS_FILE}, as written by `ddsuite distill`)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{meta_path} is not valid JSON ({exc}); the file is damaged") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_path} must hold a JSON object")
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{meta_path} has format {meta.get('format')!r}; this ddsuite reads {ARTIFACT_FORMAT!r}"
        )
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise ArtifactError(f"{meta_path} lacks required fields: {', '.join(missing)}")
    for key in ("ipc", "num_classes"):
        value = meta[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ArtifactError(f"{meta_path}: {key} must be a positive integer, got {value!r}")
    for key in ("dataset", "input_space", "protocol", "config"):
        if not isinstance(meta[key], dict):
            raise ArtifactError(f"{meta_path}: {key} must be a JSON object")
    if not isinstance(meta["dataset"].get("name"), str):
        raise ArtifactError(f"{meta_path}: dataset.name must be a string")
    zca = meta["input_space"].get("zca")
    if zca is not None and not (isinstance(zca, dict) and isinstance(
            zca.get("epsilon"), (int, float)) and not isinstance(zca.get("epsilon"), bool)):
        raise ArtifactError(f"{meta_path}: input_space.zca must be null or an object with a "
                            "numeric epsilon")
    if not isinstance(meta.get("metrics", {}), dict):
        raise ArtifactError(f"{meta_path}: metrics must be a JSON object")
    if "meta_sha256" not in meta:
        logger.warning("%s carries no meta_sha256 (written before ddsuite sealed artifact "
                       "descriptions, or the seal was removed): its fields cannot be checked; "
                       "re-distil or re-save the set to seal it", meta_path)
    elif meta["meta_sha256"] != _meta_digest(meta):
        raise ArtifactError(
            f"{meta_path} was edited after the artifact was written: its fields (everything "
            f"but metrics) no longer match its meta_sha256")
    return meta


def load_artifact(folder: str | Path, *, device: torch.device | str = "cpu") -> Artifact:
    """Load and verify an artifact folder; raises `ArtifactError` on any damage."""
    folder = Path(folder)
    meta = _read_meta(folder)
    tensors_path = folder / TENSORS_FILE
    if not tensors_path.is_file():
        raise ArtifactError(f"{tensors_path} is missing")
    if _sha256(tensors_path) != meta["tensors_sha256"]:
        raise ArtifactError(
            f"{tensors_path} does not match the checksum in {META_FILE}: the tensors were "
            "truncated, edited or replaced after the artifact was written"
        )
    try:
        tensors = load_file(str(tensors_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{tensors_path} cannot be read as safetensors: {exc}") from None
    for key in ("images_syn", "labels_syn"):
        if key not in tensors:
            raise ArtifactError(f"{tensors_path} lacks tensor {key!r}")
    images, labels = tensors["images_syn"], tensors["labels_syn"]
    expected = int(meta["num_classes"]) * int(meta["ipc"])
    if images.ndim != 4 or images.shape[0] != expected or labels.shape != (expected,):
        raise ArtifactError(
            f"tensor shapes {tuple(images.shape)} / {tuple(labels.shape)} do not match "
            f"{meta['num_classes']} classes x {meta['ipc']} ipc in {META_FILE}"
        )
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise ArtifactError(f"{tensors_path} holds non-finite or non-float pixels")
    problems = decode_problems(meta.get("decode"), tuple(images.shape[1:]), tensors)
    decoded_ipc = meta.get("decoded_ipc")
    if not problems and decoded_ipc is not None \
            and decoded_ipc != int(meta["ipc"]) * decoded_per_image(meta.get("decode")):
        problems.append(f"decoded_ipc {decoded_ipc!r} does not match ipc {meta['ipc']} and "
                        f"decode {meta.get('decode')!r}")
    if meta.get("labels", "hard") == "soft" and "labels_soft" not in tensors:
        problems.append('labels is "soft" but the tensors hold no labels_soft')
    if problems:
        raise ArtifactError(f"{folder / META_FILE}: " + "; ".join(problems))
    classes = int(meta["num_classes"])
    if labels.is_floating_point() or int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ArtifactError(f"{tensors_path}: labels_syn must be integers in 0..{classes - 1}")
    return Artifact(tensors=tensors, meta=meta, path=folder)


def update_metrics(folder: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge `metrics` into the artifact's metadata (atomic rewrite); returns the new meta."""
    folder = Path(folder)
    meta = _read_meta(folder)
    meta.setdefault("metrics", {}).update(metrics)
    write_json(folder / META_FILE, meta)
    return meta
