"""Chapter 11's figures (Representative Batch Normalization): what the calibrations do to a
feature map, training curves of BN against RBN, and the channel-mean spread per layer."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from .rbn import RepresentativeBatchNorm2d

__all__ = ["example_feature_map", "plot_calibration", "plot_curves", "plot_spread"]


def example_feature_map(n: int = 8, c: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    """A small batch ``[n, c, size, size]`` whose examples have different means (one strong,
    one weak, the rest typical): the situation the calibrations are meant for."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(n)
    shift[0], shift[1] = 3.0, -2.0
    return torch.randn(n, c, size, size, generator=g) + 1.0 + shift.view(n, 1, 1, 1)


@torch.no_grad()
def plot_calibration(x: torch.Tensor, w_m: float = 0.0, w_v: float = 0.0, w_b: float = 1.0,
                     title: str | None = None, eval_mode: bool = False) -> plt.Figure:
    """BN and RBN (one channel, the same ``gamma = 1, beta = 0``) on the feature map ``x`` with the
    calibration weights set to ``w_m``, ``w_v``, ``w_b``: the per-example mean of the output (left)
    and the histogram of output values (right).

    In training mode (the default) both standardise with the statistics of the whole batch ``x``.
    With ``eval_mode=True`` both use running statistics gathered from the typical examples
    ``x[2:]`` only (one training pass with a cumulative average), as at test time when an example
    (here the strong 0 and the weak 1) does not look like the training data."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"x must be one channel [N, 1, H, W], got shape {tuple(x.shape)}")
    if eval_mode and x.shape[0] < 4:
        raise ValueError(f"eval_mode needs at least 4 examples (running statistics from x[2:]), got {x.shape[0]}")
    layer = RepresentativeBatchNorm2d(1, momentum=None)
    layer.center_weight.fill_(w_m), layer.scale_weight.fill_(w_v), layer.scale_bias.fill_(w_b)
    if eval_mode:
        layer(x[2:])   # first pass with momentum=None: the running statistics are those of X_cm on x[2:]
        layer.eval()
        typical = x[2:].transpose(0, 1).reshape(1, -1)
        bn = torch.nn.functional.batch_norm(x, typical.mean(1), typical.var(1), training=False)
    else:
        bn = torch.nn.functional.batch_norm(x, None, None, training=True)
    out = layer(x)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    idx = torch.arange(x.shape[0]).float().numpy()
    a.bar(idx - 0.2, bn.mean((1, 2, 3)).numpy(), 0.4, label="BN")
    a.bar(idx + 0.2, out.mean((1, 2, 3)).numpy(), 0.4, label="RBN")
    a.axhline(0, color="k", lw=0.5)
    a.set(xlabel="example n (0: strong, 1: weak)", ylabel="mean of the output map", title="per-example mean")
    a.legend()
    bins = torch.linspace(float(min(bn.min(), out.min())), float(max(bn.max(), out.max())), 40)
    b.hist(bn.flatten().numpy(), bins=bins.numpy(), alpha=0.5, label=f"BN (variance {float(bn.var()):.2f})")
    b.hist(out.flatten().numpy(), bins=bins.numpy(), alpha=0.5, label=f"RBN (variance {float(out.var()):.2f})")
    b.set(xlabel="output value", ylabel="count", title="all output values")
    b.legend()
    mode = "eval mode, running statistics of examples 2.." if eval_mode else "training mode, batch statistics"
    fig.suptitle(title or f"w_m = {w_m:g}, w_v = {w_v:g}, w_b = {w_b:g} ({mode})")
    fig.tight_layout()
    return fig


def plot_curves(histories: Mapping[str, Sequence], title: str = "") -> plt.Figure:
    """Training loss and test accuracy per epoch, mean over seeds with min-max bands;
    ``histories[label]`` is a list of :class:`~minidistill.train.History`, one per seed."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, hs in histories.items():
        for ax, key in ((a, "train_loss"), (b, "test_acc")):
            v = torch.tensor([h[key] for h in hs], dtype=torch.float64)
            epochs = torch.arange(1, v.shape[1] + 1).numpy()
            line, = ax.plot(epochs, v.mean(0).numpy(), label=label)
            ax.fill_between(epochs, v.min(0).values.numpy(), v.max(0).values.numpy(), color=line.get_color(), alpha=0.2)
    a.set(xlabel="epoch", ylabel="training loss", title="training loss")
    b.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    a.legend(), b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_spread(spreads: Mapping[str, Mapping[str, float]], title: str = "") -> plt.Figure:
    """The channel-mean spread per normalisation layer (see ``rbn.channel_mean_spread``), one bar
    series per model; ``spreads[label][layer] = value``."""
    labels = list(spreads)
    layers = list(spreads[labels[0]])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(layers) + 2), 3.6))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        pos = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(pos, [spreads[label][k] for k in layers], width, label=label)
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="std over channels of the channel means", title=title)
    ax.legend()
    fig.tight_layout()
    return fig
