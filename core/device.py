"""Resolve a device name given on the command line or in a scenario (entry points only)."""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when present, else CPU; "cpu", "cuda", "cuda:N", "mps" as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError([f"device {name!r} is not a device; allowed: auto, cpu, cuda, "
                           "cuda:N, mps"]) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"device {name!r} was asked for but CUDA is not available here; "
                           "use --device cpu or auto"])
    return device
