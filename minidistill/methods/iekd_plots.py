"""Chapter 7's figures (deep mutual learning and IE-KD), re-exported by
:mod:`minidistill.methods.iekd`."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib.pyplot as plt

__all__ = ["plot_toy", "plot_accuracies"]


def plot_toy(runs: Mapping[str, Mapping[str, Sequence[float]]], *, dim: int | None = None, title: str | None = None):
    """Curves of :func:`~minidistill.methods.iekd.toy_inherit_explore` runs (``{label: curves}``):
    left, each half's normalised L1 distance to the teacher's factor (with the ceilings
    ``2 / sqrt(dim)`` for any factors and ``sqrt(2 / dim)`` for non-negative ones when ``dim`` is given); middle, linear CKA of each half with the teacher's
    factor; right, training accuracy. Solid lines: inheritance half, dashed: exploration half."""
    if not runs:
        raise ValueError("runs must hold at least one {label: curves} entry")
    fig, (ax_d, ax_c, ax_a) = plt.subplots(1, 3, figsize=(13, 3.4))
    for i, (label, c) in enumerate(runs.items()):
        for key, style, half in (("inh", "-", "inh."), ("exp", "--", "exp.")):
            ax_d.plot(c[key], style, color=f"C{i}", label=f"{label}: {half}")
            ax_c.plot(c[f"cka_{key}"], style, color=f"C{i}", label=f"{label}: {half}")
        ax_a.plot(c["acc"], color=f"C{i}", label=label)
    if dim is not None:
        ax_d.axhline(2 / math.sqrt(dim), color="k", ls=":", lw=1, label=r"ceiling $2/\sqrt{D}$ (any factors)")
        ax_d.axhline(math.sqrt(2 / dim), color="0.5", ls=":", lw=1, label=r"ceiling $\sqrt{2/D}$ (non-negative)")
        ax_d.set_ylim(0, 1.8 * 2 / math.sqrt(dim))   # room for the legend above the ceilings
    ax_d.set(xlabel="step", ylabel="normalised L1 distance to $F^t$", title="distance to the teacher's factor")
    ax_c.set(xlabel="step", ylabel="linear CKA with $F^t$", title="similarity to the teacher's factor", ylim=(0, 1.02))
    ax_a.set(xlabel="step", ylabel="training accuracy (%)", title="the task")
    ax_d.legend(fontsize=6.5, loc="upper left")
    for ax in (ax_c, ax_a):
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_accuracies(acc: Mapping[str, Sequence[float]], *, title: str | None = None, ax=None,
                    reference: str | None = None):
    """One dot per run and a bar at the mean for each method (``{method: [test acc per run]}``);
    ``reference`` draws that method's mean as a dotted line across."""
    if not acc:
        raise ValueError("acc must map at least one method to its accuracies")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(acc)), 3.4))
    for i, (method, values) in enumerate(acc.items()):
        values = list(values)
        mean = sum(values) / len(values)
        ax.bar(i, mean, color=f"C{i}", alpha=0.35, width=0.6)
        ax.plot([i] * len(values), values, "o", color=f"C{i}", ms=5)
    if reference is not None:
        ref = list(acc[reference])
        ax.axhline(sum(ref) / len(ref), color="k", ls=":", lw=1, label=f"mean of '{reference}'")
        ax.legend(fontsize=7)
    lo = min(min(v) for v in acc.values())
    hi = max(max(v) for v in acc.values())
    pad = max(1.0, 0.15 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(range(len(acc)), list(acc), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.figure.tight_layout()
    return ax.figure
