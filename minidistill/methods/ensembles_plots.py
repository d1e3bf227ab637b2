"""Chapter 5's figures (learning from ensembles): the toy ensemble on a line, the members'
diversity by the ensemble's confidence (in the spirit of Nam et al.'s Figure 3, whose binned
confidence the official code does not show: not a reproduction of it), and one image under
perturbations. Plain functions of tensors returning a matplotlib figure; re-exported by
:mod:`minidistill.methods.ensembles`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from .. import metrics

__all__ = ["plot_toy_ensemble", "plot_diversity_by_confidence", "plot_perturbation"]


def plot_toy_ensemble(toy: Mapping[str, torch.Tensor], title: str = "Members agree on the training points, not between them"):
    """The chapter's opening picture, from :func:`~minidistill.methods.ensembles.toy_ensemble_1d`.
    Top: each member's probability of class 1 along the line, with the training points.
    Bottom: the members' pairwise KL (log scale), with the training inputs marked."""
    fig, (ax, ax_d) = plt.subplots(2, 1, figsize=(5.2, 3.4), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for j in range(toy["probs"].shape[0]):
        ax.plot(toy["grid"].numpy(), toy["probs"][j, :, 1].numpy(), lw=1.2, label=f"member {j + 1}")
    for c, marker in ((0, "o"), (1, "s")):
        sel = toy["y_train"] == c
        ax.scatter(toy["x_train"][sel].numpy(), torch.full((int(sel.sum()),), float(c)).numpy(), marker=marker,
                   color="k", zorder=3, label=f"training points, class {c}")
    ax.set_ylabel("p(class 1 | x)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax_d.semilogy(toy["grid"].numpy(), toy["diversity"].clamp_min(1e-12).numpy(), color="C4", label="pairwise KL d(x)")
    for x in toy["x_train"].tolist():
        ax_d.axvline(x, color="k", lw=0.6, ls=":")
    ax_d.set_xlabel("input x")
    ax_d.set_ylabel("members' diversity")
    ax_d.legend(fontsize=7)
    for a in (ax, ax_d):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig



def plot_diversity_by_confidence(member_probs: Mapping[str, torch.Tensor], n_bins: int = 10,
                                 title: str = "Members' diversity by the ensemble's confidence",
                                 show_counts: bool = True):
    r"""Diversity against confidence (in the spirit of the paper's Figure 3; here the confidence is the
    ensemble's, $\max_k \bar p_k$): for each ``{label: member_probs [M, N, K]}``, the mean pairwise
    KL between members per confidence bin (log scale) and, with ``show_counts``, the inputs per
    bin in a second panel. Labels get the count-weighted mean diversity appended."""
    if not member_probs:
        raise ValueError("member_probs must map at least one label to [M, N, K] probabilities")
    if show_counts:
        fig, (ax, ax_n) = plt.subplots(1, 2, figsize=(7.6, 2.9))
    else:
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
    for i, (label, probs) in enumerate(member_probs.items()):
        c = metrics.diversity_by_confidence(probs, n_bins)
        ok = c["count"] > 0
        centres = ((c["edges"][:-1] + c["edges"][1:]) / 2)
        ax.plot(centres[ok].numpy(), c["diversity"][ok].clamp_min(1e-8).numpy(), "o-", ms=3, color=f"C{i}",
                label=f"{label} (mean {c['mean'].item():.3g})")
        if show_counts:
            ax_n.plot(centres[ok].numpy(), c["count"][ok].numpy(), "o-", ms=3, color=f"C{i}", label=label)
    axes = [ax]
    ax.set_yscale("log")
    ax.set_ylabel("mean pairwise KL")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6)
    if show_counts:
        ax_n.set_yscale("log")
        ax_n.set_ylabel("inputs per bin")
        ax_n.set_title("Inputs in each bin", fontsize=10)
        axes.append(ax_n)
    for a in axes:
        a.set_xlabel("ensemble confidence (max mean prob.)")
        a.set_xlim(0, 1)
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_perturbation(image: torch.Tensor, perturbed: Mapping[str, torch.Tensor],
                      member_probs: Mapping[str, torch.Tensor], class_names: Sequence[str],
                      title: str | None = None):
    """One image in $[0, 1]$ ``[C, H, W]``, its perturbed versions ``{label: [C, H, W]}`` and, for
    each label (``'clean'`` included), the members' probabilities ``[M, K]``: a row of images, a
    row of the perturbations (amplified to the full grey range), and a row of bars (the clean
    image's top 4 classes, one bar per member) titled with the members' mean pairwise KL."""
    labels = ["clean", *perturbed]
    missing = [lb for lb in labels if lb not in member_probs]
    if missing:
        raise ValueError(f"member_probs lacks {missing}; give [M, K] probabilities for 'clean' and every perturbed image")
    images = {"clean": image, **perturbed}
    top = member_probs["clean"].mean(0).topk(min(4, len(class_names))).indices
    fig, axes = plt.subplots(3, len(labels), figsize=(1.9 * len(labels), 4.8), squeeze=False)
    for col, lb in enumerate(labels):
        img = images[lb].detach().cpu().float()
        axes[0, col].imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[0, col].set_title(lb, fontsize=9)
        diff = (img - image.detach().cpu().float()).mean(0)
        scale = diff.abs().max().item()
        axes[1, col].imshow(diff.numpy(), cmap="coolwarm", vmin=-max(scale, 1e-12), vmax=max(scale, 1e-12),
                           interpolation="nearest")
        rms = (img - image.detach().cpu().float()).pow(2).mean().sqrt().item()
        axes[1, col].set_title(f"change (RMS {rms * 255:.2f}/255)", fontsize=8)
        for a in axes[:2, col]:
            a.set_xticks([])
            a.set_yticks([])
        probs = member_probs[lb].detach().cpu().float()
        m = probs.shape[0]
        width = 0.8 / m
        for j in range(m):
            axes[2, col].bar(torch.arange(len(top)).numpy() + (j - (m - 1) / 2) * width, probs[j, top].numpy(), width,
                             label=f"member {j + 1}", color=f"C{j}")
        div = metrics.pairwise_kl(probs.unsqueeze(1).double()).item() if m > 1 else 0.0
        axes[2, col].set_xticks(range(len(top)), [class_names[k] for k in top.tolist()], rotation=30, ha="right", fontsize=8)
        axes[2, col].set_ylim(0, 1)
        axes[2, col].set_title(f"members' probabilities\n(pairwise KL {div:.2g})", fontsize=8)
        if col == 0:
            axes[2, col].set_ylabel("probability")
            axes[2, col].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
