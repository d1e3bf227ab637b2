r"""The Jacobian view of distillation on perturbed inputs (chapter 5), with ``torch.func.jvp``.

For one teacher and student member with tempered logits $t(x), s(x)$, softmaxes $p_t, p_s$ and
$\ell(x) = \mathrm{KL}(p_t \,\|\, p_s)$, a step $\eta\delta$ gives
$\ell(x + \eta\delta) = \ell(x) + \eta\,c_1 + O(\eta^2)$ (:func:`kl_first_order`), and where the
student matches the teacher at $x$, $\ell(x + \eta\delta) = \eta^2\,\tfrac12\Delta^\top F_t\Delta
+ O(\eta^3)$ with $\Delta = (J_t - J_s)\delta$ (:func:`jacobian_matching_penalty`): KD on perturbed
inputs is a Fisher-weighted Jacobian-matching penalty along $\delta$. :func:`perturbed_kl` is the
exact loss the two expansions are checked against. Directional derivatives only (one forward
pass each), never a Jacobian matrix. Re-exported by :mod:`minidistill.methods.ensembles`.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch.func import jvp

from ..losses import check_temperature

__all__ = ["perturbed_kl", "kl_first_order", "jacobian_matching_penalty"]


def _tempered_jvp(fn, x, delta, temperature):
    check_temperature(temperature)
    if delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    with warnings.catch_warnings():  # torch's first jvp builds its decompositions with the deprecated jit.script
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        return jvp(lambda v: fn(v) / temperature, (x,), (delta,))


def perturbed_kl(teacher_fn: Callable, student_fn: Callable, x: torch.Tensor, delta: torch.Tensor, eta: float,
                 temperature: float = 1.0) -> torch.Tensor:
    r"""$\ell(x + \eta\delta)$ per sample, $\ell = \mathrm{KL}(\mathrm{softmax}(t/\tau)\,\|\,\mathrm{softmax}(s/\tau))$."""
    check_temperature(temperature)
    xt = x + eta * delta
    log_pt = torch.log_softmax(teacher_fn(xt) / temperature, -1)
    log_ps = torch.log_softmax(student_fn(xt) / temperature, -1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def kl_first_order(teacher_fn: Callable, student_fn: Callable, x: torch.Tensor, delta: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    r"""The first-order coefficient of $\ell(x + \eta\delta) = \ell(x) + \eta\,c_1 + O(\eta^2)$,

    $$c_1 = (p_s - p_t)^\top J_s\delta + (\log p_t - \log p_s)^\top F_t J_t \delta,\qquad
      F_t = \mathrm{diag}(p_t) - p_t p_t^\top,$$

    with $J_t\delta, J_s\delta$ the directional derivatives of the tempered logits (``torch.func.jvp``)."""
    t, jt = _tempered_jvp(teacher_fn, x, delta, temperature)
    s, js = _tempered_jvp(student_fn, x, delta, temperature)
    pt, ps = t.softmax(-1), s.softmax(-1)
    ft_jt = pt * jt - pt * (pt * jt).sum(-1, keepdim=True)  # F_t (J_t delta)
    return ((ps - pt) * js).sum(-1) + ((pt.log() - ps.log()) * ft_jt).sum(-1)


def jacobian_matching_penalty(teacher_fn: Callable, student_fn: Callable, x: torch.Tensor, delta: torch.Tensor,
                              temperature: float = 1.0) -> torch.Tensor:
    r"""$\frac12 \Delta^\top F_t \Delta$ with $\Delta = (J_t - J_s)\delta$: where the student matches the
    teacher at $x$, $\ell(x + \eta\delta) = \eta^2 \cdot$ this $+\, O(\eta^3)$ -- KD on perturbed
    inputs is a Fisher-weighted Jacobian-matching penalty along $\delta$."""
    t, jt = _tempered_jvp(teacher_fn, x, delta, temperature)
    _, js = _tempered_jvp(student_fn, x, delta, temperature)
    pt = t.softmax(-1)
    d = jt - js
    return 0.5 * ((pt * d * d).sum(-1) - (pt * d).sum(-1) ** 2)
