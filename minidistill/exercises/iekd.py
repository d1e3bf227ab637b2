"""Chapter 7's exercise self-checks (deep mutual learning and IE-KD), re-exported by
:mod:`minidistill.methods.iekd`.

Each check prints one line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises ``NotImplementedError``, and raises an ``AssertionError``
with a hint that names the classic mistake when it is wrong. The references are computed here,
independently of the package functions the chapter shows.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import attempted

__all__ = ["check_exploration_loss", "check_linear_cka", "check_dml_mimicry"]


def _tensor_result(got: object, what: str) -> torch.Tensor:
    if isinstance(got, (int, float)):
        got = torch.tensor(float(got))
    if not isinstance(got, torch.Tensor) or got.numel() != 1:
        raise AssertionError(f"{what} must return one number (a scalar tensor or a float), got "
                             f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
    return got.reshape(()).double()


def check_exploration_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    r"""Exercise: your ``fn(f_exp, f_teacher)`` must be IE-KD's exploration loss, the *negative*
    normalised L1 distance $-\frac{1}{ND}\sum_n \lVert \hat a_n - \hat b_n \rVert_1$ between the
    per-example L2-normalised factors."""
    g = torch.Generator().manual_seed(7)
    if not attempted(fn, torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)):
        return
    for shape in ((4, 8, 3, 3), (6, 5, 2, 2), (3, 20)):
        a = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
        b = torch.rand(*shape, generator=g, dtype=torch.float64) * 2
        n, d = shape[0], a[0].numel()
        a_hat = a.flatten(1) / a.flatten(1).norm(dim=1, keepdim=True)
        b_hat = b.flatten(1) / b.flatten(1).norm(dim=1, keepdim=True)
        dist = (a_hat - b_hat).abs().sum() / (n * d)
        got = _tensor_result(fn(a.clone(), b.clone()), "your function")
        close = lambda v: torch.allclose(got, torch.as_tensor(v, dtype=torch.float64), rtol=1e-4, atol=1e-8)  # noqa: E731
        if close(dist):
            raise AssertionError("the sign is missing: the exploration loss is the NEGATIVE distance "
                                 "(minimising it must push the factors apart)")
        if close(-(a_hat - b_hat).abs().sum() / n) or close((a_hat - b_hat).abs().sum() / n):
            raise AssertionError("off by a factor D: divide the summed absolute differences by N*D (all "
                                 "elements), not by N alone")
        raw = (a.flatten(1) - b.flatten(1)).abs().sum() / (n * d)
        if close(-raw):
            raise AssertionError("normalise each example to unit L2 norm first (a / a.norm()), per example: "
                                 "without it the push grows without bound")
        whole = (a.flatten() / a.norm() - b.flatten() / b.norm()).abs().sum() / (n * d)
        if close(-whole):
            raise AssertionError("normalise each example separately (norm over dim=1 of the flattened factors), "
                                 "not the whole batch at once")
        if not close(-dist):
            raise AssertionError(f"value {got.item():.6g} != {-dist.item():.6g} for shape {shape}: flatten each "
                                 "example, L2-normalise it, take minus the mean absolute difference")
    print("✓ exploration loss: correct (negative, normalised, bounded)")


def check_linear_cka(fn: Callable[[torch.Tensor, torch.Tensor], float]) -> None:
    r"""Exercise: your ``fn(x, y)`` (``[n, d1]``, ``[n, d2]``) must be linear CKA; either the
    feature-space form $\lVert\tilde Y^\top\tilde X\rVert_F^2 / (\lVert\tilde X^\top\tilde X\rVert_F
    \lVert\tilde Y^\top\tilde Y\rVert_F)$ or the Gram-matrix form is accepted."""
    g = torch.Generator().manual_seed(8)
    if not attempted(fn, torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)):
        return
    for n, d1, d2 in ((50, 6, 4), (12, 30, 20), (40, 5, 5)):
        x = torch.randn(n, d1, generator=g, dtype=torch.float64) + 2.0       # not centred: centring matters
        y = x[:, :min(d1, d2)] @ torch.randn(min(d1, d2), d2, generator=g, dtype=torch.float64) \
            + torch.randn(n, d2, generator=g, dtype=torch.float64) + 1.0
        kx, ky = x @ x.T, y @ y.T
        h = torch.eye(n, dtype=torch.float64) - 1.0 / n                      # the centring matrix
        kxc, kyc = h @ kx @ h, h @ ky @ h
        want = (kxc * kyc).sum() / (kxc.norm() * kyc.norm())                  # Gram form, reference
        got = _tensor_result(fn(x.clone(), y.clone()), "your function")
        close = lambda v: torch.allclose(got, torch.as_tensor(v, dtype=torch.float64), rtol=1e-5, atol=1e-9)  # noqa: E731
        if not close(want):
            if close((kx * ky).sum() / (kx.norm() * ky.norm())):
                raise AssertionError("centre the columns first (x - x.mean(0)): without centring it is not CKA")
            xc, yc = x - x.mean(0), y - y.mean(0)
            if close((yc.T @ xc).square().sum() / ((xc.T @ xc).norm() ** 2 * (yc.T @ yc).norm() ** 2)):
                raise AssertionError("the denominator takes the Frobenius norms themselves, not their squares")
            if close((yc.T @ xc).norm() / ((xc.T @ xc).norm() * (yc.T @ yc).norm())):
                raise AssertionError("the numerator is the SQUARED Frobenius norm of y~^T x~")
            raise AssertionError(f"value {got.item():.6g} != {want.item():.6g} for n={n}, d=({d1}, {d2})")
    print("✓ linear CKA: correct")


def check_dml_mimicry(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    r"""Exercise: your ``fn(z1, z2)`` must be network 1's DML mimicry term at $T = 1$:
    $\frac1N\sum_n \mathrm{KL}(p_{2,n}\,\|\,p_{1,n})$ with the peer's logits ``z2`` detached, so
    that it sends no gradient to network 2."""
    g = torch.Generator().manual_seed(9)
    if not attempted(fn, torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)):
        return
    for n, k in ((1, 3), (8, 10), (4, 100)):
        z1 = (torch.randn(n, k, generator=g, dtype=torch.float64) * 2).requires_grad_()
        z2 = (torch.randn(n, k, generator=g, dtype=torch.float64) * 2).requires_grad_()
        lp1, lp2 = torch.log_softmax(z1.detach(), 1), torch.log_softmax(z2.detach(), 1)
        want = (lp2.exp() * (lp2 - lp1)).sum() / n
        got_t = fn(z1, z2)
        got = _tensor_result(got_t, "your function")
        close = lambda v: torch.allclose(got, v, rtol=1e-5, atol=1e-10)  # noqa: E731
        if not close(want):
            if close((lp1.exp() * (lp1 - lp2)).sum() / n):
                raise AssertionError("the KL is reversed: the peer is the target, KL(p2 || p1) (peer first)")
            if close((lp2.exp() * (lp2 - lp1)).sum() / (n * k)):
                raise AssertionError("off by a factor K: average over the batch only ('batchmean'), not over N*K")
            raise AssertionError(f"value {got.item():.6g} != {want.item():.6g} for N={n}, K={k}")
        if not (isinstance(got_t, torch.Tensor) and got_t.requires_grad):
            raise AssertionError("the result carries no gradient for z1: compute it with torch operations on z1")
        grads = torch.autograd.grad(got_t.sum(), [z1, z2], allow_unused=True)
        if grads[1] is not None and grads[1].abs().max() > 0:
            raise AssertionError("the peer gets a gradient: detach z2 (the target), or network 2 is pulled "
                                 "towards network 1 by network 1's loss")
        p1, p2 = lp1.exp(), lp2.exp()
        if not torch.allclose(grads[0], (p1 - p2) / n, atol=1e-10):
            raise AssertionError("the gradient for z1 is not (p1 - p2)/N: check the softmaxes")
    print("✓ DML mimicry term: correct (peer first, detached)")
