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


#: the setting of exercise 2: CIFAR-10's ten classes, the official LSR baseline's 0.9, two temperatures
TAU_EXERCISE = {"num_classes": 10, "correct_prob": 0.9, "temperatures": (1.0, 5.0)}


def check_tau_effect(answer: tuple[float, float] | None) -> None:
    """Exercise 2: predict the true-class probability of the official target
    ``softmax(p^d / T)`` for a = 0.9 and K = 10, at T = 1 and at T = 5, as a pair."""
    if answer is None or answer is ...:
        print("… not attempted yet: replace the ... with your two numbers")
        return
    if not (isinstance(answer, (tuple, list)) and len(answer) == 2 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in answer)):
        raise AssertionError("answer with a pair of numbers: (probability at T = 1, probability at T = 5)")
    from ..methods.tfkd import tempered_virtual_teacher

    k, a, temps = TAU_EXERCISE["num_classes"], TAU_EXERCISE["correct_prob"], TAU_EXERCISE["temperatures"]
    y = torch.zeros(1, dtype=torch.int64)
    want = [tempered_virtual_teacher(y, k, a, t, dtype=torch.float64)[0, 0].item() for t in temps]
    # tempering the log-probabilities, softmax(log(p^d) / T): the "proper" way, not the code's
    logp = torch.log(torch.tensor([a] + [(1 - a) / (k - 1)] * (k - 1), dtype=torch.float64))
    proper = [torch.softmax(logp / t, -1)[0].item() for t in temps]
    p1, p5 = (float(v) for v in answer)
    printed = [tempered_virtual_teacher(y, 100, 0.99, t, dtype=torch.float64)[0, 0].item() for t in (1.0, 20.0)]
    if all(abs(x - w) < 0.03 * w for x, w in zip((p1, p5), printed)):
        raise AssertionError(f"those are the values printed in the chapter for K = 100, a = 0.99 at T = 1 and 20; "
                             f"this exercise asks for K = {k}, a = {a:g} at T = 1 and 5")
    if all(abs(x - w) < 0.03 * w for x, w in zip((p1, p5), proper)):
        raise AssertionError("that is softmax(log(p^d) / T), tempering the log-probabilities; the code divides "
                             "the probabilities themselves by T")
    if abs(p1 - a) < 0.01:
        raise AssertionError(f"not quite: T = 1 leaves *logits* unchanged, but the code feeds the probabilities "
                             f"{a:g} and {(1 - a) / (k - 1):.4f} to the softmax as if they were logits. They differ "
                             "by less than 1, so exp() makes them almost equal")
    if p5 > p1 + 1e-9:
        raise AssertionError(f"check the direction: a larger T divides the differences by more, so the target "
                             f"moves *towards* uniform (1/K = {1 / k:g}) as T grows")
    if abs(p1 - want[0]) > 0.03 * want[0] or abs(p5 - want[1]) > 0.03 * want[1]:
        raise AssertionError(f"close in spirit, not in value: compute e^(a/T) / (e^(a/T) + (K-1)·e^(((1-a)/(K-1))/T)) "
                             f"with a = {a:g}, K = {k} for T = 1 and T = 5")
    u = 1 / k
    print(f"✓ tau effect: correct -- {want[0]:.4f} at T = 1 ({want[0] / u:.2f}× uniform, although the virtual "
          f"teacher says {a:g}) and {want[1]:.4f} at T = 5 ({want[1] / u:.2f}× uniform)")
