r"""Chapter 1 -- Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

The loss itself is shared by every chapter and lives in :mod:`minidistill.losses`
(:func:`~minidistill.losses.soft_targets`, :func:`~minidistill.losses.kd_loss`,
:func:`~minidistill.losses.distillation_loss`). This room holds what the chapter adds: the
closed-form gradients its derivation checks and the student-vs-KD experiment
(:func:`train_student`, a few lines on :func:`minidistill.train.train_model`). The chapter's
teacher is :func:`minidistill.fast_teacher.fast_teacher`, shared with chapter 2. The exercises'
self-checks live in :mod:`minidistill.exercises.kd_basics` and are re-exported here.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..data import Dataset
from ..exercises.kd_basics import check_kd_loss, check_shrink_factor, check_soft_targets
from ..losses import Distillation, check_logits_pair, check_temperature, kd_loss, soft_targets
from ..train import History, Recipe, train_model

__all__ = [
    "soft_target_gradient",
    "logit_matching_gradient",
    "gradient_norms",
    "train_student",
    # exercise self-checks, from exercises.kd_basics
    "check_soft_targets",
    "check_kd_loss",
    "check_shrink_factor",
]


def soft_target_gradient(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Closed form of $\partial C/\partial z_i = \frac1T (q_i - p_i)$ for one example's soft-target
    cross-entropy $C = -\sum_i p_i \log q_i$, $q = \mathrm{softmax}(z/T)$, $p = \mathrm{softmax}(v/T)$.
    Row by row: ``[N, K]`` in, ``[N, K]`` out (no batch averaging)."""
    check_logits_pair(student_logits, teacher_logits)
    q = soft_targets(student_logits.double(), temperature)
    p = soft_targets(teacher_logits.double(), temperature)
    return (q - p) / temperature


def logit_matching_gradient(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""The high-temperature limit of :func:`soft_target_gradient` (Hinton et al., Eq. 4):
    $\frac{1}{K T^2}\,(z_i - v_i)$ after centring each row of logits to zero mean."""
    check_logits_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    z = student_logits.double() - student_logits.double().mean(-1, keepdim=True)
    v = teacher_logits.double() - teacher_logits.double().mean(-1, keepdim=True)
    return (z - v) / (z.shape[-1] * temperature**2)


def gradient_norms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperatures: Sequence[float]) -> dict[str, list[float]]:
    r"""For each $T$, the norm of the autograd gradient w.r.t. the student logits of the
    batch-mean soft-target KL *without* the $T^2$ factor (``'raw'``) and of
    :func:`~minidistill.losses.kd_loss`, which has it (``'scaled'``)."""
    out: dict[str, list[float]] = {"temperature": [], "raw": [], "scaled": []}
    for t in temperatures:
        z = student_logits.detach().double().requires_grad_(True)
        (g,) = torch.autograd.grad(kd_loss(z, teacher_logits.double(), t), z)
        out["temperature"].append(float(t))
        out["scaled"].append(g.norm().item())
        out["raw"].append(g.norm().item() / t**2)
    return out


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
