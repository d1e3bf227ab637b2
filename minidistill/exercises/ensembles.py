"""Self-checks for chapter 5's exercises (learning from ensembles): the BatchEnsemble linear
layer, the ODS step, the members' pairwise-KL diversity.

Each prints a line starting with a tick when the answer is right, says "not attempted yet"
while the exercise still raises ``NotImplementedError`` (:func:`~minidistill.runtime.attempted`),
and raises an ``AssertionError`` with a hint naming the classic mistake when it is wrong. The
notebook calls them as ``ensembles.check_*`` (re-exported by :mod:`minidistill.methods.ensembles`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .. import metrics
from ..runtime import attempted

__all__ = ["check_batch_ensemble_linear", "check_ods_step", "check_pairwise_kl"]


def _be_linear_reference(x, weight, r, gamma, bias):
    m = r.shape[0]
    xb = x.view(m, -1, x.shape[-1])
    return ((xb * r[:, None]) @ weight.T * gamma[:, None] + bias[:, None]).flatten(0, 1)


def check_batch_ensemble_linear(fn: Callable) -> None:
    """Exercise 1: ``fn(x, weight, r, gamma, bias)`` with ``x`` ``[M*N, in]`` (M consecutive blocks),
    ``weight`` ``[out, in]``, ``r`` ``[M, in]``, ``gamma`` ``[M, out]`` (Wen et al.'s $s$), ``bias``
    ``[M, out]`` must return the BatchEnsemble layer's output ``[M*N, out]``."""
    g = torch.Generator().manual_seed(5)
    m, b, n_in, n_out = 3, 4, 5, 6
    args = [torch.randn(m * b, n_in, generator=g, dtype=torch.float64), torch.randn(n_out, n_in, generator=g, dtype=torch.float64),
            1 + 0.5 * torch.randn(m, n_in, generator=g, dtype=torch.float64),
            1 + 0.5 * torch.randn(m, n_out, generator=g, dtype=torch.float64), torch.randn(m, n_out, generator=g, dtype=torch.float64)]
    x, weight, r, gamma, bias = args
    want = _be_linear_reference(x, weight, r, gamma, bias)
    try:
        if not attempted(fn, *[a.clone() for a in args]):
            return
        got = fn(*[a.clone() for a in args])
    except RuntimeError as e:
        raise AssertionError(f"your function failed ({e}); r scales the *inputs* ([M, in]) and gamma the "
                             "*outputs* ([M, out]): y = ((x * r_j) W^T) * gamma_j + b_j") from e
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise AssertionError(f"expected a tensor of shape {tuple(want.shape)} (one row per input row), got "
                             f"{tuple(getattr(got, 'shape', ()))}")
    inter = x.view(b, m, n_in).transpose(0, 1).reshape(m * b, n_in)  # rows as if interleaved
    interleaved = _be_linear_reference(inter, weight, r, gamma, bias).view(m, b, n_out).transpose(0, 1).reshape(m * b, n_out)
    if torch.allclose(got.double(), interleaved, atol=1e-8):
        raise AssertionError("the batch holds M consecutive blocks of N rows (row i belongs to member i // N), "
                             "not interleaved rows (member i % M)")
    if torch.allclose(got.double(), _be_linear_reference(x, weight, r, gamma, bias[:1].expand_as(bias)), atol=1e-8) or \
            torch.allclose(got.double(), _be_linear_reference(x, weight, r, gamma, torch.zeros_like(bias)), atol=1e-8):
        raise AssertionError("each member has its own bias b_j: add bias[j] to block j")
    if not torch.allclose(got.double(), want, atol=1e-8):
        raise AssertionError("values differ: member j's weight is W * (gamma_j r_j^T), i.e. scale the inputs by r_j, "
                             "multiply by W^T, then scale the outputs by gamma_j")
    print("✓ BatchEnsemble linear layer: correct")


def check_ods_step(fn: Callable) -> None:
    """Exercise 2: ``fn(x, grad, eta)`` with images ``x`` in [0, 1] ``[N, C, H, W]`` and the
    ODS gradient ``grad`` (not yet normalised) must return the perturbed images the official
    code trains on."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)
    grad = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(4, 1, 1, 1)
    eta = 8 / 255
    if not attempted(fn, x.clone(), grad.clone(), eta):
        return
    d = x[0].numel()
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    want = (x + eta * math.sqrt(d) * unit).clamp(0, 1)
    got = fn(x.clone(), grad.clone(), eta)
    if not isinstance(got, torch.Tensor) or got.shape != x.shape:
        raise AssertionError(f"expected a tensor of the images' shape {tuple(x.shape)}")
    if torch.allclose(got, (x + eta * unit).clamp(0, 1), atol=1e-9):
        raise AssertionError(f"a unit step moves each pixel by eta/sqrt(D), {math.sqrt(d):.0f} times less than intended "
                             "here: scale the unit direction by sqrt(D), D = values per image")
    batch_unit = grad / grad.norm()
    if torch.allclose(got, (x + eta * math.sqrt(d) * batch_unit).clamp(0, 1), atol=1e-9) or \
            torch.allclose(got, (x + eta * math.sqrt(x.numel()) * batch_unit).clamp(0, 1), atol=1e-9):
        raise AssertionError("normalise each sample's gradient on its own (norm over dims 1..3), not the whole batch")
    if torch.allclose(got, x + eta * math.sqrt(d) * unit, atol=1e-9):
        raise AssertionError("clip the result to [0, 1]: the perturbed images must stay valid images")
    if not torch.allclose(got, want, atol=1e-9):
        raise AssertionError("values differ: x_tilde = clip(x + eta * sqrt(D) * grad / ||grad||_2, 0, 1), per sample")
    print("✓ ODS step: correct")


def check_pairwise_kl(fn: Callable) -> None:
    """Exercise 3: ``fn(member_probs)`` with ``[M, N, K]`` probabilities must return each input's
    mean KL over ordered pairs of distinct members, ``[N]``."""
    g = torch.Generator().manual_seed(7)
    probs = (2 * torch.randn(4, 6, 5, generator=g, dtype=torch.float64)).softmax(-1)
    if not attempted(fn, probs.clone()):
        return
    got = fn(probs.clone())
    want = metrics.pairwise_kl(probs)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise AssertionError(f"expected one value per input, shape {tuple(want.shape)}, got {tuple(getattr(got, 'shape', ()))}")
    got = got.double()
    m = probs.shape[0]
    if torch.allclose(got, want * (m - 1) / m, rtol=1e-6):
        raise AssertionError("you averaged over all M^2 pairs; the i = j pairs are zero and do not count: "
                             "divide by M(M-1)")
    mean = probs.mean(0)
    to_mean = (probs * (probs.log() - mean.log())).sum(-1).mean(0)
    if torch.allclose(got, to_mean, rtol=1e-6):
        raise AssertionError("that is the members' mean KL to the ensemble mean, another measure; "
                             "compare every member with every other member")
    if not torch.allclose(got, want, rtol=1e-6, atol=1e-12):
        raise AssertionError("values differ: d(x) = 1/(M(M-1)) * sum over i != j of KL(p_j || p_i)")
    print("✓ pairwise KL diversity: correct")
