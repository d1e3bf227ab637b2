r"""Chapter 2's figures (Tf-KD): grouped bars of target distributions, and the targets of
Tf-KD$_\mathrm{reg}$ next to label smoothing's. Both are re-exported by
:mod:`minidistill.methods.tfkd`, where the notebook calls them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from ..plots import _class_labels

__all__ = ["plot_distributions", "plot_tfkd_targets"]


def plot_distributions(dists: Mapping[str, torch.Tensor], class_names: Sequence[str] | None = None,
                       title: str = "Target distributions", log: bool = False, annotate: bool = False, ax=None):
    """Grouped bars: one group per class, one bar per named distribution (each a ``[K]`` vector)."""
    if not dists:
        raise ValueError("dists is empty: give at least one {label: probabilities} entry")
    rows = {k: torch.as_tensor(v, dtype=torch.float64).flatten() for k, v in dists.items()}
    sizes = {len(v) for v in rows.values()}
    if len(sizes) != 1:
        raise ValueError(f"all distributions must have the same length, got lengths {sorted(sizes)}")
    k = sizes.pop()
    names = _class_labels(class_names, k)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(max(5.5, 0.75 * k), 3.4))
    width = 0.8 / len(rows)
    for i, (label, p) in enumerate(rows.items()):
        xs = torch.arange(k, dtype=torch.float64) + (i - (len(rows) - 1) / 2) * width
        bars = ax.bar(xs.numpy(), p.numpy(), width, label=label, color=f"C{i}")
        if annotate:
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in p.tolist()], fontsize=7, padding=1)
    ax.set_xticks(range(k), names, rotation=0 if k <= 4 else 30, ha="center" if k <= 4 else "right")
    ax.set_xlabel("class")
    ax.set_ylabel("probability" + (" (log scale)" if log else ""))
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(v[v > 0].min().item() for v in rows.values()) / 3, 3)
    else:
        ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_tfkd_targets(num_classes: int = 100, correct_prob: float = 0.99, temperature: float = 20.0,
                      alpha: float = 0.1, kl_weight: float = 0.1, epsilon: float = 0.1, ax=None):
    r"""The targets of Tf-KD$_\mathrm{reg}$ next to label smoothing's, for the correct class and
    for any one of the other $K-1$ classes (they are all equal), on a log scale:

    the virtual teacher $p^d$, the tempered $\mathrm{softmax}(p^d/T)$ the official code
    distils from, Tf-KD$_\mathrm{reg}$'s effective target $q_\mathrm{eff}$ (:func:`~minidistill.methods.tfkd.tfkd_reg_as_lsr`),
    the label-smoothing target with ``epsilon``, and the uniform distribution.
    """
    from .tfkd import label_smoothing_targets, tempered_virtual_teacher, tfkd_reg_as_lsr, virtual_teacher

    y = torch.zeros(1, dtype=torch.int64)
    pd = virtual_teacher(y, num_classes, correct_prob)[0]
    pt = tempered_virtual_teacher(y, num_classes, correct_prob, temperature)[0]
    eff = tfkd_reg_as_lsr(num_classes, correct_prob, temperature, alpha, kl_weight)
    ls = label_smoothing_targets(y, num_classes, epsilon)[0]
    u = 1.0 / num_classes
    two = lambda v: torch.tensor([v[0], v[1]], dtype=torch.float64)  # noqa: E731 -- correct, other
    dists = {
        f"virtual teacher $p^d$ (a = {correct_prob:g})": two(pd),
        f"softmax($p^d/T$), T = {temperature:g}": two(pt),
        f"Tf-KD reg effective target (α = {alpha:g}, w = {kl_weight:g})":
            torch.tensor([eff["target_correct"], eff["target_other"]], dtype=torch.float64),
        f"label smoothing, ε = {epsilon:g}": two(ls),
        "uniform 1/K": torch.tensor([u, u], dtype=torch.float64),
    }
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.3))
    fig = plot_distributions(dists, ["correct class", f"each of the other {num_classes - 1}"],
                             title=f"Targets for one example, K = {num_classes}", log=True, annotate=True, ax=ax)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    return fig
