"""Rank correlations between a proxy's scores and the real accuracies, ties handled.

- Spearman's rho: the Pearson correlation of the average ranks (tied values share the mean of
  the ranks they span).
- Kendall's tau-b: ``(concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y))`` over all
  ``n0 = n (n - 1) / 2`` pairs, where ``ties_x`` counts the pairs tied in x.

Both return None when the correlation is undefined (fewer than two values, or one side
constant), so a report never shows a NaN as if it were a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["average_ranks", "kendall", "spearman", "top_k_spearman"]


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of `values` (ascending), ties sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        shared = (start + stop) / 2 + 1  # mean of the 1-based ranks start+1..stop+1
        for i in order[start:stop + 1]:
            ranks[i] = shared
        start = stop + 1
    return ranks


def _check(x: Sequence[float], y: Sequence[float]) -> None:
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if any(not math.isfinite(v) for v in (*x, *y)):
        raise ValueError("rank correlations take finite values only; drop failed candidates")


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation with average ranks for ties; None when undefined."""
    _check(x, y)
    if len(x) < 2:
        return None
    rx = torch.tensor(average_ranks(x), dtype=torch.float64)
    ry = torch.tensor(average_ranks(y), dtype=torch.float64)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denominator = float((dx.square().sum() * dy.square().sum()).sqrt())
    if denominator == 0.0:
        return None
    return float((dx * dy).sum()) / denominator


def kendall(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b (ties in either variable handled); None when undefined."""
    _check(x, y)
    n = len(x)
    if n < 2:
        return None
    tx = torch.tensor(list(x), dtype=torch.float64)
    ty = torch.tensor(list(y), dtype=torch.float64)
    i, j = torch.triu_indices(n, n, offset=1)  # every unordered pair once
    sx = torch.sign(tx[i] - tx[j])
    sy = torch.sign(ty[i] - ty[j])
    pairs = n * (n - 1) / 2
    untied_x = pairs - float((sx == 0).sum())
    untied_y = pairs - float((sy == 0).sum())
    if untied_x == 0 or untied_y == 0:
        return None
    return float((sx * sy).sum()) / math.sqrt(untied_x * untied_y)


def top_k_spearman(real: Sequence[float], proxy: Sequence[float], k: int) -> float | None:
    """Spearman's rho over the `k` candidates with the highest real accuracy.

    Candidates tied on real accuracy at the cut keep their given order. None when fewer than
    `k` candidates are given or the correlation is undefined on them.
    """
    if len(real) < k:
        return None
    best = sorted(range(len(real)), key=lambda i: -real[i])[:k]
    return spearman([real[i] for i in best], [proxy[i] for i in best])
