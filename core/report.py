"""Markdown tables and summaries written into run folders and printed by the command line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_mean_std", "markdown_table"]


def format_mean_std(mean: float, std: float, digits: int = 1, *, n: int | None = None) -> str:
    """``mean ± std``; with `n` = 1 (one seed or network) there is no spread to show, and the
    text says so instead of printing ± 0."""
    if n == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table with padded columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells[1:]]
    return "\n".join(out)
