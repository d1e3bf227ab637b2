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

from ..methods.jem import energy, px_loss
from ..runtime import attempted

__all__ = ["check_energy", "check_sgld_step", "check_px_loss", "check_forgetting_steps"]


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
    $x - \\eta \\nabla_x E + \\sigma\\,\\epsilon$ (``eps`` is the standard normal draw)."""
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    if not attempted(fn, x0, x0, 0.1, 0.1, x0):
        return
    g = torch.Generator().manual_seed(1)
    x, grad, eps = (torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(3))
    for eta, sigma in ((0.1, 0.05), (0.3, 0.2), (0.01, math.sqrt(0.02))):
        got = fn(x, grad, eta, sigma, eps)
        want = x - eta * grad + sigma * eps
        _is_tensor(got, want.shape)
        if torch.allclose(got, want):
            continue
        if torch.allclose(got, x + eta * grad + sigma * eps):
            raise AssertionError("you climb the energy: step AGAINST its gradient (x - step_size * grad)")
        if torch.allclose(got, x - eta * grad + eta * sigma * eps):
            raise AssertionError("the noise is not multiplied by the step size: add sigma * eps")
        if torch.allclose(got, x - eta * grad + sigma**2 * eps) or torch.allclose(got, x - eta * grad + math.sqrt(sigma) * eps):
            raise AssertionError("sigma is the noise's standard deviation: multiply eps by sigma itself")
        if torch.allclose(got, x - eta / 2 * grad + sigma * eps):
            raise AssertionError("that halves the step: the paper's alpha/2 is for its own alpha = 2 * step_size; "
                                 "here x_next = x - step_size * grad + sigma * eps")
        raise AssertionError(f"values differ at step_size={eta}, sigma={sigma:.3g}: "
                             "x_next = x - step_size * grad + sigma * eps")
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


def _forgetting_steps(temperature: float, start_var: float = 9.0, ell2: float = 1.0, step_size: float = 0.1,
                     fraction: float = 0.01) -> float:
    r"""The number of steps $k$ (a real number) after which a chain on the Gaussian energy
    $E(x) = x^2/(2 \ell^2)$ (``ell2`` is $\ell^2$), started with variance ``start_var`` and run with
    step $\eta$ at ``temperature`` $T$, keeps a leftover of its start $\rho^{2k}(v_0 - v_\infty)$
    equal to ``fraction`` of its stationary variance $v_\infty = T \ell^2 / (1 - \eta / 2 \ell^2)$,
    with $\rho = 1 - \eta / \ell^2$ (the chain is $x_{k+1} = \rho\,x_k + \sigma\epsilon_k$)."""
    rho = 1 - step_size / ell2
    v_inf = temperature * ell2 / (1 - step_size / (2 * ell2))
    return math.log(fraction * v_inf / (start_var - v_inf)) / (2 * math.log(rho))


def check_forgetting_steps(answer) -> None:
    """Exercise 4: ``answer = (k_langevin, k_cold)``, the number of steps after which the chains
    of the Gaussian check of step 4 ($\\ell^2 = 1$, $\\eta = 0.1$, start variance 9) have forgotten
    their start down to 1 % of the stationary variance, at $T = 1$ and at $T = 5\\cdot 10^{-5}$.
    Any number within one step of the exact (real) solution is right: rounded up, or not."""
    if answer is None or answer is ...:
        print("… not attempted yet: replace the ... with your two numbers")
        return
    if (not isinstance(answer, (tuple, list)) or len(answer) != 2
            or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in answer)):
        raise AssertionError("answer with two numbers: (steps for the Langevin chain, steps for the cold chain)")
    want = (_forgetting_steps(1.0), _forgetting_steps(5e-5))
    if all(abs(a - w) <= 1.0 for a, w in zip(answer, want)):
        print(f"✓ forgetting time: correct -- about {want[0]:.0f} steps at T = 1 and {want[1]:.0f} at T = 5e-5. "
              "The start fades at the same rate rho^(2k) at any temperature, but a cold chain must shrink it "
              "to a far smaller stationary spread: persistent chains pay this once, chains restarted from "
              "noise at every update pay it every time.")
        return
    if all(abs(a - w) <= 1.0 for a, w in zip(answer[::-1], want)):
        raise AssertionError("the right numbers in the wrong order: (Langevin, cold)")
    if all(abs(a - 2 * w) <= 2.0 for a, w in zip(answer, want)):
        raise AssertionError("twice too many steps: the VARIANCE of the start shrinks by rho^2 per step "
                             "(x_k shrinks by rho = 1 - eta / l^2)")
    if all(abs(a - w / 2) <= 1.0 for a, w in zip(answer, want)):
        raise AssertionError("half the steps: rho = 1 - eta / l^2 multiplies x, so the variance goes as rho^(2k)")
    no_fraction = (_forgetting_steps(1.0, fraction=1.0), _forgetting_steps(5e-5, fraction=1.0))
    if all(abs(a - w) <= 1.0 for a, w in zip(answer, no_fraction)):
        raise AssertionError("that is where the leftover equals the stationary variance; the question asks "
                             "for 1 % of it")
    of_start = tuple(math.log(0.01 * 9.0 / (9.0 - v)) / (2 * math.log(0.9)) for v in (1 / 0.95, 5e-5 / 0.95))
    if all(abs(a - w) <= 1.0 for a, w in zip(answer, of_start)):
        raise AssertionError("that brings the leftover to 1 % of the START variance; the question asks for 1 % "
                             "of the stationary variance v_inf, which is far smaller for the cold chain")
    if abs(answer[0] - want[0]) <= 1.0:
        raise AssertionError("the Langevin chain is right; for the cold one the stationary variance is "
                             "T l^2 / (1 - eta / (2 l^2)) with T = 5e-5")
    raise AssertionError("not quite: solve rho^(2k) (v0 - v_inf) = 0.01 v_inf for k, with rho = 1 - eta / l^2 "
                         "and v_inf = T l^2 / (1 - eta / (2 l^2))")
