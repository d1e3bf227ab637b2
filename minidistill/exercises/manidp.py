"""Chapter 10's exercise self-checks (ManiDP), re-exported by :mod:`minidistill.methods.manidp`.

Each check prints a line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises ``NotImplementedError``, and raises an ``AssertionError``
with a hint that names the classic mistake when the answer is wrong.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import attempted

__all__ = ["check_instance_weight", "check_cosine_gram"]


def check_instance_weight(fn: Callable[[torch.Tensor, float, float], torch.Tensor]) -> None:
    """Exercise 1: ``fn(ce, c_prime, lam)`` -> ManiDP's weight
    :math:`\\lambda(x_i) = \\lambda' \\mathbb 1[\\mathcal L_{CE} < C'] (C' - \\mathcal L_{CE}) / C'` per instance."""
    ce = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 3.0], dtype=torch.float64)
    if not attempted(fn, ce, 0.5, 0.01):
        return
    for c_prime, lam in ((0.5, 0.01), (1.0, 2.0), (0.2, 1.0)):
        got = torch.as_tensor(fn(ce.clone(), c_prime, lam), dtype=torch.float64)
        want = torch.tensor([lam * max(c_prime - c, 0.0) / c_prime for c in ce.tolist()], dtype=torch.float64)
        if got.shape != want.shape:
            raise AssertionError(f"one weight per instance: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
        if torch.allclose(got, lam * (ce / c_prime).clamp(max=1)) or (got[-1] > got[0]):
            raise AssertionError("reversed: harder instances (larger CE) must get a *smaller* weight, easy ones lam'")
        if (got < -1e-12).any():
            raise AssertionError("instances with CE above C' must get weight 0, not a negative weight (the indicator)")
        if torch.allclose(got, torch.full_like(got, lam) * (ce < c_prime)):
            raise AssertionError("the indicator alone is not enough: the weight falls linearly, (C' - CE) / C'")
        if not torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            raise AssertionError(f"for C' = {c_prime}, lam' = {lam}: expected {want.tolist()}, got {got.tolist()}")
    print("✓ instance weight: correct")


def check_cosine_gram(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 2: ``fn(v)`` -> the ``[N, N]`` matrix of cosine similarities between the rows of ``v``."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 7, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5, 2.0, 10.0],
                                                                            dtype=torch.float64)[:, None]
    if not attempted(fn, v):
        return
    got = torch.as_tensor(fn(v.clone()), dtype=torch.float64)
    if got.shape == (7, 7):
        raise AssertionError("the similarity is between instances (rows), so the matrix is N x N, not d x d")
    if got.shape != (5, 5):
        raise AssertionError(f"expected a 5 x 5 matrix, got shape {tuple(got.shape)}")
    if torch.allclose(got, v @ v.T, rtol=1e-6):
        raise AssertionError("that is the plain Gram matrix: divide by both rows' norms to get cosines")
    want = torch.tensor([[float(torch.dot(a, b) / (a.norm() * b.norm())) for b in v] for a in v], dtype=torch.float64)
    if not torch.allclose(got, want, rtol=1e-6, atol=1e-8):
        raise AssertionError("not the cosine similarities: entry (i, j) is <v_i, v_j> / (|v_i| |v_j|)")
    scaled = torch.as_tensor(fn(v * 7.0), dtype=torch.float64)
    if not torch.allclose(scaled, want, rtol=1e-6, atol=1e-8):
        raise AssertionError("cosines do not change when every vector is scaled")
    print("✓ cosine Gram matrix: correct")
