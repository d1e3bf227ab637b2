"""Chapter 4's three tasks made from any image batch -- the class, the rotation and an edge map --
and how a multi-task model is scored on them (:func:`evaluate_tasks`, :func:`relative_gain`,
:func:`results_markdown`). The method itself (the network, the policy, training) is in
:mod:`minidistill.methods.adashare`, which re-exports these names."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset, DeviceLoader
from ..report import metrics_table
from ..runtime import get_device
from ..train import autocast, autocast_dtype

__all__ = ["TASKS", "rotate_batch", "edge_map", "evaluate_tasks", "relative_gain", "results_markdown"]

#: The chapter's three tasks, made from any image batch: the class label, the rotation by k·90° (4-way, on
#: the rotated image) and a dense regression of the edge strength (:func:`edge_map`, at the last feature map).
TASKS = ("class", "rotation", "edges")

def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    if not tasks or len(set(tasks)) != len(tasks) or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be distinct names from {TASKS}, got {tasks!r}")
    return tasks


def rotate_batch(x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate sample $i$ of a square batch ``[N, C, H, W]`` by $k_i \\cdot 90°$ with
    $k_i = (i + \\text{offset}) \\bmod 4$ (balanced, and random per image when batches are
    shuffled; ``offset`` = the batch's start index keeps a test set's angles fixed).
    Returns the rotated batch and the labels $k$ (int64)."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x must be a batch of square images [N, C, H, H], got {tuple(x.shape)}")
    out = torch.empty_like(x)
    for k in range(4):  # four strided slices: no per-sample Python work
        start = (k - offset) % 4
        out[start::4] = x[start::4].rot90(k, dims=(2, 3))
    return out, (torch.arange(len(x), device=x.device) + offset) % 4


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def edge_map(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    r"""The dense task's target: the Sobel gradient magnitude of the channel-mean image (borders
    replicated), average-pooled to ``size``: ``[N, C, H, W]`` in, float32 ``[N, 1, *size]`` out.
    The kernels are scaled by 1/8, so a unit step between neighbouring pixels gives 1/2."""
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images [N, C, H, W], got {tuple(x.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        g = F.pad(x.float().mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
        k = torch.stack([_SOBEL, _SOBEL.T])[:, None].to(g.device)
        grad = F.conv2d(g, k)
        mag = (grad.pow(2).sum(1, keepdim=True) + 1e-12).sqrt()
        return F.adaptive_avg_pool2d(mag, size)


def _task_inputs(tasks: Sequence[str], x: torch.Tensor, y: torch.Tensor, offset: int = 0):
    inputs, targets = [], []
    for t in tasks:
        if t == "rotation":
            xr, k = rotate_batch(x, offset)
            inputs.append(xr)
            targets.append(k)
        else:
            inputs.append(x)
            targets.append(y if t == "class" else None)  # edges: made from x once the output size is known
    return inputs, targets


@torch.no_grad()
def evaluate_tasks(model: nn.Module, data: Dataset, split: str = "test", *, batch_size: int = 1024,
                   device: str | torch.device | None = None, amp: bool | str = "auto") -> dict[str, float]:
    """Each task's test score: ``class_acc`` and ``rotation_acc`` (top-1, %; every test image
    rotated by $i \\bmod 4$ quarter turns) and ``edges_mae`` (mean absolute error of the edge map)."""
    tasks = getattr(model, "tasks", None)
    if tasks is None or not hasattr(model, "forward_tasks"):
        raise ValueError(f"model must be an AdaShareNet or IndependentNets, got {type(model).__name__}")
    device = get_device(device) if device is not None else next(model.parameters()).device
    dtype = autocast_dtype(device, amp)
    loader = DeviceLoader.from_dataset(data, split, batch_size, train=False, device=device,
                                       channels_last=device.type == "cuda")
    model.eval()
    sums, seen = torch.zeros(len(tasks), device=device, dtype=torch.float64), 0
    for x, y in loader:
        inputs, targets = _task_inputs(tasks, x, y, offset=seen)
        seen += len(x)
        with autocast(device, dtype):
            outs = model.forward_tasks(inputs)
        for i, (t, out, target) in enumerate(zip(tasks, outs, targets)):  # summed absolute errors, or hits
            sums[i] += ((out.float() - edge_map(x, tuple(out.shape[-2:]))).abs().mean((1, 2, 3)) if t == "edges"
                        else out.argmax(1) == target).sum()
    return {("edges_mae" if t == "edges" else f"{t}_acc"): s / seen * (1 if t == "edges" else 100)
            for t, s in zip(tasks, sums.tolist())}


def relative_gain(scores: Mapping[str, Sequence[Mapping[str, float]]],
                  reference: str = "independent") -> dict[str, list[float]]:
    r"""$\Delta$ of each method's runs against ``reference``: the mean relative change over the tasks,
    each seed against the same seed's reference run, in %, higher is better (errors count negated):
    $$\Delta = \frac1T \sum_t s_t\,\frac{M_t - M_t^{\mathrm{ref}}}{M_t^{\mathrm{ref}}} \cdot 100\,\%,
    \quad s_t = +1 \text{ for accuracies}, -1 \text{ for errors}.$$
    ``scores`` maps a method to one ``{metric: value}`` per seed (as :func:`evaluate_tasks` returns)."""
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not among the methods {sorted(scores)}")
    ref_runs, out = scores[reference], {}
    for method, runs in scores.items():
        if len(runs) != len(ref_runs):
            raise ValueError(f"{method} has {len(runs)} runs, {reference} has {len(ref_runs)}: pair them by seed")
        out[method] = [100 * sum((run[m] - ref[m]) / ref[m] * (-1 if m.endswith("mae") else 1) for m in ref) / len(ref)
                       for run, ref in zip(runs, ref_runs)]
    return out


def results_markdown(scores: Mapping[str, Sequence[Mapping[str, float]]], parameters: Mapping[str, int],
                     reference: str = "independent", digits: int = 2) -> str:
    """A Markdown table (:func:`~minidistill.report.metrics_table`), one row per method: deployed
    parameters, each task's score (mean ± std over seeds; errors with one more digit) and
    :func:`relative_gain` $\\Delta$ against ``reference``."""
    deltas = relative_gain(scores, reference)
    headers = {"class_acc": "class acc. (%) ↑", "rotation_acc": "rotation acc. (%) ↑", "edges_mae": "edge MAE ↓"}
    columns = {m: (headers.get(m, m), 1.0, digits + 1 if m.endswith("mae") else digits) for m in scores[reference][0]}
    columns["Δ"] = (f"Δ vs {reference} (%) ↑", 1.0, digits)
    rows = {method: [{**run, "Δ": d} for run, d in zip(runs, deltas[method])] for method, runs in scores.items()}
    return metrics_table(rows, columns, extra={"parameters": {m: f"{parameters[m]:,}" for m in scores}})
