"""Differentially private distillation accounted by Opacus, a DP-SGD baseline, and
membership-inference audits.

Importing this package registers the private distillers "dp-dm" and "dp-dc"; Opacus itself is
imported only when a private run or an accountant is used.
"""

from .accounting import ACCOUNTANTS, PrivacyPlan, budget_problems, plan_privacy, spent_epsilon
from .distillers import DPDCConfig, DPDMConfig, PrivateDC, PrivateDM
from .errors import (
    MembershipSplitError,
    PrivacyBudgetError,
    PrivateModelError,
    UnaccountedReleaseError,
)
from .mechanism import clip_per_sample, noisy_class_sums, poisson_sample
from .models import check_private_model, fix_private_model

__all__ = [
    "ACCOUNTANTS",
    "DPDCConfig",
    "DPDMConfig",
    "MembershipSplitError",
    "PrivacyBudgetError",
    "PrivacyPlan",
    "PrivateDC",
    "PrivateDM",
    "PrivateModelError",
    "UnaccountedReleaseError",
    "budget_problems",
    "check_private_model",
    "clip_per_sample",
    "fix_private_model",
    "noisy_class_sums",
    "plan_privacy",
    "poisson_sample",
    "spent_epsilon",
]
