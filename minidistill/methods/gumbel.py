r"""Chapter 4, first half -- the Gumbel-max trick and its relaxation, the Gumbel-softmax
(Jang, Gu & Poole; Maddison, Mnih & Teh; both ICLR 2017): sampling a discrete choice, and getting
a gradient through it.

* Sampling: :func:`gumbel_noise`, :func:`gumbel_max` (the exact sampler
  $\arg\max_i(\log\pi_i + g_i)$), :func:`gumbel_softmax` (its relaxation at temperature $\tau$,
  straight-through when ``hard=True``), and two tests to check a sampler: :func:`chi_square_test`
  (counts against probabilities) and :func:`ks_two_sample` (two samples of a continuous variable).
* Gradient estimators on a problem whose gradient is known: :func:`exact_gradient`,
  :func:`gradient_samples` (REINFORCE, alone or with a leave-one-out baseline over k draws,
  Gumbel-softmax, straight-through), :func:`gradient_statistics` (bias, variance per evaluation of
  $f$, mean squared error), :func:`mse_at_budget`, and :func:`estimator_race`, which charges every
  estimator per evaluation of $f$.

AdaShare (:mod:`minidistill.methods.adashare`) gates its blocks with these samples. The figure
of relaxed samples is :func:`minidistill.methods.adashare_plots.plot_relaxed_samples`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "check_tau",
    "gumbel_noise",
    "gumbel_max",
    "gumbel_softmax",
    "chi_square_test",
    "ESTIMATORS",
    "exact_gradient",
    "gradient_samples",
    "gradient_statistics",
    "mse_at_budget",
    "estimator_race",
    "ks_two_sample",
    "kolmogorov_q",
]


def check_tau(tau: float) -> None:
    """Raise a ``ValueError`` unless ``tau`` is a finite number > 0 (a bool is not a number here)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau < math.inf):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {type(logits).__name__}"
                         + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else ""))
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise ValueError(f"{name} must have the categories in the last dimension, at least 2 of them; "
                         f"got shape {tuple(logits.shape)}")


def gumbel_noise(shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> torch.Tensor:
    r"""Standard Gumbel noise $g = -\log(-\log u)$, $u \sim \mathcal U(0, 1)$, of the given shape,
    drawn with :class:`torch.distributions.Gumbel` (which keeps $u$ away from 0 and 1, so $g$ is
    always finite). Uses torch's global random state: seed it with ``torch.manual_seed``."""
    zero = torch.zeros((), dtype=dtype, device=device)
    # validate_args=False: the argument check would copy a boolean to the host on every call
    return torch.distributions.Gumbel(zero, torch.ones_like(zero), validate_args=False).sample(tuple(shape))


def gumbel_max(logits: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
    r"""Exact categorical samples by the Gumbel-max trick:
    $$k = \arg\max_i \big(\log\pi_i + g_i\big) \sim \mathrm{Cat}(\pi),$$
    where ``logits`` are $\log\pi$ up to a constant. Returns int64 indices of shape
    ``logits.shape[:-1]``, or ``[num_samples, *logits.shape[:-1]]`` when ``num_samples`` is given."""
    _check_logits(logits)
    shape = tuple(logits.shape) if num_samples is None else (int(num_samples), *logits.shape)
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    return (logits + gumbel_noise(shape, dtype=logits.dtype, device=logits.device)).argmax(-1)


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, hard: bool = False) -> torch.Tensor:
    r"""A Gumbel-softmax (Concrete) sample over the last dimension:
    $$\tilde e_i = \frac{\exp\big((\log\pi_i + g_i)/\tau\big)}{\sum_j \exp\big((\log\pi_j + g_j)/\tau\big)},
    \qquad g_i \sim \mathrm{Gumbel}(0, 1).$$

    ``logits`` are $\log\pi$ up to a constant. As $\tau \to 0$ the sample tends to the one-hot
    Gumbel-max sample; as $\tau \to \infty$ to the uniform vector. With ``hard=True`` the forward
    value is that one-hot vector $h$ and the gradient is the soft sample's (straight-through):
    returned as $h + (\tilde e - \mathrm{sg}(\tilde e))$, which is exactly $h$ in the forward pass.
    Same distribution as :func:`torch.nn.functional.gumbel_softmax`.
    """
    _check_logits(logits)
    check_tau(tau)
    g = gumbel_noise(logits.shape, dtype=logits.dtype, device=logits.device)
    y = torch.softmax((logits + g) / tau, dim=-1)
    if not hard:
        return y
    h = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
    return h + (y - y.detach())


def chi_square_test(counts: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
    r"""Pearson's goodness-of-fit test of observed ``counts`` against category ``probs``:
    $X^2 = \sum_i (O_i - n p_i)^2 / (n p_i)$ with $k - 1$ degrees of freedom, and the p-value
    $P(\chi^2_{k-1} \ge X^2) = Q\big(\tfrac{k-1}{2}, \tfrac{X^2}{2}\big)$ (regularised upper
    incomplete gamma function, :func:`torch.special.gammaincc`). Computed in float64.

    Returns ``{'statistic', 'dof', 'p_value'}``.
    """
    counts = torch.as_tensor(counts).double().flatten()
    probs = torch.as_tensor(probs).double().flatten()
    if counts.shape != probs.shape or len(counts) < 2:
        raise ValueError(f"counts and probs must be 1-D with the same length >= 2, got {tuple(counts.shape)} "
                         f"and {tuple(probs.shape)}")
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("counts must be non-negative with a positive total")
    if (probs <= 0).any() or abs(probs.sum().item() - 1) > 1e-6:
        raise ValueError(f"probs must be positive and sum to one, got sum {probs.sum().item():.6g}")
    expected = counts.sum() * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = len(counts) - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2)
    return {"statistic": stat.item(), "dof": dof, "p_value": p.item()}


def exact_gradient(logits: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    r"""The exact gradient of $\mathbb E_{k \sim \mathrm{Cat}(\mathrm{softmax}\,\theta)}[f(e_k)]$
    with respect to the logits $\theta$ (one vector ``[K]``), in float64:
    $$\nabla_\theta \sum_k \pi_k f(e_k) = \sum_k f(e_k)\,\pi_k\,(e_k - \pi) = \pi \odot (f - \pi^\top f).$$
    ``f`` maps a batch of (one-hot or relaxed) vectors ``[N, K]`` to values ``[N]``."""
    _check_logits(logits)
    if logits.ndim != 1:
        raise ValueError(f"logits must be one vector [K], got shape {tuple(logits.shape)}")
    pi = torch.softmax(logits.detach().double(), -1)
    fk = f(torch.eye(len(pi), dtype=torch.float64)).reshape(-1)
    return pi * (fk - (pi * fk).sum())


ESTIMATORS = ("reinforce", "reinforce_loo", "gumbel_softmax", "straight_through")


def gradient_samples(logits: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], estimator: str,
                     num_samples: int = 10_000, tau: float = 1.0, draws: int = 1) -> torch.Tensor:
    r"""``num_samples`` independent estimates ``[N, K]`` of the gradient of
    $\mathbb E_{k\sim\mathrm{Cat}(\mathrm{softmax}\,\theta)}[f(e_k)]$ (float64), each the mean over
    ``draws`` $= J$ draws, so each costs $J$ evaluations of ``f``:

    - ``'reinforce'``: the score function $f(e_k)\,\nabla_\theta \log \pi_k = f(e_k)(e_k - \pi)$;
    - ``'reinforce_loo'``: the same with a leave-one-out baseline, $b_j$ = the mean $f$ of the
      other $J - 1$ draws of the *same* estimate ($J \ge 2$; unbiased, and available to a real
      training step, unlike a baseline computed from other estimates);
    - ``'gumbel_softmax'``: $\nabla_\theta f(\tilde e)$ for a relaxed sample $\tilde e$ at
      temperature ``tau`` (the gradient of a different, relaxed objective: biased);
    - ``'straight_through'``: $f$ evaluated at the hard sample, gradient through the soft one.

    The reparameterised estimators also need $\nabla f$, the score-function ones only values of $f$.
    """
    _check_logits(logits)
    if logits.ndim != 1:
        raise ValueError(f"logits must be one vector [K], got shape {tuple(logits.shape)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    least = 2 if estimator == "reinforce_loo" else 1
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < least:
        raise ValueError(f"draws must be an int >= {least} for {estimator!r}, got {draws!r}")
    # one row of logits per draw: the gradient of the summed surrogate w.r.t. row (n, j) is draw j's share
    theta = logits.detach().double().expand(num_samples, draws, -1).clone().requires_grad_(True)
    if estimator.startswith("reinforce"):
        c = gumbel_max(theta.detach())                                         # [N, J] categories
        fc = f(F.one_hot(c, theta.shape[-1]).double()).detach()                # [N, J]
        if estimator == "reinforce_loo":
            fc = fc - (fc.sum(-1, keepdim=True) - fc) / (draws - 1)             # f_j - mean of the others
        log_pc = torch.log_softmax(theta, -1).gather(-1, c[..., None]).squeeze(-1)
        surrogate = (fc * log_pc).sum()
    else:
        surrogate = f(gumbel_softmax(theta, tau, hard=estimator == "straight_through")).sum()
    (grad,) = torch.autograd.grad(surrogate, theta)
    return grad.mean(1)


def gradient_statistics(samples: torch.Tensor, exact: torch.Tensor, evaluations: int = 1) -> dict[str, float]:
    r"""Statistics of gradient estimates ``samples`` ``[N, K]`` against the ``exact`` gradient ``[K]``,
    each estimate costing ``evaluations`` evaluations of $f$:

    - ``bias``: $\|\bar g - \nabla\|$, and ``bias2``: $\|\bar g - \nabla\|^2 - V/N$ (clipped at 0),
      an unbiased estimate of the squared bias (the mean of $N$ estimates is itself off by $V/N$);
    - ``variance`` $V = \sum_k \mathrm{Var}(g_k)$ (trace of the covariance of one estimate), and
      ``variance_per_evaluation`` $= V \cdot$ ``evaluations``: the variance of an average of
      estimates that costs one evaluation in all (averaging $n/c$ estimates of cost $c$ gives
      $V c / n$);
    - ``mse``: $\mathbb E\|g - \nabla\|^2$ of one estimate; ``num_samples`` $= N$.

    :func:`mse_at_budget` combines them for a budget of $n$ evaluations.
    """
    if samples.ndim != 2 or exact.shape != samples.shape[1:]:
        raise ValueError(f"samples must be [N, K] and exact [K], got {tuple(samples.shape)} and {tuple(exact.shape)}")
    if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 1:
        raise ValueError(f"evaluations must be an int >= 1, got {evaluations!r}")
    samples, exact = samples.double(), exact.double()
    variance = samples.var(0).sum().item()
    bias = (samples.mean(0) - exact).norm().item()
    return {"bias": bias, "bias2": max(bias**2 - variance / len(samples), 0.0), "variance": variance,
            "variance_per_evaluation": variance * evaluations, "evaluations": evaluations,
            "num_samples": len(samples), "mse": ((samples - exact) ** 2).sum(-1).mean().item()}


def mse_at_budget(stats: dict[str, float], budget: float) -> float:
    r"""Mean squared error of the average of estimates costing ``budget`` evaluations of $f$ in all:
    $\mathrm{bias}^2 + v / n$, with $v$ the variance per evaluation (:func:`gradient_statistics`).
    Averaging removes variance, never bias."""
    if not budget >= 1:
        raise ValueError(f"budget must be >= 1 evaluation, got {budget!r}")
    return stats["bias2"] + stats["variance_per_evaluation"] / budget


def estimator_race(logits: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], taus: Sequence[float],
                   draws: Sequence[int] = tuple(range(2, 9)),
                   num_samples: int = 20_000) -> dict[tuple, dict[str, float]]:
    r"""The estimators on one problem, charged per evaluation of $f$: plain REINFORCE (one draw),
    REINFORCE with a leave-one-out baseline over each $J$ in ``draws``, and the Gumbel-softmax (soft)
    and straight-through estimators at each temperature in ``taus`` (one draw each). Returns
    ``{(estimator, J or tau): gradient_statistics(...)}`` from ``num_samples`` estimates each;
    uses torch's global random state."""
    exact = exact_gradient(logits, f)
    race = {("reinforce", 1): gradient_statistics(gradient_samples(logits, f, "reinforce", num_samples), exact)}
    for j in draws:
        race["reinforce_loo", j] = gradient_statistics(
            gradient_samples(logits, f, "reinforce_loo", num_samples, draws=j), exact, evaluations=j)
    for estimator in ("gumbel_softmax", "straight_through"):
        for tau in taus:
            race[estimator, tau] = gradient_statistics(gradient_samples(logits, f, estimator, num_samples, tau), exact)
    return race


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    r"""The two-sample Kolmogorov-Smirnov test of whether 1-D samples ``a`` and ``b`` come from the
    same continuous distribution: $D = \sup_x |F_a(x) - F_b(x)|$ (empirical CDFs), and the asymptotic
    p-value $Q_{KS}\big((\sqrt{m} + 0.12 + 0.11/\sqrt{m})\,D\big)$ with $m = n_a n_b / (n_a + n_b)$
    (Stephens' small-sample correction) and $Q_{KS}(\lambda) = 2\sum_{j\ge1}(-1)^{j-1}e^{-2j^2\lambda^2}$.
    Computed in float64. Returns ``{'statistic', 'p_value'}``."""
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    if len(a) < 2 or len(b) < 2 or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError(f"a and b must hold at least 2 finite values each, got {len(a)} and {len(b)}")
    a, b = a.sort().values, b.sort().values
    x = torch.cat([a, b])
    cdf = lambda s: torch.searchsorted(s, x, right=True).double() / len(s)  # noqa: E731  (empirical CDF at x)
    d = (cdf(a) - cdf(b)).abs().max().item()
    m = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    return {"statistic": d, "p_value": kolmogorov_q((m + 0.12 + 0.11 / m) * d)}


def kolmogorov_q(lam: float) -> float:
    r"""$Q_{KS}(\lambda) = P(\sup_t |B(t)| > \lambda)$ for a Brownian bridge $B$: the alternating series
    $2\sum_{j\ge1}(-1)^{j-1}e^{-2j^2\lambda^2}$ for $\lambda \ge 1$, and $1 - \frac{\sqrt{2\pi}}{\lambda}
    \sum_{j\ge1} e^{-(2j-1)^2\pi^2/(8\lambda^2)}$ (the same function, fast to converge) below."""
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if lam < 1e-3:
        return 1.0
    j = torch.arange(1, 101, dtype=torch.float64)
    if lam >= 1:
        return float((2 * (-1) ** (j - 1) * torch.exp(-2 * j**2 * lam**2)).sum().clamp(0, 1))
    cdf = math.sqrt(2 * math.pi) / lam * torch.exp(-((2 * j - 1) ** 2) * math.pi**2 / (8 * lam**2)).sum().item()
    return min(max(1 - cdf, 0.0), 1.0)
