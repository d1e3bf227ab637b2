"""Chapter 10's exercise self-checks (ManiDP), re-exported by :mod:`minidistill.methods.manidp`.

Each check prints a line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises ``NotImplementedError``, and raises an ``AssertionError``
with a hint that names the classic mistake when the answer is wrong.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import attempted

__all__ = ["check_instance_weight", "check_cosine_gram", "check_block_macs"]


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


def check_block_macs(fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 2: ``fn(c_in, c_out, kept1, kept2, h, w)`` -> per image ``[N]``, the multiply-accumulates
    of a gated block's two 3x3 convolutions (``h x w`` output), when its first gate keeps ``kept1[n]``
    of the ``c_out`` channels and its second gate ``kept2[n]``: :math:`9hw(c_{in}k_1 + k_1k_2)`."""
    kept1, kept2 = torch.tensor([16, 10, 4, 16]), torch.tensor([16, 8, 12, 2])
    if not attempted(fn, 16, 16, kept1.clone(), kept2.clone(), 8, 8):
        return
    for c_in, c_out, h, w in ((16, 16, 8, 8), (8, 16, 4, 6)):
        got = torch.as_tensor(fn(c_in, c_out, kept1.clone(), kept2.clone(), h, w), dtype=torch.float64)
        k1, k2 = kept1.double(), kept2.double()
        want = 9 * h * w * (c_in * k1 + k1 * k2)
        if got.shape != want.shape:
            raise AssertionError(f"one cost per image: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
        if torch.allclose(got, 2 * want):
            raise AssertionError("that counts FLOPs (2 per multiply-accumulate): count MACs")
        if torch.allclose(got, want / 9):
            raise AssertionError("a 3x3 kernel does 9 multiply-accumulates per input channel and output position")
        if torch.allclose(got, 9 * h * w * (c_in * k1 + c_out * k2)):
            raise AssertionError("the second conv reads only the channels the first gate kept: its cost is "
                                 "k1 * k2, not c_out * k2")
        if torch.allclose(got, 9 * h * w * (k1 * k1 + k1 * k2)) or (
                c_in != c_out and torch.allclose(got, 9 * h * w * (c_out * k1 + k1 * k2))):
            raise AssertionError("the first conv reads every one of the block's c_in input channels (the residual "
                                 "stream is not gated)")
        if torch.allclose(got, torch.full_like(want, 9 * h * w * (c_in * c_out + c_out * c_out))):
            raise AssertionError("that is the dense cost: count only the channels each image keeps")
        if not torch.allclose(got, want, rtol=1e-6):
            raise AssertionError(f"for c_in = {c_in}, c_out = {c_out}, {h} x {w}: expected {want.tolist()}, got {got.tolist()}")
    print("✓ block MACs: correct")
