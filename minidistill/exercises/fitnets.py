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
    """Exercise 2: ``fn(regressed, teacher)`` -> the paper's hint loss, squared error halved,
    summed over features and averaged over the batch.

    ``F.mse_loss`` (or half of it, what stage 1 minimises with ``normalize=True``) is the same
    loss divided by a constant: same minimiser, but not the paper's value, so the check says
    which constant it is rather than accepting it."""
    from ..methods.fitnets import hint_loss  # here, not at the top: the method module re-exports this one

    g = torch.Generator().manual_seed(0)
    r, u = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    if not attempted(fn, r, u):
        return
    got, want = fn(r, u), hint_loss(r, u)
    if not isinstance(got, torch.Tensor) or got.ndim != 0:
        raise AssertionError("expected a scalar tensor")
    n_feat = r[0].numel()
    if torch.allclose(got * n_feat, want, rtol=1e-4):
        raise AssertionError(
            "that is 0.5 * F.mse_loss: the per-feature loss that stage 1 minimises here (normalize=True, for SGD's "
            "sake), the paper's loss divided by the number of features per example. Same minimiser, a gradient "
            "scaled by a constant; but the exercise asks for the paper's L_HT: sum over the features, mean over "
            "the batch")
    if torch.allclose(got * n_feat, want * 2, rtol=1e-4):
        raise AssertionError(
            "that is F.mse_loss, which averages over the features too: 2 / (number of features) times the "
            "paper's L_HT (stage 1 minimises half of it, normalize=True). The paper sums over the features and "
            "averages over the batch only, with the factor 1/2")
    if torch.allclose(got, 2 * want, rtol=1e-4):
        raise AssertionError("missing the factor 1/2")
    if torch.allclose(got, len(r) * want, rtol=1e-4):
        raise AssertionError("summed over the batch: average over the examples instead")
    if not torch.allclose(got, want, rtol=1e-4):
        raise AssertionError(f"value {got.item():.5g} != {want.item():.5g}: compute 0.5 * (u - r)**2")
    print("✓ hint loss: correct")


def check_fitnets_kd_loss(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]) -> None:
    """Exercise 3: ``fn(student_logits, teacher_logits, targets, T, lam)`` -> FitNets' stage-2
    loss: label cross-entropy plus lam times the soft cross-entropy at temperature T, no T².

    The KL form (``lam * KL(p^t_T || p^s_T)`` in place of the cross-entropy) is accepted with a
    note: it differs by ``lam`` times the teacher's entropy, a constant, so it has the same
    gradient and trains the same student; the official code's value is the cross-entropy."""
    from ..methods.fitnets import fitnets_kd_loss  # here, not at the top: the method module re-exports this one

    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(8, 10, generator=g, dtype=torch.float64) * 3, torch.randn(8, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    if not attempted(fn, z, v, y, 3.0, 4.0):
        return
    t, lam = 3.0, 4.0
    got, want = fn(z, v, y, t, lam), fitnets_kd_loss(z, v, y, t, lam)
    if not isinstance(got, torch.Tensor) or got.ndim != 0:
        raise AssertionError("expected a scalar tensor (mean over the batch)")
    ce = F.cross_entropy(z, y)
    cross = -(soft_targets(v, t) * F.log_softmax(z / t, -1)).sum(-1).mean()   # H(p^t_T, p^s_T)
    log_p = F.log_softmax(v / t, -1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()                           # H(p^t_T), log-safe
    kl = cross - entropy
    k = z.shape[1]
    for soft in (cross, kl):
        if torch.allclose(got, ce + lam * t**2 * soft, rtol=1e-5):
            raise AssertionError("that is Hinton's T² scaling: FitNets' code has no T² factor")
    if torch.allclose(got, ce + lam * kl / k, rtol=1e-5):
        raise AssertionError("the KL was averaged over the classes too (nn.KLDivLoss() and F.kl_div default to "
                             "reduction='mean', which divides by N*K): use reduction='batchmean'")
    untempered = -(soft_targets(v, t) * F.log_softmax(z, -1)).sum(-1).mean()
    if torch.allclose(got, ce + lam * untempered, rtol=1e-5):
        raise AssertionError("soften the student too: log_softmax(student_logits / T)")
    if torch.allclose(got, ce + lam * kl, rtol=1e-5):
        print("✓ FitNets KD loss: correct, in the KL form. lam * KL(p^t_T || p^s_T) differs from FitNets' "
              "lam * H(p^t_T, p^s_T) by lam times the teacher's entropy, a constant: the same gradient, so the "
              f"same training. Only the value differs (here by {(lam * entropy).item():.3f}); the official code "
              "reports the cross-entropy.")
        return
    if not torch.allclose(got, want, rtol=1e-5):
        raise AssertionError(f"value {got.item():.5g} != {want.item():.5g}: label CE + lam * H(softmax(v/T), "
                             "softmax(z/T)), both batch means")
    print("✓ FitNets KD loss: correct")
