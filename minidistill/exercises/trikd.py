"""Chapter 8's exercise self-checks (TriKD), re-exported by :mod:`minidistill.methods.trikd`.

Each check prints one line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises ``NotImplementedError``, and raises an ``AssertionError``
with a hint that names the classic mistake when it is wrong. The references are written out here
with explicit sums, independently of the package functions the chapter shows.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..runtime import attempted

__all__ = ["check_anchor_term", "check_anchor_gradient", "check_flip_weight", "check_student_gradient"]


def _kl_rows(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(target/T) || softmax(logits/T)) per row, written out."""
    lp_a = torch.log_softmax(target_logits / temperature, 1)
    lp = torch.log_softmax(logits / temperature, 1)
    return (lp_a.exp() * (lp_a - lp)).sum(1)


def _scalar(got: object, what: str) -> torch.Tensor:
    if isinstance(got, (int, float)):
        got = torch.tensor(float(got))
    if not isinstance(got, torch.Tensor) or got.numel() != 1:
        raise AssertionError(f"{what} must return one number (a scalar tensor), got "
                             f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
    return got


def check_anchor_term(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    r"""Exercise: your ``fn(logits, anchor_logits, T)`` must be one network's anchor term before its
    weight: $T^2\,\frac1N\sum_n \mathrm{KL}(p^a_{T,n}\,\|\,p_{T,n})$, the anchor the (detached) target.
    Any correct form is accepted (``F.kl_div`` with ``batchmean``, explicit sums, cross-entropy minus
    the anchor's entropy)."""
    g = torch.Generator().manual_seed(11)
    if not attempted(fn, torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), 1.0):
        return
    for n, k, t in ((1, 3, 1.0), (8, 10, 1.0), (6, 5, 4.0), (4, 100, 2.0)):
        z = (torch.randn(n, k, generator=g, dtype=torch.float64) * 2).requires_grad_()
        a = (torch.randn(n, k, generator=g, dtype=torch.float64) * 3).requires_grad_()
        rows = _kl_rows(a.detach(), z.detach(), t)
        want = t * t * rows.sum() / n
        got_t = fn(z, a, t)
        got = _scalar(got_t, "your function").detach().double()
        close = lambda v: torch.allclose(got, torch.as_tensor(v, dtype=torch.float64), rtol=1e-5, atol=1e-10)  # noqa: E731
        if not close(want):
            if close(t * t * _kl_rows(z.detach(), a.detach(), t).sum() / n):
                raise AssertionError("the KL is reversed: the anchor is the target, KL(p^a_T || p_T) (anchor first)")
            if t != 1.0 and close(rows.sum() / n):
                raise AssertionError(f"the factor T^2 is missing (at T = {t:g} your value is {t * t:g}x too small)")
            if close(want / k):
                raise AssertionError("off by a factor K: average over the batch only ('batchmean'), not over N*K")
            if n > 1 and close(want * n):
                raise AssertionError("the batch is summed, not averaged: divide by N")
            raise AssertionError(f"value {got.item():.6g} != {want.item():.6g} for N={n}, K={k}, T={t:g}")
        if not (isinstance(got_t, torch.Tensor) and got_t.requires_grad):
            raise AssertionError("the result carries no gradient for the network's logits: compute it with torch "
                                 "operations on them")
        grads = torch.autograd.grad(got_t.sum(), [z, a], allow_unused=True)
        if grads[1] is not None and grads[1].abs().max() > 0:
            raise AssertionError("the anchor gets a gradient: detach anchor_logits (the anchor is frozen, a target)")
    print("✓ anchor term: correct (anchor first, T^2, batch mean, anchor detached)")


def check_anchor_gradient(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    r"""Exercise: your ``fn(teacher_logits, anchor_logits, T)`` must return, in closed form (no
    autograd), the gradient of the batch-mean anchor term $T^2\,\frac1N\sum_n
    \mathrm{KL}(p^a_{T,n}\,\|\,p^t_{T,n})$ with respect to the teacher's logits ``[N, K]``:
    $\frac{T}{N}\,(p^t_T - p^a_T)$."""
    g = torch.Generator().manual_seed(12)
    if not attempted(fn, torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), 1.0):
        return
    for n, k, t in ((1, 3, 1.0), (8, 10, 1.0), (5, 6, 3.0), (3, 20, 0.5)):
        v = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
        a = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
        v_req = v.clone().requires_grad_()
        (auto,) = torch.autograd.grad(t * t * _kl_rows(a, v_req, t).sum() / n, v_req)   # the reference
        got = fn(v.clone(), a.clone(), t)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (n, k):
            raise AssertionError(f"return a [N, K] = [{n}, {k}] tensor (one entry per logit), got "
                                 f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
        got = got.detach().double()
        close = lambda w: torch.allclose(got, w, rtol=1e-5, atol=1e-10)  # noqa: E731
        if not close(auto):
            if close(-auto):
                raise AssertionError("the sign is flipped: the gradient is p^t_T - p^a_T (a descent step moves "
                                     "the teacher towards the anchor)")
            if n > 1 and close(auto * n):
                raise AssertionError("the 1/N of the batch mean is missing")
            if t != 1.0 and (close(auto / t) or close(auto / t**2) or close(auto / t**3)):
                raise AssertionError(f"the power of T is wrong: T^2 from the loss times 1/T from the softmax leaves "
                                     f"T (at T = {t:g})")
            raise AssertionError(f"your gradient differs from autograd's for N={n}, K={k}, T={t:g} "
                                 f"(max difference {(got - auto).abs().max().item():.3g})")
    print("✓ anchor gradient: correct, T (p^t_T - p^a_T) / N")


def _flip_reference(y: int, ps: torch.Tensor, pa: torch.Tensor, mutual_weight: float) -> float:
    """The smallest anchor weight at which class ``y`` is no longer strictly on top of the mixture
    q + lambda_m p^s + lambda_a p^a (math.inf if none), by scanning every wrong class."""
    best = math.inf
    for k in range(len(pa)):
        gap = float(pa[k] - pa[y])
        if k != y and gap > 0:
            best = min(best, (1 + mutual_weight * float(ps[y] - ps[k])) / gap)
    return best


def check_flip_weight(fn: Callable[[int, torch.Tensor, torch.Tensor, float], float]) -> None:
    r"""Exercise: your ``fn(y, student_probs, anchor_probs, mutual_weight)`` returns, for one example at
    $T = 1$ with $0 \le \lambda_m < 1$, the smallest anchor weight $\lambda_a$ at which the teacher's best
    answer (the mixture of step 3) no longer has the true class ``y`` strictly on top; ``math.inf`` when no
    weight does. A float or a 0-d tensor is accepted."""
    ps0 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    if not attempted(fn, 0, ps0.clone(), ps0.clone(), 0.0):
        return
    cases = [  # (y, p^s, p^a, lambda_m): the anchor wrong without / with the student's term, the binding class
        (0, [0.5, 0.2, 0.1, 0.1, 0.1], [0.3, 0.6, 0.04, 0.03, 0.03], 0.0),        # no mutual term: 1 / 0.3
        (0, [0.5, 0.2, 0.1, 0.1, 0.1], [0.3, 0.6, 0.04, 0.03, 0.03], 0.5),        # the student's term raises it
        (0, [0.55, 0.0, 0.45], [0.1, 0.46, 0.44], 0.9),                           # binding class: not the anchor's top
        (2, [0.2, 0.3, 0.5], [0.05, 0.15, 0.8], 0.5),                             # the anchor is right: never
        (1, [0.1, 0.1, 0.8], [0.45, 0.1, 0.45], 0.25),                            # label 1, two wrong classes tie
    ]
    for y, ps, pa, lm in cases:
        ps_t, pa_t = torch.tensor(ps, dtype=torch.float64), torch.tensor(pa, dtype=torch.float64)
        want = _flip_reference(y, ps_t, pa_t, lm)
        got = fn(y, ps_t.clone(), pa_t.clone(), lm)
        if isinstance(got, torch.Tensor):
            if got.numel() != 1:
                raise AssertionError(f"return one number (the weight), got a tensor of shape {tuple(got.shape)}")
            got = got.item()
        if not isinstance(got, (int, float)):
            raise AssertionError(f"return one number (the weight, or math.inf), got {type(got).__name__}")
        got = float(got)
        if math.isinf(want):
            if not math.isinf(got) or got < 0:
                raise AssertionError(f"y={y}, p^a={pa}: the anchor ranks the true class first, so no weight moves "
                                     f"the label off the top: return math.inf (got {got:.6g})")
            continue
        if math.isclose(got, want, rel_tol=1e-6):
            continue
        no_mutual = _flip_reference(y, ps_t, pa_t, 0.0)
        top = int(pa_t.argmax())
        only_top = (1 + lm * float(ps_t[y] - ps_t[top])) / float(pa_t[top] - pa_t[y])
        if lm > 0 and math.isclose(got, no_mutual, rel_tol=1e-6):
            raise AssertionError(f"lambda_m = {lm:g} is ignored: the student's term moves the mixture too, the "
                                 "condition is lambda_a (p^a_k - p^a_y) >= 1 + lambda_m (p^s_y - p^s_k)")
        if math.isclose(got, only_top, rel_tol=1e-6):
            raise AssertionError("only the anchor's top class was tried: another wrong class can overtake the label "
                                 "at a smaller weight (take the minimum over every k != y)")
        raise AssertionError(f"y={y}, p^s={ps}, p^a={pa}, lambda_m={lm:g}: got {got:.6g}, expected {want:.6g}")
    print("✓ flip weight: correct (the minimum over the wrong classes of (1 + lambda_m (p^s_y - p^s_k)) / "
          "(p^a_k - p^a_y), infinite when the anchor ranks the label first)")


def check_student_gradient(fn: Callable[..., torch.Tensor]) -> None:
    r"""Exercise: your ``fn(student_logits, teacher_logits, anchor_logits, y, mutual_weight, anchor_weight, T)``
    returns, in closed form (no autograd), the gradient with respect to the student's logits ``[N, K]`` of
    the *normalised* student loss $\mathcal L_s / (1 + \lambda_m + \lambda_a)$, every term a batch mean,
    the label's cross-entropy at $T = 1$ and both KL terms at $T$ with the factor $T^2$."""
    g = torch.Generator().manual_seed(13)
    tiny = [torch.randn(2, 3, generator=g) for _ in range(3)]
    if not attempted(fn, *tiny, torch.tensor([0, 1]), 1.0, 1.0, 1.0):
        return
    for n, k, lm, la, t in ((1, 3, 1.0, 1.0, 1.0), (8, 10, 0.5, 2.0, 1.0), (5, 6, 1.0, 1.0, 4.0),
                            (4, 7, 0.3, 3.0, 2.0)):
        z, v, a = (torch.randn(n, k, generator=g, dtype=torch.float64) * 2 for _ in range(3))
        y = torch.randint(0, k, (n,), generator=g)
        z_req = z.clone().requires_grad_()
        ce = -torch.log_softmax(z_req, 1)[torch.arange(n), y].sum() / n
        loss = (ce + lm * t * t * _kl_rows(v, z_req, t).sum() / n + la * t * t * _kl_rows(a, z_req, t).sum() / n)
        (auto,) = torch.autograd.grad(loss / (1 + lm + la), z_req)          # the reference
        got = fn(z.clone(), v.clone(), a.clone(), y.clone(), lm, la, t)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (n, k):
            raise AssertionError(f"return a [N, K] = [{n}, {k}] tensor (one entry per logit), got "
                                 f"{type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
        got = got.detach().double()
        close = lambda w: torch.allclose(got, w, rtol=1e-5, atol=1e-10)  # noqa: E731
        if close(auto):
            continue
        q = torch.nn.functional.one_hot(y, k).double()
        p, p_t = z.softmax(1), (z / t).softmax(1)
        pv, pa = (v / t).softmax(1), (a / t).softmax(1)
        scale = (1 + lm + la) * n
        if close(-auto):
            raise AssertionError("the sign is flipped: each term is (learner - target), e.g. p^s - q")
        if close(auto * (1 + lm + la)):
            raise AssertionError("not normalised: divide by 1 + lambda_m + lambda_a")
        if n > 1 and close(auto * n):
            raise AssertionError("the 1/N of the batch mean is missing")
        if t != 1.0 and close(((p_t - q) + t * lm * (p_t - pv) + t * la * (p_t - pa)) / scale):
            raise AssertionError("the label's cross-entropy is at T = 1: its part is p^s - q, not p^s_T - q")
        if t != 1.0 and close(((p - q) + lm * (p_t - pv) + la * (p_t - pa)) / scale):
            raise AssertionError(f"the KL terms' factor is T (T^2 from the loss times 1/T from the softmax), "
                                 f"missing at T = {t:g}")
        raise AssertionError(f"your gradient differs from autograd's for N={n}, K={k}, lambda_m={lm:g}, "
                             f"lambda_a={la:g}, T={t:g} (max difference {(got - auto).abs().max().item():.3g})")
    print("✓ student gradient: correct, [(p^s - q) + T lambda_m (p^s_T - p^t_T) + T lambda_a (p^s_T - p^a_T)] "
          "/ ((1 + lambda_m + lambda_a) N)")
