"""Figures for chapter 10 (ManiDP)."""
from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["plot_weight_and_schedule", "plot_flops_vs_ce", "plot_examples", "plot_budget"]


def plot_weight_and_schedule(lam: float = 5e-3, complexity: float = 0.5, mean_ce: float = 1.0,
                             target: float = 0.6, epochs: int = 8):
    """Left: :math:`\\lambda(x_i)` against an image's CE (with :math:`C' = ` ``complexity * mean_ce``).
    Right: the keep-ratio schedule :math:`\\rho_e` over ``epochs`` for the ``target`` ratio."""
    from .manidp import instance_weight, keep_ratio

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    c_prime = complexity * mean_ce
    ce = torch.linspace(0, 2 * mean_ce, 401)
    a.plot(ce, instance_weight(ce, c_prime, lam), label=r"$\lambda(x_i)$ (ManiDP)")
    a.axhline(lam, color="gray", ls="--", label=r"$\lambda'$ for every image (plain dynamic pruning)")
    a.axvline(c_prime, color="k", ls=":", label=rf"$C' = {complexity:g}\,\bar{{\mathcal{{L}}}}_{{CE}}$")
    a.set(xlabel=r"cross-entropy of the image $\mathcal{L}_{CE}(x_i)$", ylabel="sparsity weight",
          title="easy images are pushed to small sub-networks")
    a.legend(fontsize=8)
    e = np.arange(epochs)
    b.plot(e, [keep_ratio(int(i), epochs, target) for i in e], "o-")
    b.axhline(target, color="gray", ls="--", label=rf"target $\rho^* = {target:g}$")
    b.set(xlabel="epoch $e$", ylabel=r"keep ratio $\rho_e$", ylim=(min(target, 1) - 0.05, 1.02),
          title="thresholds follow a cosine schedule")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_flops_vs_ce(results: Mapping[str, Mapping[str, torch.Tensor]], bins: int = 8, ax=None):
    """Mean per-image MACs (as % of the dense network) in CE quantile bins, one line per method."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8)) if ax is None else (ax.figure, ax)
    for name, r in results.items():
        ce, macs = r["ce"].double(), r["macs"].double() / r["dense_macs"] * 100
        order = ce.argsort()
        chunks = [c for c in order.chunk(bins) if len(c)]
        ax.plot([ce[c].median().item() for c in chunks], [macs[c].mean().item() for c in chunks], "o-", label=name)
    ax.set_xscale("log")
    ax.set(xlabel="test image's cross-entropy (median of its bin, log scale)",
           ylabel="MACs of its sub-network (% of dense)", title="per-image cost against difficulty")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_budget(results: Mapping[str, Mapping[str, torch.Tensor]], references: Mapping[str, tuple[float, float]],
                ratio: float, bins: int = 8):
    """Left: :func:`plot_flops_vs_ce` for ``results`` (networks re-thresholded at keep ratio ``ratio``).
    Right: test accuracy against MACs reduction for those networks (filled) and for the fixed
    ``references`` ``{name: (MACs reduction %, accuracy %)}`` (open markers)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    plot_flops_vs_ce(results, bins=bins, ax=a)
    a.set_title(rf"per-image cost against difficulty at $\rho = {ratio:.2f}$")
    colours = {}
    for i, (name, r) in enumerate(results.items()):
        red = 100 * (1 - r["macs"].double().mean().item() / r["dense_macs"])
        colours[name] = f"C{i}"
        b.plot(red, 100 * r["correct"].double().mean().item(), "o", ms=8, color=colours[name], label=f"{name}, at this rho")
    spare = iter(f"C{i}" for i in range(len(results), 10))
    for name, (red, acc) in references.items():   # a reference named after a result shares its colour
        colour = next((c for n, c in colours.items() if name.startswith(n)), None) or next(spare)
        b.plot(red, acc, "s", mfc="none", ms=8, color=colour, label=name)
    b.set(xlabel="MACs reduction (% of dense)", ylabel="test accuracy %", title="accuracy against cost")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_examples(images: torch.Tensor, macs: torch.Tensor, dense: float, ce: torch.Tensor, n: int = 6):
    """The ``n`` test images with the cheapest and the ``n`` with the dearest sub-networks
    (``images`` uint8 ``[N, 3, H, W]``), titled with their MACs (% of dense) and CE."""
    order = macs.argsort()
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.8))
    for row, idx in enumerate((order[:n], order.flip(0)[:n])):
        for ax, i in zip(axes[row], idx.tolist()):
            ax.imshow(images[i].permute(1, 2, 0).numpy())
            ax.set_title(f"{100 * macs[i] / dense:.0f}%\nCE {ce[i]:.2f}", fontsize=8)
            ax.axis("off")
    axes[0][0].text(-0.3, 0.5, "cheapest", transform=axes[0][0].transAxes, rotation=90, va="center")
    axes[1][0].text(-0.3, 0.5, "dearest", transform=axes[1][0].transAxes, rotation=90, va="center")
    fig.tight_layout()
    return fig
