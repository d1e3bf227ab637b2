"""Chapter 4's figures: Gumbel-softmax samples on the simplex (:func:`plot_relaxed_samples`) and
a select/skip policy as a blocks-by-tasks grid (:func:`plot_policy`). Both are re-exported by
:mod:`minidistill.methods.adashare`, where the chapter calls them."""
from __future__ import annotations

import math
from typing import Sequence

import matplotlib.pyplot as plt
import torch

from .gumbel import check_tau, gumbel_softmax

__all__ = ["plot_relaxed_samples", "plot_policy"]

_CORNERS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)


def plot_relaxed_samples(logits: torch.Tensor, taus: Sequence[float] = (0.1, 0.5, 1.0, 5.0),
                         num_samples: int = 300, seed: int = 0, labels: Sequence[str] = ("1", "2", "3")):
    r"""Gumbel-softmax samples of a 3-category distribution on the probability simplex, one
    triangle per temperature: near the corners (one-hot) for small $\tau$, near the centre for
    large $\tau$. The cross marks $\pi$, where the mean of the *discrete* samples lies.
    Seeded locally: the global random state is left as it was."""
    logits = torch.as_tensor(logits, dtype=torch.float64).flatten()
    if len(logits) != 3:
        raise ValueError(f"logits must have exactly 3 entries (a triangle), got {len(logits)}")
    for t in taus:
        check_tau(t)
    if len(labels) != 3:
        raise ValueError(f"labels must name the 3 categories, got {labels!r}")
    pi = torch.softmax(logits, -1)
    fig, axes = plt.subplots(1, len(taus), figsize=(2.2 * len(taus) + 0.3, 2.5), squeeze=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for ax, tau in zip(axes[0], taus):
            y = gumbel_softmax(logits.expand(num_samples, 3), tau)
            xy = y @ _CORNERS
            ax.fill(*_CORNERS.T.numpy(), facecolor="0.95", edgecolor="0.4", lw=1)
            ax.scatter(*xy.T.numpy(), s=5, alpha=0.45, color="C0", label="relaxed samples")
            ax.plot(*(pi @ _CORNERS).numpy(), "x", color="C3", ms=9, mew=2, label=r"$\pi$")
            for (cx, cy), name in zip(_CORNERS.tolist(), labels):
                ax.annotate(name, (cx, cy), textcoords="offset points", ha="center",
                            xytext=(0, 4 if cy > 0 else -12), fontsize=9)
            ax.set_title(rf"$\tau$ = {tau:g}")
            ax.set_xlabel("simplex (corner = one-hot)")
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(-0.1, 1.1)
            ax.set_ylim(-0.15, 1.0)
    axes[0][-1].legend(fontsize=7, loc="upper right", framealpha=0.9)
    fig.suptitle(rf"Gumbel-softmax samples, $\pi$ = ({', '.join(f'{p:.2f}' for p in pi.tolist())})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_policy(values: torch.Tensor, tasks: Sequence[str], title: str = "Policy: which task runs which block",
                ax=None, colorbar: bool = True):
    """A blocks-by-tasks grid: rows are blocks (input at the top), columns are tasks; colour and
    number give $P(\\text{select})$ (or 1/0 for a fixed policy, drawn as ✓ and ·). Draws into
    ``ax`` when given one; ``colorbar=False`` leaves the colour scale out (0 white, 1 dark blue)."""
    values = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if values.ndim != 2 or values.shape[0] != len(tasks):
        raise ValueError(f"values must be [tasks, blocks] with {len(tasks)} tasks, got {tuple(values.shape)}")
    if (values < 0).any() or (values > 1).any():
        raise ValueError("values must be probabilities or a 0/1 policy, in [0, 1]")
    binary = bool(((values == 0) | (values == 1)).all())
    k, n = values.shape
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(1.2 * k + 2.0, 0.42 * n + 1.4))
    im = ax.imshow(values.T.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for j in range(k):
        for i in range(n):
            v = values[j, i].item()
            text = ("✓" if v else "·") if binary else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if v > 0.6 else "black")
    ax.set_xticks(range(k), list(tasks))
    ax.set_yticks(range(n), [str(i + 1) for i in range(n)])
    ax.set_xlabel("task")
    ax.set_ylabel("residual block (1 = nearest the input)")
    ax.set_title(title, fontsize=10)
    if colorbar:
        fig.colorbar(im, ax=ax, label="P(select)" if not binary else "selected", fraction=0.08)
    fig.tight_layout()
    return fig
