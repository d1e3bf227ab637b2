"""Figures for chapter 12 (robust transfer): accuracies against the robustness budget, and
adversarial examples beside their clean images."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from minidistill.report import mean_std

__all__ = ["plot_vs_eps", "show_adversarial"]


def plot_vs_eps(eps: Sequence[float], series: Mapping[str, Sequence[Sequence[float]]], title: str = "",
                ylabel: str = "accuracy (%)"):
    """One line per series (mean over seeds, error bar = std) against the source models' eps.
    ``series[name][i]`` lists the seeds' values at ``eps[i]``."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, values in series.items():
        stats = [mean_std(v) for v in values]
        ax.errorbar(list(eps), [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=name)
    ax.set_xlabel("source model's training budget $\\epsilon$ ($\\ell_2$, images in [0, 1])")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def show_adversarial(clean: torch.Tensor, adv: Sequence[torch.Tensor], row_labels: Sequence[str],
                     titles: Sequence[Sequence[str]] | None = None, gain: float = 5.0):
    """Clean images (top row), then one row of adversarial images per entry of ``adv``, and the
    perturbations ``gain`` times enlarged around grey (bottom rows). Images in [0, 1], ``[n, 3, H, W]``."""
    n, rows = len(clean), 1 + 2 * len(adv)
    fig, axes = plt.subplots(rows, n, figsize=(1.3 * n, 1.35 * rows), squeeze=False)
    grids = [("clean", clean)]
    for label, a in zip(row_labels, adv):
        grids += [(label, a), (f"{label}: δ x{gain:g}", (0.5 + gain * (a - clean)).clamp(0, 1))]
    for r, (label, imgs) in enumerate(grids):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c].detach().cpu().permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
            if titles is not None and r < len(titles) and titles[r] is not None:
                ax.set_title(titles[r][c], fontsize=7)
    fig.tight_layout()
    return fig
