"""Chapter 4's exercise self-checks (Gumbel-softmax and AdaShare), re-exported by
:mod:`minidistill.methods.adashare`, where the notebook calls them.

Each prints a tick when the answer is right, says "not attempted yet" while the exercise raises
``NotImplementedError``, and raises an ``AssertionError`` with a hint that names the classic
mistake when it is wrong.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..methods.gumbel import chi_square_test
from ..runtime import attempted

__all__ = ["check_gumbel_max", "check_straight_through", "check_sharing_loss"]


def _frequencies(samples: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(samples.flatten().long(), minlength=k).double() / samples.numel()


def check_gumbel_max(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Exercise 1: ``fn(logits, n)`` must return ``n`` category indices distributed as
    ``softmax(logits)``, by the Gumbel-max trick (uniform noise only: ``torch.rand``)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    if not attempted(fn, logits, 2):
        return
    n = 40_000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        got = fn(logits, n)
        if not isinstance(got, torch.Tensor) or got.shape != (n,) or got.is_floating_point():
            raise AssertionError(f"expected {n} integer indices (shape [{n}]), got {type(got).__name__} "
                                 f"{tuple(getattr(got, 'shape', ()))}: take the argmax over the last dimension")
        if got.min() < 0 or got.max() >= len(logits):
            raise AssertionError("indices out of range: argmax over the categories (the last dimension)")
        freq = _frequencies(got, len(logits))
        pi = torch.softmax(logits, -1)
        if chi_square_test(freq * n, pi)["p_value"] > 1e-4:
            print("✓ Gumbel-max sampler: its frequencies match softmax(logits) (χ² test)")
            return
        u = torch.rand(n, len(logits), dtype=torch.float64).clamp_min(1e-300)
        mistakes = {
            "the noise must be -log(-log u) (Gumbel); -log u is exponential noise":
                (logits - u.log()).argmax(-1),
            "add the noise to the logits (log-probabilities), not to the probabilities":
                (pi - (-u.log()).log()).argmax(-1),
            "take the argmax, not the argmin": (logits - (-u.log()).log()).argmin(-1),
        }
    distance = {hint: (freq - _frequencies(s, len(logits))).abs().sum().item() for hint, s in mistakes.items()}
    hint = min(distance, key=distance.get)
    if distance[hint] < 0.03:
        raise AssertionError(f"the frequencies are not softmax(logits): {hint}")
    raise AssertionError(f"the frequencies {[round(v, 3) for v in freq.tolist()]} are not softmax(logits) = "
                         f"{[round(v, 3) for v in pi.tolist()]}: argmax(logits + g) with g = -log(-log u)")


def check_straight_through(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 2: ``fn(y_soft)`` must return the one-hot vector of each row's argmax in the
    forward pass and pass the gradient to ``y_soft`` unchanged (the identity) in the backward."""
    g = torch.Generator().manual_seed(0)
    y = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    if not attempted(fn, y.detach().clone()):
        return
    out = fn(y)
    want = F.one_hot(y.argmax(-1), 4).double()
    if not isinstance(out, torch.Tensor) or out.shape != y.shape:
        raise AssertionError(f"expected a tensor of shape {tuple(y.shape)}, got {type(out).__name__} "
                             f"{tuple(getattr(out, 'shape', ()))}")
    if torch.allclose(out.detach().double(), y.detach() + want, atol=1e-9):
        raise AssertionError("the forward value is hard + soft: subtract the detached soft sample, h - y.detach() + y")
    if not torch.allclose(out.detach().double(), want, atol=1e-9):
        raise AssertionError("the forward value must be the one-hot argmax of each row (exactly 0 and 1)")
    if not out.requires_grad:
        raise AssertionError("no gradient reaches y_soft: a plain one-hot is constant; add y - y.detach()")
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * w).sum(), y)
    if not torch.allclose(grad, w, atol=1e-9):
        raise AssertionError("the gradient w.r.t. y_soft must be the identity (straight through): "
                             "detach the hard part and the *subtracted* soft part, not the added one")
    print("✓ straight-through: one-hot forward, identity gradient")


def check_sharing_loss(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 3: ``fn(pi)`` must return the paper's sharing loss for select probabilities
    ``pi`` ``[tasks, blocks]``: $\\sum_{m_1<m_2}\\sum_l \\frac{L-l}{L}|\\pi_{l,m_1}-\\pi_{l,m_2}|$,
    blocks numbered $l = 0, \\dots, L-1$ from the input."""
    g = torch.Generator().manual_seed(1)
    cases = [torch.rand(k, n, generator=g, dtype=torch.float64) for k, n in ((2, 3), (3, 6), (4, 5))]
    if not attempted(fn, cases[0]):
        return
    # imported here, not at the top: methods.adashare re-exports these checks, so a module-level
    # import of it would be circular when this module is imported first
    from ..methods.adashare import sharing_loss

    for alpha in cases:
        k, n = alpha.shape
        logits = torch.stack([alpha.log(), (1 - alpha).log()], -1)
        want = sharing_loss(logits)
        got = fn(alpha)
        if not isinstance(got, torch.Tensor) or got.ndim != 0:
            raise AssertionError("expected a scalar tensor (sum over pairs of tasks and over blocks)")
        got = got.double()
        pos = torch.arange(n, dtype=torch.float64)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        reversed_w = sum((((pos + 1) / n) * (alpha[i] - alpha[j]).abs()).sum() for i, j in pairs)
        if torch.isclose(got, reversed_w) and not torch.isclose(got, want):
            raise AssertionError("those are the released code's weights (l + 1)/L, which favour sharing the *late* "
                                 "blocks; the paper weights (L - l)/L so that early blocks are shared")
        if torch.isclose(got, 2 * want):
            raise AssertionError("each pair counted twice: sum over k1 < k2 only")
        ones_w = sum((alpha[i] - alpha[j]).abs().sum() for i, j in pairs)
        if torch.isclose(got, ones_w) and not torch.isclose(got, want):
            raise AssertionError("no depth weights: multiply block l's term by (L - l)/L")
        if not torch.isclose(got, want, atol=1e-9):
            raise AssertionError(f"value {got.item():.6g} != {want.item():.6g} for {k} tasks and {n} blocks: check the "
                                 "weights (L - l)/L with l from 0 and the absolute differences of alpha")
    print("✓ sharing loss: the paper's form")
