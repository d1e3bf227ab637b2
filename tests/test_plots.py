"""minidistill.plots: every figure is a Figure with labelled axes, a title and a legend."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from minidistill import plots as plots_mod
from minidistill.losses import soft_targets
from minidistill.metrics import expected_calibration_error
from minidistill.plots import plot_history, plot_reliability, plot_soft_targets
from minidistill.train import History


def _history(accs, model="CifarResNet"):
    records = [{"epoch": i + 1, "lr": 0.1, "train_loss": 2.0 / (i + 1), "train_acc": a - 5,
                "test_loss": 1.5 / (i + 1), "test_acc": a, "seconds": float(i)} for i, a in enumerate(accs)]
    return History(records, {"model": model})


def _labelled(ax):
    return ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_all_names_exist():
    for name in plots_mod.__all__:
        assert hasattr(plots_mod, name), name


def test_plot_history_single():
    h = _history([20.0, 40.0, 50.0])
    fig = plot_history(h)
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert len(axes) == 2  # the default metrics: train_loss, test_acc
    for ax in axes:
        assert _labelled(ax)
        assert ax.get_xlabel() == "epoch"
        assert _legend_texts(ax) == ["CifarResNet"]
    assert axes[0].get_ylabel() == "training loss"
    assert axes[1].get_ylabel() == "test accuracy (%)"
    x, y = axes[1].lines[0].get_data()
    assert list(x) == [1, 2, 3] and np.allclose(y, [20, 40, 50])


def test_plot_history_several_with_mean_and_band():
    runs = {"teacher": _history([30.0, 60.0]), "student": [_history([10.0, 40.0]), _history([20.0, 50.0])]}
    fig = plot_history(runs, metrics=("test_acc",), title="KD on shapes")
    ax, = fig.axes
    assert _labelled(ax)
    assert fig._suptitle is not None and fig._suptitle.get_text() == "KD on shapes"
    assert _legend_texts(ax) == ["teacher", "student (mean of 2)"]
    teacher, student = ax.lines
    assert np.allclose(student.get_ydata(), [15.0, 45.0])  # the mean of the two runs
    assert np.allclose(teacher.get_ydata(), [30.0, 60.0])
    assert len(ax.collections) == 1  # one min-max band, for the label with two runs
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(10.0) and band[:, 1].max() == pytest.approx(50.0)


def test_plot_history_unknown_metric_raises():
    with pytest.raises(KeyError, match="no column 'val_acc'"):
        plot_history(_history([1.0, 2.0]), metrics=("val_acc",))


def test_history_plot_delegates():
    fig = _history([5.0, 6.0]).plot(metrics=("train_loss", "train_acc", "lr"))
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert all(_labelled(ax) for ax in fig.axes)


def test_plot_soft_targets_draws_the_tempered_softmax():
    logits = torch.tensor([4.0, 1.0, 0.0, -1.0])
    fig = plot_soft_targets(logits, temperatures=(1, 4), class_names=["cat", "dog", "car", "ship"])
    assert isinstance(fig, Figure)
    ax, = fig.axes
    assert ax.get_ylabel() == "probability" and ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "car", "ship"]
    assert _legend_texts(ax) == ["T = 1", "T = 4"]
    heights = [[bar.get_height() for bar in container] for container in ax.containers]
    for t, h in zip((1, 4), heights):
        assert np.allclose(h, soft_targets(logits, t).numpy(), atol=1e-6)


def test_plot_soft_targets_labels_both_axes():
    ax, = plot_soft_targets(torch.tensor([1.0, 0.0, -1.0])).axes
    assert _labelled(ax)


def test_plot_soft_targets_into_given_axes():
    fig, (left, right) = plt.subplots(1, 2)
    out = plot_soft_targets(torch.tensor([1.0, 0.0]), temperatures=(2,), ax=right)
    assert out is fig
    assert len(right.patches) == 2 and len(left.patches) == 0


def test_plot_soft_targets_bad_input():
    with pytest.raises(ValueError, match="class_names has 2 names for 3 logits"):
        plot_soft_targets(torch.zeros(3), class_names=["a", "b"])
    with pytest.raises(ValueError, match="temperature"):
        plot_soft_targets(torch.zeros(3), temperatures=(1, 0))


def test_plot_reliability():
    g = torch.Generator().manual_seed(0)
    probs = (3 * torch.randn(200, 5, generator=g)).softmax(-1)
    y = torch.randint(0, 5, (200,), generator=g)
    fig = plot_reliability({"student": (probs, y), "teacher": (torch.eye(5)[y], y)}, n_bins=10)
    assert isinstance(fig, Figure)
    ax, = fig.axes
    assert _labelled(ax)
    texts = _legend_texts(ax)
    assert texts[0] == "perfectly calibrated"
    assert texts[1] == f"student (ECE {100 * expected_calibration_error(probs, y, 10):.1f} %)"
    assert texts[2] == "teacher (ECE 0.0 %)"
    assert np.allclose(ax.lines[0].get_xdata(), [0, 1]) and np.allclose(ax.lines[0].get_ydata(), [0, 1])


def test_plot_reliability_rejects_logits():
    with pytest.raises(ValueError, match="sum to one"):
        plot_reliability({"raw": (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))})
