r"""Measuring ensembles for chapter 5: the scores of an ensemble's averaged prediction (accuracy,
NLL, calibrated NLL after temperature scaling, ECE, Brier score, the members' diversity), the
ladder of Deep Ensembles of every size that the Deep Ensemble Equivalent (DEE) reads, the
results table, and the numbers the official code reports. Functions of member logits
``[M, N, K]``; the measures themselves live in :mod:`minidistill.metrics`. Re-exported by
:mod:`minidistill.methods.ensembles`.
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import torch

from .. import metrics, report
from .batchensemble import ensemble_log_probs

__all__ = ["ensemble_scores", "ensemble_ladder", "dee_score", "metrics_table", "REPORTED"]


def ensemble_scores(member_logits: torch.Tensor, targets: torch.Tensor, val_member_logits: torch.Tensor | None = None,
                    val_targets: torch.Tensor | None = None) -> dict[str, float]:
    """The ensemble's ``acc`` (%), ``nll``, ``ece`` (fraction), ``brier`` and, given a
    validation split, ``cnll``: the NLL after temperature scaling fitted on that split, and
    ``temperature``; plus ``diversity``, the mean pairwise KL between members (0 for one)."""
    targets = targets.to(member_logits.device)
    log_p = ensemble_log_probs(member_logits)
    p = log_p.exp()
    out = {"acc": metrics.accuracy(log_p, targets), "nll": metrics.nll(p, targets),
           "ece": metrics.expected_calibration_error(p, targets), "brier": metrics.brier_score(p, targets),
           "diversity": metrics.pairwise_kl(member_logits.softmax(-1)).mean().item() if len(member_logits) > 1 else 0.0}
    if val_member_logits is not None:
        if val_targets is None:
            raise ValueError("val_member_logits given without val_targets")
        temp = metrics.fit_temperature(ensemble_log_probs(val_member_logits), val_targets.to(val_member_logits.device))
        out["temperature"] = temp
        out["cnll"] = metrics.nll((log_p / temp).softmax(-1), targets)
    return out


def ensemble_ladder(member_logits: torch.Tensor, targets: torch.Tensor, val_member_logits: torch.Tensor,
                    val_targets: torch.Tensor) -> dict[str, list[float]]:
    """Deep Ensembles of every size ``l = 1..M`` drawn from the ``M`` members: for each ``l``
    the scores of :func:`ensemble_scores` averaged over all ``C(M, l)`` subsets. Its ``cnll``
    list is the ladder :func:`~minidistill.metrics.deep_ensemble_equivalent` interpolates."""
    m = member_logits.shape[0]
    ladder: dict[str, list[float]] = {"size": []}
    for size in range(1, m + 1):
        runs = [ensemble_scores(member_logits[list(c)], targets, val_member_logits[list(c)], val_targets)
                for c in itertools.combinations(range(m), size)]
        ladder["size"].append(size)
        for k in runs[0]:
            ladder.setdefault(k, []).append(sum(r[k] for r in runs) / len(runs))
    return ladder


def dee_score(cnll: float, ladder_cnll: Sequence[float]) -> float:
    r"""The Deep Ensemble Equivalent of a model with calibrated NLL ``cnll`` against the ladder
    ``ladder_cnll`` (``[cNLL of DE-1, ..., DE-L]``, :func:`ensemble_ladder`'s ``cnll``), as
    :func:`~minidistill.metrics.deep_ensemble_equivalent` gives it, except at both ends of the ladder:
    a model *worse* than one member (``cnll`` above the DE-1 value) gets ``-inf``, not the 1.0 of the
    definition, so that :func:`metrics_table` can show it as "≤ 1" rather than "1.00" ("as good as one
    member"); one better than the largest ensemble gets ``inf`` ("> L")."""
    ladder = [float(v) for v in ladder_cnll]
    value = metrics.deep_ensemble_equivalent(cnll, ladder)  # checks both arguments
    return -math.inf if float(cnll) > ladder[0] else value


_COLUMNS = {"acc": ("ACC (%)", 1.0, 2), "nll": ("NLL", 1.0, 3), "cnll": ("cNLL", 1.0, 3),
            "ece": ("ECE (%)", 100.0, 2), "brier": ("BS", 1.0, 3), "dee": ("DEE", 1.0, 2),
            "diversity": ("diversity", 1.0, 4)}


def metrics_table(rows: Mapping[str, Sequence[Mapping[str, float]]],
                  columns: Sequence[str] = ("acc", "nll", "cnll", "ece", "brier", "dee"),
                  dee_cap: int | None = None) -> str:
    """A Markdown table, one row per method and one column per metric, each cell mean ± std
    over the method's runs (``rows[method]`` is a list of score dicts, one per seed), through
    :func:`minidistill.report.metrics_table`. ECE is shown in %. A DEE off the ladder
    (:func:`dee_score`) shows as ``> dee_cap`` (``inf``: better than the largest ensemble measured) or
    ``≤ 1`` (``-inf``: worse than one member), next to the finite runs' mean if any."""
    unknown = [c for c in columns if c not in _COLUMNS]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; expected some of {sorted(_COLUMNS)}")

    def beyond(key: str, values: list[float]) -> str | None:
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) == len(values):
            return None  # the default cell
        above, below = sum(v == math.inf for v in values), sum(v == -math.inf for v in values)
        if not finite and not (above and below):
            return f"{'> ' + str(dee_cap) if above else '≤ 1'} (n={len(values)})"
        parts = [report.format_mean_std(finite, _COLUMNS[key][2])] if finite else []
        parts += [f"{above} {'more ' if finite else ''}runs > {dee_cap}"] if above else []
        parts += [f"{below} {'more ' if finite or above else ''}runs ≤ 1"] if below else []
        return "; ".join(parts)

    return report.metrics_table(rows, {c: _COLUMNS[c] for c in columns}, cell=beyond)


#: Reported numbers (quoted, not ours): CIFAR-100, WRN-28x10, DE-4 teacher -> BE-4 student, from
#: the official README of cs-giung/giung2 (projects/Diversity-Matters): the current version
#: (commit bc54f4e) and, for the students, an earlier one (2758d54) -- two runs of the same code.
#: ACC and ECE in % (the README gives ECE as a fraction), as in :func:`metrics_table`.
REPORTED = {
    "source": "official README of cs-giung/giung2, CIFAR-100, WRN-28×10 (current version; earlier version in brackets)",
    "rows": {
        "DE-1": {"acc": "80.22", "nll": "0.789", "cnll": "0.789", "ece": "4.2", "brier": "0.282"},
        "DE-4": {"acc": "82.54", "nll": "0.670", "cnll": "0.655", "ece": "3.3", "brier": "0.249"},
        "KD": {"acc": "80.40 [80.35]", "nll": "0.804 [0.818]", "cnll": "0.750 [0.787]", "ece": "7.2 [7.0]",
               "brier": "0.286 [0.286]"},
        "KD + Gaussian": {"acc": "80.04 [80.36]", "nll": "0.816 [0.837]", "cnll": "0.760 [0.802]",
                          "ece": "7.5 [7.2]", "brier": "0.288 [0.290]"},
        "KD + ODS": {"acc": "81.92 [81.84]", "nll": "0.685 [0.690]", "cnll": "0.682 [0.687]", "ece": "2.6 [2.8]",
                     "brier": "0.258 [0.258]"},
        "KD + ConfODS": {"acc": "82.25 [81.89]", "nll": "0.670 [0.690]", "cnll": "0.665 [0.688]",
                         "ece": "2.3 [3.2]", "brier": "0.253 [0.259]"},
    },
}
