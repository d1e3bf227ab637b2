"""Self-check for the exercise of the page "Write your own method": an objective that matches
the teacher's logits with a mean squared error (chapter 1's high-temperature limit of KD)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import Objective
from ..runtime import attempted

__all__ = ["check_logit_matching"]


def _nets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 5))
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    with torch.no_grad():
        for p in (*teacher.parameters(), *student.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    return teacher, student


def check_logit_matching(make_objective: Callable[[nn.Module], nn.Module]) -> bool:
    """Check ``make_objective(teacher)``: an :class:`~minidistill.losses.Objective` whose forward
    returns ``(loss, logits, terms)`` with ``loss`` = mean over the batch and the classes of
    $(z - v)^2$ (any positive multiple of it is accepted: $\\frac12$ or a sum over classes
    only rescale the gradient), the student's logits $z$, and a teacher that stays frozen in
    eval mode (its dropout off) and gets no gradient. Prints what is wrong, returns True when
    all is right."""
    teacher, student = _nets()
    x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 5

    def build():
        make_objective(teacher)(student, x, y)

    if not attempted(build):
        return False
    objective = make_objective(teacher)
    problems = []
    if not isinstance(objective, Objective):
        problems.append("derive the class from losses.Objective (or losses.TeacherObjective)")
    objective.train()
    if teacher.training:
        problems.append("objective.train() put the teacher in training mode: derive from losses.TeacherObjective")
    out = objective(student, x, y)
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], dict)):
        problems.append("forward must return (loss, logits, terms) with terms a dict")
    else:
        loss, logits, _ = out
        with torch.no_grad():
            v, z = teacher.eval()(x), student(x)
        mse = F.mse_loss(z, v)
        if logits is None or not torch.allclose(logits, z):
            problems.append("return the student's logits as the second element")
        ratio = (loss.detach() / mse).item() if loss.ndim == 0 else float("nan")
        if not ratio > 0 or not torch.isfinite(torch.tensor(ratio)):
            problems.append(f"the loss should be a positive multiple of mean((z - v)^2); got {loss.detach()}")
        else:
            other_x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(2))
            loss2 = objective(student, other_x, y)[0].detach()
            with torch.no_grad():
                mse2 = F.mse_loss(student(other_x), teacher(other_x))
            if abs((loss2 / mse2).item() - ratio) > 1e-4 * ratio:
                problems.append("the loss is not a fixed multiple of mean((z - v)^2) (is it squared? averaged?)")
        loss.backward()
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters()):
            problems.append("the teacher received gradients: run it under torch.no_grad()")
        if any(p.requires_grad for p in teacher.parameters()) and not isinstance(objective, Objective):
            problems.append("freeze the teacher")
    for p in problems:
        print("✗", p)
    if not problems:
        print("✓ a frozen teacher, the student's logits, and a loss proportional to the mean squared logit gap")
    return not problems
