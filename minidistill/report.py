"""Results tables: mean ± std over seeds, next to the papers' reported numbers."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["mean_std", "format_mean_std", "results_table"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``'88.50 ± 0.20 (n=3)'``; a single value prints without ± and says n=1."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={len(values)})" if len(values) > 1 else f"{m:.{digits}f} (n=1)"


def results_table(
    rows: Mapping[str, Sequence[float]],
    ours: str = "ours",
    reported: Mapping[str, Mapping[str, str]] | None = None,
    digits: int = 2,
) -> str:
    """A Markdown table: one row per method, our mean ± std, then one column per source of
    reported numbers (``{source: {method: text}}``; '–' where a source has no number)."""
    reported = reported or {}
    header = ["method", ours, *reported]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, values in rows.items():
        cells = [method, format_mean_std(values, digits), *(src.get(method, "–") for src in reported.values())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
