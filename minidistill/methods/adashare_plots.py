"""Chapter 4's figures: Gumbel-softmax samples on the simplex (:func:`plot_relaxed_samples`), the
gradient estimators raced per evaluation of $f$ (:func:`plot_estimator_race`, and for one temperature
and one budget, :func:`plot_estimator_budget`, the widget's figure), and a select/skip policy as a
blocks-by-tasks grid (:func:`plot_policy`). All are re-exported by :mod:`minidistill.methods.adashare`,
where the chapter calls them."""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from .gumbel import (check_tau, exact_gradient, gradient_samples, gradient_statistics, gumbel_softmax,
                     mse_at_budget)

__all__ = ["plot_relaxed_samples", "plot_estimator_race", "plot_estimator_budget", "plot_policy"]

_NAMES = {"gumbel_softmax": "Gumbel-softmax (soft)", "straight_through": "straight-through"}

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


def plot_estimator_race(race: Mapping[tuple, Mapping[str, float]], budgets: Sequence[int] = (8, 64)):
    r"""Three panels against the temperature $\tau$ from :func:`~minidistill.methods.gumbel.estimator_race`:
    the variance per evaluation of $f$; the squared bias (hollow markers where it is below what the
    samples can resolve, drawn at that resolution, $2V/N$); and the mean squared error at each budget
    of $B$ evaluations, $\mathrm{bias}^2 + v/B$. REINFORCE alone and with a leave-one-out baseline
    (the smallest and largest $J$ raced; only the largest in the last panel) are horizontal lines:
    they have no temperature, and no bias."""
    taus = sorted({key[1] for key in race if key[0] == "gumbel_softmax"})
    js = sorted(key[1] for key in race if key[0] == "reinforce_loo")
    if not taus or not js or ("reinforce", 1) not in race or any(("straight_through", t) not in race for t in taus):
        raise ValueError("race must hold ('reinforce', 1), ('reinforce_loo', J) and both relaxed estimators at "
                         "the same temperatures, as estimator_race returns")
    if not budgets or len(budgets) > 4 or any(not n >= 1 for n in budgets):
        raise ValueError(f"budgets must be 1 to 4 numbers of evaluations >= 1, got {budgets!r}")
    styles = ("-", "--", ":", "-.")
    loo = ("reinforce_loo", js[-1])
    fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.4))
    for i, (est, name) in enumerate(_NAMES.items()):
        stats = [race[est, t] for t in taus]
        axes[0].loglog(taus, [s["variance_per_evaluation"] for s in stats], "o-", ms=3, color=f"C{i}", label=name)
        resolution = [2 * s["variance"] / s["num_samples"] for s in stats]
        ok = [s["bias2"] > r for s, r in zip(stats, resolution)]
        axes[1].loglog(taus, [s["bias2"] if o else r for s, r, o in zip(stats, resolution, ok)], "-", color=f"C{i}")
        axes[1].scatter([t for t, o in zip(taus, ok) if o], [s["bias2"] for s, o in zip(stats, ok) if o],
                        s=14, color=f"C{i}", label=name)
        axes[1].scatter([t for t, o in zip(taus, ok) if not o], [r for r, o in zip(resolution, ok) if not o],
                        s=14, facecolor="white", edgecolor=f"C{i}")
        for n, ls in zip(budgets, styles):
            axes[2].loglog(taus, [mse_at_budget(s, n) for s in stats], ls, marker="o", ms=3, color=f"C{i}")
    lines = ((("reinforce", 1), "REINFORCE", "C2"), (("reinforce_loo", js[0]), f"REINFORCE + LOO, J = {js[0]}", "C3"),
             (loo, f"REINFORCE + LOO, J = {js[-1]}", "C4"))
    for key, name, color in lines:
        axes[0].axhline(race[key]["variance_per_evaluation"], color=color, lw=1, label=name)
    for n, ls in zip(budgets, styles):
        axes[2].axhline(mse_at_budget(race[loo], n), color="C4", ls=ls, lw=1)
        axes[2].plot([], [], ls, color="k", label=f"B = {n}")
    axes[2].plot([], [], "-", color="C4", label=f"REINFORCE + LOO, J = {js[-1]}")
    axes[1].scatter([], [], s=14, facecolor="white", edgecolor="0.3", label="not resolved: drawn at 2V/N")
    titles = ("variance per evaluation of f", "squared bias (REINFORCE: 0)", "MSE at a budget of B evaluations")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("temperature τ")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    return fig


def plot_estimator_budget(logits: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], tau: float = 1.0,
                          hard: bool = False, draws: int = 8, budget: int = 32, num_samples: int = 20_000,
                          num_points: int = 300, seed: int = 0):
    r"""One relaxed estimator (temperature ``tau``, straight-through if ``hard``) against REINFORCE with
    a leave-one-out baseline over $J$ = ``draws`` draws, at the same ``budget`` $B$ of evaluations of
    $f$. Left: the mean squared error against the budget (the relaxed one levels off at its squared
    bias; REINFORCE averages $\lfloor B/J \rfloor$ estimates). Right: ``num_points`` estimates at the
    chosen budget, as errors in the plane of the exact gradient and the relaxed estimator's bias.
    Seeded locally: the global random state is left as it was."""
    check_tau(tau)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2 or isinstance(budget, bool) \
            or not isinstance(budget, int) or budget < draws:
        raise ValueError(f"draws must be an int >= 2 and budget an int >= draws, got {draws!r} and {budget!r}")
    relaxed = "straight_through" if hard else "gumbel_softmax"
    exact = exact_gradient(logits, f)
    m = budget // draws  # REINFORCE + LOO estimates that fit in the budget
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        s_rel = gradient_statistics(gradient_samples(logits, f, relaxed, num_samples, tau), exact)
        s_loo = gradient_statistics(gradient_samples(logits, f, "reinforce_loo", num_samples, draws=draws),
                                    exact, draws)
        cloud_rel = gradient_samples(logits, f, relaxed, num_points, tau, draws=budget)  # the mean of B draws
        cloud_loo = gradient_samples(logits, f, "reinforce_loo", num_points * m, draws=draws)
        cloud_loo = cloud_loo.view(num_points, m, -1).mean(1)                           # the mean of m estimates
    e1 = exact / exact.norm()
    offset = cloud_rel.mean(0) - exact
    e2 = offset - (offset @ e1) * e1
    if e2.norm() < 1e-12:  # no bias across the gradient: any direction orthogonal to it
        e2 = torch.roll(e1, 1) - (torch.roll(e1, 1) @ e1) * e1
    e2 = e2 / e2.norm()
    ns = torch.unique(torch.logspace(math.log10(draws), 3, 40, dtype=torch.float64).round().long()).tolist()
    rel_name, loo_name = _NAMES[relaxed] + f", τ = {tau:g}", f"REINFORCE + LOO, J = {draws}"
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    ax0.loglog(ns, [mse_at_budget(s_rel, n) for n in ns], color="C0", label=rel_name)
    ax0.loglog(ns, [s_loo["variance"] / (n // draws) for n in ns], color="C4", label=loo_name)
    ax0.axhline(max(s_rel["bias2"], 1e-9), color="C0", ls=":", lw=1, label="its squared bias (the floor)")
    ax0.axvline(budget, color="0.5", ls="--", lw=1)
    ax0.set_xlabel("budget B (evaluations of f)")
    ax0.set_ylabel("MSE of the averaged estimate")
    ax0.set_title("Averaging removes variance, not bias", fontsize=10)
    ax0.grid(alpha=0.3, which="both")
    ax0.legend(fontsize=7)
    for cloud, color, label, mse in ((cloud_loo, "C4", loo_name, s_loo["variance"] / m),
                                     (cloud_rel, "C0", rel_name, mse_at_budget(s_rel, budget))):
        xy = torch.stack([(cloud - exact) @ e1, (cloud - exact) @ e2], -1)
        ax1.scatter(*xy.T.numpy(), s=6, alpha=0.35, color=color, label=f"{label}: MSE {mse:.2g}")
        ax1.plot(*xy.mean(0).numpy(), "X", color=color, ms=9, mec="k")
    ax1.plot(0, 0, "*", color="C3", ms=14, mec="k", label="exact gradient (X: the means)")
    ax1.set_xlabel("error along ∇")
    ax1.set_ylabel("error across ∇ (towards the bias)")
    ax1.set_title(f"{num_points} estimates, each from B = {budget} evaluations", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_policy(values: torch.Tensor, tasks: Sequence[str], title: str = "Policy: which task runs which block",
                ax=None, colorbar: bool = True):
    """A blocks-by-tasks grid: rows are blocks $l = 0, 1, \\dots$ (input at the top), columns are
    tasks; colour and number give $P(\\text{select}) = \\pi_{l,m}$ (or 1/0 for a fixed policy, drawn
    as ✓ and ·). Draws into ``ax`` when given one; ``colorbar=False`` leaves the colour scale out
    (0 white, 1 dark blue)."""
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
    ax.set_yticks(range(n), [str(i) for i in range(n)])
    ax.set_xlabel("task")
    ax.set_ylabel("block l (0 = nearest the input)")
    ax.set_title(title, fontsize=10)
    if colorbar:
        fig.colorbar(im, ax=ax, label="P(select)" if not binary else "selected", fraction=0.08)
    fig.tight_layout()
    return fig
