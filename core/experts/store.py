"""Stored expert trajectories: safetensors per expert, one JSON of metadata, validated loads."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_write, write_json
from ..data import DatasetIdentity, InputSpace
from ..errors import ExpertTrajectoryError
from ..models import parse_model_spec
from ..provenance import library_versions, timestamp

__all__ = [
    "EXPERTS_FORMAT",
    "META_FILE",
    "ExpertSpec",
    "ExpertTrajectories",
    "default_experts_dir",
    "expert_key",
    "load_experts",
    "save_experts",
]

logger = logging.getLogger(__name__)

EXPERTS_FORMAT = "ddsuite.expert-trajectories/1"
META_FILE = "experts.json"
TRAJECTORY_TENSOR = "trajectory"


@dataclass(frozen=True, kw_only=True)
class ExpertSpec:
    """How experts are trained; MTT's published settings are the defaults.

    Attributes:
        model: the model spec (e.g. ``"convnet"``); students use the same architecture.
        epochs: training epochs; ``epochs + 1`` snapshots are kept (the initialisation, then
            one after every epoch).
        num_experts: independent networks, each from its own seed.
        lr: SGD learning rate (MTT: 0.01).
        momentum: SGD momentum (MTT: 0).
        weight_decay: L2 weight decay (MTT: 0).
        batch_size: real images per SGD step (MTT: 256).
        augmentation: DSA strategy applied to every real batch, or ``"none"``.
        seed: expert ``i`` is initialised and shuffled from a seed derived from this one.
    """

    model: str
    epochs: int = 50
    num_experts: int = 100
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    augmentation: str = "none"
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        for name in ("epochs", "num_experts", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"expert {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            out.append(f"expert lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            out.append(f"expert momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            out.append(f"expert weight_decay must be >= 0, got {self.weight_decay}")
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = str(parse_model_spec(self.model))
        return data


def expert_key(spec: ExpertSpec, *, dataset: DatasetIdentity, input_space: InputSpace) -> str:
    """The cache key: sha256 over the dataset, its input space and every training setting."""
    payload = {
        "format": EXPERTS_FORMAT,
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint},
        "input_space": input_space.to_dict(),
        "spec": spec.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_experts_dir() -> Path:
    """``$XDG_CACHE_HOME/ddsuite/experts``, by default ``~/.cache/ddsuite/experts``."""
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "ddsuite" / "experts"


@dataclass
class ExpertTrajectories:
    """Expert trajectories, in memory or in a verified folder.

    Attributes:
        meta: the metadata (the content of ``experts.json``).
        folder: where the tensors live, or None when they are held in memory.
        trajectories: in memory only: one (epochs + 1, num_params) tensor per expert.
    """

    meta: dict[str, Any]
    folder: Path | None = None
    trajectories: list[Tensor] | None = None

    @property
    def num_experts(self) -> int:
        return int(self.meta["spec"]["num_experts"])

    @property
    def epochs(self) -> int:
        return int(self.meta["spec"]["epochs"])

    @property
    def num_params(self) -> int:
        return int(self.meta["num_params"])

    @property
    def param_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of each parameter, in the order of the flat vector."""
        return [(name, tuple(shape)) for name, shape in self.meta["params"]]

    def snapshot(self, *, expert: int, epoch: int, device: torch.device | str) -> Tensor:
        """Flat parameters (num_params,) of `expert` after `epoch` epochs (0: at init)."""
        if not 0 <= expert < self.num_experts or not 0 <= epoch <= self.epochs:
            raise IndexError(f"expert {expert} epoch {epoch} outside 0..{self.num_experts - 1}"
                             f" x 0..{self.epochs}")
        if self.trajectories is not None:
            return self.trajectories[expert][epoch].to(device)
        assert self.folder is not None
        path = self.folder / self.meta["files"][expert]["name"]
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            row = handle.get_slice(TRAJECTORY_TENSOR)[epoch]
        return row.to(device)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_meta(spec: ExpertSpec, *, dataset: DatasetIdentity, input_space: InputSpace,
               params: list[tuple[str, tuple[int, ...]]],
               metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata of trajectories trained with `spec` (everything but the file list)."""
    return {
        "format": EXPERTS_FORMAT,
        "created": timestamp(),
        "key": expert_key(spec, dataset=dataset, input_space=input_space),
        "dataset": dataset.to_dict(),
        "input_space": input_space.to_dict(),
        "model": str(parse_model_spec(spec.model)),
        "spec": spec.to_dict(),
        "augmentation": spec.augmentation,
        "optimizer": {"name": "sgd", "lr": spec.lr, "momentum": spec.momentum,
                      "weight_decay": spec.weight_decay, "batch_size": spec.batch_size},
        "seed": spec.seed,
        "epochs": spec.epochs,
        "params": [[name, list(shape)] for name, shape in params],
        "num_params": sum(_numel(shape) for _, shape in params),
        "versions": library_versions(),
        "metrics": metrics or {},
    }


def _numel(shape: tuple[int, ...] | list[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def save_experts(folder: str | Path, trajectories: list[Tensor], meta: dict[str, Any]) -> Path:
    """Write one safetensors file per expert, then `experts.json` (each atomically).

    The metadata is written last and records every file's sha256, so a folder whose
    metadata exists is complete.
    """
    folder = Path(folder)
    files = []
    for i, trajectory in enumerate(trajectories):
        if not torch.isfinite(trajectory).all():
            raise ExpertTrajectoryError(f"refusing to save: expert {i} holds NaN or infinity")
        name = f"expert_{i:03d}.safetensors"
        tensors = {TRAJECTORY_TENSOR: trajectory.detach().float().cpu().contiguous()}
        atomic_write(folder / name, lambda tmp, t=tensors: save_file(t, str(tmp)))
        files.append({"name": name, "sha256": _sha256(folder / name)})
    write_json(folder / META_FILE, {**meta, "files": files})
    logger.info("stored %d expert trajectories in %s", len(trajectories), folder)
    return folder


def _mismatches(meta: dict[str, Any], *, dataset: DatasetIdentity | None,
                input_space: InputSpace | None, model: str | None) -> list[str]:
    """Plain-words differences between what the trajectories were made with and this run."""
    found = []
    if dataset is not None:
        theirs = meta["dataset"]
        if theirs.get("name") != dataset.name:
            found.append(f"dataset: made on {theirs.get('name')!r}, this run uses "
                         f"{dataset.name!r}")
        elif theirs.get("fingerprint") != dataset.fingerprint:
            found.append(f"dataset: {dataset.name!r} with fingerprint "
                         f"{str(theirs.get('fingerprint'))[:12]}..., this run's data has "
                         f"{dataset.fingerprint[:12]}... (other pixels or labels)")
    if model is not None:
        ours = str(parse_model_spec(model))
        if meta.get("model") != ours:
            found.append(f"model: made with {meta.get('model')!r}, this run uses {ours!r}")
    if input_space is not None:
        try:
            found += [f"input space: {d}" for d in input_space.differences(meta["input_space"])]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            found.append(f"input space: the stored description is malformed ({exc!r})")
    return found


def load_experts(folder: str | Path, *, dataset: DatasetIdentity | None = None,
                 input_space: InputSpace | None = None,
                 model: str | None = None) -> ExpertTrajectories:
    """Open and verify stored trajectories; refuse those made for another run.

    Args:
        folder: a folder written by `save_experts`.
        dataset, input_space, model: what this run uses; each one given is compared with
            what the trajectories were made with.

    Raises:
        ExpertTrajectoryError: the folder is missing or damaged (bad JSON, unknown format,
            missing file, checksum or shape mismatch, non-finite values), or the trajectories
            were made on another dataset, with another model or in another input space (every
            mismatch is named).
    """
    folder = Path(folder).expanduser()
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ExpertTrajectoryError(f"no expert trajectories at {folder} ({META_FILE} is "
                                    "missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExpertTrajectoryError(f"{meta_path} is unreadable ({exc}); delete {folder} to "
                                    "train the experts again") from None
    required = ("format", "dataset", "input_space", "model", "spec", "params", "num_params",
                "files")
    if not isinstance(meta, dict) or meta.get("format") != EXPERTS_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExpertTrajectoryError(f"{meta_path} has format {found!r}; this ddsuite reads "
                                    f"{EXPERTS_FORMAT!r}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ExpertTrajectoryError(f"{meta_path} lacks fields: {', '.join(missing)}")
    mismatches = _mismatches(meta, dataset=dataset, input_space=input_space, model=model)
    if mismatches:
        raise ExpertTrajectoryError(
            f"the expert trajectories in {folder} were made for another run: "
            + "; ".join(mismatches)
            + ". Use trajectories trained for this dataset, model and input space (or let "
            "the distiller train them in another experts_dir)")

    experts = ExpertTrajectories(meta=meta, folder=folder)
    files = meta["files"]
    if not isinstance(files, list) or len(files) != experts.num_experts:
        raise ExpertTrajectoryError(f"{meta_path} lists {len(files)} files for "
                                    f"{experts.num_experts} experts")
    if sum(_numel(shape) for _, shape in experts.param_layout) != experts.num_params:
        raise ExpertTrajectoryError(f"{meta_path}: the parameter shapes do not add up to "
                                    f"num_params {experts.num_params}")
    expected = (experts.epochs + 1, experts.num_params)
    for entry in files:
        path = folder / str(entry.get("name", ""))
        if path.parent != folder or not path.is_file():
            raise ExpertTrajectoryError(f"expert file {entry.get('name')!r} is missing in "
                                        f"{folder}")
        if _sha256(path) != entry.get("sha256"):
            raise ExpertTrajectoryError(f"{path} does not match the checksum in {META_FILE}: "
                                        "it was truncated, edited or replaced; delete "
                                        f"{folder} to train the experts again")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(TRAJECTORY_TENSOR)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ExpertTrajectoryError(f"{path} cannot be read as safetensors: {exc}") from None
        if tuple(tensor.shape) != expected or not torch.isfinite(tensor).all():
            raise ExpertTrajectoryError(f"{path} holds a {tuple(tensor.shape)} trajectory "
                                        f"(expected finite {expected})")
    return experts
