r"""Chapter 1's figures (Hinton et al., knowledge distillation): the soft targets of one set of
logits at several temperatures, with a log-scale option, and the teacher's class-by-class mean
soft targets as a matrix. Both are re-exported by :mod:`minidistill.methods.kd_basics`, where the
notebook calls them.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import LogNorm

from .. import plots
from ..plots import _class_labels
from ..losses import check_temperature

__all__ = ["plot_soft_targets", "plot_class_soft_targets"]


def plot_soft_targets(logits: torch.Tensor, temperatures: Sequence[float] = (1, 2, 4, 8),
                      class_names: Sequence[str] | None = None,
                      title: str = "The same logits at different temperatures", *, log: bool = False, ax=None):
    """:func:`minidistill.plots.plot_soft_targets` (bars of ``softmax(logits / T)`` per class and
    temperature), with ``log=True`` for a logarithmic probability axis: on a linear axis the
    small probabilities -- the "dark knowledge" -- are invisible at low temperature."""
    fig = plots.plot_soft_targets(logits, temperatures, class_names, title=title, ax=ax)
    if log:
        ax = fig.axes[0] if ax is None else ax
        smallest = min(bar.get_height() for bar in ax.patches if bar.get_height() > 0)
        ax.set_yscale("log")
        ax.set_ylim(max(smallest / 3, 1e-12), 1.5)
        ax.set_ylabel("probability (log scale)")
        fig.tight_layout()
    return fig


def plot_class_soft_targets(matrices: dict[float, torch.Tensor], class_names: Sequence[str] | None = None,
                            title: str = "The teacher's mean soft targets, class by class", *, log: bool = True,
                            annotate: bool | None = None):
    r"""One heat map per temperature of a ``[K, K]`` matrix of mean soft targets (row: the true
    class, column: the class the probability goes to), as made by
    :func:`~minidistill.methods.kd_basics.mean_soft_targets`: ``matrices`` maps each
    temperature to its matrix. ``log=True`` (the default) colours on a log scale, shared by
    the panels, so that probabilities of $10^{-4}$ and $10^{-1}$ are both readable;
    ``annotate`` writes the values in the cells (default: when $K \le 10$)."""
    if not matrices:
        raise ValueError("matrices is empty: give at least one {temperature: [K, K] matrix} entry")
    mats = {}
    for t, m in matrices.items():
        check_temperature(t)
        m = torch.as_tensor(m, dtype=torch.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"the matrix for T = {t:g} must be square [K, K], got {tuple(m.shape)}")
        mats[t] = m
    sizes = {m.shape[0] for m in mats.values()}
    if len(sizes) != 1:
        raise ValueError(f"all matrices must have the same size, got {sorted(sizes)}")
    k = sizes.pop()
    names = _class_labels(class_names, k)
    annotate = k <= 10 if annotate is None else annotate
    finite = torch.cat([m[torch.isfinite(m)].flatten() for m in mats.values()])
    if log:
        positive = finite[finite > 0]
        low = positive.min().item() if len(positive) else 1e-6
        norm = LogNorm(vmin=max(low, 1e-8), vmax=1.0)
    else:
        norm = plt.Normalize(vmin=0.0, vmax=1.0)
    fig, axes = plt.subplots(1, len(mats), figsize=(0.5 * k * len(mats) + 2.2, 0.42 * k + 1.2), squeeze=False,
                             layout="constrained")
    for ax, (t, m) in zip(axes[0], mats.items()):
        im = ax.imshow(m.clamp_min(norm.vmin).numpy() if log else m.numpy(), norm=norm, cmap="viridis")
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_xlabel("soft-target probability of class")
        ax.set_ylabel("true class")
        ax.set_title(f"T = {t:g}")
        if annotate:
            for i in range(k):
                for j in range(k):
                    v = m[i, j].item()
                    dark = norm(max(v, norm.vmin)) < 0.6
                    ax.text(j, i, f"{v:.0e}" if v < 0.01 else f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if dark else "black")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="mean probability" + (" (log scale)" if log else ""))
    fig.suptitle(title)
    return fig
