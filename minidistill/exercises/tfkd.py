"""Chapter 2's exercise self-checks (Tf-KD), re-exported by :mod:`minidistill.methods.tfkd`.

Each check prints a line with a tick when the answer is right, says "not attempted yet" while
the exercise still raises ``NotImplementedError`` (or is left as ``...``), and raises an
``AssertionError`` with a hint that names the classic mistake when it is wrong.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import attempted

__all__ = ["check_virtual_teacher", "check_tau_effect"]


def check_virtual_teacher(fn: Callable[[torch.Tensor, int, float], torch.Tensor]) -> None:
    """Exercise 1: your ``fn(targets, num_classes, correct_prob)`` must equal
    :func:`~minidistill.methods.tfkd.virtual_teacher`."""
    from ..methods.tfkd import label_smoothing_targets, virtual_teacher  # here: the method module re-exports this one

    if not attempted(fn, torch.tensor([0]), 3, 0.9):
        return
    g = torch.Generator().manual_seed(0)
    for k, a in ((3, 0.9), (10, 0.99), (100, 0.5), (7, 1.0)):
        y = torch.randint(0, k, (6,), generator=g)
        got, want = fn(y, k, a), virtual_teacher(y, k, a)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            raise AssertionError(f"expected a tensor of shape {tuple(want.shape)} (one row per label), got "
                                 f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
        got = got.double()
        if torch.allclose(got, label_smoothing_targets(y, k, 1 - a).double(), atol=1e-6) and a < 1:
            raise AssertionError("that is label smoothing's target (1-ε)q + ε/K, which gives the correct class "
                                 "a + (1-a)/K: the virtual teacher gives it exactly a and shares 1-a among the "
                                 "K-1 *other* classes")
        if not torch.allclose(got.sum(-1), torch.ones(len(y), dtype=torch.float64), atol=1e-6):
            raise AssertionError("rows do not sum to one: the other classes get (1-a)/(K-1) each, not (1-a)/K")
        if not torch.allclose(got, want.double(), atol=1e-6):
            raise AssertionError(f"values differ for K={k}, a={a}: put a at each row's own label "
                                 "(scatter along dim 1), not at a fixed column")
    print("✓ virtual teacher: correct")


def check_tau_effect(answer: tuple[float, float] | None) -> None:
    """Exercise 2: predict the correct-class probability of the official target
    ``softmax(p^d / tau)`` for a = 0.99 and K = 100, at tau = 1 and at tau = 20, as a pair."""
    if answer is None or answer is ...:
        print("… not attempted yet: replace the ... with your two numbers")
        return
    if not (isinstance(answer, (tuple, list)) and len(answer) == 2 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in answer)):
        raise AssertionError("answer with a pair of numbers: (probability at tau = 1, probability at tau = 20)")
    from ..methods.tfkd import tempered_virtual_teacher

    y = torch.zeros(1, dtype=torch.int64)
    want = [tempered_virtual_teacher(y, 100, 0.99, t)[0, 0].item() for t in (1.0, 20.0)]
    p1, p20 = (float(v) for v in answer)
    if p1 > 0.5:
        raise AssertionError("not quite: tau = 1 leaves *logits* unchanged, but the code feeds probabilities to "
                             "the softmax as if they were logits. Logits 0.99 and 0.0001 differ by less than 1, "
                             "so exp() makes them almost equal")
    if p20 > p1 + 1e-9:
        raise AssertionError("check the direction: a larger tau divides the differences by more, so the target "
                             "moves *towards* uniform (1/K = 0.01) as tau grows")
    if abs(p1 - want[0]) > 0.03 * want[0] or abs(p20 - want[1]) > 0.03 * want[1]:
        raise AssertionError("close in spirit, not in value: compute e^{0.99/τ} / (e^{0.99/τ} + 99·e^{0.0001/τ}) "
                             "for τ = 1 and τ = 20")
    print(f"✓ tau effect: correct -- {want[0]:.4f} at tau = 1 and {want[1]:.4f} at tau = 20, "
          "both within a few percent of uniform (0.01)")
