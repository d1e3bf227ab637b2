r"""Chapter 6 (JEM): the figures, and the 2-D toy they are drawn on.

The toy is a JEM in two dimensions, where $Z$ is a sum over a grid instead of a job for a
sampler: :func:`train_toy_jem` trains it on :func:`toy_mixture` with the exact
$\log p(y|x) + \log p(x)$, :func:`grid_log_density` evaluates its normalised density and
:func:`histogram_tv` measures how far a set of samples is from it. Everything here is also
importable from :mod:`minidistill.methods.jem`.
"""
from __future__ import annotations

import math
from typing import Mapping

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.ticker import MaxNLocator
from torch import nn

from ..runtime import seed_everything
from ..train import History, TrainingDiverged
from .jem import PAPER, _check_nonneg, _check_targets, energy, sampler_temperature, sgld

__all__ = [
    # the 2-D toy
    "toy_mixture",
    "ToyClassifier",
    "train_toy_jem",
    "grid_log_density",
    "histogram_tv",
    # figures
    "plot_energy_landscape",
    "plot_toy_sgld",
    "plot_ood_histograms",
    "plot_samples",
    "plot_energy_trace",
]


# -- the 2-D toy -----------------------------------------------------------------------------

def toy_mixture(n: int = 600, num_classes: int = 3, radius: float = 1.5, std: float = 0.5,
                seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, 2], y [n])``: a 2-D mixture of ``num_classes`` Gaussians (std ``std``) centred
    on a circle of radius ``radius``, one per class, in equal numbers."""
    if not isinstance(n, int) or n < num_classes or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"need num_classes >= 2 and n >= num_classes, got n={n!r}, num_classes={num_classes!r}")
    _check_nonneg("std", std, positive=True)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    angle = 2 * math.pi * y.to(dtype) / num_classes + math.pi / 2
    centres = radius * torch.stack([angle.cos(), angle.sin()], 1)
    x = centres + std * torch.randn(n, 2, generator=g, dtype=dtype)
    return x, y


class ToyClassifier(nn.Module):
    r"""A small MLP classifier of 2-D points, $f(x) = g(x) - \frac{\|x\|^2}{2 \ell^2}\mathbf 1$.

    The second term is the same for every class, so it leaves $p(y|x)$ alone (the shift
    property) but makes $p(x) \propto \sum_y e^{f(x)[y]}$ integrable: an MLP's logits can grow
    linearly far from the data, the quadratic wins. ``envelope`` is $\ell$ (not $s$, which names a student in the course).
    """

    def __init__(self, num_classes: int = 3, hidden: int = 64, envelope: float = 3.0) -> None:
        super().__init__()
        _check_nonneg("envelope", envelope, positive=True)
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, num_classes))
        self.envelope = envelope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) - (x**2).sum(-1, keepdim=True) / (2 * self.envelope**2)


def train_toy_jem(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 300,
    seed: int = 0,
    lr: float = 1e-2,
    lim: float = 4.0,
    grid: int = 48,
    px_weight: float = 1.0,
    hidden: int = 32,
) -> tuple[ToyClassifier, History]:
    r"""Train a :class:`ToyClassifier` on 2-D points with JEM's objective, full batch, Adam,
    in the dtype of ``x`` (float64 on the CPU makes it repeatable).

    In two dimensions $Z$ needs no sampler: $\log Z \approx \log\sum_c e^{-E(x_c)}\,\Delta$
    over the centres $x_c$ of a ``grid`` x ``grid`` cell grid on $[-\mathrm{lim}, \mathrm{lim}]^2$
    (cell area $\Delta$), so the loss is the exact
    $\mathrm{CE} + w_x\,\big(\overline{E(x)} + \log Z\big) = -\overline{\log p(y|x)} - w_x\,\overline{\log p(x)}$,
    whose $\theta$-gradient is the difference of expectations that SGLD estimates for images.
    ``px_weight=0`` trains a plain classifier. The history has one record per 50 steps.
    """
    if x.ndim != 2 or x.shape[1] != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be float points [N, 2], got {x.dtype} {tuple(x.shape)}")
    _check_targets(x, y, None)                          # K is read from the labels: y.max() + 1
    _check_nonneg("px_weight", px_weight)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    seed_everything(seed)
    model = ToyClassifier(int(y.max()) + 1, hidden).to(x.device, x.dtype)
    _, pts = _grid(lim, grid, x.dtype)
    pts = pts.to(x.device)
    log_cell = math.log((2 * lim / grid) ** 2)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = History(meta={"model": "ToyClassifier", "objective": "JEM (exact log Z on a grid)",
                            "data": "toy mixture", "seed": seed, "steps": steps, "px_weight": px_weight})
    model.train()
    for step in range(steps):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if px_weight:
            log_z = torch.logsumexp(-energy(model(pts)), 0) + log_cell
            loss = loss + px_weight * (energy(logits).mean() + log_z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"the toy model's loss became {loss.item()} at step {step + 1}; lower lr")
            history.records.append({"epoch": step + 1, "train_loss": loss.item(),
                                    "train_acc": 100.0 * (logits.argmax(1) == y).double().mean().item()})
    model.eval()
    return model, history


def _grid(lim: float, n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.linspace(-lim, lim, 2 * n + 1, dtype=dtype)[1::2]        # cell centres
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    return centres, torch.stack([gx.flatten(), gy.flatten()], 1)


@torch.no_grad()
def grid_log_density(model: nn.Module, lim: float = 4.0, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(centres [n], log_p [n, n])``: the model's $\log p(x)$ at the centres of an
    ``n`` x ``n`` grid of cells on $[-\mathrm{lim}, \mathrm{lim}]^2$, normalised so that
    $\sum p \cdot \mathrm{cell\ area} = 1$ over the box. ``log_p[i, j]`` is at
    ``(x=centres[j], y=centres[i])``."""
    p = next(model.parameters())
    centres, pts = _grid(lim, n, p.dtype)
    log_q = -energy(model(pts.to(p.device))).reshape(n, n).cpu()
    cell = (2 * lim / n) ** 2
    return centres, log_q - torch.logsumexp(log_q.flatten(), 0) - math.log(cell)


def histogram_tv(samples: torch.Tensor, model: nn.Module, lim: float = 4.0, bins: int = 16,
                 resolution: int = 8) -> float:
    r"""Total variation distance between the histogram of 2-D ``samples`` and the model's
    density, both on ``bins`` x ``bins`` cells of $[-\mathrm{lim}, \mathrm{lim}]^2$:
    $\frac12\sum_b |\hat p_b - p_b|$ (samples outside the box count as mass the model lacks).
    0 is a perfect match, 1 disjoint. Even exact samples score about
    $\sqrt{\text{bins}^2 / (2\pi N)}$ from counting noise."""
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"samples must be [N, 2] points, got {tuple(samples.shape)}")
    _, log_p = grid_log_density(model, lim, bins * resolution)
    p = log_p.exp().reshape(bins, resolution, bins, resolution).sum((1, 3))
    p = p / p.sum()
    s = samples.detach().double().cpu()
    inside = (s.abs() < lim).all(1)
    idx = ((s[inside] + lim) / (2 * lim) * bins).floor().long().clamp(0, bins - 1)
    counts = torch.zeros(bins, bins, dtype=torch.float64)
    counts.index_put_((idx[:, 1], idx[:, 0]), torch.ones(len(idx), dtype=torch.float64), accumulate=True)
    return 0.5 * ((counts / len(s) - p).abs().sum().item() + (1 - inside.double().mean().item()))


# -- figures ---------------------------------------------------------------------------------

def plot_energy_landscape(model: nn.Module, lim: float = 4.0, points: torch.Tensor | None = None,
                          labels: torch.Tensor | None = None, title: str = r"$\log p(x)$ of the toy JEM",
                          ax=None, n: int = 80, boundaries: bool = False):
    r"""Heat map of the model's normalised $\log p(x) = -E(x) - \log Z$ on the box, with
    ``points`` on top (coloured by ``labels`` if given) and, with ``boundaries``, the
    classifier's decision boundaries (where $\arg\max_y p(y|x)$ changes) as white lines.
    ``labels`` are class indices in ``[0, 10)`` (one colour each), one per point."""
    if labels is not None:
        if points is None:
            raise ValueError("labels colour the points: pass points too")
        _check_targets(points, labels, 10, name="labels")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.2, 3.6))
    centres, log_p = grid_log_density(model, lim, n)
    c = centres.numpy()
    # filled contours (12 bands of one nat) read like a map and keep the PNG small
    top = math.ceil(log_p.max().item())
    mesh = ax.contourf(c, c, log_p.clamp_min(top - 12).numpy(), levels=list(range(top - 12, top + 1)), cmap="viridis")
    fig.colorbar(mesh, ax=ax, label=r"$\log p(x)$", shrink=0.85)
    if boundaries:
        p = next(model.parameters())
        _, pts = _grid(lim, n, p.dtype)
        with torch.no_grad():
            pred = model(pts.to(p.device)).argmax(-1).reshape(n, n).cpu().double()
        k = int(pred.max().item()) + 1
        ax.contour(c, c, pred.numpy(), levels=[i + 0.5 for i in range(k - 1)], colors="white", linewidths=1)
    if points is not None:
        pts = points.detach().cpu().double()
        inside = (pts.abs() < lim).all(1)
        style = dict(c="white") if labels is None else dict(c=labels.cpu()[inside].numpy(), cmap="tab10", vmin=0, vmax=9)
        ax.scatter(pts[inside, 0].numpy(), pts[inside, 1].numpy(), s=4, alpha=0.7, linewidths=0,
                   label=f"{'points' if labels is None else 'data, coloured by class'} ({int(inside.sum())} in view)",
                   **style)
        ax.legend(loc="lower left", fontsize=7)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def plot_toy_sgld(model: nn.Module, step_size: float = PAPER["step_size"], noise: float = PAPER["noise"],
                  n_steps: int = 200, n_chains: int = 1000, lim: float = 4.0, seed: int = 0, ax=None):
    r"""Run :func:`sgld` on the toy model from ``n_chains`` uniform starts and draw the final
    states over its $\log p(x)$; the title gives the sampler's temperature
    $\sigma^2/(2\eta)$ ($\eta$ = ``step_size``) and the histogram's total variation distance to $p(x)$."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x0 = (torch.rand(n_chains, 2, generator=g, dtype=dtype) * 2 - 1) * lim
    xs = sgld(lambda v: energy(model(v)), x0, n_steps, step_size, noise, generator=g)
    xs = torch.where(torch.isfinite(xs), xs, torch.full_like(xs, 1e9))   # diverged chains: out of view
    tv = histogram_tv(xs, model, lim)
    temp = sampler_temperature(step_size, noise) if step_size > 0 else float("inf")
    title = (rf"SGLD: $\eta$ = {step_size:.3g}, $\sigma$ = {noise:.3g}, {n_steps} steps" + "\n"
             + rf"$T = \sigma^2/2\eta$ = {temp:.2g}, TV to $p(x)$ = {tv:.2f}")
    return plot_energy_landscape(model, lim, xs, title=title, ax=ax)


_SCORE_LABELS = {"-E(x)": r"$-E(x) = \log p(x) + \log Z$ (unnormalised)"}


def plot_ood_histograms(scores_in: torch.Tensor, scores_out: Mapping[str, torch.Tensor],
                        score: str = "-E(x)", title: str | None = None, ax=None, bins: int = 40):
    r"""Overlaid histograms of one score for the in-distribution test set and each OOD set.
    ``score`` names the x axis; the default, :func:`~minidistill.methods.jem.ood_scores`'s
    ``-E(x)``, is labelled as what it is: $\log p(x) + \log Z$, an unnormalised log density."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3.2))
    allv = torch.cat([scores_in, *scores_out.values()]).double()
    lo, hi = torch.quantile(allv, 0.005).item(), torch.quantile(allv, 0.995).item()
    edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1).numpy()
    ax.hist(scores_in.clamp(lo, hi).numpy(), edges, density=True, alpha=0.6, label="test set (in-distribution)")
    for name, s in scores_out.items():
        ax.hist(s.clamp(lo, hi).numpy(), edges, density=True, histtype="step", lw=1.5, label=name)
    ax.set_xlabel(_SCORE_LABELS.get(score, score))
    ax.set_ylabel("density")
    ax.set_title(title or f"{score} of in- and out-of-distribution images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_samples(images: torch.Tensor, nrow: int = 8, title: str = "SGLD samples", ax=None):
    """A grid of images given in $[-1, 1]$ pixel space (``[N, 3, H, W]``, as SGLD makes them);
    values outside the range are clipped for display."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 3, H, W] (or 1 channel), got {tuple(images.shape)}")
    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = torch.ones(c, rows * (h + 1) + 1, ncol * (w + 1) + 1)
    for k in range(n):
        r, q = divmod(k, ncol)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = x[k]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(0.45 * ncol + 0.4, 0.45 * rows + 0.6))
    ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if c == 1 else None, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_energy_trace(histories: Mapping[str, History], title: str = "Energies during JEM training", ax=None):
    r"""Mean energy of the data batches (solid) and of the SGLD samples (dashed) per epoch, for
    ``{label: history}``: the History columns ``train_energy_data`` and ``train_energy_samples``
    that :class:`~minidistill.methods.jem.JEMObjective` logs (a plain classifier's run has no
    samples: only its data line is drawn). Training is healthy while the two stay close; a
    gap that runs away is divergence."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.2))
    for i, (label, h) in enumerate(histories.items()):
        if not isinstance(h, History) or not h.records or "train_energy_data" not in h.records[0]:
            raise ValueError(f"histories[{label!r}] must be the History of a JEMObjective run (with a "
                             f"train_energy_data column), got {type(h).__name__}")
        ax.plot(h["epoch"], h["train_energy_data"], color=f"C{i}", lw=1, marker="o", ms=3, label=f"{label}: data")
        if "train_energy_samples" in h.records[0]:
            ax.plot(h["epoch"], h["train_energy_samples"], color=f"C{i}", lw=1, ls="--", marker="o", ms=3,
                    label=f"{label}: SGLD samples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"mean energy $E(x) = -\mathrm{LSE}\,f(x)$")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
