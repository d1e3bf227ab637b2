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
    logits = torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64).expand(30_000, 3)
    torch.manual_seed(2)
    ours = G.gumbel_softmax(logits, tau=0.7)
    theirs = F.gumbel_softmax(logits, tau=0.7)
    assert all(G.ks_two_sample(ours[:, i], theirs[:, i])["p_value"] > 0.01 / 3 for i in range(3))
    # and not with a sampler at another temperature: the test can tell them apart
    other = F.gumbel_softmax(logits, tau=0.8)
    assert all(G.ks_two_sample(ours[:, i], other[:, i])["p_value"] < 1e-6 for i in range(3))


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


def test_reinforce_and_its_loo_baseline_are_unbiased_and_gumbel_softmax_is_biased():
    exact = G.exact_gradient(THETA, _quadratic)
    torch.manual_seed(0)
    n = 40_000
    stats = {e: G.gradient_statistics(G.gradient_samples(THETA, _quadratic, e, n, tau=1.0,
                                                         draws=4 if e == "reinforce_loo" else 1), exact)
             for e in G.ESTIMATORS}
    for e in ("reinforce", "reinforce_loo"):
        assert stats[e]["bias"] < 4 * math.sqrt(stats[e]["variance"] / n)
    assert stats["gumbel_softmax"]["bias"] > 10 * math.sqrt(stats["gumbel_softmax"]["variance"] / n)
    assert stats["gumbel_softmax"]["variance"] < stats["reinforce"]["variance"] / 3


def test_draws_are_averaged_and_the_loo_baseline_pays_per_evaluation():
    exact = G.exact_gradient(THETA, _quadratic)
    torch.manual_seed(1)
    one = G.gradient_statistics(G.gradient_samples(THETA, _quadratic, "reinforce", 20_000), exact)
    four = G.gradient_statistics(G.gradient_samples(THETA, _quadratic, "reinforce", 20_000, draws=4), exact, 4)
    assert four["variance"] == pytest.approx(one["variance"] / 4, rel=0.05)          # the mean of 4 draws
    assert four["variance_per_evaluation"] == pytest.approx(one["variance"], rel=0.05)  # ... costs 4 evaluations
    loo = {j: G.gradient_statistics(G.gradient_samples(THETA, _quadratic, "reinforce_loo", 20_000, draws=j), exact, j)
           for j in (2, 8)}
    # the baseline helps even per evaluation, and more with more draws to build it from
    assert loo[8]["variance_per_evaluation"] < loo[2]["variance_per_evaluation"] < one["variance_per_evaluation"] / 2


def test_loo_baseline_by_hand():
    # K = 2, theta = 0 (pi = (1/2, 1/2)), f(e_c) = c, two draws. Draws (0, 1) or (1, 0): advantages -1 and +1
    # (each minus the other's f), grad log pi_c = e_c - pi, so the estimate is
    # (-1 * (1/2, -1/2) + 1 * (-1/2, 1/2)) / 2 = (-1/2, 1/2); equal draws give (0, 0). The exact gradient
    # pi * (f - pi.f) = (-1/4, 1/4) is their mean, P(different draws) = 1/2.
    f = lambda y: y[..., 1]  # noqa: E731
    theta = torch.zeros(2, dtype=torch.float64)
    torch.manual_seed(0)
    g = G.gradient_samples(theta, f, "reinforce_loo", 4000, draws=2)
    assert {tuple(row) for row in g.tolist()} == {(-0.5, 0.5), (0.0, 0.0)}
    assert G.exact_gradient(theta, f).tolist() == pytest.approx([-0.25, 0.25])
    assert g.mean(0).tolist() == pytest.approx([-0.25, 0.25], abs=0.02)


def test_gradient_samples_shape_and_bad_input():
    torch.manual_seed(0)
    assert G.gradient_samples(THETA, _quadratic, "straight_through", 10).shape == (10, 4)
    assert G.gradient_samples(THETA, _quadratic, "gumbel_softmax", 10, draws=3).shape == (10, 4)
    with pytest.raises(ValueError, match="estimator"):
        G.gradient_samples(THETA, _quadratic, "rebar", 10)
    with pytest.raises(ValueError, match="num_samples"):
        G.gradient_samples(THETA, _quadratic, "reinforce", 1)
    with pytest.raises(ValueError, match="draws must be an int >= 2"):
        G.gradient_samples(THETA, _quadratic, "reinforce_loo", 10)           # a baseline needs another draw
    with pytest.raises(ValueError, match="draws"):
        G.gradient_samples(THETA, _quadratic, "reinforce", 10, draws=0)


def test_gradient_statistics_and_mse_at_budget_by_hand():
    s = G.gradient_statistics(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([2.0, 0.0]), evaluations=3)
    assert s == pytest.approx({"bias": 0.0, "bias2": 0.0, "variance": 2.0, "variance_per_evaluation": 6.0,
                               "evaluations": 3, "num_samples": 2, "mse": 1.0})
    # mean 2, exact 0: ||mean - exact||^2 = 4, minus V/N = 2/2 for the noise of the mean
    s = G.gradient_statistics(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([0.0, 0.0]))
    assert s["bias"] == pytest.approx(2.0) and s["bias2"] == pytest.approx(3.0)
    assert G.mse_at_budget(s, 4) == pytest.approx(3.0 + 2.0 / 4)
    with pytest.raises(ValueError, match="budget"):
        G.mse_at_budget(s, 0)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        G.gradient_statistics(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="evaluations"):
        G.gradient_statistics(torch.zeros(3, 2), torch.zeros(2), evaluations=0)


def test_bias2_is_unbiased_for_an_unbiased_estimator():
    # many small batches of an unbiased estimator: the raw squared bias averages V/N, bias2 about 0
    torch.manual_seed(2)
    exact = torch.zeros(3, dtype=torch.float64)
    stats = [G.gradient_statistics(torch.randn(50, 3, dtype=torch.float64), exact) for _ in range(400)]
    raw = sum(s["bias"] ** 2 for s in stats) / len(stats)
    assert raw == pytest.approx(3 / 50, rel=0.15)
    assert sum(s["bias2"] for s in stats) / len(stats) < raw / 2


def test_estimator_race_charges_per_evaluation():
    torch.manual_seed(3)
    race = G.estimator_race(THETA, _quadratic, taus=(0.5, 2.0), draws=(2, 5), num_samples=2000)
    assert set(race) == {("reinforce", 1), ("reinforce_loo", 2), ("reinforce_loo", 5), ("gumbel_softmax", 0.5),
                         ("gumbel_softmax", 2.0), ("straight_through", 0.5), ("straight_through", 2.0)}
    assert race["reinforce_loo", 5]["evaluations"] == 5 and race["gumbel_softmax", 2.0]["evaluations"] == 1
    s = race["reinforce_loo", 5]
    assert s["variance_per_evaluation"] == pytest.approx(5 * s["variance"])


# -- the two-sample test ------------------------------------------------------------------------

def test_kolmogorov_q_matches_tabulated_values_and_is_continuous():
    # critical values of the Kolmogorov distribution: 1.358 (5 %), 1.628 (1 %), 1.224 (10 %)
    assert G.kolmogorov_q(1.358) == pytest.approx(0.05, abs=5e-4)
    assert G.kolmogorov_q(1.628) == pytest.approx(0.01, abs=2e-4)
    assert G.kolmogorov_q(1.224) == pytest.approx(0.10, abs=5e-4)
    assert G.kolmogorov_q(0.5) == pytest.approx(0.9639, abs=1e-4) and G.kolmogorov_q(0.0) == 1.0
    assert G.kolmogorov_q(1 - 1e-9) == pytest.approx(G.kolmogorov_q(1.0), abs=1e-8)  # the two series agree
    assert G.kolmogorov_q(5.0) < 1e-20
    with pytest.raises(ValueError, match="lam"):
        G.kolmogorov_q(-1.0)


def test_ks_two_sample_statistic_by_hand_and_power():
    r = G.ks_two_sample(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.5, 3.5, 4.5, 5.5]))
    # at x = 3: F_a = 1, F_b = 1/4
    assert r["statistic"] == pytest.approx(0.75)
    torch.manual_seed(4)
    a, b = torch.randn(20_000, dtype=torch.float64), torch.randn(20_000, dtype=torch.float64)
    assert G.ks_two_sample(a, b)["p_value"] > 0.01
    assert G.ks_two_sample(a, b + 0.05)["p_value"] < 1e-3        # a shift of 1/20 of a standard deviation
    assert G.ks_two_sample(a, 1.05 * b)["statistic"] > 0          # different spread, same mean
    # under the null the p-value is about uniform: it falls below 0.1 about 10 % of the time
    p = [G.ks_two_sample(torch.rand(300, dtype=torch.float64), torch.rand(300, dtype=torch.float64))["p_value"]
         for _ in range(300)]
    assert 0.04 < sum(v < 0.1 for v in p) / len(p) < 0.17
    with pytest.raises(ValueError, match="at least 2"):
        G.ks_two_sample(torch.tensor([1.0]), torch.tensor([1.0, 2.0]))


def test_adashare_re_exports_the_sampler_under_its_old_names():
    for name in G.__all__:
        if name != "check_tau":
            assert getattr(adashare, name) is getattr(G, name) and name in adashare.__all__
