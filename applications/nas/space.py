"""The ConvNet search space as an NNI 3.0 `ModelSpace` whose samples are ddsuite specs.

Each dimension is an `nni.choice` labelled ``convnet/depth``, ``convnet/width``,
``convnet/norm``, ``convnet/act`` and ``convnet/pool``. A sampled model is this module,
re-created by NNI under the sample: it holds the candidate's spec string (`spec`) and the
network ddsuite builds from it (`network`), so every strategy and evaluator sees exactly the
network `build_model(spec)` gives. When the space is restricted to a list of candidates (a
sample of the 720), an NNI constraint rejects every other combination, so grid, random and
evolutionary strategies only ever propose listed candidates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import nni
import torch
from nni.mutable import ConstraintViolation, Sample, ensure_frozen
from nni.mutable.annotation import Constraint
from nni.nas.nn.pytorch import ModelSpace

from ddsuite.core.models import build_model

from .candidates import DIMENSIONS, FIELD_SPACE, ConvNetDims, convnet_spec, parse_candidate

__all__ = ["CandidateList", "ConvNetSpace", "candidate_of"]

_PREFIX = "convnet"


class CandidateList(Constraint):
    """An NNI constraint that admits only the listed ConvNet candidates."""

    def __init__(self, specs: Sequence[str], *, label: str = f"{_PREFIX}/candidates"):
        self.label = label
        self.allowed = frozenset(tuple(parse_candidate(s).values()) for s in specs)
        self._dims: list = []

    def bind(self, dims: list) -> None:
        """The dimension mutables (in `DIMENSIONS` order) the constraint reads."""
        self._dims = list(dims)

    def leaf_mutables(self, is_leaf):
        for mutable in self._dims:
            yield from mutable.leaf_mutables(is_leaf)
        yield self

    def check_contains(self, sample: Sample) -> ConstraintViolation | None:
        combo = tuple(sample.get(m.label) for m in self._dims)
        if combo not in self.allowed:
            return ConstraintViolation(f"{combo} is not one of the listed candidates")
        return None

    def extra_repr(self) -> str:
        return f"{len(self.allowed)} candidates, label={self.label!r}"


class ConvNetSpace(ModelSpace, label_prefix=_PREFIX):
    """The field's ConvNet space (720 networks by default) for one input size.

    Args:
        in_channels: channels of the images.
        num_classes: outputs of the classifier.
        image_size: ``(H, W)`` of the images.
        dims: the choices per dimension; default `FIELD_SPACE` (depth 1-4, width
            32/64/128/256, norm none/batch/layer/instance/group, act sigmoid/relu/leakyrelu,
            pool none/max/avg).
        candidates: restrict the space to these specs (each must lie in `dims`); None keeps
            every combination.

    Attributes:
        spec: the sampled candidate's spec (the default combination before sampling).
        network: the ddsuite network built from `spec` on the CPU.
    """

    def __init__(self, *, in_channels: int, num_classes: int, image_size: tuple[int, int],
                 dims: ConvNetDims = FIELD_SPACE, candidates: Sequence[str] | None = None):
        super().__init__()
        mutables = [self.add_mutable(nni.choice(name, list(dims.choices[name])))
                    for name in DIMENSIONS]
        if candidates is not None:
            constraint = CandidateList(candidates)
            constraint.bind(mutables)
            self.add_mutable(constraint)
        values = {name: ensure_frozen(m) for name, m in zip(DIMENSIONS, mutables)}
        self.spec = convnet_spec(**values)
        self.network = build_model(self.spec, in_channels=in_channels, num_classes=num_classes,
                                   image_size=tuple(image_size), device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def candidate_of(model: torch.nn.Module, sample: Sample | None = None) -> str:
    """The key of a sampled model: its ddsuite spec, or the class and sample of a user space."""
    spec = getattr(model, "spec", None)
    if isinstance(spec, str):
        return spec
    if sample:
        items = ",".join(f"{k}={v!r}" for k, v in sorted(sample.items()))
        return f"{type(model).__name__}({items})"
    digest = hashlib.sha256(str(model).encode()).hexdigest()[:12]
    return f"{type(model).__name__}#{digest}"
