"""Membership-inference audits: disjoint member / non-member splits, the loss-threshold and
offline LiRA attacks, and their metrics with bootstrap confidence intervals.

Offline LiRA (Carlini et al., S&P 2022) needs only shadow models that never saw the audited
examples: the shadows are trained by the target's own pipeline on random subsets of a
shadow pool disjoint from both members and non-members. For each audited example the
shadows' logit-scaled confidences fit a Gaussian of "out" behaviour; an example is scored by
how far above it the target's confidence lies. With few shadows (the CPU setting) a
variance pooled over all examples is steadier than per-example variances and is the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MembershipSplitError

__all__ = [
    "ATTACKS",
    "MembershipSplit",
    "attack_metrics",
    "best_threshold",
    "check_disjoint",
    "example_losses",
    "lira_offline_scores",
    "logit_confidence",
    "make_membership_split",
    "roc_points",
]

ATTACKS = ("loss", "lira")


def check_disjoint(members: Tensor, non_members: Tensor, *, shadow_pool: Tensor | None = None
                   ) -> None:
    """Raise `MembershipSplitError` when the member, non-member (and shadow) index sets share
    an example, or repeat one."""
    problems = []
    parts = {"members": members, "non-members": non_members}
    if shadow_pool is not None:
        parts["shadow pool"] = shadow_pool
    for name, index in parts.items():
        if index.numel() != index.unique().numel():
            problems.append(f"{name} list an example more than once")
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = np.intersect1d(parts[a].cpu().numpy(), parts[b].cpu().numpy())
            if shared.size:
                problems.append(
                    f"{a} and {b} share {shared.size} example(s) (e.g. index "
                    f"{', '.join(map(str, shared[:5]))}); an audit needs disjoint sets, or a "
                    "member counts as a non-member; draw them from disjoint index ranges "
                    "(make_membership_split does)")
    if problems:
        raise MembershipSplitError(problems, source="membership split")


@dataclass(frozen=True)
class MembershipSplit:
    """Disjoint indices into the real training split.

    members train the target; non-members are audited against them; shadows are trained
    on random subsets of the shadow pool, which holds neither.
    """

    members: Tensor
    non_members: Tensor
    shadow_pool: Tensor
    seed: int

    def __post_init__(self) -> None:
        check_disjoint(self.members, self.non_members, shadow_pool=self.shadow_pool)

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "members": self.members.tolist(),
                "non_members": self.non_members.tolist(),
                "shadow_pool": self.shadow_pool.tolist()}


def make_membership_split(n: int, *, members: int, non_members: int, seed: int
                          ) -> MembershipSplit:
    """A random disjoint split of n examples: `members`, `non_members`, the rest the pool.

    Raises:
        MembershipSplitError: the sizes exceed n, or leave no shadow pool of the members'
            size (each shadow trains on as many examples as the target).
    """
    problems = []
    if members < 1 or non_members < 1:
        problems.append(f"members and non_members must be >= 1, got {members} and "
                        f"{non_members}")
    pool = n - members - non_members
    if pool < members:
        problems.append(f"{members} members + {non_members} non-members leave {max(pool, 0)} "
                        f"of the {n} training examples for the shadow pool, fewer than the "
                        f"{members} each shadow trains on; use at most {n // 3} members and "
                        "as many non-members")
    if problems:
        raise MembershipSplitError(problems, source="membership split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return MembershipSplit(members=order[:members].sort().values,
                           non_members=order[members:members + non_members].sort().values,
                           shadow_pool=order[members + non_members:].sort().values, seed=seed)


@torch.no_grad()
def _logits(forward: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
    return torch.cat([forward(images[lo:lo + batch_size]).float()
                      for lo in range(0, images.shape[0], batch_size)])


def example_losses(forward: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, *,
                   batch_size: int = 1024) -> Tensor:
    """Cross-entropy of each example, (N,), on the CPU."""
    logits = _logits(forward, images, batch_size)
    return F.cross_entropy(logits, labels, reduction="none").cpu()


def logit_confidence(forward: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, *,
                     batch_size: int = 1024) -> Tensor:
    """LiRA's statistic log(p_y / (1 - p_y)), computed stably from the logits, (N,)."""
    logits = _logits(forward, images, batch_size)
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), -math.inf).logsumexp(dim=1)
    return (true - others).cpu()


def lira_offline_scores(target: Tensor, shadows: Tensor, *, global_variance: bool = True
                        ) -> Tensor:
    """Offline LiRA scores: (target - mean_out) / std_out per example.

    Args:
        target: (N,) the target model's logit-scaled confidences.
        shadows: (S, N) the same for S shadows that never trained on these examples.
        global_variance: pool the variance over examples (steadier for small S).
    """
    mean = shadows.mean(dim=0)
    if global_variance or shadows.shape[0] < 2:
        std = (shadows - mean).pow(2).mean().sqrt().expand_as(mean)
    else:
        std = shadows.std(dim=0)
    return (target - mean) / (std + 1e-8)


def roc_points(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the threshold attack "member when score >= t", over all t."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(is_member, scores)
    return fpr, tpr


def _curve_metrics(scores: np.ndarray, is_member: np.ndarray,
                   fprs: Sequence[float]) -> dict[str, float]:
    """AUC and TPR at each FPR: read off the ROC curve of all the given examples."""
    from sklearn.metrics import roc_auc_score

    fpr, tpr = roc_points(scores, is_member)
    out = {"auc": float(roc_auc_score(is_member, scores))}
    for limit in fprs:
        out[f"tpr_at_{limit:g}_fpr"] = float(tpr[fpr <= limit].max(initial=0.0))
    return out


def best_threshold(scores: np.ndarray, is_member: np.ndarray) -> float:
    """The threshold t of "member when score >= t" with the highest balanced accuracy on
    these examples (the highest such t on ties; +inf, "nobody is a member", at worst)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(is_member, scores)
    return float(thresholds[int(np.argmax(tpr - fpr))])


def _balanced_accuracy(scores: np.ndarray, is_member: np.ndarray, threshold: float) -> float:
    guess = scores >= threshold
    return float((guess[is_member].mean() + (~guess[~is_member]).mean()) / 2)


def _halves(index: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random split of `index` into two halves (the second gets the odd one out)."""
    order = rng.permutation(index)
    return order[:index.size // 2], order[index.size // 2:]


def attack_metrics(scores: Tensor | np.ndarray, is_member: Tensor | np.ndarray, *,
                   fprs: Sequence[float] = (0.001, 0.01), bootstrap: int = 200,
                   confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """AUC, held-out balanced accuracy and TPR at each FPR, with bootstrap intervals.

    AUC and the TPRs are read off the ROC curve of all members and non-members; for the
    intervals, members and non-members are resampled separately (with replacement)
    `bootstrap` times and each interval is the central `confidence` percentile range. A TPR
    at an FPR below 1 / non-members is the TPR with no false positive at all;
    `fpr_resolution` says so.

    The balanced accuracy is not the best one over all thresholds, which on the same data is
    biased upwards (above 0.5 even for scores that carry no signal). Members and
    non-members are each split at random (by `seed`) into two halves: the threshold with the
    best balanced accuracy on the first halves is fixed, and the balanced accuracy reported
    is that threshold's on the second halves, whose bootstrap gives its interval.

    Raises:
        MembershipSplitError: fewer than 2 members or 2 non-members (each half needs one),
            or `bootstrap` < 1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member).astype(bool)
    members, non_members = np.flatnonzero(is_member), np.flatnonzero(~is_member)
    problems = []
    if members.size < 2 or non_members.size < 2:
        problems.append(f"an audit needs at least 2 members and 2 non-members (the balanced "
                        f"accuracy picks its threshold on one half of each and measures it on "
                        f"the other), got {members.size} and {non_members.size}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 1:
        problems.append(f"bootstrap must be an integer >= 1, got {bootstrap!r}")
    if problems:
        raise MembershipSplitError(problems, source="attack metrics")
    rng = np.random.default_rng(seed)

    # Threshold from the first halves; balanced accuracy on the second halves only.
    fit_members, held_members = _halves(members, rng)
    fit_non, held_non = _halves(non_members, rng)
    fit = np.concatenate([fit_members, fit_non])
    threshold = best_threshold(scores[fit], is_member[fit])
    held = np.concatenate([held_members, held_non])

    point = {**_curve_metrics(scores, is_member, fprs),
             "balanced_accuracy": _balanced_accuracy(scores[held], is_member[held], threshold)}
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(bootstrap):
        index = np.concatenate([rng.choice(members, members.size),
                                rng.choice(non_members, non_members.size)])
        for key, value in _curve_metrics(scores[index], is_member[index], fprs).items():
            draws[key].append(value)
        index = np.concatenate([rng.choice(held_members, held_members.size),
                                rng.choice(held_non, held_non.size)])
        draws["balanced_accuracy"].append(
            _balanced_accuracy(scores[index], is_member[index], threshold))
    tail = (1 - confidence) / 2 * 100
    out: dict[str, Any] = {}
    for key, value in point.items():
        low, high = np.percentile(draws[key], [tail, 100 - tail])
        out[key] = {"value": value, "ci_low": float(low), "ci_high": float(high)}
    out["balanced_accuracy"].update(
        threshold=threshold if math.isfinite(threshold) else None,  # inf: no one is in
        threshold_members=int(fit_members.size),
        threshold_non_members=int(fit_non.size), held_out_members=int(held_members.size),
        held_out_non_members=int(held_non.size))
    out["members"] = int(members.size)
    out["non_members"] = int(non_members.size)
    out["fpr_resolution"] = 1 / max(1, non_members.size)
    out["bootstrap"] = bootstrap
    out["confidence"] = confidence
    return out
