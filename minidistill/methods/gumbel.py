r"""Chapter 4, first half -- the Gumbel-max trick and its relaxation, the Gumbel-softmax
(Jang, Gu & Poole; Maddison, Mnih & Teh; both ICLR 2017): sampling a discrete choice, and getting
a gradient through it.

* Sampling: :func:`gumbel_noise`, :func:`gumbel_max` (the exact sampler
  $\arg\max_i(\log\pi_i + g_i)$), :func:`gumbel_softmax` (its relaxation at temperature $\tau$,
  straight-through when ``hard=True``), and :func:`chi_square_test` to check a sampler.
* Gradient estimators on a problem whose gradient is known: :func:`exact_gradient`,
  :func:`gradient_samples` (REINFORCE with and without a baseline, Gumbel-softmax,
  straight-through) and :func:`gradient_statistics` (bias, variance, mean squared error).

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
    $$z = \arg\max_i \big(\log\pi_i + g_i\big) \sim \mathrm{Cat}(\pi),$$
    where ``logits`` are $\log\pi$ up to a constant. Returns int64 indices of shape
    ``logits.shape[:-1]``, or ``[num_samples, *logits.shape[:-1]]`` when ``num_samples`` is given."""
    _check_logits(logits)
    shape = tuple(logits.shape) if num_samples is None else (int(num_samples), *logits.shape)
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    return (logits + gumbel_noise(shape, dtype=logits.dtype, device=logits.device)).argmax(-1)


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, hard: bool = False) -> torch.Tensor:
    r"""A Gumbel-softmax (Concrete) sample over the last dimension:
    $$y_i = \frac{\exp\big((\log\pi_i + g_i)/\tau\big)}{\sum_j \exp\big((\log\pi_j + g_j)/\tau\big)},
    \qquad g_i \sim \mathrm{Gumbel}(0, 1).$$

    ``logits`` are $\log\pi$ up to a constant. As $\tau \to 0$ the sample tends to the one-hot
    Gumbel-max sample; as $\tau \to \infty$ to the uniform vector. With ``hard=True`` the forward
    value is that one-hot vector $h$ and the gradient is the soft sample's (straight-through):
    returned as $h + (y - \mathrm{sg}(y))$, which is exactly $h$ in the forward pass.
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
    r"""The exact gradient of $\mathbb E_{z \sim \mathrm{Cat}(\mathrm{softmax}\,\theta)}[f(e_z)]$
    with respect to the logits $\theta$ (one vector ``[K]``), in float64:
    $$\nabla_\theta \sum_k \pi_k f(e_k) = \sum_k f(e_k)\,\pi_k\,(e_k - \pi) = \pi \odot (f - \pi^\top f).$$
    ``f`` maps a batch of (one-hot or relaxed) vectors ``[N, K]`` to values ``[N]``."""
    _check_logits(logits)
    if logits.ndim != 1:
        raise ValueError(f"logits must be one vector [K], got shape {tuple(logits.shape)}")
    pi = torch.softmax(logits.detach().double(), -1)
    fk = f(torch.eye(len(pi), dtype=torch.float64)).reshape(-1)
    return pi * (fk - (pi * fk).sum())


ESTIMATORS = ("reinforce", "reinforce_baseline", "gumbel_softmax", "straight_through")


def gradient_samples(logits: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], estimator: str,
                     num_samples: int = 10_000, tau: float = 1.0) -> torch.Tensor:
    r"""``num_samples`` independent one-sample estimates ``[N, K]`` of the gradient of
    $\mathbb E_{z\sim\mathrm{Cat}(\mathrm{softmax}\,\theta)}[f(e_z)]$ (float64):

    - ``'reinforce'``: the score function $f(e_z)\,\nabla_\theta \log \pi_z = f(e_z)(e_z - \pi)$;
    - ``'reinforce_baseline'``: the same with $f$ minus the mean of the *other* samples' $f$
      (a leave-one-out baseline; still unbiased);
    - ``'gumbel_softmax'``: $\nabla_\theta f(y)$ for a relaxed sample $y$ at temperature ``tau``
      (the gradient of a different, relaxed objective: biased);
    - ``'straight_through'``: $f$ evaluated at the hard sample, gradient through the soft one.
    """
    _check_logits(logits)
    if logits.ndim != 1:
        raise ValueError(f"logits must be one vector [K], got shape {tuple(logits.shape)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples!r}")
    # one row of logits per sample: the gradient of the summed surrogate w.r.t. row n is sample n's estimate
    theta = logits.detach().double().expand(num_samples, -1).clone().requires_grad_(True)
    if estimator.startswith("reinforce"):
        z = gumbel_max(theta.detach())
        fz = f(F.one_hot(z, theta.shape[-1]).double()).detach()
        if estimator == "reinforce_baseline":
            fz = fz - (fz.sum() - fz) / (num_samples - 1)
        log_pz = torch.log_softmax(theta, -1).gather(-1, z[:, None]).squeeze(-1)
        surrogate = (fz * log_pz).sum()
    else:
        y = gumbel_softmax(theta, tau, hard=estimator == "straight_through")
        surrogate = f(y).sum()
    (grad,) = torch.autograd.grad(surrogate, theta)
    return grad


def gradient_statistics(samples: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    r"""Bias $\|\bar g - \nabla\|$, variance $\sum_k \mathrm{Var}(g_k)$ (the trace of the
    covariance of one-sample estimates) and mean squared error $\mathbb E\|g - \nabla\|^2$ of
    gradient ``samples`` ``[N, K]`` against the ``exact`` gradient ``[K]``."""
    if samples.ndim != 2 or exact.shape != samples.shape[1:]:
        raise ValueError(f"samples must be [N, K] and exact [K], got {tuple(samples.shape)} and {tuple(exact.shape)}")
    samples, exact = samples.double(), exact.double()
    return {"bias": (samples.mean(0) - exact).norm().item(),
            "variance": samples.var(0).sum().item(),
            "mse": ((samples - exact) ** 2).sum(-1).mean().item()}
