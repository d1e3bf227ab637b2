r"""Chapter 3's figures (FitNets), and the numbers behind them: the hint diagram, the training
curves of both stages on one epoch axis, the budget curve, the pull of the stage-2 soft term
against the temperature, and what the hint does to the guided layer (channel-averaged maps,
and the held-out $R^2$ of the best linear map from the guided features to the hint). Every
name is re-exported by
:mod:`minidistill.methods.fitnets`, where the notebook calls them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import check_logits_pair

__all__ = [
    "plot_training",
    "plot_budget",
    "conv_layers",
    "plot_hint_diagram",
    "soft_term_balance",
    "plot_kd_balance",
    "channel_maps",
    "hint_r2",
    "plot_hint_maps",
]


# -- the idea, the training curves and the budget experiment -----------------------------------

def plot_training(hint_histories: Sequence, histories: Mapping[str, Sequence], offsets: Mapping[str, int] | None = None,
                  title: str | None = None):
    r"""The chapter's training curves on epoch axes with integer ticks.

    Left (when stage 1 ran for 2 epochs or more; a single epoch is no curve and is left out):
    stage 1's loss per epoch, the per-feature hint loss the trunk minimises, mean and min-max
    band over ``hint_histories``. Right: test accuracy against the epochs of training each run
    has used so far, one line per ``{label: [History, ...]}`` (mean over seeds, min-max band);
    ``offsets[label]`` epochs of an earlier stage are added to that label's epochs, so that a
    second stage starts where its first stage ended and runs of equal compute end at the same
    place. Epochs that were not scored (NaN) are skipped. Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    offsets = dict(offsets or {})
    unknown = set(offsets) - set(histories)
    if unknown:
        raise ValueError(f"offsets name labels that have no histories: {sorted(unknown)}")
    if not histories or any(len(list(hs)) == 0 for hs in histories.values()):
        raise ValueError("every label needs at least one History")
    stage1 = [h for h in hint_histories if len(h) >= 2]
    panels = 2 if stage1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.6), squeeze=False)
    axes = axes[0]

    def band(ax, xs, rows, label, color):
        ys = torch.tensor(rows, dtype=torch.float64)
        keep = ~torch.isnan(ys).any(0)
        x = [v for v, k in zip(xs, keep.tolist()) if k]
        ax.plot(x, ys.mean(0)[keep].numpy(), "o-", ms=3, color=color,
                label=label + (f" (mean of {len(rows)})" if len(rows) > 1 else ""))
        if len(rows) > 1:
            ax.fill_between(x, ys.min(0).values[keep].numpy(), ys.max(0).values[keep].numpy(), alpha=0.2, color=color)

    if stage1:
        ax = axes[0]
        band(ax, stage1[0]["epoch"], [h["train_loss"] for h in stage1], "stage 1 (trunk + regressor)", "C0")
        ax.set_xlabel("stage-1 epoch")
        ax.set_ylabel("hint loss per feature")
        ax.set_title("Stage 1: the trunk learns the hint")
    ax = axes[-1]
    last = 0
    for i, (label, hs) in enumerate(histories.items()):
        hs = list(hs)
        shift = offsets.get(label, 0)
        xs = [e + shift for e in hs[0]["epoch"]]
        last = max(last, xs[-1])
        band(ax, xs, [h["test_acc"] for h in hs], label, f"C{i}")
    for shift in sorted(set(offsets.values()) - {0}):
        ax.axvline(shift + 0.5, color="0.5", ls=":", lw=1)
    ax.set_xlabel("epochs of training (stage 1 counted)" if offsets else "epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy")
    for a in axes:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_budget(depths: Sequence[int], accuracies: dict[str, Sequence[float]], budget: int,
                title: str | None = None, ax=None):
    """Test accuracy against depth for students of (about) the same multiplication count,
    one line per training method (``{method: [accuracy per depth]}``); NaN marks a run that
    diverged. Returns the figure."""
    import matplotlib.pyplot as plt

    if any(len(v) != len(depths) for v in accuracies.values()):
        raise ValueError(f"every method needs one accuracy per depth ({len(depths)})")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3.4))
    for i, (method, acc) in enumerate(accuracies.items()):
        ax.plot(list(depths), list(acc), "o-", color=f"C{i}", label=method)
    ax.set_xticks(list(depths))
    ax.set_xlabel("conv layers (width shrinks to keep the budget)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or f"Students of about {budget / 1e6:.0f}M multiplications")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def conv_layers(model: nn.Module) -> list[tuple[str, int]]:
    """``(name, output channels)`` of every 2-D convolution of ``model`` in registration
    (forward) order, shortcut projections left out: the layers a diagram shows."""
    return [(name, m.out_channels) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and "shortcut" not in name]


def plot_hint_diagram(teacher_widths: Sequence[int], student_widths: Sequence[int], hint: int, guided: int,
                      title: str = "Hint training: the guided layer learns to predict the hint"):
    """The FitNets picture: one bar per conv layer (height ~ channels), the wide shallow
    teacher above the thin deep student; the student's layers up to ``guided`` (0-based
    index), which stage 1 trains, are shaded, and an arrow runs from the teacher's layer
    ``hint`` through the regressor to the guided layer. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    if not (0 <= hint < len(teacher_widths) and 0 <= guided < len(student_widths)):
        raise ValueError(f"hint must index a teacher layer (0..{len(teacher_widths) - 1}) and guided a student "
                         f"layer (0..{len(student_widths) - 1}), got hint={hint}, guided={guided}")
    top = max(max(teacher_widths), max(student_widths))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    n = max(len(teacher_widths), len(student_widths))
    xs_t, xs_s = {}, {}
    for row, widths, y0, xs in (("teacher", teacher_widths, 2.2, xs_t), ("student", student_widths, 0.0, xs_s)):
        step = n / len(widths)
        for i, w in enumerate(widths):
            h = 0.25 + 1.3 * w / top
            x = i * step + 0.1
            if row == "teacher":
                color = "C1" if i == hint else "0.75"
            else:
                color = "C0" if i == guided else ("#9ecae1" if i < guided else "0.85")
            ax.add_patch(Rectangle((x, y0 + (1.6 - h) / 2), 0.8 * step, h, color=color, ec="k", lw=0.5))
            xs[i] = (x + 0.4 * step, y0 + (1.6 + h) / 2, y0 + (1.6 - h) / 2)
        ax.text(-0.3, y0 + 0.8, f"{row}\n{len(widths)} conv\n{min(widths)}-{max(widths)} ch", ha="right",
                va="center", fontsize=8)
    (xt, _, yt_bottom), (xg, yg_top, _) = xs_t[hint], xs_s[guided]
    ax.add_patch(FancyArrowPatch((xg, yg_top), (xt, yt_bottom), arrowstyle="<|-|>", mutation_scale=12, color="C3", lw=1.5))
    ax.text((xt + xg) / 2 + 0.2, (yg_top + yt_bottom) / 2, r"$\frac{1}{2}\|f^t_h(x) - r(f^s_g(x))\|^2$", color="C3",
            fontsize=10, va="center")
    ax.set_xlim(-2.2, n + 0.3)
    ax.set_ylim(-0.2, 4.0)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    handles = [Rectangle((0, 0), 1, 1, color=c, ec="k", lw=0.5) for c in ("C1", "C0", "#9ecae1")]
    ax.legend(handles, ["hint layer h", "guided layer g", "also trained in stage 1"], fontsize=8,
              loc="upper right", ncol=3, frameon=False, bbox_to_anchor=(1.0, 1.02))
    fig.tight_layout()
    return fig


# -- the balance of the two stage-2 terms -----------------------------------------------------

def soft_term_balance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperatures: Sequence[float]) -> dict[str, list[float]]:
    r"""For each temperature $T$: the norm of the gradient (w.r.t. the student logits) of the
    soft term $H(p^t_T, p^s_T)$ divided by that of the label term $H(q, p^s)$, without the
    $T^2$ factor (``'fitnets'``) and with it (``'hinton'``). Multiply by a weight $\lambda$ to
    read the soft term's share of the update. Computed in float64."""
    from .fitnets import fitnets_kd_loss  # here, not at the top: fitnets re-exports this module's names

    check_logits_pair(student_logits, teacher_logits)
    z0 = student_logits.detach().double()
    z = z0.clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z, targets), z)
    out: dict[str, list[float]] = {"temperature": [], "fitnets": [], "hinton": []}
    for t in temperatures:
        z = z0.clone().requires_grad_(True)
        soft = fitnets_kd_loss(z, teacher_logits.double(), targets, t, 1.0) - F.cross_entropy(z, targets)
        (g,) = torch.autograd.grad(soft, z)
        ratio = (g.norm() / g_ce.norm()).item()
        out["temperature"].append(float(t))
        out["fitnets"].append(ratio)
        out["hinton"].append(ratio * t**2)
    return out


def plot_kd_balance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                    weight: float = 4.0, temperature: float = 3.0,
                    temperatures: Sequence[float] = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 20), ax=None):
    r"""How strongly the soft term pulls, relative to the label term, as $T$ grows: the
    gradient-norm ratio of :func:`soft_term_balance` times ``weight``, for FitNets' term (no
    $T^2$) and Hinton's ($T^2$), with ``temperature`` marked. Returns the figure."""
    import matplotlib.pyplot as plt

    b = soft_term_balance(student_logits, teacher_logits, targets, temperatures)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.2, 3.4))
    ax.loglog(b["temperature"], [weight * r for r in b["fitnets"]], "o-", label=r"FitNets: $\lambda\,H$ (no $T^2$)")
    ax.loglog(b["temperature"], [weight * r for r in b["hinton"]], "s-", label=r"Hinton: $\lambda\,T^2\,$KL")
    ax.axvline(temperature, color="k", ls=":", lw=1, label=rf"$T$ = {temperature:g}")
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="as strong as the label term")
    ax.set_xlabel(r"temperature $T$")
    ax.set_ylabel("soft / label gradient norm")
    ax.set_title(rf"Pull of the soft term at weight $\lambda$ = {weight:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# -- what the hint does to the guided layer ----------------------------------------------------

def channel_maps(features: torch.Tensor) -> torch.Tensor:
    """Channel-averaged maps ``[N, H, W]`` of features ``[N, C, H, W]``, each scaled to [0, 1]
    (a constant map becomes 0), so that maps of different layers can be shown side by side."""
    if features.ndim != 4:
        raise ValueError(f"features must be [N, C, H, W], got {tuple(features.shape)}")
    m = features.detach().float().mean(1)
    lo = m.flatten(1).min(1).values.view(-1, 1, 1)
    hi = m.flatten(1).max(1).values.view(-1, 1, 1)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def hint_r2(student_features: torch.Tensor, teacher_features: torch.Tensor, holdout: float = 0.5,
            ridge: float = 1e-6) -> float:
    r"""How well the hint can be predicted from the guided features by the best linear 1x1
    map (least squares with a bias, fitted on the first ``1 - holdout`` of the examples):
    the coefficient of determination $R^2 = 1 - \mathrm{SSE}/\mathrm{SST}$ on the held-out
    examples. 1 is perfect, 0 is no better than the mean hint. Needs maps of the same spatial
    size; computed in float64 on the CPU."""
    if student_features.ndim != 4 or teacher_features.ndim != 4 or \
            student_features.shape[0] != teacher_features.shape[0] or \
            student_features.shape[2:] != teacher_features.shape[2:]:
        raise ValueError("need features [N, C_s, H, W] and [N, C_t, H, W] (same N, H, W), got "
                         f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}")
    n = student_features.shape[0]
    n_fit = int(round(n * (1 - holdout)))
    if not (0 < holdout < 1 and 0 < n_fit < n):
        raise ValueError(f"holdout must leave examples on both sides (N={n}), got {holdout!r}")

    def rows(f: torch.Tensor) -> torch.Tensor:
        return f.detach().cpu().double().permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1])

    v, u = rows(student_features), rows(teacher_features)
    x = torch.cat([v, torch.ones(*v.shape[:2], 1, dtype=v.dtype)], -1)
    x_fit, u_fit = x[:n_fit].flatten(0, 1), u[:n_fit].flatten(0, 1)
    x_test, u_test = x[n_fit:].flatten(0, 1), u[n_fit:].flatten(0, 1)
    gram = x_fit.T @ x_fit
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram, x_fit.T @ u_fit)
    sse = (u_test - x_test @ w).pow(2).sum()
    sst = (u_test - u_test.mean(0)).pow(2).sum()
    return float(1 - sse / sst) if sst > 0 else float("nan")


def plot_hint_maps(images: torch.Tensor, rows: dict[str, torch.Tensor], title: str = "What the hint does"):
    """A grid: the input images on top, then one row of channel-averaged maps
    (:func:`channel_maps`) per entry of ``rows`` (``{label: features [N, C, H, W]}``)."""
    import matplotlib.pyplot as plt

    n = len(images)
    if any(len(f) != n for f in rows.values()):
        raise ValueError(f"every row needs {n} feature maps, one per image")
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.25 * n + 1.6, 1.3 * (1 + len(rows))), squeeze=False)
    imgs = images.detach().float().cpu()
    imgs = (imgs - imgs.amin((1, 2, 3), keepdim=True)) / (imgs.amax((1, 2, 3), keepdim=True) - imgs.amin((1, 2, 3), keepdim=True)).clamp_min(1e-12)
    for j in range(n):
        axes[0, j].imshow(imgs[j].permute(1, 2, 0).numpy())
    for i, (label, feats) in enumerate(rows.items(), start=1):
        maps = channel_maps(feats).cpu()
        for j in range(n):
            axes[i, j].imshow(maps[j].numpy(), cmap="viridis", vmin=0, vmax=1)
    for i, label in enumerate(["input", *rows]):
        axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
