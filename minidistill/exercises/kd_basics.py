"""Chapter 1's exercise self-checks (Hinton et al., knowledge distillation), re-exported by
:mod:`minidistill.methods.kd_basics`.

Each check prints one line starting with a tick when the answer is right, says "not
attempted yet" while the exercise still raises ``NotImplementedError`` (or is left as ``...``),
and raises an ``AssertionError`` with a hint that names the classic mistake when it is wrong.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..losses import kd_loss, soft_targets
from ..runtime import attempted

__all__ = ["check_soft_targets", "check_kd_loss", "check_shrink_factor"]


def _cases(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three (student, teacher) logit pairs: one row of 3 classes, 8 of 10, 4 of 100."""
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
    doubles at high temperature? (Measure it with
    :func:`~minidistill.methods.kd_basics.gradient_norms` if unsure.)"""
    if answer is None or answer is ...:
        print("… not attempted yet: replace the ... with your number")
        return
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        raise AssertionError("answer with a number")
    if abs(answer - 4) < 0.2:
        print("✓ shrink factor: correct -- the gradient falls as 1/T², so doubling T divides it by 4")
    elif abs(answer - 2) < 0.2:
        raise AssertionError("not quite: one factor 1/T comes from the chain rule, another from q - p itself shrinking")
    else:
        raise AssertionError("not quite: look at Eq. 4, the gradient scales as 1/(K T²)")
