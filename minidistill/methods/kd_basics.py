r"""Chapter 1 -- Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

The loss itself is shared by every chapter and lives in :mod:`minidistill.losses`
(:func:`~minidistill.losses.soft_targets`, :func:`~minidistill.losses.kd_loss`,
:func:`~minidistill.losses.distillation_loss`). This room holds what the chapter adds: the
closed-form gradients its derivation checks, the student-vs-KD experiment, and the
exercises' self-checks.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..data import Dataset
from ..losses import Distillation, check_logits_pair, check_temperature, kd_loss, soft_targets
from ..models import create_model
from ..runtime import attempted, seed_everything
from ..train import History, Recipe, fit

__all__ = [
    "soft_target_gradient",
    "logit_matching_gradient",
    "gradient_norms",
    "train_student",
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
    **fit_kwargs,
) -> tuple[nn.Module, History]:
    """Train a fresh ``name`` from seed ``seed``: alone (``teacher=None``, cross-entropy) or
    distilled from ``teacher`` with :class:`~minidistill.losses.Distillation`. Same seed,
    same initial weights and data order either way, so the two differ only in the loss."""
    seed_everything(seed)
    model = create_model(name, data.num_classes)
    objective = None if teacher is None else Distillation(teacher, temperature, alpha)
    label = f"{name} ({'alone' if teacher is None else f'KD, T={temperature:g}'}, seed {seed})"
    history = fit(model, data, objective, recipe, seed=seed, description=label, **fit_kwargs)
    return model, history


# -- self-checks for the exercises ----------------------------------------------------------
# Each check prints one line starting with a tick when the answer is right, says "not
# attempted yet" while the exercise still raises NotImplementedError, and raises an
# AssertionError with a hint when the answer is wrong.

def _cases(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, k, generator=g) * s, torch.randn(n, k, generator=g) * s)
            for n, k, s in ((1, 3, 1.0), (8, 10, 3.0), (4, 100, 10.0))]


def check_soft_targets(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> None:
    """Exercise 1: your ``fn(logits, T)`` must equal the tempered softmax, also for large logits."""
    if not attempted(fn, torch.zeros(1, 3), 1.0):
        return
    for (z, _), t in zip(_cases(), (1.0, 4.0, 20.0)):
        z = z * 50  # large logits: a naive exp() overflows
        got = fn(z, t)
        want = soft_targets(z, t)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            raise AssertionError(f"expected a tensor of shape {tuple(want.shape)}, got {type(got).__name__} "
                                 f"{tuple(getattr(got, 'shape', ()))}")
        if not torch.isfinite(got).all():
            raise AssertionError("got inf/NaN for large logits: subtract the row maximum before exp()")
        if not torch.allclose(got.float(), want, atol=1e-5):
            raise AssertionError(f"values differ at T={t}: did you divide the logits (not the probabilities) by T?")
    print("✓ soft targets: correct")


def check_kd_loss(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    """Exercise 2: your ``fn(student_logits, teacher_logits, T)`` must equal T² · batch-mean KL(p_t || p_s)."""
    if not attempted(fn, torch.zeros(1, 3), torch.zeros(1, 3), 1.0):
        return
    for (z, v), t in zip(_cases(1), (1.0, 4.0, 10.0)):
        got, want = fn(z, v, t), kd_loss(z, v, t)
        if not isinstance(got, torch.Tensor) or got.ndim != 0:
            raise AssertionError("expected a scalar tensor (reduce over the batch)")
        if torch.allclose(got, want / t**2, rtol=1e-4) and t != 1.0:
            raise AssertionError("off by a factor T²: multiply the KL by T**2")
        if torch.allclose(got * z.shape[1], want, rtol=1e-4):
            raise AssertionError("off by a factor K: use reduction='batchmean', not 'mean' (which divides by N·K)")
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
            raise AssertionError(f"value {got.item():.6g} != {want.item():.6g} at T={t}: check the KL direction "
                                 "(teacher first: KL(p_t || p_s)) and that both softmaxes use T")
    print("✓ KD loss: correct")


def check_shrink_factor(answer: float | None) -> None:
    """Exercise 3: by what factor does the soft-target gradient *without* T² shrink when T
    doubles at high temperature? (Measure it with :func:`gradient_norms` if unsure.)"""
    if answer is None or answer is ...:
        print("… not attempted yet: replace the ... with your number")
        return
    if not isinstance(answer, (int, float)):
        raise AssertionError("answer with a number")
    if abs(answer - 4) < 0.2:
        print("✓ shrink factor: correct -- the gradient falls as 1/T², so doubling T divides it by 4")
    elif abs(answer - 2) < 0.2:
        raise AssertionError("not quite: one factor 1/T comes from the chain rule, another from q - p itself shrinking")
    else:
        raise AssertionError("not quite: look at Eq. 4, the gradient scales as 1/(K T²)")
