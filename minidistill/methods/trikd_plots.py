"""Chapter 8's figures (TriKD): the toy's decision regions, the anchor-weight sweep, and accuracy
per generation (the functions of tensors and the training live in :mod:`minidistill.methods.trikd`)."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from torch import nn

from .trikd import toy_data

__all__ = ["plot_toy_regions", "plot_toy_sweep", "plot_generations"]

_COLORS = ("#4C72B0", "#DD8452", "#55A868")


def plot_toy_regions(networks: Mapping[str, nn.Module], *, title: str | None = None, resolution: int = 150):
    """One panel per network: its predicted class over [-1, 1]^2 (shaded) and the toy's training
    points (coloured by their label, flipped labels included)."""
    from matplotlib.colors import ListedColormap

    if not networks:
        raise ValueError("networks must name at least one network to draw")
    x, y = toy_data()
    g = torch.linspace(-1, 1, resolution)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, len(networks), figsize=(3.2 * len(networks), 3.3), squeeze=False)
    for ax, (name, net) in zip(axes[0], networks.items()):
        with torch.no_grad():
            pred = net.eval()(grid).argmax(1).reshape(resolution, resolution)
        ax.imshow(pred, origin="lower", extent=(-1, 1, -1, 1), cmap=ListedColormap(_COLORS), alpha=0.35,
                  vmin=0, vmax=2, interpolation="nearest")
        ax.scatter(x[:, 0], x[:, 1], c=[_COLORS[int(c)] for c in y], s=6, linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel("$x_1$"), ax.set_ylabel("$x_2$")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_toy_sweep(weights: Sequence[float], results: Sequence[Mapping[str, float]], *, title: str | None = None):
    """Left: the teacher's distance to the anchor, KL(p^a || p^t), and the student's to the teacher,
    KL(p^t || p^s), against the anchor weight. Right: the three networks' test accuracies."""
    if len(weights) != len(results) or not weights:
        raise ValueError("weights and results must be two non-empty sequences of the same length")
    xs = list(range(len(weights)))
    fig, (ax_d, ax_a) = plt.subplots(1, 2, figsize=(10.5, 3.4))
    ax_d.plot(xs, [r["teacher_to_anchor"] for r in results], "o-", label=r"teacher to anchor, KL($p^a\|p^t$)")
    ax_d.plot(xs, [r["student_to_teacher"] for r in results], "s--", label=r"student to teacher, KL($p^t\|p^s$)")
    ax_d.set_ylabel("KL on test points (nats)")
    ax_a.plot(xs, [r["teacher_acc"] for r in results], "o-", label="teacher")
    ax_a.plot(xs, [r["student_acc"] for r in results], "s--", label="student")
    ax_a.plot(xs, [r["anchor_acc"] for r in results], "k:", label="anchor (fixed)")
    ax_a.set_ylabel("test accuracy (%)")
    for ax in (ax_d, ax_a):
        ax.set_xticks(xs, [f"{w:g}" for w in weights])
        ax.set_xlabel(r"anchor weight $\lambda_a$")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_generations(students: Mapping[int, Sequence[float]], teachers: Mapping[int, Sequence[float]],
                     baselines: Mapping[str, float], *, title: str | None = None, ax=None):
    """Test accuracy per generation: one dot per seed and the mean (line) for the students and for
    the online teachers, with ``baselines`` (name -> mean accuracy) as horizontal lines."""
    if not students:
        raise ValueError("students must map at least one generation to its accuracies")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, accs, marker, color in (("TriKD student", students, "o", "C0"), ("online teacher", teachers, "s", "C1")):
        gens = sorted(accs)
        for g in gens:
            ax.scatter([g] * len(accs[g]), accs[g], color=color, marker=marker, alpha=0.45, s=18)
        ax.plot(gens, [sum(accs[g]) / len(accs[g]) for g in gens], marker=marker, color=color, label=f"{label} (mean)")
    styles = ("--", ":", "-.", (0, (5, 1)), (0, (1, 3)))
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, color=f"C{i + 2}", linestyle=styles[i % len(styles)], label=name)
    ax.set_xticks(sorted(students))
    ax.set_xlabel("generation (0: no anchor)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    return ax.figure
