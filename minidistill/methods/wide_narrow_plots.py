r"""Chapter 9's figures (Go Wide, Then Narrow): the three stages as a diagram, and the relative
imitation error per block before and after layerwise imitation. Re-exported by
:mod:`minidistill.methods.wide_narrow`, where the notebook calls them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["plot_stages", "plot_imitation_errors", "plot_costs"]


def plot_stages(n_blocks: int = 4, labels: Sequence[str] | None = None):
    r"""The three stages for a network of ``n_blocks`` blocks: (1) the wide network $B$,
    (2) the thin blocks $S_i$ with the pairs $M_{i,1}$ (thin to wide) and $M_{i,2}$ (wide to thin)
    between them, each $\bar S_{(:i)}$ matched to $B_{(:i)}$, (3) the merged thin network $S$
    with $M_{i,2}M_{i,1}$ folded into the first layer of $S_{i+1}$. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    if not isinstance(n_blocks, int) or n_blocks < 2:
        raise ValueError(f"n_blocks must be an int >= 2, got {n_blocks!r}")
    labels = list(labels) if labels is not None else [f"block {i + 1}" for i in range(n_blocks)]
    fig, ax = plt.subplots(figsize=(10, 4.6))
    ax.set_xlim(-2.7, 3 * n_blocks + 0.2)
    ax.set_ylim(-0.6, 3.4)
    ax.axis("off")

    def box(x, y, w, h, text, color, fontsize=9):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.03", fc=color, ec="k", lw=0.8))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)

    rows = {2.6: "1. wide learning", 1.35: "2. layerwise\nimitation", 0.0: "3. merge,\nfine-tune"}
    for y, text in rows.items():
        ax.text(-2.6, y + 0.3, text, ha="left", va="center", fontsize=10, weight="bold")
    for i in range(n_blocks):
        x = 3 * i
        box(x, 2.45, 1.6, 0.6, f"$B_{i + 1}$\n{labels[i]}", "#f4c27a")
        box(x + 0.3, 1.2, 1.0, 0.3, f"$S_{i + 1}$", "#9ecae1")
        box(x + 0.3, 0.0, 1.0, 0.3, f"$S_{i + 1}$" if i == 0 else f"$S_{i + 1}'$", "#9ecae1")
        if i < n_blocks - 1:
            box(x + 1.45, 1.0, 0.55, 0.7, f"$M_{{{i + 1},1}}$", "#c7e9c0", 8)
            box(x + 2.2, 1.0, 0.55, 0.7, f"$M_{{{i + 1},2}}$", "#c7e9c0", 8)
            ax.annotate("", (x + 3.0, 2.75), (x + 1.65, 2.75), arrowprops=dict(arrowstyle="->"))
            ax.annotate("", (x + 3.3, 0.15), (x + 1.35, 0.15), arrowprops=dict(arrowstyle="->"))
            ax.plot([x + 2.0, x + 2.2], [1.35, 1.35], "k-", lw=0.8)
            ax.plot([x + 1.3, x + 1.45], [1.35, 1.35], "k-", lw=0.8)
            ax.plot([x + 2.75, x + 3.3], [1.35, 1.35], "k-", lw=0.8)
        ax.annotate("", (x + 1.55, 1.75), (x + 1.55, 2.4),
                    arrowprops=dict(arrowstyle="<->", color="#b2182b", ls="--"))
        ax.text(x + 1.65, 2.07, rf"$\mathcal{{L}}_{i + 1}$", color="#b2182b", fontsize=9)
    ax.text(3 * n_blocks - 1.2, -0.45, r"$S'_{i+1}$: first layer's weight $W \leftarrow W\,M_{i,2}M_{i,1}$",
            ha="right", fontsize=9)
    ax.set_title("Go wide, then narrow: train wide, imitate it block by block with a thin net plus linear pairs, "
                 "merge the pairs", fontsize=10)
    fig.tight_layout()
    return fig


def plot_imitation_errors(errors: Mapping[str, Sequence[Sequence[float]]], block_labels: Sequence[str],
                          title: str | None = None):
    r"""Grouped bars: for each ``{label: [per-block errors of one seed, ...]}`` the relative
    imitation error $\|B_{(:i)} - \bar S_{(:i)}\|^2 / \|B_{(:i)}\|^2$ of every block (mean over
    seeds, min-max whiskers), on a log scale. Returns the figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    if not errors:
        raise ValueError("errors must map at least one label to per-seed lists of per-block errors")
    n = len(block_labels)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(errors)
    for k, (label, runs) in enumerate(errors.items()):
        values = np.asarray(runs, dtype=float)
        if values.ndim != 2 or values.shape[1] != n:
            raise ValueError(f"errors[{label!r}] must be a list of {n}-long lists (one per seed), "
                             f"got shape {values.shape}")
        mean = values.mean(0)
        xs = np.arange(n) + (k - (len(errors) - 1) / 2) * width
        ax.bar(xs, mean, width, label=label, yerr=[mean - values.min(0), values.max(0) - mean], capsize=3)
    ax.set_xticks(np.arange(n), block_labels)
    ax.set_yscale("log")
    ax.set_xlabel("output after block")
    ax.set_ylabel("relative imitation error")
    ax.set_title(title or "How well the thin network with linear pairs imitates the wide one")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_costs(costs: Mapping[str, tuple[int, int]], title: str | None = None):
    """Two bar charts, parameters and multiply-accumulates per image (log scale), of the networks
    in ``costs`` (``{network: (parameters, MACs)}``, e.g. from ``network_costs``). Returns the figure."""
    import matplotlib.pyplot as plt

    if not costs:
        raise ValueError("costs must name at least one network")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    names = list(costs)
    colors = ["#9ecae1", "#c7e9c0", "#3182bd", "#f4c27a", "#bbbbbb"]
    for ax, k, label in zip(axes, (0, 1), ("parameters", "multiply-accumulates per image")):
        values = [costs[n][k] for n in names]
        bars = ax.barh(names, values, color=[colors[i % len(colors)] for i in range(len(names))])
        for bar, v in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v / 1e6:.2f} M", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.invert_yaxis()
        ax.set_xlim(min(values) / 2, max(values) * 8)
    axes[1].set_yticklabels([])
    fig.suptitle(title or "What each stage costs")
    fig.tight_layout()
    return fig
