"""Chapter 3's exercise self-checks (FitNets), re-exported by
:mod:`minidistill.methods.fitnets`.

Each check prints a line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises ``NotImplementedError``, and raises an ``AssertionError``
with a hint that names the classic mistake when the answer is wrong.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..losses import soft_targets
from ..runtime import attempted

__all__ = ["check_kernel_size", "check_hint_loss", "check_fitnets_kd_loss"]


def check_kernel_size(fn: Callable[[int, int], int]) -> None:
    """Exercise 1: ``fn(student_size, teacher_size)`` -> the kernel of the valid convolution
    that maps the guided map onto the hint map; it must raise ``ValueError`` when the teacher's
    map is larger."""
    if not attempted(fn, 32, 16):
        return
    for g, h in ((32, 16), (16, 16), (16, 8), (8, 1), (10, 4)):
        got = fn(g, h)
        if isinstance(got, (tuple, list)) and len(got) == 2 and got[0] == got[1]:
            got = got[0]  # a square kernel given as (k, k) is fine
        want = g - h + 1
        if got == h - g + 1 and g != h:
            raise AssertionError("sign: the kernel shrinks the *student's* map, k = N_g - N_h + 1, not N_h - N_g + 1")
        if got == g - h:
            raise AssertionError(f"off by one for {g} -> {h}: a valid convolution with kernel k maps N to N - k + 1")
        if got != want:
            raise AssertionError(f"for a {g}x{g} guided map and a {h}x{h} hint the kernel is {want}, got {got!r}")
    try:
        fn(8, 16)
    except ValueError:
        pass
    else:
        raise AssertionError("a teacher map larger than the student's cannot be reached by a valid convolution: "
                             "raise ValueError instead of returning a kernel")
    print("✓ kernel size: correct")


def check_hint_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 2: ``fn(regressed, teacher)`` -> the hint loss, squared error halved, summed
    over features and averaged over the batch."""
    from ..methods.fitnets import hint_loss  # here, not at the top: the method module re-exports this one

    g = torch.Generator().manual_seed(0)
    r, u = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    if not attempted(fn, r, u):
        return
    got, want = fn(r, u), hint_loss(r, u)
    if not isinstance(got, torch.Tensor) or got.ndim != 0:
        raise AssertionError("expected a scalar tensor")
    n_feat = r[0].numel()
    if torch.allclose(got * n_feat, want * 2, rtol=1e-4) or torch.allclose(got * n_feat, want, rtol=1e-4):
        raise AssertionError("you averaged over the features too (F.mse_loss does): the paper sums over "
                             "features and averages over the batch only")
    if torch.allclose(got, 2 * want, rtol=1e-4):
        raise AssertionError("missing the factor 1/2")
    if torch.allclose(got, len(r) * want, rtol=1e-4):
        raise AssertionError("summed over the batch: average over the examples instead")
    if not torch.allclose(got, want, rtol=1e-4):
        raise AssertionError(f"value {got.item():.5g} != {want.item():.5g}: compute 0.5 * (u - r)**2")
    print("✓ hint loss: correct")


def check_fitnets_kd_loss(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]) -> None:
    """Exercise 3: ``fn(student_logits, teacher_logits, targets, tau, lam)`` -> FitNets' stage-2
    loss: label cross-entropy plus lam times the soft cross-entropy at temperature tau, no tau²."""
    from ..methods.fitnets import fitnets_kd_loss  # here, not at the top: the method module re-exports this one

    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(8, 10, generator=g, dtype=torch.float64) * 3, torch.randn(8, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    if not attempted(fn, z, v, y, 3.0, 4.0):
        return
    tau, lam = 3.0, 4.0
    got, want = fn(z, v, y, tau, lam), fitnets_kd_loss(z, v, y, tau, lam)
    if not isinstance(got, torch.Tensor) or got.ndim != 0:
        raise AssertionError("expected a scalar tensor (mean over the batch)")
    ce = F.cross_entropy(z, y)
    soft = (want - ce) / lam
    p = soft_targets(v, tau)
    entropy = -(p * p.log()).sum(-1).mean()
    if torch.allclose(got, ce + lam * tau**2 * soft, rtol=1e-5):
        raise AssertionError("that is Hinton's tau² scaling: FitNets' code has no tau² factor")
    if torch.allclose(got, ce + lam * (soft - entropy), rtol=1e-5):
        raise AssertionError("that is the KL divergence: FitNets uses the cross-entropy H(p_teacher, p_student) "
                             "(same gradient, but the value differs by the teacher's entropy)")
    untempered = -(p * F.log_softmax(z, -1)).sum(-1).mean()
    if torch.allclose(got, ce + lam * untempered, rtol=1e-5):
        raise AssertionError("soften the student too: log_softmax(student_logits / tau)")
    if not torch.allclose(got, want, rtol=1e-5):
        raise AssertionError(f"value {got.item():.5g} != {want.item():.5g}: label CE + lam * H(softmax(v/tau), "
                             "softmax(z/tau)), both batch means")
    print("✓ FitNets KD loss: correct")
