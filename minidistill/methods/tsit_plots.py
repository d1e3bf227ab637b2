"""Figures for chapter 13 (TSIT): the two-stream architecture, image grids (rows of images with
labels) and the GAN loss curves."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, Rectangle

# Figures are drawn at 80 dpi (publish.FIGURE_DPI) whatever the matplotlibrc, so that their text/plain repr is the
# same under nbval and in the published notebook.
__all__ = ["draw_architecture", "show_rows", "plot_losses"]


def draw_architecture(n_scales: int = 4, image_size: int = 32):
    """A schematic of the generator: content stream (left), style stream (right), both read top
    (finest) to bottom (coarsest); the generator's column (middle) runs bottom to top, from noise at
    the coarsest scale to the image, with FAdaIN from the style features and FADE from the content ones."""
    fig, ax = plt.subplots(figsize=(8.0, 0.9 * n_scales + 1.6), dpi=80)
    ax.set_xlim(0, 10), ax.set_ylim(-1.2, n_scales + 0.6), ax.axis("off")

    def box(x, y, text, color):
        ax.add_patch(Rectangle((x - 1.05, y - 0.3), 2.1, 0.6, facecolor=color, edgecolor="0.3"))
        ax.text(x, y, text, ha="center", va="center", fontsize=7.5)

    def arrow(a, b, color="0.3", style="-|>"):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=9, color=color, lw=1))

    for i in range(n_scales):
        y, s = n_scales - 1 - i, image_size >> i
        box(1.2, y, f"content block {i}: $f_{i}$ ({s}x{s})", "#d8e8f8")
        box(8.8, y, f"style block {i}: $s_{i}$ ({s}x{s})", "#f8e0d0")
        box(5.0, y, f"FAdaIN($s_{i}$) -> FADE block($f_{i}$)", "#e4f2dc")
        arrow((2.25, y), (3.95, y), "#3b6ea8")
        arrow((7.75, y), (6.05, y), "#b8683a")
        if i:   # the streams go down (fine to coarse), the generator goes up (coarse to fine)
            arrow((1.2, y + 0.7), (1.2, y + 0.3)), arrow((8.8, y + 0.7), (8.8, y + 0.3))
            ax.text(1.35, y + 0.5, "/2", fontsize=6.5), ax.text(8.95, y + 0.5, "/2", fontsize=6.5)
            arrow((5.0, y + 0.3), (5.0, y + 0.7))
            ax.text(5.15, y + 0.45, "x2 up", fontsize=6.5)
    ax.text(1.2, n_scales - 0.4, "edge map (content)", ha="center", fontsize=8)
    ax.text(8.8, n_scales - 0.4, "style image", ha="center", fontsize=8)
    ax.text(5.0, n_scales - 0.4, "LeakyReLU, conv, tanh -> image", ha="center", fontsize=8)
    arrow((5.0, n_scales - 0.7), (5.0, n_scales - 0.45))
    low = image_size >> (n_scales - 1)
    ax.text(5.0, -1.0, f"noise {low}x{low} -> conv", ha="center", fontsize=8)
    arrow((5.0, -0.75), (5.0, -0.3))
    ax.set_title("TSIT generator: the streams run down (fine to coarse), the generator up (coarse to fine)", fontsize=10)
    fig.tight_layout()
    return fig


def show_rows(rows: Mapping[str, torch.Tensor], titles: Sequence[str] | None = None, title: str = ""):
    """One row per entry (images ``[n, C, H, W]`` in [-1, 1]; one channel is shown in grey), the
    row's name on its left, optional column titles above the first row."""
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.05 * n + 0.8, 1.1 * len(rows) + 0.4), squeeze=False, dpi=80)
    for r, (label, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(imgs):
                ax.axis("off")
                continue
            img = ((imgs[c].detach().float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
            if r == 0 and titles is not None:
                ax.set_title(titles[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_losses(histories: Mapping[str, Mapping[str, Sequence[float]]], keys: Sequence[str] = ("d_loss", "g_p"),
                window: int = 10):
    """One panel per loss term, one line per run (moving average over ``window`` steps)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.0), squeeze=False, dpi=80)
    names = {"d_loss": "discriminator hinge loss $\\mathcal{L}_D$", "g_adv": "generator adversarial loss",
             "g_fm": "feature matching $\\mathcal{L}_{FM}$", "g_p": "perceptual loss $\\mathcal{L}_P$"}
    for ax, key in zip(axes[0], keys):
        for run, hist in histories.items():
            v = torch.tensor(hist[key], dtype=torch.float64)
            w = max(1, min(window, len(v)))
            smooth = torch.nn.functional.avg_pool1d(v.view(1, 1, -1), w, stride=1).view(-1)
            ax.plot(range(w, len(v) + 1), smooth.numpy(), label=run)
        ax.set_xlabel("training step")
        ax.set_ylabel(key)
        ax.set_title(names.get(key, key), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
