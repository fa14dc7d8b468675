"""The named errors of ddsuite.

Every error says what was received, what is allowed, and how to fix it. They all derive from
`DDSuiteError`, so a caller can catch the whole family in one clause; each also derives from
the built-in exception a Python user would expect (`ValueError`, `KeyError`, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "ArtifactError",
    "ConfigError",
    "DDSuiteError",
    "DuplicateNameError",
    "ExpertTrajectoryError",
    "InputSpaceMismatchError",
    "IPCError",
    "MemoryEstimateError",
    "NonFiniteError",
    "UnknownNameError",
    "UnsupportedFeatureError",
]


class DDSuiteError(Exception):
    """Base class of every error ddsuite raises on purpose."""


class UnknownNameError(DDSuiteError, KeyError):
    """A name (dataset, model, method, scenario, ...) that no registry knows."""

    def __init__(self, kind: str, name: str, allowed: Iterable[str]):
        self.kind = kind
        self.name = name
        self.allowed = sorted(allowed)
        super().__init__(
            f"unknown {kind} {name!r}; allowed: {', '.join(self.allowed) or '(none registered)'}"
        )

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


class DuplicateNameError(DDSuiteError, ValueError):
    """A registration under a name that is already taken."""


class ConfigError(DDSuiteError, ValueError):
    """A configuration with one or more problems, all reported together."""

    def __init__(self, problems: Sequence[str], *, source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class IPCError(ConfigError):
    """Images per class that the dataset cannot supply (<= 0, or above a class's size)."""

    def __init__(self, message: str):
        super().__init__([message])


class UnsupportedFeatureError(DDSuiteError, ValueError):
    """A method or model asked for a feature it does not support."""


class NonFiniteError(DDSuiteError, FloatingPointError):
    """A loss, a pixel or a learned scalar became NaN or infinite during distillation."""

    def __init__(self, what: str, iteration: int, *, detail: str = ""):
        self.what = what
        self.iteration = iteration
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"non-finite {what} at iteration {iteration}{extra}; nothing was saved for this "
            "iteration and the last good checkpoint is kept. Lower the learning rate of the "
            "synthetic images or check the input normalisation."
        )


class ArtifactError(DDSuiteError, ValueError):
    """A distilled-set artifact that is missing, truncated, edited or of an unknown format."""


class InputSpaceMismatchError(DDSuiteError, ValueError):
    """A set evaluated under a different input space (normalisation, ZCA) than it was made in."""


class ExpertTrajectoryError(DDSuiteError, ValueError):
    """Expert trajectories that are missing, damaged, or made for another run.

    Raised when stored trajectories were trained on another dataset, with another model or in
    another input space than the distillation that wants them; the message names each
    mismatch.
    """


class MemoryEstimateError(DDSuiteError, MemoryError):
    """A configuration whose estimated peak memory exceeds what the device has free.

    Raised before any work starts; the message gives the estimate, what is available, and
    the options that lower the estimate.
    """
