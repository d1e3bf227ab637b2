r"""Classification metrics on probabilities: accuracy, NLL, Brier score, expected calibration
error (ECE) and the reliability curve behind it; temperature scaling; the ensemble
measures: members' diversity (pairwise KL, also binned by confidence) and the Deep Ensemble
Equivalent (DEE); and AUROC, for any score that should rank one group above another (an
out-of-distribution detector, say).

Functions that take ``probs`` check that each row is a probability vector (non-negative,
summing to one); pass ``logits.softmax(-1)``. Ensemble measures take the members'
probabilities stacked as ``[M, N, K]`` (members, inputs, classes).
"""
from __future__ import annotations

import math

import torch

__all__ = ["accuracy", "nll", "brier_score", "expected_calibration_error", "reliability_curve",
           "fit_temperature", "pairwise_kl", "diversity_by_confidence", "deep_ensemble_equivalent",
           "auroc", "linear_cka"]


def _check(probs: torch.Tensor, targets: torch.Tensor, need_probs: bool = True, name: str = "probs") -> None:
    for arg, value in ((name, probs), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{arg} must be a tensor, got {type(value).__name__}")
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"{name} must be [N, K] scores with K >= 2 classes, got shape {tuple(probs.shape)}")
    if len(probs) == 0:
        raise ValueError(f"{name} is empty (0 rows): there is nothing to score")
    if targets.ndim != 1 or len(targets) != len(probs):
        raise ValueError(f"targets must be [N={len(probs)}] class indices, got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be integer class indices, got {targets.dtype}")
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= probs.shape[1]:
        raise ValueError(f"targets must be class indices in [0, {probs.shape[1]}) for {name} of {probs.shape[1]} "
                         f"classes, got values from {lo} to {hi}")
    if not torch.isfinite(probs).all():
        raise ValueError(f"{name} must be finite (got NaN or inf)")
    if need_probs:
        sums = probs.double().sum(-1)
        if (probs < 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise ValueError(f"{name} must be non-negative rows that sum to one (did you pass logits? use "
                             f".softmax(-1)); row sums range {sums.min().item():.4g}..{sums.max().item():.4g}")


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent; ``scores`` may be logits or probabilities."""
    _check(scores, targets, need_probs=False, name="scores")
    return 100.0 * (scores.argmax(-1) == targets).double().mean().item()


def nll(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-12) -> float:
    r"""Mean negative log-likelihood $-\frac1N\sum_n \log p_{n,y_n}$ (clamped at ``eps``)."""
    _check(probs, targets)
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps!r}")
    p = probs.double().gather(1, targets.view(-1, 1)).squeeze(1)
    return -p.clamp_min(eps).log().mean().item()


def brier_score(probs: torch.Tensor, targets: torch.Tensor) -> float:
    r"""Mean squared error to the one-hot label, summed over classes:
    $\frac1N\sum_n\sum_k (p_{nk} - [y_n = k])^2$ (0 is perfect, 2 the worst)."""
    _check(probs, targets)
    onehot = torch.nn.functional.one_hot(targets.long(), probs.shape[1]).double()
    return ((probs.double() - onehot) ** 2).sum(1).mean().item()


def _confidence_bins(conf: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-width bins on [0, 1]: the edges and each confidence's bin index. Bin b holds
    confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 goes to bin 0."""
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(conf.double().cpu(), edges, right=False) - 1).clamp(0, n_bins - 1)
    return edges, idx


def reliability_curve(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Per equal-width confidence bin on [0, 1]: ``count``, mean ``confidence`` and
    ``accuracy`` (NaN for empty bins), plus the bin ``edges``."""
    _check(probs, targets)
    conf, pred = probs.detach().double().cpu().max(1)
    correct = (pred == targets.cpu()).double()
    edges, idx = _confidence_bins(conf, n_bins)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    return {"edges": edges, "count": count, "confidence": conf_sum / count, "accuracy": acc_sum / count}


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    r"""ECE with ``n_bins`` equal-width bins on the max probability:
    $\sum_b \frac{|B_b|}{N}\,|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|$, as a fraction (not %)."""
    c = reliability_curve(probs, targets, n_bins)
    filled = c["count"] > 0
    gap = (c["accuracy"][filled] - c["confidence"][filled]).abs()
    return (c["count"][filled] * gap).sum().item() / len(targets)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    r"""Temperature scaling (Guo et al. 2017): the $T^\star$ that minimises the NLL of
    $\mathrm{softmax}(z / T)$ on held-out data (a validation split, never the test set).

    ``logits`` may be any scores whose softmax is the prediction, e.g. an ensemble's
    $\log \bar p$. The NLL is convex in $\beta = 1/T$, so the minimum is found by bisection on
    the sign of its derivative $\frac1N\sum_n (\mathbb E_{\mathrm{softmax}(\beta z_n)}[z_n] - z_{n,y_n})$;
    the result is clipped to ``bounds``.
    """
    _check(logits, targets, need_probs=False, name="logits")
    lo_t, hi_t = bounds
    if not 0 < lo_t < hi_t:
        raise ValueError(f"bounds must be 0 < low < high, got {bounds!r}")
    z = logits.detach().double()
    z = z - z.max(-1, keepdim=True).values  # finite and shift-free: softmax ignores a constant
    if not torch.isfinite(z).all():
        raise ValueError("logits must be finite (clamp log-probabilities at a small epsilon)")
    z_y = z.gather(1, targets.view(-1, 1).long().to(z.device)).squeeze(1)

    def slope(beta: float) -> float:
        return ((torch.softmax(beta * z, -1) * z).sum(-1) - z_y).mean().item()

    lo, hi = math.log(1 / hi_t), math.log(1 / lo_t)  # bisection on log(beta)
    if slope(math.exp(lo)) >= 0:
        return hi_t
    if slope(math.exp(hi)) <= 0:
        return lo_t
    for _ in range(60):
        mid = (lo + hi) / 2
        if slope(math.exp(mid)) < 0:
            lo = mid
        else:
            hi = mid
    return 1 / math.exp((lo + hi) / 2)


def _check_members(member_probs: torch.Tensor) -> None:
    if member_probs.ndim != 3 or member_probs.shape[0] < 2:
        raise ValueError("member_probs must be [M, N, K] probabilities of M >= 2 members, got shape "
                         f"{tuple(member_probs.shape)}")
    sums = member_probs.double().sum(-1)
    if (member_probs < 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise ValueError("member_probs must be non-negative rows that sum to one (did you pass logits? use "
                         f".softmax(-1)); row sums range {sums.min().item():.4g}..{sums.max().item():.4g}")


def pairwise_kl(member_probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""Members' diversity per input, the mean KL over ordered pairs of distinct members:

    $$d(x) = \frac{1}{M(M-1)} \sum_{i \ne j} \mathrm{KL}\big(p_j(x) \,\|\, p_i(x)\big).$$

    ``member_probs`` is ``[M, N, K]``; returns ``[N]`` (float64). Computed in O(M) as
    $\big(M\sum_j \sum_k p_{jk}\log p_{jk} - \sum_k (\sum_j p_{jk})(\sum_i \log p_{ik})\big)/(M(M-1))$
    (the $i = j$ terms are zero); probabilities inside the log are clamped at ``eps``.
    """
    _check_members(member_probs)
    p = member_probs.detach().double()
    m = p.shape[0]
    neg_entropy = torch.xlogy(p, p).sum(-1).sum(0)
    cross = (p.sum(0) * p.clamp_min(eps).log().sum(0)).sum(-1)
    return ((m * neg_entropy - cross) / (m * (m - 1))).clamp_min(0)


def diversity_by_confidence(member_probs: torch.Tensor, n_bins: int = 10) -> dict[str, torch.Tensor]:
    r"""Members' diversity (:func:`pairwise_kl`) binned by the ensemble's confidence
    $\max_k \bar p_k(x)$, $\bar p = \frac1M\sum_j p_j$, in ``n_bins`` equal-width bins on [0, 1]
    (bin $(l, u]$, as for ECE).

    Returns ``edges``, ``count``, mean ``confidence`` and mean ``diversity`` per bin (NaN for
    empty bins), and ``mean``: the count-weighted average over bins, i.e. the mean diversity
    over all inputs (a 0-dim tensor).
    """
    d = pairwise_kl(member_probs)
    conf = member_probs.detach().double().mean(0).max(-1).values.cpu()
    edges, idx = _confidence_bins(conf, n_bins)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    div_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, d.cpu())
    return {"edges": edges, "count": count, "confidence": conf_sum / count, "diversity": div_sum / count,
            "mean": div_sum.sum() / count.sum()}


def deep_ensemble_equivalent(nll_value: float, ensemble_nlls) -> float:
    r"""Deep Ensemble Equivalent (Ashukha et al. 2020): the smallest (real) ensemble size
    $l \ge 1$ whose log-likelihood matches a model's,

    $$\mathrm{DEE} = \min\{\, l \ge 1 : \mathrm{CLL}_\mathrm{DE}(l) \ge \mathrm{CLL} \,\},$$

    with $\mathrm{CLL} = -\mathrm{NLL}$ and $\mathrm{CLL}_\mathrm{DE}$ linearly interpolated between
    consecutive sizes. ``ensemble_nlls[l - 1]`` is the NLL of a Deep Ensemble of $l$ members
    (use calibrated NLLs, as Ashukha et al. do, for both). A model worse than one member
    gets 1; one better than the largest ensemble given gets ``inf`` ("more than $L$").
    """
    ladder = [float(v) for v in ensemble_nlls]
    if not ladder or not all(math.isfinite(v) for v in ladder):
        raise ValueError(f"ensemble_nlls must be a non-empty sequence of finite NLLs, got {ensemble_nlls!r}")
    if not math.isfinite(float(nll_value)):
        raise ValueError(f"nll_value must be finite, got {nll_value!r}")
    target = -float(nll_value)
    cll = [-v for v in ladder]
    if cll[0] >= target:
        return 1.0
    for l in range(1, len(cll)):  # segment [l, l + 1] between sizes l and l + 1
        a, b = cll[l - 1], cll[l]
        if b >= target:
            return l + (target - a) / (b - a)
    return math.inf


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    r"""Area under the ROC curve: the probability that a random positive (``labels == 1``)
    scores higher than a random negative (``labels == 0``), ties counting one half,

    $$\mathrm{AUROC} = \frac{1}{n_+ n_-}\sum_{i:\,y_i=1}\sum_{j:\,y_j=0}
      \Big([s_i > s_j] + \tfrac12 [s_i = s_j]\Big).$$

    Computed from average ranks (the Mann-Whitney U statistic) in O(N log N). 1 is a perfect
    ranking, 0.5 is chance, 0 a perfectly inverted one. Out-of-distribution detection: the
    in-distribution images are the positives and the score is, e.g., $\log p(x)$.
    """
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be 1-D of the same length, got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    if labels.dtype == torch.bool:
        labels = labels.long()
    if labels.dtype.is_floating_point or not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be integers or booleans, 1 for positives and 0 for negatives")
    if not bool(torch.isfinite(scores.double()).all()):
        raise ValueError("scores must be finite (got NaN or inf)")
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both positives and negatives, got {n_pos} and {n_neg}")
    s = scores.double().cpu()
    pos = pos.cpu()
    # average ranks (1-based), ties sharing the mean of the ranks they span
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid_rank = ends - (counts.double() - 1) / 2
    ranks = mid_rank[inverse]
    u = ranks[pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    r"""Linear centred kernel alignment (Kornblith et al., 2019) between two representations of
    the same $n$ inputs, ``x`` ``[n, d1]`` and ``y`` ``[n, d2]`` (flatten feature maps first):

    $$\mathrm{CKA}(X, Y) = \frac{\lVert \tilde Y^\top \tilde X \rVert_F^2}
      {\lVert \tilde X^\top \tilde X \rVert_F \, \lVert \tilde Y^\top \tilde Y \rVert_F}$$

    with $\tilde X, \tilde Y$ the column-centred matrices. 1 for representations that differ by
    an orthogonal map and an isotropic scaling (and a translation); not invariant to a general
    invertible linear map. Computed in float64, from the $d \times d$ cross-covariances or, when
    $n$ is smaller than the widths, from the equivalent $n \times n$ Gram matrices.
    """
    for arg, value in (("x", x), ("y", y)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{arg} must be a tensor, got {type(value).__name__}")
        if value.ndim != 2:
            raise ValueError(f"{arg} must be an [n, d] matrix of features (flatten feature maps first: "
                             f"f.flatten(1)), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{arg} must be a floating-point tensor, got {value.dtype}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{arg} must be finite (got NaN or inf)")
    if len(x) != len(y):
        raise ValueError(f"x and y must describe the same inputs (same number of rows), got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise ValueError(f"linear_cka needs at least 2 inputs (rows) to centre, got {len(x)}")
    xc = x.detach().double().cpu()
    yc = y.detach().double().cpu()
    xc, yc = xc - xc.mean(0, keepdim=True), yc - yc.mean(0, keepdim=True)
    if len(xc) < min(xc.shape[1], yc.shape[1]):   # Gram form: <Kx, Ky> = ||Y^T X||_F^2 (the same number)
        kx, ky = xc @ xc.T, yc @ yc.T
        cross, norm_x, norm_y = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        cross, norm_x, norm_y = (yc.T @ xc).square().sum(), (xc.T @ xc).norm(), (yc.T @ yc).norm()
    if norm_x == 0 or norm_y == 0:
        raise ValueError("linear_cka is undefined for a constant representation (every row the same)")
    return (cross / (norm_x * norm_y)).item()
