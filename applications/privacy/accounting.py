"""Privacy accounting by Opacus: from an (epsilon, delta) target to a noise multiplier, and
back from the noise actually added to the epsilon actually spent.

Every private mechanism in this package is a subsampled Gaussian mechanism: at each step every
real example is included independently with probability `sample_rate` (Poisson sampling), the
included examples' clipped contributions are summed, and Gaussian noise of standard deviation
`noise_multiplier * clip_norm` is added to the sum. Opacus's accountants compose such steps;
ddsuite never does the privacy arithmetic itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import PrivacyBudgetError

__all__ = [
    "ACCOUNTANTS",
    "PrivacyPlan",
    "budget_problems",
    "clip_norm_problems",
    "epsilon_problems",
    "plan_privacy",
    "spent_epsilon",
]

ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants a run may choose: Renyi DP (the default) and the PRV accountant."""

# Opacus's own search gives up above this noise multiplier (opacus.accountants.utils).
_MAX_NOISE_MULTIPLIER = 1e6


@dataclass(frozen=True)
class PrivacyPlan:
    """The privacy of a run: what was asked, what noise answers it, what is spent.

    `epsilon` is the accountant's epsilon after `steps` steps of the subsampled Gaussian
    mechanism with this noise multiplier and sample rate; it is never above
    `target_epsilon`, and it is what a report must quote.
    """

    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    clip_norm: float
    epsilon: float
    target_epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def budget_problems(*, epsilon: float | None, delta: float, dataset_size: int | None = None,
                    accountant: str = "rdp") -> list[str]:
    """Every problem with a privacy budget (empty when valid).

    Args:
        epsilon: the target epsilon (None when the noise multiplier is given instead).
        delta: the target delta.
        dataset_size: n, the number of private examples; delta must stay below 1/n, or the
            guarantee allows publishing an example outright.
        accountant: the accountant's name.
    """
    out = [] if epsilon is None else epsilon_problems(epsilon)
    if not 0 < delta < 1:
        out.append(f"delta must lie in (0, 1), got {delta!r}; the usual choice is below 1/n, "
                   "e.g. 1e-5 for 60,000 examples")
    elif dataset_size is not None and delta >= 1 / dataset_size:
        out.append(f"delta {delta:g} is not below 1/n = {1 / dataset_size:.3g} for n = "
                   f"{dataset_size} private examples: at that delta the mechanism may publish "
                   f"an example in the clear; choose delta < {1 / dataset_size:.3g}, e.g. "
                   f"{_round_down(0.1 / dataset_size):g}")
    if accountant not in ACCOUNTANTS:
        out.append(f"accountant {accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
    return out


def epsilon_problems(epsilon: float) -> list[str]:
    """The problem with a target epsilon, if any (it must be a finite number > 0)."""
    if isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) \
            and math.isfinite(epsilon) and epsilon > 0:
        return []
    return [f"epsilon must be a finite number > 0, got {epsilon!r}; epsilon 0 means no "
            "information at all may be released, which no noise achieves"]


def clip_norm_problems(clip_norm: float, *, name: str = "clip_norm") -> list[str]:
    """The problem with a clip norm, if any: it must be a finite number > 0, since the
    noise is scaled by it (an infinite bound clips nothing and makes the noise infinite)."""
    if isinstance(clip_norm, (int, float)) and not isinstance(clip_norm, bool) \
            and math.isfinite(clip_norm) and clip_norm > 0:
        return []
    return [f"{name} must be a finite number > 0, got {clip_norm!r}; it bounds each "
            "example's contribution and scales the noise, e.g. 1.0"]


def _round_down(x: float) -> float:
    """The largest 1eK at or below x (a tidy delta to suggest)."""
    return 10 ** math.floor(math.log10(x))


def _accountant(name: str, noise_multiplier: float, sample_rate: float, steps: int):
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=name)
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return accountant


def spent_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """The epsilon Opacus's accountant reports after `steps` subsampled Gaussian steps.

    For PRV this is the accountant's upper bound, as Opacus returns it. Zero steps spend
    nothing.
    """
    if steps == 0:
        return 0.0
    if not noise_multiplier > 0:
        return math.inf
    return float(_accountant(accountant, noise_multiplier, sample_rate, steps)
                 .get_epsilon(delta=delta))


def plan_privacy(*, delta: float, sample_rate: float, steps: int, clip_norm: float,
                 target_epsilon: float | None = None, noise_multiplier: float | None = None,
                 accountant: str = "rdp", dataset_size: int | None = None) -> PrivacyPlan:
    """Fix the noise of a run: from a target epsilon, or from a given noise multiplier.

    With `target_epsilon`, Opacus's `get_noise_multiplier` finds the smallest noise (within
    its tolerance) whose spent epsilon does not exceed the target; the plan's `epsilon` is
    the accountant's value for that noise, at or below the target.

    Raises:
        PrivacyBudgetError: a malformed budget, delta >= 1/n, or a target that no noise
            multiplier reaches in `steps` steps at this sample rate (the message gives the
            smallest epsilon that is reachable and what to change).
    """
    problems = budget_problems(epsilon=target_epsilon, delta=delta, dataset_size=dataset_size,
                               accountant=accountant)
    if (target_epsilon is None) == (noise_multiplier is None):
        problems.append("give exactly one of a target epsilon and a noise multiplier")
    if noise_multiplier is not None and not (math.isfinite(noise_multiplier)
                                             and noise_multiplier > 0):
        problems.append(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not 0 < sample_rate <= 1:
        problems.append(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        problems.append(f"steps must be an integer >= 1, got {steps!r}")
    problems.extend(clip_norm_problems(clip_norm))
    if problems:
        raise PrivacyBudgetError(problems, source="privacy budget")

    if noise_multiplier is None:
        noise_multiplier = _noise_for_target(target_epsilon, delta=delta,
                                             sample_rate=sample_rate, steps=steps,
                                             accountant=accountant)
    epsilon = spent_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                            steps=steps, delta=delta, accountant=accountant)
    return PrivacyPlan(accountant=accountant, noise_multiplier=float(noise_multiplier),
                       sample_rate=float(sample_rate), steps=steps, delta=float(delta),
                       clip_norm=float(clip_norm), epsilon=epsilon,
                       target_epsilon=target_epsilon)


def _noise_for_target(target_epsilon: float, *, delta: float, sample_rate: float, steps: int,
                      accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    floor = spent_epsilon(noise_multiplier=_MAX_NOISE_MULTIPLIER, sample_rate=sample_rate,
                          steps=steps, delta=delta, accountant=accountant)
    if floor > target_epsilon:
        raise PrivacyBudgetError([
            f"target epsilon {target_epsilon:g} cannot be reached at delta {delta:g} with "
            f"{steps} steps at sample rate {sample_rate:.4g}: even noise multiplier "
            f"{_MAX_NOISE_MULTIPLIER:g} spends epsilon {floor:.4g} by the {accountant} "
            f"accountant; raise epsilon above {floor:.3g}, raise delta, or use the other "
            f"accountant ({', '.join(a for a in ACCOUNTANTS if a != accountant)})"
        ], source="privacy budget")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))
