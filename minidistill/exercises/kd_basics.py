"""Chapter 1's exercise self-checks (Hinton et al., knowledge distillation), re-exported by
:mod:`minidistill.methods.kd_basics`.

Each check prints one line starting with a tick when the answer is right, says "not
attempted yet" while the exercise still raises ``NotImplementedError`` (or is left as ``...``),
and raises an ``AssertionError`` with a hint that names the classic mistake when it is wrong.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..losses import kd_loss, soft_targets
from ..runtime import attempted

__all__ = ["check_soft_targets", "check_kd_loss", "check_kd_gradient_limit"]


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


#: exercise 3: one example, K = 3 classes, student logits z and teacher logits v
LIMIT_EXERCISE = {"z": (2.0, 0.0, 1.0), "v": (5.0, 2.0, -1.0)}


def check_kd_gradient_limit(answer: Sequence[float] | torch.Tensor | None) -> None:
    r"""Exercise 3: for ``LIMIT_EXERCISE``'s one example, the limit as $T \to \infty$ of the
    gradient of $\mathcal L_\mathrm{KD} = T^2\,\mathrm{KL}(p^t_T \,\|\, p^s_T)$ with respect to
    the student's logits $z$, as three numbers. The reference is autograd of
    :func:`~minidistill.losses.kd_loss` at $T = 10^5$ in float64, not the formula."""
    if answer is None or answer is ...:
        print("… not attempted yet: replace the ... with your three numbers")
        return
    try:
        got = torch.as_tensor(answer, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise AssertionError("answer with three numbers, one per class: a list, a tuple or a tensor") from None
    if got.numel() != 3 or not torch.isfinite(got).all():
        raise AssertionError(f"answer with three finite numbers, one per class; got {got.numel()} values")
    z = torch.tensor(LIMIT_EXERCISE["z"], dtype=torch.float64)[None].requires_grad_(True)
    v = torch.tensor(LIMIT_EXERCISE["v"], dtype=torch.float64)[None]
    (want,) = torch.autograd.grad(kd_loss(z, v, 1e5), z)
    want = want[0]
    k = len(want)
    close = lambda a, b: torch.allclose(a, b, atol=2e-3)  # noqa: E731
    if close(got, want):
        print(f"✓ KD gradient limit: correct -- {[round(x, 3) for x in want.tolist()]}, the gradient of matching the "
              f"*centred* logits, (z̄ - v̄)/K: with the T² factor it neither vanishes nor grows")
        return
    raw = (z.detach()[0] - v[0]) / k
    if close(got, torch.zeros(k, dtype=torch.float64)):
        raise AssertionError("zero is the limit *without* the T² factor (it falls like 1/T²); L_KD has T² in front")
    if close(got, -want):
        raise AssertionError("check the sign: the gradient points from the teacher to the student, p^s_T - p^t_T")
    if close(got, raw):
        raise AssertionError("that is (z - v)/K, the gradient of matching the raw logits; KD's gradient sums to zero "
                             "over the classes: centre both logit vectors first (subtract each one's mean)")
    if close(got, want * k):
        raise AssertionError("off by a factor K: the limit of T² (p^s_T - p^t_T)/T is (z̄ - v̄)/K, since e^(x/T) ≈ 1 + x/T "
                             "and the softmax's denominator tends to K")
    raise AssertionError("not quite: expand e^(x/T) ≈ 1 + x/T in both softmaxes (chapter 1, step 4), then multiply "
                         "the gradient (p^s_T - p^t_T)/T by T²")
