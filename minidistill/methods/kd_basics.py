r"""Chapter 1 -- Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

The loss itself is shared by every chapter and lives in :mod:`minidistill.losses`
(:func:`~minidistill.losses.soft_targets`, :func:`~minidistill.losses.kd_loss`,
:func:`~minidistill.losses.distillation_loss`). This room holds what the chapter adds: the
closed-form gradients its derivation checks, the teacher's class-by-class soft targets
(:func:`mean_soft_targets`) and the student-vs-KD experiment (:func:`train_student`, a few lines
on :func:`minidistill.train.train_model`). The chapter's teacher is
:func:`minidistill.fast_teacher.fast_teacher`, shared with chapter 2. The figures live in
:mod:`minidistill.methods.kd_basics_plots` and the exercises' self-checks in
:mod:`minidistill.exercises.kd_basics`; both are re-exported here.

Notation as in the course (``book/notation.md``): student logits $z$, teacher logits $v$,
temperature $T$, $p^s_T = \mathrm{softmax}(z/T)$, $p^t_T = \mathrm{softmax}(v/T)$, $K$ classes.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..exercises.kd_basics import check_kd_gradient_limit, check_kd_loss, check_soft_targets
from ..losses import Distillation, check_logits_pair, check_temperature, kd_loss, soft_targets
from ..train import History, Recipe, train_model
from .kd_basics_plots import plot_class_soft_targets, plot_soft_targets

__all__ = [
    "soft_target_gradient",
    "logit_matching_gradient",
    "gradient_norms",
    "mean_soft_targets",
    "train_student",
    # figures, from kd_basics_plots
    "plot_soft_targets",
    "plot_class_soft_targets",
    # exercise self-checks, from exercises.kd_basics
    "check_soft_targets",
    "check_kd_loss",
    "check_kd_gradient_limit",
]


def soft_target_gradient(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Closed form of $\partial C/\partial z_i = \frac1T \big(p^s_{T,i} - p^t_{T,i}\big)$ for one
    example's soft-target cross-entropy $C = H(p^t_T, p^s_T) = -\sum_i p^t_{T,i} \log p^s_{T,i}$,
    $p^s_T = \mathrm{softmax}(z/T)$, $p^t_T = \mathrm{softmax}(v/T)$.
    Row by row: ``[N, K]`` in, ``[N, K]`` out (no batch averaging), float64."""
    check_logits_pair(student_logits, teacher_logits)
    p_s = soft_targets(student_logits.double(), temperature)
    p_t = soft_targets(teacher_logits.double(), temperature)
    return (p_s - p_t) / temperature


def logit_matching_gradient(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""The high-temperature limit of :func:`soft_target_gradient` (Hinton et al., Eq. 4):
    $\frac{1}{K T^2}\,(\bar z_i - \bar v_i)$ with *centred* logits $\bar z = z - \mathrm{mean}_k z_k$
    (and $\bar v$ likewise): the gradient of matching the centred logits. Matching the raw
    logits is another objective (it also pulls the two means together, which KD never does)."""
    check_logits_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    z = student_logits.double() - student_logits.double().mean(-1, keepdim=True)
    v = teacher_logits.double() - teacher_logits.double().mean(-1, keepdim=True)
    return (z - v) / (z.shape[-1] * temperature**2)


def gradient_norms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperatures: Sequence[float]) -> dict[str, list[float]]:
    r"""For each $T$, the norm of the autograd gradient w.r.t. the student logits of the
    batch-mean soft-target KL *without* the $T^2$ factor (``'raw'``, written out here as
    $\frac1N\sum_n\sum_k p^t_{T,k}(\log p^t_{T,k} - \log p^s_{T,k})$) and of
    :func:`~minidistill.losses.kd_loss`, which has it (``'scaled'``). The two are computed
    separately (two losses, two backward passes), so ``scaled / raw = T²`` is a check, not an
    identity of the code. In float64."""
    check_logits_pair(student_logits, teacher_logits)
    out: dict[str, list[float]] = {"temperature": [], "raw": [], "scaled": []}
    v = teacher_logits.detach().double()
    for t in temperatures:
        check_temperature(t)
        z = student_logits.detach().double().requires_grad_(True)
        (g_scaled,) = torch.autograd.grad(kd_loss(z, v, t), z)
        log_p_t = F.log_softmax(v / t, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - F.log_softmax(z / t, dim=-1))).sum(-1).mean()
        (g_raw,) = torch.autograd.grad(kl, z)
        out["temperature"].append(float(t))
        out["scaled"].append(g_scaled.norm().item())
        out["raw"].append(g_raw.norm().item())
    return out


def mean_soft_targets(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                      num_classes: int | None = None) -> torch.Tensor:
    r"""The teacher's class-by-class soft targets: row $c$ is the mean of
    $\mathrm{softmax}(v_n/T)$ over the examples $n$ of true class $c$. ``[K, K]``, float64, rows
    summing to one (a class without examples gets a row of NaN). What a student distilled at
    temperature $T$ is taught, on average, about each class."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [N, K], got {getattr(logits, 'shape', type(logits))}")
    k = logits.shape[1] if num_classes is None else num_classes
    if k != logits.shape[1]:
        raise ValueError(f"num_classes={num_classes} but the logits have {logits.shape[1]} columns")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (len(logits),):
        raise ValueError(f"labels must be an int64 tensor [{len(logits)}], got "
                         f"{getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k - 1}], got values from {labels.min().item()} to {labels.max().item()}")
    check_temperature(temperature)
    p = soft_targets(logits.detach().double().cpu(), temperature)
    labels = labels.cpu()
    sums = torch.zeros(k, k, dtype=torch.float64).index_add_(0, labels, p)
    counts = torch.bincount(labels, minlength=k).double()
    return sums / counts[:, None]


def train_student(
    name: str,
    data: Dataset,
    recipe: Recipe,
    seed: int = 0,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    **fit_kwargs: Any,
) -> tuple[nn.Module, History]:
    """Train a fresh ``name`` from seed ``seed``: alone (``teacher=None``, cross-entropy) or
    distilled from ``teacher`` with :class:`~minidistill.losses.Distillation`. Same seed,
    same initial weights and data order either way, so the two differ only in the loss.
    :func:`~minidistill.train.train_model` does the work; other keyword arguments go to
    :func:`~minidistill.train.fit` (``eval_every=None`` for a run whose curves are not plotted)."""
    objective = None if teacher is None else Distillation(teacher, temperature, alpha)
    label = f"{name} ({'alone' if teacher is None else f'KD, T={temperature:g}'}, seed {seed})"
    model, history = train_model(name, data, recipe, objective, seed=seed, description=label, **fit_kwargs)
    return model, history
