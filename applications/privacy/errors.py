"""The named errors of the privacy application.

Each one is a `ConfigError`, so a harness that reports every configuration problem at once
catches them with the rest; each message says what was received and how to fix it.
"""

from __future__ import annotations

from ddsuite.core.errors import ConfigError

__all__ = [
    "MembershipSplitError",
    "PrivacyBudgetError",
    "PrivateModelError",
    "UnaccountedReleaseError",
]


class PrivacyBudgetError(ConfigError):
    """An (epsilon, delta) target that is malformed or that no noise level can reach."""


class PrivateModelError(ConfigError):
    """A model that private training cannot use: BatchNorm (which mixes the examples of a
    batch) or another module Opacus cannot compute per-sample gradients for."""


class MembershipSplitError(ConfigError):
    """Member and non-member sets that overlap, or that the data cannot supply."""


class UnaccountedReleaseError(ConfigError):
    """A setting through which the private data would reach the output outside the
    accounted mechanism: a synthetic set started from real images, or inputs whitened by a
    ZCA transform fitted on the private images."""
