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

__all__ = ["check_farthest_factor", "check_linear_cka", "check_dml_gradient"]


def _tensor_result(got: object, what: str) -> torch.Tensor:
    if isinstance(got, (int, float)):
        got = torch.tensor(float(got))
    if not isinstance(got, torch.Tensor) or got.numel() != 1:
        raise AssertionError(f"{what} must return one number (a scalar tensor or a float), got "
                             f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
    return got.reshape(()).double()


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    t = t.flatten(1)
    return t / t.norm(dim=1, keepdim=True)


def check_farthest_factor(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    r"""Exercise: your ``fn(f_teacher)`` (``[N, ...]``) must return, for every example, a factor
    $a$ of the same shape whose normalised L1 distance to the teacher's factor is as large as it
    can be: $\lVert \hat a - \hat b \rVert_1 = \sqrt D + \lVert \hat b \rVert_1$, the largest
    value over unit vectors $\hat a$ (reached by $\hat a = -\mathrm{sign}(\hat b)/\sqrt D$, with
    either sign where $\hat b_i = 0$). Any positive multiple of a farthest vector is accepted:
    the losses normalise it."""
    g = torch.Generator().manual_seed(7)
    if not attempted(fn, torch.randn(2, 3, 2, 2, generator=g)):
        return
    cases = [torch.randn(4, 8, 3, 3, generator=g, dtype=torch.float64),
             torch.rand(5, 12, generator=g, dtype=torch.float64) + 0.05,          # a non-negative factor
             torch.randn(3, 10, generator=g, dtype=torch.float64)]
    cases[2][:, :3] = 0.0                                                      # exact zeros: sign(0) = 0
    for b in cases:
        got = fn(b.clone())
        if not isinstance(got, torch.Tensor) or got.shape != b.shape:
            raise AssertionError(f"return one factor per example, a tensor of shape {tuple(b.shape)}, got "
                                 f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
        a = got.detach().double().flatten(1)
        if not torch.isfinite(a).all() or (a.norm(dim=1) == 0).any():
            raise AssertionError("every example's factor must be finite and non-zero (it is scaled to unit norm)")
        d = a.shape[1]
        b_hat = _unit_rows(b)
        dist = (_unit_rows(a) - b_hat).abs().sum(1)                             # per example
        best = d ** 0.5 + b_hat.abs().sum(1)
        if torch.allclose(dist, best, rtol=1e-6, atol=0):
            continue
        if torch.allclose(_unit_rows(a), -b_hat, atol=1e-9):
            raise AssertionError("-b is the farthest point in L2, not in L1: it gives 2 ||b_hat||_1, less than the "
                                 "maximum unless b is flat. Which unit vector has the largest L1 norm?")
        if torch.allclose(_unit_rows(a), _unit_rows(torch.sign(b)), atol=1e-9):
            raise AssertionError("sign(b) points TOWARDS the teacher's factor: flip it")
        if (b.flatten(1) == 0).any() and torch.allclose(a, -torch.sign(b.flatten(1)) * a.abs().max(1, keepdim=True).values,
                                                       atol=1e-12):
            raise AssertionError("where b_i = 0, sign(b_i) = 0 leaves the element at 0; there either sign is farthest, "
                                 "but the element must be +-1/sqrt(D)")
        raise AssertionError(f"not the farthest: distance {dist.min().item():.6g} where {best[dist.argmin()].item():.6g} "
                             "is possible for that example")
    print("✓ farthest factor: correct (every element at +-1/sqrt(D), against the teacher's signs)")


def check_dml_gradient(fn: Callable[[list, torch.Tensor], torch.Tensor]) -> None:
    r"""Exercise: your ``fn(logits, y)`` (``logits`` a list of the $M$ networks' ``[N, K]`` logits,
    network 1 first; ``y`` the labels) must return the gradient of network 1's whole DML loss,
    $\mathcal L_1 = H(q, p^{(1)}) + \frac{1}{M-1}\sum_{l\ne1}\mathrm{KL}(p^{(l)}\,\|\,p^{(1)})$
    averaged over the batch, with respect to its logits $z^{(1)}$: an ``[N, K]`` tensor. The
    reference is autograd of that loss written out here."""
    g = torch.Generator().manual_seed(9)
    if not attempted(fn, [torch.randn(2, 3, generator=g) for _ in range(2)], torch.tensor([0, 1])):
        return
    for n, k, m in ((1, 3, 2), (8, 10, 3), (4, 100, 4)):
        zs = [torch.randn(n, k, generator=g, dtype=torch.float64) * 2 for _ in range(m)]
        y = torch.randint(0, k, (n,), generator=g)
        z1 = zs[0].clone().requires_grad_()
        lp1 = torch.log_softmax(z1, 1)
        kls = [(torch.softmax(z, 1) * (torch.log_softmax(z, 1) - lp1)).sum() / n for z in zs[1:]]
        loss = -lp1[torch.arange(n), y].sum() / n + sum(kls) / (m - 1)
        (want,) = torch.autograd.grad(loss, z1)
        got = fn([z.clone() for z in zs], y.clone())
        if not isinstance(got, torch.Tensor) or got.shape != (n, k):
            raise AssertionError(f"return the gradient as an [N, K] = [{n}, {k}] tensor, got "
                                 f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
        got = got.detach().double()
        if torch.allclose(got, want, rtol=1e-5, atol=1e-6 / n):   # float32 work is fine too
            continue
        p1 = torch.softmax(zs[0], 1)
        q = torch.nn.functional.one_hot(y, k).double()
        peers = torch.stack([torch.softmax(z, 1) for z in zs[1:]])
        close = lambda v: torch.allclose(got, v, rtol=1e-5, atol=1e-6 / n)  # noqa: E731
        if close(-want):
            raise AssertionError("the sign is flipped: the gradient of H(q, p) is p - q (descent moves p towards q)")
        if close(want * n):
            raise AssertionError("off by a factor N: the loss is a batch mean, so divide by N")
        if close((p1 - peers.mean(0)) / n):
            raise AssertionError("the cross-entropy's gradient (p1 - q)/N is missing: L_1 has both terms")
        if close((p1 - q) / n):
            raise AssertionError("the mimicry term's gradient is missing: add (p1 - mean of the peers' p)/N")
        if m > 2 and close((p1 - q + (m - 1) * p1 - peers.sum(0)) / n):
            raise AssertionError("that is the official code's SUM over peers; the paper averages over the M - 1 peers")
        raise AssertionError(f"wrong gradient for N={n}, K={k}, M={m}: largest error "
                             f"{(got - want).abs().max().item():.3g}")
    print("✓ DML gradient: correct")


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
