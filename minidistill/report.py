"""Results tables: mean ± std over seeds, next to the papers' reported numbers.

Two formatters for every chapter: :func:`results_table` (one number per run, our column
beside the papers' columns) and :func:`metrics_table` (several metrics per run, one column
each). Both return Markdown text; a chapter shows its table with :func:`show_results`, which
also stores it for the book's results page -- without needing the book's packages, so the
same cell runs on Colab and on a bare GPU machine.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence, Union

__all__ = ["mean_std", "format_mean_std", "results_table", "metrics_table", "show_results", "GLUE_PREFIX"]

#: the MIME prefix under which myst-nb's ``glue(..., display=False)`` stores a value in a cell's outputs
GLUE_PREFIX = "application/papermill.record/"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (Sequence, Iterable)):
        raise TypeError(f"values must be a sequence of numbers, got {type(values).__name__}")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise TypeError(f"values must be numbers ({e})") from e
    if not values:
        raise ValueError("mean_std needs at least one value")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"mean_std needs finite values, got {values} (a diverged run? drop or fix it)")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _check_digits(digits: object) -> None:
    if not isinstance(digits, int) or isinstance(digits, bool) or not 0 <= digits <= 10:
        raise ValueError(f"digits must be an int from 0 to 10, got {digits!r}")


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``'88.50 ± 0.20 (n=3)'``; a single value prints without ± and says n=1."""
    _check_digits(digits)
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
    if not isinstance(rows, Mapping):
        raise TypeError(f"rows must map each method to its values, got {type(rows).__name__}")
    reported = reported or {}
    if not isinstance(reported, Mapping) or not all(isinstance(v, Mapping) for v in reported.values()):
        raise TypeError("reported must map each source to {method: text}, e.g. "
                        "{'Hinton et al. (2015), Table 1': {'KD': '...'}}")
    header = ["method", ours, *reported]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, values in rows.items():
        cells = [method, format_mean_std(values, digits), *(src.get(method, "–") for src in reported.values())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


Column = Union[str, tuple]


def metrics_table(
    rows: Mapping[str, Sequence[Mapping[str, float]]],
    columns: Mapping[str, Column] | Sequence[str],
    *,
    digits: int = 2,
    first: str = "method",
    extra: Mapping[str, Mapping[str, str]] | None = None,
    cell: Callable[[str, list[float]], str | None] | None = None,
) -> str:
    """A Markdown table, one row per method and one column per metric: each cell is the mean ±
    std over the method's runs (``rows[method]`` is a list of score dicts, one per seed).

    ``columns`` maps a score key to its header, or to ``(header, scale, digits)`` (``scale``
    multiplies the values, e.g. 100 for a fraction shown in %); a plain sequence of keys uses
    the keys as headers. ``extra`` adds text columns before the metrics (``{header: {method:
    text}}``, e.g. parameter counts). ``cell(key, values)`` may return the text of a cell to
    override the default (``None`` keeps it). A method without a key shows '–'.
    """
    if not isinstance(rows, Mapping) or not all(
            isinstance(r, Sequence) and not isinstance(r, (str, Mapping)) for r in rows.values()):
        raise TypeError("rows must map each method to a list of score dicts (one per run)")
    if isinstance(columns, (str, bytes)):
        raise TypeError(f"columns must be a sequence of keys or a mapping, not the string {columns!r} "
                        f"(write [{columns!r}])")
    _check_digits(digits)
    for k, v in (columns.items() if isinstance(columns, Mapping) else ()):
        if not isinstance(v, str) and (not isinstance(v, (tuple, list)) or not 1 <= len(v) <= 3
                                       or not isinstance(v[0], str)
                                       or (len(v) > 1 and not isinstance(v[1], (int, float)))):
            raise TypeError(f"columns[{k!r}] must be a header or (header, scale[, digits]) with a "
                            f"numeric scale, got {v!r}")
    spec = {k: (k, 1.0, digits) for k in columns} if not isinstance(columns, Mapping) else {
        k: (v, 1.0, digits) if isinstance(v, str) else (tuple(v) + (1.0, digits)[len(v) - 1:])[:3]
        for k, v in columns.items()}
    extra = extra or {}
    header = [first, *extra, *(h for h, _, _ in spec.values())]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in rows.items():
        cells = [method, *(col.get(method, "–") for col in extra.values())]
        for key, (_, scale, d) in spec.items():
            values = [float(r[key]) * scale for r in runs if key in r]
            text = cell(key, values) if cell is not None and values else None
            cells.append(text if text is not None else format_mean_std(values, d) if values else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def show_results(key: str, table: str, *, display: bool = True) -> None:
    """Show a chapter's results ``table`` (Markdown) and store it under ``key`` for the book.

    The stored copy is the output that myst-nb's ``glue(key, Markdown(table), display=False)``
    writes (a hidden MIME bundle tagged ``scrapbook``), produced here with IPython alone: the
    results page pastes it with ``{glue} key`` and ``:doc:``, and no notebook needs ``myst_nb``
    (which Colab and the publishing machine do not have). Outside IPython it prints the table.
    """
    if not isinstance(key, str) or not key.isidentifier():
        raise ValueError(f"key must be an identifier-like name (letters, digits, _), got {key!r}")
    if not isinstance(table, str):
        raise TypeError(f"table must be Markdown text, got {type(table).__name__}")
    try:
        from IPython.display import Markdown
        from IPython.display import display as ipy_display
    except ImportError:  # pragma: no cover - IPython comes with every notebook kernel
        print(table)
        return
    if display:
        ipy_display(Markdown(table))
    ipy_display({GLUE_PREFIX + "text/markdown": table, GLUE_PREFIX + "text/plain": table}, raw=True,
                metadata={"scrapbook": {"name": key, "mime_prefix": GLUE_PREFIX}})
