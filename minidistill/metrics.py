r"""Classification metrics on probabilities: accuracy, NLL, Brier score, expected calibration
error (ECE) and the reliability curve behind it; and AUROC, for any score that should rank one
group above another (an out-of-distribution detector, say).

Functions that take ``probs`` check that each row is a probability vector (non-negative,
summing to one); pass ``logits.softmax(-1)``.
"""
from __future__ import annotations

import torch

__all__ = ["accuracy", "nll", "brier_score", "expected_calibration_error", "reliability_curve", "auroc"]


def _check(probs: torch.Tensor, targets: torch.Tensor, need_probs: bool = True) -> None:
    if probs.ndim != 2:
        raise ValueError(f"expected [N, K] scores, got shape {tuple(probs.shape)}")
    if targets.ndim != 1 or len(targets) != len(probs):
        raise ValueError(f"targets must be [N={len(probs)}] class indices, got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point:
        raise ValueError(f"targets must be integer class indices, got {targets.dtype}")
    if need_probs:
        sums = probs.double().sum(-1)
        if (probs < 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise ValueError("probs must be non-negative rows that sum to one (did you pass logits? use "
                             f".softmax(-1)); row sums range {sums.min().item():.4g}..{sums.max().item():.4g}")


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent; ``scores`` may be logits or probabilities."""
    _check(scores, targets, need_probs=False)
    return 100.0 * (scores.argmax(-1) == targets).double().mean().item()


def nll(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-12) -> float:
    r"""Mean negative log-likelihood $-\frac1N\sum_n \log p_{n,y_n}$ (clamped at ``eps``)."""
    _check(probs, targets)
    p = probs.double().gather(1, targets.view(-1, 1)).squeeze(1)
    return -p.clamp_min(eps).log().mean().item()


def brier_score(probs: torch.Tensor, targets: torch.Tensor) -> float:
    r"""Mean squared error to the one-hot label, summed over classes:
    $\frac1N\sum_n\sum_k (p_{nk} - [y_n = k])^2$ (0 is perfect, 2 the worst)."""
    _check(probs, targets)
    onehot = torch.nn.functional.one_hot(targets.long(), probs.shape[1]).double()
    return ((probs.double() - onehot) ** 2).sum(1).mean().item()


def reliability_curve(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Per equal-width confidence bin on [0, 1]: ``count``, mean ``confidence`` and
    ``accuracy`` (NaN for empty bins), plus the bin ``edges``."""
    _check(probs, targets)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    conf, pred = probs.double().max(1)
    correct = (pred == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 goes to bin 0
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
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
