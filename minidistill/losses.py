r"""Distillation primitives shared by every chapter.

Pure functions of tensors first (:func:`soft_targets`, :func:`kd_loss`,
:func:`distillation_loss`), then the two *objectives* the trainer takes: an objective is a
module called as ``objective(model, x, y) -> (loss, logits)``, so teacher-student training
is the same :func:`minidistill.train.fit` with another objective, not another trainer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "check_temperature",
    "check_logits_pair",
    "soft_targets",
    "kd_loss",
    "distillation_loss",
    "CrossEntropy",
    "Distillation",
]


def check_temperature(temperature: float) -> None:
    """Raise a ``ValueError`` unless ``temperature`` is a finite number > 0."""
    if isinstance(temperature, torch.Tensor):
        ok = bool(torch.all(temperature > 0) & torch.all(torch.isfinite(temperature)))
    else:
        ok = isinstance(temperature, (int, float)) and temperature > 0 and temperature < float("inf")
    if not ok:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")


def check_logits_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless both are ``[N, K]`` logits of the same shape."""
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both be [N, K] with the same shape, got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )


def _check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.ndim != 1 or len(targets) != len(logits) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 class indices [{len(logits)}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (softmax and KL in low precision lose the small
    probabilities that distillation is about); float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""The tempered softmax $p_k = e^{z_k/T} / \sum_j e^{z_j/T}$ over the last dimension."""
    check_temperature(temperature)
    return torch.softmax(_upcast(logits) / temperature, dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    r"""Hinton's soft-target loss, scaled so its gradient does not shrink with $T$:

    $$\mathcal L_\mathrm{KD} = T^2 \, \frac1N \sum_{n=1}^N
      \mathrm{KL}\big(\mathrm{softmax}(v_n/T) \,\|\, \mathrm{softmax}(z_n/T)\big)$$

    with student logits $z$ and teacher logits $v$ (the teacher is the target and gets no
    gradient). Half-precision logits are computed in float32 (float64 stays float64).
    """
    check_logits_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    log_p_s = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(_upcast(teacher_logits.detach()).to(log_p_s.dtype) / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    r"""The usual mix $(1-\alpha)\,H(y, \mathrm{softmax}(z)) + \alpha\,\mathcal L_\mathrm{KD}$.

    ``alpha=0`` is plain cross-entropy, ``alpha=1`` pure distillation; $\mathcal L_\mathrm{KD}$
    keeps its $T^2$ factor at every ``alpha``.
    """
    _check_alpha(alpha)
    _check_targets(student_logits, targets)
    ce = F.cross_entropy(_upcast(student_logits), targets)
    return (1 - alpha) * ce + alpha * kd_loss(student_logits, teacher_logits, temperature)


class CrossEntropy(nn.Module):
    """The plain objective: ``(cross_entropy(model(x), y), logits)``, optional label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), logits


class Distillation(nn.Module):
    """The KD objective: a frozen teacher's logits (eval mode, no grad) and
    :func:`distillation_loss`. ``fit(student, data, objective=Distillation(teacher))``."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        check_temperature(temperature)
        _check_alpha(alpha)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def train(self, mode: bool = True) -> "Distillation":
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm statistics never move
        return self

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        logits = model(x)
        return distillation_loss(logits, teacher_logits, y, self.temperature, self.alpha), logits
