"""Provenance stamped on every artifact, result and report: versions and time."""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata

__all__ = ["library_versions", "timestamp"]

_PACKAGES = ("ddsuite", "torch", "torchvision", "numpy", "safetensors")


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of ddsuite and the libraries its numbers depend on."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES + extra:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def timestamp() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
