r"""The Jacobian view of distillation on perturbed inputs (chapter 5), with ``torch.func``.

In the course's notation, one teacher member has logits $v(x)$ and one student member $z(x)$;
$p^t = \mathrm{softmax}(v/T)$, $p^s = \mathrm{softmax}(z/T)$, $\ell(x) = \mathrm{KL}(p^t \,\|\, p^s)$,
$J_v, J_z$ the Jacobians of the tempered logits $v/T, z/T$ and $F = \mathrm{diag}(p^t) - p^t p^{t\top}$.
A step $\eta\delta$ gives $\ell(x + \eta\delta) = \ell(x) + \eta\,c_1 + O(\eta^2)$ (:func:`kl_first_order`),
and where the student matches the teacher at $x$, $\ell(x + \eta\delta) = \eta^2\,\tfrac12\Delta^\top
F\Delta + O(\eta^3)$ with $\Delta = (J_v - J_z)\delta$ (:func:`jacobian_matching_penalty`): KD on
perturbed inputs is a Fisher-weighted Jacobian-matching penalty along $\delta$. :func:`perturbed_kl`
is the exact loss the two expansions are checked against; those use directional derivatives only
(``jvp``, one forward pass each).

Which directions $\delta$ carry that penalty: :func:`softmax_jacobian` (the full Jacobian of $p^t$,
``jacrev``, for small checks), :func:`row_space_fraction` (how much of a step lies in its row
space, where ODS steps live) and :func:`frobenius_jacobian_penalty` (the penalty's expectation
under Gaussian steps, $\tfrac12 \mathrm{tr}\big((J_v - J_z)^\top F (J_v - J_z)\big)$, optionally
restricted to a subspace). Re-exported by :mod:`minidistill.methods.ensembles`.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch.func import jacrev, jvp, vmap

from ..losses import check_temperature

__all__ = ["perturbed_kl", "kl_first_order", "jacobian_matching_penalty", "softmax_jacobian",
           "row_space_fraction", "frobenius_jacobian_penalty"]


def _tempered_jvp(fn, x, delta, temperature):
    check_temperature(temperature)
    if delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        # contiguous: jvp cannot make an expanded tensor (x.expand(n, ...)) a dual tensor
        return jvp(lambda v: fn(v) / temperature, (x.contiguous(),), (delta.contiguous(),))


def perturbed_kl(teacher_fn: Callable, student_fn: Callable, x: torch.Tensor, delta: torch.Tensor, eta: float,
                 temperature: float = 1.0) -> torch.Tensor:
    r"""$\ell(x + \eta\delta)$ per sample, $\ell = \mathrm{KL}(\mathrm{softmax}(v/T)\,\|\,\mathrm{softmax}(z/T))$."""
    check_temperature(temperature)
    xt = x + eta * delta
    log_pt = torch.log_softmax(teacher_fn(xt) / temperature, -1)
    log_ps = torch.log_softmax(student_fn(xt) / temperature, -1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def kl_first_order(teacher_fn: Callable, student_fn: Callable, x: torch.Tensor, delta: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    r"""The first-order coefficient of $\ell(x + \eta\delta) = \ell(x) + \eta\,c_1 + O(\eta^2)$,

    $$c_1 = (p^s - p^t)^\top J_z\delta + (\log p^t - \log p^s)^\top F J_v \delta,\qquad
      F = \mathrm{diag}(p^t) - p^t p^{t\top},$$

    with $J_v\delta, J_z\delta$ the directional derivatives of the tempered logits (``torch.func.jvp``)."""
    v, jv = _tempered_jvp(teacher_fn, x, delta, temperature)
    z, jz = _tempered_jvp(student_fn, x, delta, temperature)
    pt, ps = v.softmax(-1), z.softmax(-1)
    f_jv = pt * jv - pt * (pt * jv).sum(-1, keepdim=True)  # F (J_v delta)
    return ((ps - pt) * jz).sum(-1) + ((pt.log() - ps.log()) * f_jv).sum(-1)


def jacobian_matching_penalty(teacher_fn: Callable, student_fn: Callable, x: torch.Tensor, delta: torch.Tensor,
                              temperature: float = 1.0) -> torch.Tensor:
    r"""$\frac12 \Delta^\top F \Delta$ with $\Delta = (J_v - J_z)\delta$, per sample: where the student
    matches the teacher at $x$, $\ell(x + \eta\delta) = \eta^2 \cdot$ this $+\, O(\eta^3)$ -- KD on
    perturbed inputs is a Fisher-weighted Jacobian-matching penalty along $\delta$."""
    v, jv = _tempered_jvp(teacher_fn, x, delta, temperature)
    _, jz = _tempered_jvp(student_fn, x, delta, temperature)
    pt = v.softmax(-1)
    d = jv - jz
    return 0.5 * ((pt * d * d).sum(-1) - (pt * d).sum(-1) ** 2)


def _jacobians(fn: Callable, x: torch.Tensor, temperature: float, softmax: bool) -> torch.Tensor:
    """``[N, K, D]``: per sample, the Jacobian of ``fn``'s tempered logits (or their softmax) w.r.t.
    the ``D`` input values (``vmap(jacrev)``, each sample through ``fn`` alone)."""
    check_temperature(temperature)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch [N, ...], got shape {tuple(x.shape)}")

    def one(xi: torch.Tensor) -> torch.Tensor:
        out = fn(xi.unsqueeze(0)).squeeze(0) / temperature
        return out.softmax(-1) if softmax else out

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        return vmap(jacrev(one))(x).flatten(2)


def softmax_jacobian(fn: Callable, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""The full Jacobian $J_{p}(x) = \partial\,\mathrm{softmax}(\mathrm{fn}(x)/T) / \partial x$ of each
    sample, ``[N, K, D]`` with ``D`` the values per input (``jacrev``: $K$ backward passes per sample,
    for small checks). Its rows span at most $K - 1$ directions (the probabilities sum to one), and
    every ODS direction $J_p^\top w / \|J_p^\top w\|$ lies in that row space."""
    return _jacobians(fn, x, temperature, softmax=True)


def row_space_fraction(jacobian: torch.Tensor, delta: torch.Tensor, rtol: float = 1e-8) -> torch.Tensor:
    r"""$\|P\delta\| / \|\delta\|$ for each row of ``delta`` ``[n, D]`` (or ``[n, ...]``, flattened),
    $P$ the orthogonal projector onto the row space of ``jacobian`` ``[K, D]``: the fraction of a
    step's length that the outputs react to. The row space is spanned by the right singular vectors
    whose singular values exceed ``rtol`` times the largest. A random (Gaussian) direction in $D$
    dimensions puts a fraction $\approx\sqrt{r/D}$ of its length in an $r$-dimensional subspace; an
    ODS direction puts all of it there."""
    if jacobian.ndim != 2:
        raise ValueError(f"jacobian must be [K, D] (one sample's), got shape {tuple(jacobian.shape)}")
    d = delta.flatten(1)
    if d.shape[1] != jacobian.shape[1]:
        raise ValueError(f"delta must have D = {jacobian.shape[1]} values per row, got {d.shape[1]}")
    _, sv, vh = torch.linalg.svd(jacobian, full_matrices=False)
    basis = vh[sv > rtol * sv[0]]  # [r, D], orthonormal rows
    return (d.to(basis.dtype) @ basis.T).norm(dim=1) / d.norm(dim=1).to(basis.dtype)


def frobenius_jacobian_penalty(teacher_fn: Callable, student_fn: Callable, x: torch.Tensor,
                               temperature: float = 1.0, within: torch.Tensor | None = None) -> torch.Tensor:
    r"""$\tfrac12\,\mathrm{tr}\big((J_v - J_z)^\top F\,(J_v - J_z)\big)$ per sample, from the full
    Jacobians (``jacrev``): the expectation of :func:`jacobian_matching_penalty` over Gaussian steps
    $\delta \sim \mathcal N(0, I_D)$, a Fisher-weighted Frobenius matching of the two Jacobians.
    With ``within`` ``[r, D]`` (orthonormal rows), only the part in their span:
    $\tfrac12\,\mathrm{tr}\big(B (J_v - J_z)^\top F (J_v - J_z) B^\top\big)$, $B$ = ``within``."""
    jv = _jacobians(teacher_fn, x, temperature, softmax=False)
    jz = _jacobians(student_fn, x, temperature, softmax=False)
    with torch.no_grad():
        pt = (teacher_fn(x) / temperature).softmax(-1)
    diff = jv - jz  # [N, K, D]
    if within is not None:
        if within.ndim != 2 or within.shape[1] != diff.shape[2]:
            raise ValueError(f"within must be [r, D={diff.shape[2]}] (orthonormal rows), got {tuple(within.shape)}")
        diff = diff @ within.T.to(diff.dtype)  # [N, K, r]
    p = pt.unsqueeze(-1)
    return 0.5 * ((p * diff * diff).sum((1, 2)) - (p * diff).sum(1).pow(2).sum(-1))
