"""Chapter 6 (JEM): self-checks for the notebook's exercises (also importable from
:mod:`minidistill.methods.jem`).

Each check prints one line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises NotImplementedError, and raises an AssertionError with a
hint when the answer is wrong.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..methods.jem import energy, px_loss, sampler_temperature
from ..runtime import attempted

__all__ = ["check_energy", "check_sgld_step", "check_px_loss", "check_sampler_temperature"]


def _is_tensor(got, shape) -> None:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(shape):
        raise AssertionError(f"expected a tensor of shape {tuple(shape)}, got {type(got).__name__} "
                             f"{tuple(getattr(got, 'shape', ()))}")


def check_energy(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 1: your ``fn(logits)`` must return $E(x) = -\\log\\sum_y e^{f(x)[y]}$ per row,
    finite for logits in the thousands, without ``torch.logsumexp``."""
    if not attempted(fn, torch.zeros(1, 3)):
        return
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 10.0, 1000.0):
        z = torch.randn(6, 10, generator=g, dtype=torch.float64) * scale
        got, want = fn(z), energy(z)
        _is_tensor(got, want.shape)
        if torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            continue
        if not torch.isfinite(got).all():
            raise AssertionError("inf/NaN for large logits: subtract each row's maximum before exp() and add it back")
        if torch.allclose(got, -want, rtol=1e-6):
            raise AssertionError("wrong sign: the energy is MINUS the log-sum-exp (low energy = high density)")
        if torch.allclose(got, -z.max(-1).values, rtol=1e-9):
            raise AssertionError("that is minus the largest logit: sum exp() over all classes, not just the top one")
        raise AssertionError(f"values differ at logit scale {scale:g}: check that you sum over the class dimension "
                             "(the last one) and take the log after the sum")
    print("✓ energy: correct")


def check_sgld_step(fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 2: ``fn(x, grad_energy, step_size, noise, eps)`` must return one SGLD step
    $x - \\alpha \\nabla_x E + \\sigma\\,\\epsilon$ (``eps`` is the standard normal draw)."""
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    if not attempted(fn, x0, x0, 0.1, 0.1, x0):
        return
    g = torch.Generator().manual_seed(1)
    x, grad, eps = (torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(3))
    for alpha, sigma in ((0.1, 0.05), (0.3, 0.2), (0.01, math.sqrt(0.02))):
        got = fn(x, grad, alpha, sigma, eps)
        want = x - alpha * grad + sigma * eps
        _is_tensor(got, want.shape)
        if torch.allclose(got, want):
            continue
        if torch.allclose(got, x + alpha * grad + sigma * eps):
            raise AssertionError("you climb the energy: step AGAINST its gradient (x - alpha * grad)")
        if torch.allclose(got, x - alpha * grad + alpha * sigma * eps):
            raise AssertionError("the noise is not multiplied by the step size: add sigma * eps")
        if torch.allclose(got, x - alpha * grad + sigma**2 * eps) or torch.allclose(got, x - alpha * grad + math.sqrt(sigma) * eps):
            raise AssertionError("sigma is the noise's standard deviation: multiply eps by sigma itself")
        raise AssertionError(f"values differ at alpha={alpha}, sigma={sigma:.3g}: x_next = x - alpha * grad + sigma * eps")
    print("✓ SGLD step: correct")


def check_px_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 3: ``fn(logits_data, logits_samples)`` must return the contrastive surrogate
    $\\overline{E(x_\\mathrm{data})} - \\overline{E(x')}$ whose gradient estimates $-\\nabla_\\theta \\log p(x)$."""
    z = torch.zeros(2, 3)
    if not attempted(fn, z, z):
        return
    g = torch.Generator().manual_seed(2)
    ld = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
    lq = torch.randn(24, 10, generator=g, dtype=torch.float64) * 3 + 1
    got, want = fn(ld, lq), px_loss(ld, lq)
    if not isinstance(got, torch.Tensor) or got.ndim != 0:
        raise AssertionError("expected a scalar tensor (mean over each batch, then the difference)")
    if not torch.allclose(got, want):
        if torch.allclose(got, -want):
            raise AssertionError("wrong sign: minimising it must LOWER the data's energy and RAISE the samples' "
                                 "(data energy minus sample energy)")
        if torch.allclose(got, lq.max(-1).values.mean() - ld.max(-1).values.mean()):
            raise AssertionError("that uses the largest logit; the energy of p(x) is -logsumexp over classes")
        if torch.allclose(got, energy(ld).sum() - energy(lq).sum()):
            raise AssertionError("use batch MEANS: the two batches can differ in size")
        raise AssertionError(f"value {got.item():.6g} != {want.item():.6g}: mean E(data) - mean E(samples), "
                             "with E = -logsumexp(logits)")
    print("✓ contrastive p(x) loss: correct")


def check_sampler_temperature(answer: float | None) -> None:
    """Exercise 4: at which temperature $T$ (stationary density $\\propto p(x)^{1/T}$) does the
    paper's sampler, $\\alpha = 1$ and $\\sigma = 0.01$, sample?"""
    if answer is None or answer is ...:
        print("… not attempted yet: replace the ... with your number")
        return
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        raise AssertionError("answer with a number")
    want = sampler_temperature(1.0, 0.01)
    if math.isclose(answer, want, rel_tol=0.02):
        print(f"✓ temperature: correct -- T = sigma^2 / (2 alpha) = {want:g}, so the chains sample p(x)^{1 / want:,.0f}: "
              "nearly noise-free gradient descent on the energy")
    elif math.isclose(answer, 0.01**2, rel_tol=0.02):
        raise AssertionError("close: Langevin's noise variance is 2 * alpha * T, don't forget the factor 2")
    elif math.isclose(answer, 0.01 / 2, rel_tol=0.02):
        raise AssertionError("not quite: the temperature involves the noise VARIANCE sigma^2, not sigma")
    elif math.isclose(answer, 1.0, rel_tol=0.02):
        raise AssertionError("T = 1 is true Langevin, which needs sigma = sqrt(2 alpha) = 1.41, not 0.01")
    else:
        raise AssertionError("not quite: match x - alpha grad E + sigma eps to Langevin at temperature T, "
                             "x - alpha grad E + sqrt(2 alpha T) eps")
