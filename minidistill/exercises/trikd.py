"""Chapter 8's exercise self-checks (TriKD), re-exported by :mod:`minidistill.methods.trikd`.

Each check prints one line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises ``NotImplementedError``, and raises an ``AssertionError``
with a hint that names the classic mistake when it is wrong. The references are written out here
with explicit sums, independently of the package functions the chapter shows.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import attempted

__all__ = ["check_anchor_term", "check_anchor_gradient"]


def _kl_rows(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(target/T) || softmax(logits/T)) per row, written out."""
    lp_a = torch.log_softmax(target_logits / temperature, 1)
    lp = torch.log_softmax(logits / temperature, 1)
    return (lp_a.exp() * (lp_a - lp)).sum(1)


def _scalar(got: object, what: str) -> torch.Tensor:
    if isinstance(got, (int, float)):
        got = torch.tensor(float(got))
    if not isinstance(got, torch.Tensor) or got.numel() != 1:
        raise AssertionError(f"{what} must return one number (a scalar tensor), got "
                             f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
    return got


def check_anchor_term(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    r"""Exercise: your ``fn(logits, anchor_logits, T)`` must be one network's anchor term before its
    weight: $T^2\,\frac1N\sum_n \mathrm{KL}(p^a_{T,n}\,\|\,p_{T,n})$, the anchor the (detached) target.
    Any correct form is accepted (``F.kl_div`` with ``batchmean``, explicit sums, cross-entropy minus
    the anchor's entropy)."""
    g = torch.Generator().manual_seed(11)
    if not attempted(fn, torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), 1.0):
        return
    for n, k, t in ((1, 3, 1.0), (8, 10, 1.0), (6, 5, 4.0), (4, 100, 2.0)):
        z = (torch.randn(n, k, generator=g, dtype=torch.float64) * 2).requires_grad_()
        a = (torch.randn(n, k, generator=g, dtype=torch.float64) * 3).requires_grad_()
        rows = _kl_rows(a.detach(), z.detach(), t)
        want = t * t * rows.sum() / n
        got_t = fn(z, a, t)
        got = _scalar(got_t, "your function").detach().double()
        close = lambda v: torch.allclose(got, torch.as_tensor(v, dtype=torch.float64), rtol=1e-5, atol=1e-10)  # noqa: E731
        if not close(want):
            if close(t * t * _kl_rows(z.detach(), a.detach(), t).sum() / n):
                raise AssertionError("the KL is reversed: the anchor is the target, KL(p^a_T || p_T) (anchor first)")
            if t != 1.0 and close(rows.sum() / n):
                raise AssertionError(f"the factor T^2 is missing (at T = {t:g} your value is {t * t:g}x too small)")
            if close(want / k):
                raise AssertionError("off by a factor K: average over the batch only ('batchmean'), not over N*K")
            if n > 1 and close(want * n):
                raise AssertionError("the batch is summed, not averaged: divide by N")
            raise AssertionError(f"value {got.item():.6g} != {want.item():.6g} for N={n}, K={k}, T={t:g}")
        if not (isinstance(got_t, torch.Tensor) and got_t.requires_grad):
            raise AssertionError("the result carries no gradient for the network's logits: compute it with torch "
                                 "operations on them")
        grads = torch.autograd.grad(got_t.sum(), [z, a], allow_unused=True)
        if grads[1] is not None and grads[1].abs().max() > 0:
            raise AssertionError("the anchor gets a gradient: detach anchor_logits (the anchor is frozen, a target)")
    print("✓ anchor term: correct (anchor first, T^2, batch mean, anchor detached)")


def check_anchor_gradient(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    r"""Exercise: your ``fn(teacher_logits, anchor_logits, T)`` must return, in closed form (no
    autograd), the gradient of the batch-mean anchor term $T^2\,\frac1N\sum_n
    \mathrm{KL}(p^a_{T,n}\,\|\,p^t_{T,n})$ with respect to the teacher's logits ``[N, K]``:
    $\frac{T}{N}\,(p^t_T - p^a_T)$."""
    g = torch.Generator().manual_seed(12)
    if not attempted(fn, torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), 1.0):
        return
    for n, k, t in ((1, 3, 1.0), (8, 10, 1.0), (5, 6, 3.0), (3, 20, 0.5)):
        v = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
        a = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
        v_req = v.clone().requires_grad_()
        (auto,) = torch.autograd.grad(t * t * _kl_rows(a, v_req, t).sum() / n, v_req)   # the reference
        got = fn(v.clone(), a.clone(), t)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (n, k):
            raise AssertionError(f"return a [N, K] = [{n}, {k}] tensor (one entry per logit), got "
                                 f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
        got = got.detach().double()
        close = lambda w: torch.allclose(got, w, rtol=1e-5, atol=1e-10)  # noqa: E731
        if not close(auto):
            if close(-auto):
                raise AssertionError("the sign is flipped: the gradient is p^t_T - p^a_T (a descent step moves "
                                     "the teacher towards the anchor)")
            if n > 1 and close(auto * n):
                raise AssertionError("the 1/N of the batch mean is missing")
            if t != 1.0 and (close(auto / t) or close(auto / t**2) or close(auto / t**3)):
                raise AssertionError(f"the power of T is wrong: T^2 from the loss times 1/T from the softmax leaves "
                                     f"T (at T = {t:g})")
            raise AssertionError(f"your gradient differs from autograd's for N={n}, K={k}, T={t:g} "
                                 f"(max difference {(got - auto).abs().max().item():.3g})")
    print("✓ anchor gradient: correct, T (p^t_T - p^a_T) / N")
