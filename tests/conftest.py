"""Shared fixtures: the offline real data in ../shared/data, and the embedded digits set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _require_shared(path: Path) -> Path:
    if path.exists():
        return path
    message = f"offline real data not found at {path} (see ../shared/data/README.md)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; under CI this data must be present")
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """The folder holding MNIST/raw and cifar10-jpeg.tar.gz; fails under CI when absent."""
    return _require_shared(SHARED_DATA)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cpu")
