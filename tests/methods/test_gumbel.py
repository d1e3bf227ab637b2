"""Chapter 4, first half (the Gumbel-max trick and the Gumbel-softmax): the sampler, the
χ² test and the gradient estimators of :mod:`minidistill.methods.gumbel`."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minidistill.methods import adashare, gumbel as G


# -- the sampler ------------------------------------------------------------------------------

def test_gumbel_noise_has_the_gumbel_mean_and_variance():
    torch.manual_seed(0)
    g = G.gumbel_noise((200_000,), dtype=torch.float64)
    assert g.dtype == torch.float64 and torch.isfinite(g).all()
    assert g.mean().item() == pytest.approx(0.5772156649, abs=0.01)      # Euler-Mascheroni
    assert g.var().item() == pytest.approx(math.pi**2 / 6, abs=0.02)


def test_gumbel_max_frequencies_pass_a_chi_square_test_and_a_wrong_sampler_fails():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    torch.manual_seed(1)
    z = G.gumbel_max(logits, 50_000)
    assert z.shape == (50_000,) and z.dtype == torch.int64
    counts = torch.bincount(z, minlength=5)
    assert G.chi_square_test(counts, logits.softmax(-1))["p_value"] > 1e-3
    wrong = (logits - torch.rand(50_000, 5, dtype=torch.float64).log()).argmax(-1)  # exponential noise
    assert G.chi_square_test(torch.bincount(wrong, minlength=5), logits.softmax(-1))["p_value"] < 1e-6


def test_gumbel_max_keeps_batch_dimensions_and_rejects_bad_counts():
    assert G.gumbel_max(torch.zeros(2, 3, 4)).shape == (2, 3)
    assert G.gumbel_max(torch.zeros(2, 4), num_samples=7).shape == (7, 2)
    with pytest.raises(ValueError, match="num_samples"):
        G.gumbel_max(torch.zeros(3), 0)


def test_gumbel_softmax_rows_are_probability_vectors_of_the_input_dtype():
    torch.manual_seed(0)
    y = G.gumbel_softmax(torch.randn(6, 5, dtype=torch.float64), tau=0.7)
    assert y.shape == (6, 5) and y.dtype == torch.float64
    assert (y >= 0).all() and torch.allclose(y.sum(-1), torch.ones(6, dtype=torch.float64))


def test_gumbel_softmax_agrees_in_distribution_with_torch():
    logits = torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64).expand(100_000, 3)
    torch.manual_seed(2)
    ours = G.gumbel_softmax(logits, tau=0.7)
    theirs = F.gumbel_softmax(logits, tau=0.7)
    assert torch.allclose(ours.mean(0), theirs.mean(0), atol=0.006)
    assert torch.allclose(ours.std(0), theirs.std(0), atol=0.006)
    # and not with a sampler at another temperature: the comparison can tell them apart
    other = F.gumbel_softmax(logits, tau=1.5)
    assert (ours.std(0) - other.std(0)).abs().max() > 0.03


def test_hard_samples_are_exactly_one_hot_and_carry_the_soft_gradient():
    logits = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads, values = [], []
    for hard in (False, True):
        z = logits.clone().requires_grad_(True)
        torch.manual_seed(5)  # the same noise for both
        y = G.gumbel_softmax(z, tau=0.5, hard=hard)
        values.append(y.detach())
        grads.append(torch.autograd.grad((w * y).sum(), z)[0])
    soft, hard = values
    assert set(hard.unique().tolist()) == {0.0, 1.0} and torch.equal(hard.sum(-1), torch.ones(8, dtype=torch.float64))
    assert torch.equal(hard.argmax(-1), soft.argmax(-1))
    assert torch.allclose(grads[0], grads[1]) and grads[1].abs().sum() > 0


def test_temperature_limits_one_hot_and_uniform():
    logits = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    cold = G.gumbel_softmax(logits, tau=1e-6)
    torch.manual_seed(7)
    z = G.gumbel_max(logits)
    assert torch.equal(cold.argmax(-1), z) and cold.max(-1).values.min() > 0.999
    assert (G.gumbel_softmax(logits, tau=1e5) - 0.2).abs().max() < 1e-3


@pytest.mark.parametrize("tau", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_gumbel_softmax_rejects_bad_temperatures(tau):
    with pytest.raises(ValueError, match="tau"):
        G.gumbel_softmax(torch.zeros(2, 3), tau=tau)


def test_gumbel_softmax_rejects_bad_logits():
    with pytest.raises(ValueError, match="floating-point"):
        G.gumbel_softmax(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2"):
        G.gumbel_softmax(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="at least 2"):
        G.gumbel_softmax(torch.tensor(1.0))


# -- chi-square and gradient estimators -------------------------------------------------------

def test_chi_square_matches_a_hand_computation():
    r = G.chi_square_test(torch.tensor([10, 20, 30]), torch.full((3,), 1 / 3, dtype=torch.float64))
    # expected 20 each: X^2 = (100 + 0 + 100) / 20 = 10; with 2 dof the survival function is exp(-x/2)
    assert r["statistic"] == pytest.approx(10.0) and r["dof"] == 2
    assert r["p_value"] == pytest.approx(math.exp(-5.0), rel=1e-9)


def test_chi_square_rejects_bad_input():
    with pytest.raises(ValueError, match="sum to one"):
        G.chi_square_test(torch.tensor([1, 2]), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="same length"):
        G.chi_square_test(torch.tensor([1, 2, 3]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="non-negative"):
        G.chi_square_test(torch.tensor([-1, 2]), torch.tensor([0.5, 0.5]))


def _quadratic(y: torch.Tensor) -> torch.Tensor:
    target = torch.tensor([0.1, 0.6, 0.3, 0.0], dtype=y.dtype)
    return ((y - target) ** 2).sum(-1)


THETA = torch.tensor([0.3, -0.2, 0.8, 0.0], dtype=torch.float64)


def test_exact_gradient_matches_autograd_of_the_expectation():
    theta = THETA.clone().requires_grad_(True)
    expectation = (theta.softmax(-1) * _quadratic(torch.eye(4, dtype=torch.float64))).sum()
    (auto,) = torch.autograd.grad(expectation, theta)
    assert torch.allclose(G.exact_gradient(THETA, _quadratic), auto, atol=1e-12)
    with pytest.raises(ValueError, match="one vector"):
        G.exact_gradient(THETA[None], _quadratic)


def test_reinforce_is_unbiased_and_gumbel_softmax_is_biased_with_lower_variance():
    exact = G.exact_gradient(THETA, _quadratic)
    torch.manual_seed(0)
    n = 40_000
    stats = {e: G.gradient_statistics(G.gradient_samples(THETA, _quadratic, e, n, tau=1.0), exact)
             for e in G.ESTIMATORS}
    for e in ("reinforce", "reinforce_baseline"):
        assert stats[e]["bias"] < 4 * math.sqrt(stats[e]["variance"] / n)
    assert stats["gumbel_softmax"]["bias"] > 10 * math.sqrt(stats["gumbel_softmax"]["variance"] / n)
    assert stats["gumbel_softmax"]["variance"] < stats["reinforce"]["variance"] / 3
    assert stats["reinforce_baseline"]["variance"] < stats["reinforce"]["variance"]


def test_gradient_samples_shape_and_bad_input():
    torch.manual_seed(0)
    assert G.gradient_samples(THETA, _quadratic, "straight_through", 10).shape == (10, 4)
    with pytest.raises(ValueError, match="estimator"):
        G.gradient_samples(THETA, _quadratic, "rebar", 10)
    with pytest.raises(ValueError, match="num_samples"):
        G.gradient_samples(THETA, _quadratic, "reinforce", 1)


def test_gradient_statistics_by_hand():
    s = G.gradient_statistics(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([2.0, 0.0]))
    assert s == pytest.approx({"bias": 0.0, "variance": 2.0, "mse": 1.0})
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        G.gradient_statistics(torch.zeros(3), torch.zeros(3))


def test_adashare_re_exports_the_sampler_under_its_old_names():
    for name in G.__all__:
        if name != "check_tau":
            assert getattr(adashare, name) is getattr(G, name) and name in adashare.__all__
