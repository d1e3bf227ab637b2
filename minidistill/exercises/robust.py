"""Chapter 12's exercise self-checks (adversarially robust transfer), re-exported by
:mod:`minidistill.methods.robust`: the l1 steepest-ascent step, the l1 projection, and how an l2
budget scales with the image shape.

Each check prints a line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises ``NotImplementedError``, and raises an ``AssertionError``
with a hint that names the classic mistake when the answer is wrong.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..runtime import attempted

__all__ = ["check_l1_step", "check_l1_projection", "check_l2_budget"]


def check_l1_step(step_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    r"""``step_fn(g)`` must return, for each row of ``g`` (shape ``[N, D]``), the unit steepest-ascent
    step under $\ell_1$: $\arg\max_{\|s\|_1 \le 1} \langle g, s\rangle$, which puts all its mass on a
    coordinate of largest $|g_i|$, with that coordinate's sign (gain $\|g\|_\infty$, the dual norm)."""
    g = torch.tensor([[0.3, -2.0, 0.0, 1.0], [-0.5, 0.5, 4.0, -1e-3], [-3.0, 1.0, 2.0, 0.1]], dtype=torch.float64)
    if not attempted(step_fn, g.clone()):
        return None
    s = step_fn(g.clone())
    if not isinstance(s, torch.Tensor) or s.shape != g.shape:
        raise AssertionError(f"return a tensor of the gradient's shape {tuple(g.shape)}")
    s = s.double()
    if torch.allclose(s, g.sign()):
        raise AssertionError("sign(g) is the l-infinity step; its l1 norm is D, not 1. Under l1 the whole "
                             "budget goes to one coordinate")
    if torch.allclose(s, g / g.abs().sum(1, keepdim=True)) or torch.allclose(s, g / g.norm(dim=1, keepdim=True)):
        raise AssertionError("a normalised gradient spreads the budget; under l1 one coordinate (the largest "
                             "|g_i|) gives more: <g, s> = max |g_i|")
    if (s.abs().sum(1) > 1 + 1e-9).any():
        raise AssertionError("a step of the l1 unit ball has sum |s_i| <= 1 in every row")
    gain, best = (g * s).sum(1), g.abs().amax(1)
    if torch.allclose(gain, -best):
        raise AssertionError("this descends: keep the sign of g at the chosen coordinate")
    if not torch.allclose(gain, best):
        raise AssertionError("choose, in every row, the coordinate with the largest |g_i| (not the largest g_i, "
                             "and not over the whole batch), with sign(g_i)")
    print("✓ the l1 steepest-ascent step is sign(g_i) at the largest |g_i|: the dual norm of l1 is l-infinity")


def _l1_ball_projection(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference: soft-thresholding by the tau (found by bisection) that brings each outside row
    to l1 norm eps; rows inside the ball are kept."""
    a = delta.abs()
    lo, hi = torch.zeros(len(a), 1, dtype=a.dtype), a.amax(1, keepdim=True)
    for _ in range(200):
        tau = (lo + hi) / 2
        big = (a - tau).clamp_min(0).sum(1, keepdim=True) > eps
        lo, hi = torch.where(big, tau, lo), torch.where(big, hi, tau)
    out = delta.sign() * (a - (lo + hi) / 2).clamp_min(0)
    inside = a.sum(1, keepdim=True) <= eps
    return torch.where(inside, delta, out)


def check_l1_projection(project_fn: Callable[[torch.Tensor, float], torch.Tensor]) -> None:
    r"""``project_fn(delta, eps)`` must map each row of ``delta`` (shape ``[N, D]``) to the
    closest ($\ell_2$ distance) point of the $\ell_1$ ball of radius ``eps``: unchanged inside;
    outside, soft-thresholding $\mathrm{sign}(\delta_i)\max(|\delta_i| - \tau, 0)$ with the
    $\tau > 0$ that makes the row's $\ell_1$ norm equal ``eps``."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(5, 12, generator=g, dtype=torch.float64)
    delta[0] *= 0.01                               # inside the ball
    delta[3, :6] *= 8                              # a few large values: several survive the threshold
    eps = 2.0
    want = _l1_ball_projection(delta, eps)
    if not attempted(project_fn, delta.clone(), eps):
        return None
    out = project_fn(delta.clone(), eps)
    if not isinstance(out, torch.Tensor) or out.shape != delta.shape:
        raise AssertionError(f"return a tensor of delta's shape {tuple(delta.shape)}")
    out = out.double()
    l1 = delta.abs().sum(1, keepdim=True)
    if torch.allclose(out, delta * torch.clamp(eps / l1, max=1.0)) or torch.allclose(out, eps * delta / l1):
        raise AssertionError("rescaling delta to l1 norm eps stays in the ball but is not the closest point: "
                             "the closest point subtracts the same amount tau from every |delta_i| (clipping at 0)")
    if torch.allclose(out, delta.clamp(-eps, eps)):
        raise AssertionError("clamping each coordinate projects onto the l-infinity ball (a cube), not the l1 ball")
    if torch.allclose(out, delta * torch.clamp(eps / delta.norm(dim=1, keepdim=True), max=1.0)):
        raise AssertionError("that is the l2 projection; the l1 ball has corners, and its closest point is sparse")
    if torch.allclose(out[1:], want[1:], rtol=1e-6, atol=1e-9) and not torch.allclose(out[0], delta[0]):
        raise AssertionError("a perturbation already inside the ball must stay as it is")
    if (out.abs().sum(1) > eps * (1 + 1e-6)).any():
        raise AssertionError("a point of the l1 ball has sum |delta_i| <= eps in every row (per row, not per batch)")
    if not torch.allclose(out, want, rtol=1e-6, atol=1e-9):
        raise AssertionError("inside the ball, but not the closest point: shrink every |delta_i| by the same tau "
                             "(values below tau become 0), keep the signs, and choose tau per row so that "
                             "sum |delta_i| = eps")
    print("✓ projection onto the l1 ball: soft-threshold each outside row by the tau that leaves l1 norm eps")


def check_l2_budget(budget_fn: Callable[[float, tuple, tuple], float]) -> None:
    r"""``budget_fn(eps, shape_from, shape_to)``: an $\ell_2$ budget ``eps`` chosen for images of
    shape ``shape_from`` (``(C, H, W)``), rescaled so that it allows the same root-mean-square change
    per value on images of shape ``shape_to``: $\epsilon\sqrt{D_\text{to}/D_\text{from}}$."""
    cases = [(0.5, (3, 32, 32), (3, 224, 224)), (3.0, (3, 224, 224), (3, 32, 32)), (1.0, (1, 28, 28), (3, 32, 32)),
             (0.25, (3, 16, 16), (3, 16, 16)), (2.0, (3, 64, 32), (1, 32, 32))]
    if not attempted(budget_fn, *cases[0]):
        return None
    got = []
    for eps, a, b in cases:
        out = budget_fn(eps, a, b)
        try:
            got.append(float(out))
        except (TypeError, ValueError):
            raise AssertionError("return a number")
    ratio = [math.prod(b) / math.prod(a) for _, a, b in cases]
    if all(math.isclose(v, eps * math.sqrt(r), rel_tol=1e-6) for v, (eps, _, _), r in zip(got, cases, ratio)):
        print("✓ the l2 budget scales with sqrt(D): eps * sqrt(D_to / D_from)")
        return None
    if all(math.isclose(v, eps * r, rel_tol=1e-6) for v, (eps, _, _), r in zip(got, cases, ratio)):
        raise AssertionError("this scales with D (the number of values), not sqrt(D): ||delta||_2 for a "
                             "fixed change per value grows like the square root of the count")
    if all(math.isclose(v, eps * b[-1] / a[-1], rel_tol=1e-6) for v, (eps, a, b) in zip(got, cases)):
        raise AssertionError("the side ratio works only for square images with the same channels: count all the "
                             "values, D = C * H * W")
    if all(math.isclose(v, eps / math.sqrt(r), rel_tol=1e-6) for v, (eps, _, _), r in zip(got, cases, ratio)):
        raise AssertionError("upside down: bigger images need a bigger l2 budget for the same change per value")
    raise AssertionError("if every value moves by c, ||delta||_2 = c sqrt(D): keep c fixed and solve for the new budget")
