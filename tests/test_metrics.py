"""minidistill.metrics: accuracy, NLL, Brier, ECE and the reliability curve, against hand values."""
from __future__ import annotations

import math

import pytest
import torch

from minidistill import metrics as metrics_mod
from minidistill.metrics import (accuracy, auroc, brier_score, deep_ensemble_equivalent, diversity_by_confidence,
                                 expected_calibration_error, fit_temperature, nll, pairwise_kl, reliability_curve)

# Six samples, three classes; with 5 bins (edges 0, .2, .4, .6, .8, 1) the confidences fall
# two each into bins 2, 3 and 4, well away from the edges.
P6 = torch.tensor([
    [0.90, 0.05, 0.05],  # conf .90, y=0 correct   -> bin 4
    [0.85, 0.10, 0.05],  # conf .85, y=1 wrong     -> bin 4
    [0.10, 0.70, 0.20],  # conf .70, y=1 correct   -> bin 3
    [0.25, 0.10, 0.65],  # conf .65, y=1 wrong     -> bin 3
    [0.30, 0.50, 0.20],  # conf .50, y=0 wrong     -> bin 2
    [0.45, 0.30, 0.25],  # conf .45, y=0 correct   -> bin 2
], dtype=torch.float64)
Y6 = torch.tensor([0, 1, 1, 1, 0, 0])
# per bin: |acc - conf| = |.5-.875|, |.5-.675|, |.5-.475|, each with 2 of 6 samples
ECE6 = (2 * 0.375 + 2 * 0.175 + 2 * 0.025) / 6


def ece_loop(probs: torch.Tensor, targets: torch.Tensor, n_bins: int) -> float:
    """ECE written the slow, obvious way: bin b holds confidences in (b/n_bins, (b+1)/n_bins]."""
    conf = probs.max(1).values.tolist()
    pred = probs.argmax(1).tolist()
    ys = targets.tolist()
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, c in enumerate(conf) if lo < c <= hi or (b == 0 and c == 0)]
        if not members:
            continue
        acc = sum(pred[i] == ys[i] for i in members) / len(members)
        avg_conf = sum(conf[i] for i in members) / len(members)
        total += len(members) / len(conf) * abs(acc - avg_conf)
    return total


def test_all_names_exist():
    for name in metrics_mod.__all__:
        assert hasattr(metrics_mod, name), name


# --- accuracy -------------------------------------------------------------------------------

def test_accuracy_on_logits_and_on_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 2, 1, 2])
    assert accuracy(logits, y) == pytest.approx(75.0)
    assert accuracy(logits.softmax(-1), y) == pytest.approx(75.0)
    assert accuracy(logits, torch.tensor([1, 0, 1, 0])) == pytest.approx(0.0)
    assert accuracy(P6, Y6) == pytest.approx(50.0)


def test_accuracy_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        accuracy(torch.zeros(4), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="targets"):
        accuracy(torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer class indices"):
        accuracy(torch.zeros(4, 3), torch.zeros(4))


# --- NLL and Brier --------------------------------------------------------------------------

def test_nll_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    y = torch.tensor([0, 1])
    assert nll(p, y) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-6)
    assert nll(torch.eye(3), torch.arange(3)) == pytest.approx(0.0, abs=1e-12)


def test_nll_clamps_zero_probability():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    value = nll(p, torch.tensor([1, 0]))
    assert math.isfinite(value)
    assert value == pytest.approx((-math.log(1e-12) - math.log(0.5)) / 2, rel=1e-6)


def test_brier_score_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    y = torch.tensor([0, 1])
    # (.09 + .04 + .01 + .01 + .49 + .36) / 2
    assert brier_score(p, y) == pytest.approx(0.5, rel=1e-6)
    assert brier_score(torch.eye(3), torch.arange(3)) == pytest.approx(0.0)
    assert brier_score(torch.eye(3), torch.tensor([1, 2, 0])) == pytest.approx(2.0)  # the worst


def test_brier_score_accepts_int32_targets():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    assert brier_score(p, torch.tensor([0, 1], dtype=torch.int32)) == pytest.approx(0.5, rel=1e-6)


# --- ECE and reliability --------------------------------------------------------------------

def test_ece_hand_example():
    assert expected_calibration_error(P6, Y6, n_bins=5) == pytest.approx(ECE6, rel=1e-9)
    assert ece_loop(P6, Y6, 5) == pytest.approx(ECE6, rel=1e-9)  # the reference agrees with the hand value


def test_ece_equals_loop_reference_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    for n_bins in (1, 5, 10, 15):
        probs = (2 * torch.randn(300, 10, generator=g)).softmax(-1)
        y = torch.randint(0, 10, (300,), generator=g)
        assert expected_calibration_error(probs, y, n_bins) == pytest.approx(ece_loop(probs, y, n_bins), abs=1e-6)


def test_ece_is_zero_when_calibrated_within_each_bin():
    """10 samples at confidence .7 with 7 right, 10 at .9 with 9 right: perfectly calibrated."""
    probs = torch.tensor([[0.7, 0.3]] * 10 + [[0.1, 0.9]] * 10, dtype=torch.float64)
    y = torch.tensor([0] * 7 + [1] * 3 + [1] * 9 + [0])
    assert expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.0, abs=1e-12)
    # same confidences, every answer right: under-confident by .3 and .1
    y_right = torch.tensor([0] * 10 + [1] * 10)
    assert expected_calibration_error(probs, y_right, n_bins=10) == pytest.approx(0.2, rel=1e-9)


def test_ece_single_bin_is_gap_between_mean_confidence_and_accuracy():
    assert expected_calibration_error(P6, Y6, n_bins=1) == pytest.approx(abs(0.5 - P6.max(1).values.mean().item()))


def test_reliability_curve_hand_example():
    c = reliability_curve(P6, Y6, n_bins=5)
    assert torch.allclose(c["edges"], torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    assert c["count"].tolist() == [0, 0, 2, 2, 2]
    assert torch.isnan(c["confidence"][:2]).all() and torch.isnan(c["accuracy"][:2]).all()
    assert torch.allclose(c["confidence"][2:], torch.tensor([0.475, 0.675, 0.875], dtype=torch.float64))
    assert torch.allclose(c["accuracy"][2:], torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))


def test_reliability_curve_bins_are_closed_on_the_right():
    """A confidence of exactly 0.5 belongs to (0.25, 0.5], one of exactly 1 to the last bin."""
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    c = reliability_curve(probs, torch.tensor([0, 0]), n_bins=4)
    assert c["count"].tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("fn", [nll, brier_score, expected_calibration_error, reliability_curve])
def test_probability_metrics_reject_logits(fn):
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    with pytest.raises(ValueError, match="sum to one"):
        fn(logits, torch.tensor([0, 1]))


@pytest.mark.parametrize("fn", [nll, brier_score, expected_calibration_error, reliability_curve])
@pytest.mark.parametrize("probs", [
    torch.tensor([[1.2, -0.2], [0.5, 0.5]]),          # sums to one but negative
    torch.tensor([[0.5, 0.4], [0.5, 0.5]]),           # 0.9
    torch.tensor([[float("nan"), 0.5], [0.5, 0.5]]),  # NaN
])
def test_probability_metrics_reject_non_probabilities(fn, probs):
    with pytest.raises(ValueError, match="probs must be (non-negative rows that sum to one|finite)"):
        fn(probs, torch.tensor([0, 1]))


@pytest.mark.parametrize("fn", [nll, brier_score, expected_calibration_error])
def test_probability_metrics_reject_bad_targets(fn):
    p = torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="targets"):
        fn(p, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class indices"):
        fn(p, torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize("n_bins", [0, -3, 2.5])
def test_bad_bin_count_raises(n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(P6, Y6, n_bins)


# --- temperature scaling ----------------------------------------------------------------------

def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    g = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(20000, 5, generator=g, dtype=torch.float64)
    y = torch.multinomial((z / 2.5).softmax(-1), 1, generator=g).squeeze(1)  # labels drawn at T = 2.5
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.05)
    # it is the minimiser: a grid around it has no lower NLL
    grid = [t * f for f in (0.8, 0.9, 0.97, 1.03, 1.1, 1.25)]
    best = nll((z / t).softmax(-1), y)
    assert all(nll((z / s).softmax(-1), y) >= best - 1e-9 for s in grid)


def test_fit_temperature_ignores_a_constant_shift_and_clips_to_bounds():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(500, 4, generator=g, dtype=torch.float64)
    y = z.argmax(-1)  # always right: sharpen as far as allowed
    assert fit_temperature(z, y, bounds=(0.1, 10.0)) == 0.1
    assert fit_temperature(z + 100.0, y, bounds=(0.1, 10.0)) == 0.1
    y_rand = torch.randint(0, 4, (500,), generator=g)
    t = fit_temperature(z, y_rand)
    assert t == pytest.approx(fit_temperature(z - 7.0, y_rand), rel=1e-9)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(z, y, bounds=(1.0, 0.5))
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(torch.full((2, 3), -float("inf")), torch.tensor([0, 1]))


# --- ensemble diversity -------------------------------------------------------------------------

def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_pairwise_kl_by_hand():
    members = [[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]
    probs = torch.tensor(members, dtype=torch.float64).unsqueeze(1)  # [M=3, N=1, K=3]
    want = sum(kl(members[j], members[i]) for i in range(3) for j in range(3) if i != j) / 6
    assert pairwise_kl(probs).tolist() == pytest.approx([want], rel=1e-12)


def test_pairwise_kl_is_zero_for_identical_members_and_per_input():
    g = torch.Generator().manual_seed(3)
    p = (2 * torch.randn(1, 7, 4, generator=g)).softmax(-1).repeat(3, 1, 1)
    assert torch.allclose(pairwise_kl(p), torch.zeros(7, dtype=torch.float64), atol=1e-7)
    q = (2 * torch.randn(4, 7, 4, generator=g, dtype=torch.float64)).softmax(-1)
    loop = [sum(kl(q[j, n].tolist(), q[i, n].tolist()) for i in range(4) for j in range(4) if i != j) / 12 for n in range(7)]
    assert pairwise_kl(q).tolist() == pytest.approx(loop, rel=1e-10)


def test_pairwise_kl_handles_zeros_and_rejects_bad_input():
    p = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]], dtype=torch.float64)
    # KL((.5, .5) || (1, 0)) is infinite; the log is clamped at 1e-12, so it is large but finite
    huge = 0.5 * math.log(0.5) + 0.5 * math.log(0.5 / 1e-12)
    assert pairwise_kl(p).item() == pytest.approx((math.log(2) + huge) / 2, rel=1e-9)
    with pytest.raises(ValueError, match=r"\[M, N, K\]"):
        pairwise_kl(torch.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"M >= 2"):
        pairwise_kl(torch.full((1, 4, 3), 1 / 3))
    with pytest.raises(ValueError, match="sum to one"):
        pairwise_kl(torch.randn(2, 4, 3))


def test_diversity_by_confidence_by_hand():
    # input 0: identical members, confidence .9; input 1: two members, confidence .55
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4]],
                          [[0.9, 0.1], [0.5, 0.5]]], dtype=torch.float64)
    c = diversity_by_confidence(probs, n_bins=4)  # edges 0, .25, .5, .75, 1
    assert c["count"].tolist() == [0, 0, 1, 1]
    assert c["confidence"][2:].tolist() == pytest.approx([0.55, 0.9])
    d1 = (kl([0.6, 0.4], [0.5, 0.5]) + kl([0.5, 0.5], [0.6, 0.4])) / 2
    assert c["diversity"][2].item() == pytest.approx(d1) and c["diversity"][3].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isnan(c["diversity"][:2]).all()
    assert c["mean"].item() == pytest.approx(d1 / 2)  # count-weighted = mean over inputs


def test_diversity_by_confidence_mean_is_the_count_weighted_average():
    g = torch.Generator().manual_seed(4)
    p = (3 * torch.randn(3, 200, 6, generator=g, dtype=torch.float64)).softmax(-1)
    c = diversity_by_confidence(p, n_bins=7)
    ok = c["count"] > 0
    assert c["count"].sum().item() == 200
    assert c["mean"].item() == pytest.approx((c["count"][ok] * c["diversity"][ok]).sum().item() / 200)
    assert c["mean"].item() == pytest.approx(pairwise_kl(p).mean().item())
    with pytest.raises(ValueError, match="n_bins"):
        diversity_by_confidence(p, n_bins=0)


# --- Deep Ensemble Equivalent -------------------------------------------------------------------

def test_dee_interpolates_between_ensemble_sizes():
    ladder = [0.80, 0.72, 0.69, 0.68]  # NLL of DE-1..DE-4
    assert deep_ensemble_equivalent(0.72, ladder) == pytest.approx(2.0)
    assert deep_ensemble_equivalent(0.76, ladder) == pytest.approx(1.5)
    assert deep_ensemble_equivalent(0.70, ladder) == pytest.approx(2 + 2 / 3)
    assert deep_ensemble_equivalent(0.68, ladder) == pytest.approx(4.0)


def test_dee_floor_ceiling_and_bad_input():
    ladder = [0.80, 0.72, 0.69, 0.68]
    assert deep_ensemble_equivalent(0.95, ladder) == 1.0  # worse than one member
    assert deep_ensemble_equivalent(0.80, ladder) == 1.0
    assert deep_ensemble_equivalent(0.60, ladder) == math.inf  # better than the largest ensemble
    # the first crossing counts when the ladder is not monotone
    assert deep_ensemble_equivalent(0.70, [0.8, 0.7, 0.75, 0.6]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="ensemble_nlls"):
        deep_ensemble_equivalent(0.7, [])
    with pytest.raises(ValueError, match="nll_value"):
        deep_ensemble_equivalent(float("nan"), ladder)


# --- AUROC ----------------------------------------------------------------------------------

def auroc_pairs(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC by its definition: every positive-negative pair, ties counting one half."""
    pos = [s for s, l in zip(scores.tolist(), labels.tolist()) if l == 1]
    neg = [s for s, l in zip(scores.tolist(), labels.tolist()) if l == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_hand_values():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: three of the four pairs are ranked right
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1])) == 1.0
    assert auroc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 1, 1])) == 0.0
    assert auroc(torch.tensor([5.0, 5.0, 5.0, 5.0]), torch.tensor([1, 0, 1, 0])) == 0.5
    # one tie between a positive and a negative counts one half: (1 + 0.5) / 2
    assert auroc(torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1, 1, 0])) == pytest.approx(0.75)


def test_auroc_matches_the_pairwise_definition_with_many_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randint(0, 6, (80,), generator=g).double()   # many ties
        labels = torch.randint(0, 2, (80,), generator=g)
        assert auroc(scores, labels) == pytest.approx(auroc_pairs(scores, labels), abs=1e-12)


def test_auroc_is_invariant_to_monotone_maps_and_flips_with_the_labels():
    g = torch.Generator().manual_seed(1)
    scores, labels = torch.randn(200, generator=g), torch.randint(0, 2, (200,), generator=g)
    a = auroc(scores, labels)
    assert auroc(scores.exp() * 3 + 1, labels) == pytest.approx(a)
    assert auroc(scores, 1 - labels) == pytest.approx(1 - a)
    assert auroc(scores, labels.bool()) == pytest.approx(a)


def test_auroc_rejects_bad_input():
    with pytest.raises(ValueError, match="both positives and negatives"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="same length"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="1 for positives and 0 for negatives"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1 for positives"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="finite"):
        auroc(torch.tensor([0.1, float("nan")]), torch.tensor([1, 0]))


def test_auroc_is_exported():
    assert "auroc" in metrics_mod.__all__


@pytest.mark.parametrize("fn", [accuracy, nll, brier_score, expected_calibration_error, fit_temperature])
@pytest.mark.parametrize("targets, match", [(torch.tensor([0, 10]), r"\[0, 2\).*from 0 to 10"),
                                            (torch.tensor([-1, 0]), r"\[0, 2\)"),
                                            (torch.tensor([0.0, 1.0]), "integer class indices")])
def test_metrics_reject_targets_outside_the_classes(fn, targets, match):
    probs = torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    with pytest.raises(ValueError, match=match):
        fn(probs, targets)


@pytest.mark.parametrize("fn", [accuracy, nll, brier_score, expected_calibration_error, fit_temperature])
def test_metrics_reject_an_empty_batch_and_nan_scores(fn):
    with pytest.raises(ValueError, match="empty"):
        fn(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="finite"):
        fn(torch.tensor([[float("nan"), 0.5], [0.5, 0.5]]), torch.tensor([0, 1]))


# --- linear_cka (chapter 7) -------------------------------------------------------------------

def _cka_by_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Reference: HSIC with the centring matrix H on the Gram matrices, written out."""
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kx, ky = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h
    return ((kx * ky).sum() / (kx.norm() * ky.norm())).item()


def test_linear_cka_of_a_representation_with_itself_is_one_and_matches_the_hsic_form():
    from minidistill.metrics import linear_cka

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=g, dtype=torch.float64)
    y = x @ torch.randn(7, 5, generator=g, dtype=torch.float64) + torch.randn(40, 5, generator=g, dtype=torch.float64)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(_cka_by_hsic(x, y), rel=1e-10)
    wide_x, wide_y = torch.randn(6, 50, generator=g), torch.randn(6, 30, generator=g)   # n < d: the Gram branch
    assert linear_cka(wide_x, wide_y) == pytest.approx(_cka_by_hsic(wide_x, wide_y), rel=1e-9)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)


def test_linear_cka_invariances_orthogonal_and_isotropic_but_not_general_linear():
    from minidistill.metrics import linear_cka

    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(8, 6, generator=g, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.5 * x + 2.0, y) == pytest.approx(base, rel=1e-10)
    a = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 0.1], dtype=torch.float64))    # invertible, not orthogonal
    assert abs(linear_cka(x @ a, y) - base) > 1e-2


@pytest.mark.parametrize("x, y, error, match", [
    ([[1.0, 2.0]], torch.zeros(1, 2), TypeError, "x must be a tensor"),
    (torch.zeros(4), torch.zeros(4, 2), ValueError, r"\[n, d\]"),
    (torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2), ValueError, "floating-point"),
    (torch.randn(4, 2), torch.randn(5, 2), ValueError, "same number of rows"),
    (torch.randn(1, 2), torch.randn(1, 2), ValueError, "at least 2"),
    (torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]), torch.randn(2, 2), ValueError, "finite"),
    (torch.ones(4, 3), torch.randn(4, 2), ValueError, "constant"),
])
def test_linear_cka_rejects_bad_inputs(x, y, error, match):
    from minidistill.metrics import linear_cka

    with pytest.raises(error, match=match):
        linear_cka(x, y)


def test_linear_cka_is_exported():
    assert "linear_cka" in metrics_mod.__all__
