"""The learnable synthetic set, its initialisation, and the saved artifact."""

from .artifact import (
    ARTIFACT_FORMAT,
    META_FILE,
    TENSORS_FILE,
    Artifact,
    is_artifact,
    load_artifact,
    save_artifact,
    update_metrics,
)
from .decode import decode_set
from .syn_set import SyntheticSet

__all__ = [
    "ARTIFACT_FORMAT",
    "META_FILE",
    "TENSORS_FILE",
    "Artifact",
    "SyntheticSet",
    "decode_set",
    "is_artifact",
    "load_artifact",
    "save_artifact",
    "update_metrics",
]
