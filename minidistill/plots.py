"""Figures several chapters share. Each function returns a matplotlib ``Figure`` (and draws
into ``ax`` when given one), with labelled axes, a title and a legend."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from .losses import soft_targets
from .metrics import reliability_curve

__all__ = ["plot_history", "plot_soft_targets", "plot_reliability"]

_LABELS = {"train_loss": "training loss", "train_acc": "training accuracy (%)", "val_acc":
           "validation accuracy (%)", "test_acc": "test accuracy (%)", "test_loss": "test loss",
           "val_loss": "validation loss", "lr": "learning rate"}


def _class_labels(class_names: Sequence[str] | None, k: int, unit: str = "classes") -> list[str]:
    """The ``k`` tick labels: ``class_names`` (checked to have ``k`` names) or '0', '1', ..."""
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names for {k} {unit}")
    return names


def plot_history(histories, metrics: Sequence[str] = ("train_loss", "test_acc"), title: str | None = None):
    """Curves of ``metrics`` per epoch for one History or a ``{label: History or [History, ...]}``
    mapping; several histories under one label are drawn as their mean with a min-max band."""
    from .train import History

    if isinstance(histories, History):
        histories = {histories.meta.get("model", "model"): histories}
    if not isinstance(histories, Mapping):
        raise TypeError(f"histories must be a History or a {{label: History or [History, ...]}} mapping, "
                        f"got {type(histories).__name__}")
    if not histories:
        raise ValueError("histories is empty: pass at least one History to plot")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (label, hs) in enumerate(histories.items()):
            hs = [hs] if isinstance(hs, History) else list(hs)
            ys = torch.tensor([h[metric] for h in hs], dtype=torch.float64)
            epochs = hs[0]["epoch"]
            ax.plot(epochs, ys.mean(0).numpy(), label=label + (f" (mean of {len(hs)})" if len(hs) > 1 else ""), color=f"C{i}")
            if len(hs) > 1:
                ax.fill_between(epochs, ys.min(0).values.numpy(), ys.max(0).values.numpy(), alpha=0.2, color=f"C{i}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(_LABELS.get(metric, metric))
        ax.set_title(_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_soft_targets(
    logits: torch.Tensor,
    temperatures: Sequence[float] = (1, 2, 4, 8),
    class_names: Sequence[str] | None = None,
    title: str = "The same logits at different temperatures",
    ax=None,
):
    """Bar chart of ``softmax(logits / T)`` for each temperature, side by side per class."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 2 and logits.shape[0] == 1:
        logits = logits[0]
    if logits.dim() != 1 or len(logits) < 2:
        raise ValueError(f"logits must be one example's logits, shape (K,) with K >= 2, got shape "
                         f"{tuple(logits.shape)} (pick one row, e.g. logits[0])")
    temperatures = list(temperatures)
    if not temperatures or not all(isinstance(t, (int, float)) and t > 0 and t == t and t != float("inf")
                                   for t in temperatures):
        raise ValueError(f"temperatures must be finite positive numbers, got {temperatures!r}")
    k = len(logits)
    names = _class_labels(class_names, k, "logits")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(max(6, 0.7 * k), 3.2))
    width = 0.8 / len(temperatures)
    for i, t in enumerate(temperatures):
        p = soft_targets(logits, t).numpy()
        ax.bar((torch.arange(k) + (i - (len(temperatures) - 1) / 2) * width).numpy(), p, width, label=f"T = {t:g}")
    ax.set_xticks(range(k), names, rotation=30, ha="right")
    ax.set_xlabel("class")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_reliability(results: Mapping[str, tuple[torch.Tensor, torch.Tensor]], n_bins: int = 15,
                     title: str = "Reliability diagram"):
    """Accuracy against confidence per bin for ``{label: (probs, targets)}``; the diagonal is
    perfect calibration. Labels get their ECE appended."""
    from .metrics import expected_calibration_error

    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty {label: (probs, targets)} mapping")
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for label, (probs, targets) in results.items():
        c = reliability_curve(probs, targets, n_bins)
        ok = c["count"] > 0
        ece = expected_calibration_error(probs, targets, n_bins)
        ax.plot(c["confidence"][ok].numpy(), c["accuracy"][ok].numpy(), "o-", ms=3, label=f"{label} (ECE {100 * ece:.1f} %)")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
