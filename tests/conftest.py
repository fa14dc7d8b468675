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


@pytest.fixture(scope="session")
def digits_splits():
    """The embedded digits set (10 classes of 1x8x8 images), loaded once; never mutate it."""
    from ddsuite.core.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session", autouse=True)
def torch_single_thread():
    """One intra-op thread for the whole suite, restored afterwards.

    On a small shared CPU, OpenMP's two threads contend with other processes and turn a
    millisecond ConvNet step into a third of a second; one thread keeps the tests fast and
    their floating-point results independent of the machine's load.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
