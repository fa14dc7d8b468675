"""Resolve a device name given on the command line or in a scenario (entry points only)."""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["device_problems", "resolve_device"]


def device_problems(name: object) -> list[str]:
    """Problems with a device name's form (not whether the device is present)."""
    allowed = "allowed: auto, cpu, cuda, cuda:N, mps"
    if not isinstance(name, str):
        return [f"device: expected a string, got {name!r}; {allowed}"]
    if name == "auto":
        return []
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return [f"device: {name!r} is not a device; {allowed}"]
    return []


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
