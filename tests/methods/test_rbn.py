"""Chapter 11 (Representative Batch Normalization): the layer against BatchNorm2d and against
the equations written out, train/eval statistics, gradients, no in-place change, bad inputs,
the swap and constructor, the channel-mean spread and the exercise self-checks."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from minidistill.exercises import rbn as rbn_exercises
from minidistill.methods import rbn
from minidistill.models import count_parameters, create_model


def test_all_names_exist_and_are_re_exported():
    for name in rbn.__all__:
        assert hasattr(rbn, name), name
    for name in rbn_exercises.__all__:
        assert name in rbn.__all__ and getattr(rbn, name) is getattr(rbn_exercises, name), name


def _x(seed: int = 0, shape=(6, 4, 5, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2 + torch.arange(shape[1]).view(1, -1, 1, 1)


def _random_params(layer: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("training", [True, False])
def test_equals_batchnorm_without_calibration(training):
    bn, r = nn.BatchNorm2d(4), rbn.RepresentativeBatchNorm2d(4, scaling=False)
    _random_params(bn)
    r.load_state_dict(bn.state_dict(), strict=False)   # w_m = 0 stays
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, 1.0, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 3.0]))
    r.load_state_dict(bn.state_dict(), strict=False)
    bn.train(training), r.train(training)
    x = _x()
    torch.testing.assert_close(r(x), bn(x))
    torch.testing.assert_close(r.running_mean, bn.running_mean)
    torch.testing.assert_close(r.running_var, bn.running_var)
    assert int(r.num_batches_tracked) == int(bn.num_batches_tracked)


@pytest.mark.parametrize("training", [True, False])
def test_matches_the_equations_written_out(training):
    r = rbn.RepresentativeBatchNorm2d(4).double()
    _random_params(r)
    with torch.no_grad():
        r.running_mean.copy_(torch.tensor([0.5, 1.0, -1.0, 2.0]))
        r.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 3.0]))
    r.train(training)
    x = _x().double().requires_grad_()
    c = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    k_m = x.sum((2, 3), keepdim=True) / 25
    x_cm = x + c(r.center_weight.detach()) * k_m
    if training:
        mu = x_cm.sum((0, 2, 3), keepdim=True) / x_cm[:, 0].numel()
        var = ((x_cm - mu) ** 2).sum((0, 2, 3), keepdim=True) / x_cm[:, 0].numel()
    else:
        mu, var = c(r.running_mean.clone()), c(r.running_var.clone())
    x_s = (x_cm - mu) / torch.sqrt(var + r.eps)
    gate = 1 / (1 + torch.exp(-(c(r.scale_weight.detach()) * x_s.sum((2, 3), keepdim=True) / 25 + c(r.scale_bias.detach()))))
    want = c(r.weight.detach()) * x_s * gate + c(r.bias.detach())
    got = r(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the gradient with respect to the input flows through K_m and K_s too
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * probe).sum(), x)
    (g_want,) = torch.autograd.grad((want * probe).sum(), x)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)


def test_initial_gate_is_not_the_identity():
    bn, r = nn.BatchNorm2d(4), rbn.RepresentativeBatchNorm2d(4)
    x = _x()
    assert abs(rbn.initial_gate() - 0.7310585786) < 1e-9
    torch.testing.assert_close(r(x), bn(x) * rbn.initial_gate())


def test_running_statistics_are_those_of_the_calibrated_input():
    r = rbn.RepresentativeBatchNorm2d(4, momentum=None)
    with torch.no_grad():
        r.center_weight.fill_(0.5)
    x = _x()
    r(x)  # cumulative average, first batch: the running mean is the batch mean of X_cm = 1.5 E[X] here
    torch.testing.assert_close(r.running_mean, 1.5 * x.mean((0, 2, 3)))
    x_cm = x + 0.5 * x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(r.running_var, x_cm.transpose(0, 1).reshape(4, -1).var(1, unbiased=True))
    r.eval()
    before = r.running_mean.clone()
    r(_x(5))
    torch.testing.assert_close(r.running_mean, before)   # eval does not update


def test_eval_uses_running_statistics_and_is_per_example():
    r = rbn.RepresentativeBatchNorm2d(4)
    _random_params(r)
    for s in range(3):
        r(_x(s))
    r.eval()
    x = _x(9)
    torch.testing.assert_close(r(x)[:2], r(x[:2]))   # no batch statistics in eval
    r.train()
    assert not torch.allclose(r(x)[:2], r(x[:2]))


def test_gradients_reach_the_calibration_weights():
    r = rbn.RepresentativeBatchNorm2d(4)
    x = _x().requires_grad_()
    r(x).pow(3).sum().backward()
    for p in (r.center_weight, r.scale_weight, r.scale_bias, r.weight, r.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert x.grad is not None


def test_input_not_modified_in_place():
    r = rbn.RepresentativeBatchNorm2d(4)
    with torch.no_grad():
        r.center_weight.fill_(0.7)
    x = _x()
    before = x.clone()
    r(x)
    assert torch.equal(x, before)


def test_bad_inputs():
    r = rbn.RepresentativeBatchNorm2d(4)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        r(torch.randn(2, 4))
    with pytest.raises(ValueError, match="3 channels"):
        r(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="norm must be"):
        rbn.create_rbn_model("resnet8", 10, norm="layernorm")
    with pytest.raises(TypeError):
        rbn.swap_batchnorm("resnet8")


def test_swap_keeps_state_and_function():
    bn_model = create_model("resnet8", 10)
    for m in bn_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _random_params(m)
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    bn_model.eval()
    swapped = rbn.swap_batchnorm(copy.deepcopy(bn_model), scaling=False)
    n_bn = sum(type(m) is nn.BatchNorm2d for m in bn_model.modules())
    assert sum(type(m) is rbn.RepresentativeBatchNorm2d for m in swapped.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm2d for m in swapped.modules())
    assert not swapped.training
    x = _x(shape=(3, 3, 16, 16))
    torch.testing.assert_close(swapped(x), bn_model(x))
    channels = sum(m.num_features for m in bn_model.modules() if isinstance(m, nn.BatchNorm2d))
    assert count_parameters(swapped) == count_parameters(bn_model) + 3 * channels


def test_create_rbn_model():
    m = rbn.create_rbn_model("resnet8", 10)
    assert any(isinstance(x, rbn.RepresentativeBatchNorm2d) for x in m.modules())
    b = rbn.create_rbn_model("resnet8", 10, norm="bn")
    assert not any(isinstance(x, rbn.RepresentativeBatchNorm2d) for x in b.modules())
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_channel_mean_spread_against_a_direct_computation():
    layer = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    x = _x(shape=(5, 3, 8, 8))
    out = layer(x).detach()
    spread = rbn.channel_mean_spread(layer, x)
    means = out.mean((2, 3))
    want = sum(float(torch.std(means[n])) for n in range(5)) / 5
    assert set(spread) == {"1"} and abs(spread["1"] - want) < 1e-5


def _eval_form(layer):
    with torch.no_grad():
        a = layer.weight * torch.sigmoid(layer.scale_bias) / torch.sqrt(layer.running_var + layer.eps)
        return a, a * layer.center_weight, layer.bias - a * layer.running_mean


def test_exercise_checks_accept_right_answers(capsys):
    rbn.check_centering(lambda x, w: x + w.view(1, -1, 1, 1) * x.mean((2, 3), keepdim=True))
    rbn.check_centering(lambda x, w: x + torch.einsum("c,nc->nc", w, x.flatten(2).mean(2))[..., None, None])
    rbn.check_gate_variance(lambda f: torch.logit(torch.tensor(f) ** 0.5))
    rbn.check_gate_variance(lambda f: -math.log(1 / math.sqrt(f) - 1))
    rbn.check_eval_form(_eval_form)
    rbn.check_eval_form(lambda layer: tuple(t.float() for t in _eval_form(layer)))   # float32 is right too
    assert capsys.readouterr().out.count("✓") == 6


def _inplace(x, w):
    x += w.view(1, -1, 1, 1) * x.mean((2, 3), keepdim=True)
    return x


@pytest.mark.parametrize("fn, hint", [
    (lambda x, w: x + w.view(1, -1, 1, 1) * x.mean((0, 2, 3), keepdim=True), "batch"),
    (lambda x, w: x - w.view(1, -1, 1, 1) * x.mean((2, 3), keepdim=True), "adds"),
    (lambda x, w: x + x.mean((2, 3), keepdim=True), "w_m is missing"),
    (_inplace, "in place"),
])
def test_check_centering_catches_classic_mistakes(fn, hint):
    with pytest.raises(AssertionError, match=hint):
        rbn.check_centering(fn)


@pytest.mark.parametrize("fn, hint", [
    (lambda f: torch.logit(torch.tensor(f)), r"\*gate\* equal f"),
    (lambda f: f ** 0.5, "the gate r"),
    (lambda f: f, "solve"),
])
def test_check_gate_variance_catches_classic_mistakes(fn, hint):
    with pytest.raises(AssertionError, match=hint):
        rbn.check_gate_variance(fn)


def _no_gate(layer):
    a, b, c = _eval_form(layer)
    r = torch.sigmoid(layer.scale_bias.detach())
    return a / r, b / r, c


def _b_is_w_m(layer):
    a, _, c = _eval_form(layer)
    return a, layer.center_weight.detach(), c


def _c_without_gate(layer):
    a, b, _ = _eval_form(layer)
    s = layer.weight.detach() / torch.sqrt(layer.running_var + layer.eps)
    return a, b, layer.bias.detach() - s * layer.running_mean


def _no_eps(layer):
    with torch.no_grad():
        a = layer.weight * torch.sigmoid(layer.scale_bias) / torch.sqrt(layer.running_var)
        return a, a * layer.center_weight, layer.bias - a * layer.running_mean


def _b_without_gate(layer):
    a, _, c = _eval_form(layer)
    s = layer.weight.detach() / torch.sqrt(layer.running_var + layer.eps)
    return a, s * layer.center_weight.detach(), c


@pytest.mark.parametrize("fn, hint", [(_no_gate, "gate is missing"), (_b_is_w_m, "b = a"), (_c_without_gate, r"\*before\* the gate"),
                                      (_no_eps, "eps is missing"), (_b_without_gate, "gate is in b")])
def test_check_eval_form_catches_classic_mistakes(fn, hint):
    with pytest.raises(AssertionError, match=hint):
        rbn.check_eval_form(fn)


def test_unattempted_exercises_print_a_hint(capsys):
    def todo(*_):
        raise NotImplementedError
    rbn.check_centering(todo), rbn.check_gate_variance(todo), rbn.check_eval_form(todo)
    assert capsys.readouterr().out.count("not attempted") == 3


def test_plots_draw_and_reject_bad_input():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from minidistill.methods import rbn_plots
    from minidistill.train import History

    x = rbn_plots.example_feature_map()
    assert x.shape == (8, 1, 8, 8) and x[0].mean() > x[2:].mean() > x[1].mean()
    fig = rbn_plots.plot_calibration(x, 0.5, 1.0, 1.0)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="one channel"):
        rbn_plots.plot_calibration(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="at least 4"):
        rbn_plots.plot_calibration(torch.randn(3, 1, 4, 4), eval_mode=True)
    fig = rbn_plots.plot_calibration(x, 0.0, 0.0, 1.0, eval_mode=True)
    assert "eval mode" in fig._suptitle.get_text()
    h = History([{"epoch": 1, "train_loss": 2.0, "test_acc": 10.0}, {"epoch": 2, "train_loss": 1.5, "test_acc": 20.0}])
    fig = rbn_plots.plot_curves({"BN": [h, h], "RBN": [h]})
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2
    fig = rbn_plots.plot_spread({"BN": {"a": 1.0, "b": 2.0}, "RBN": {"a": 0.5, "b": 1.0}})
    assert len(fig.axes[0].patches) == 4
    plt.close("all")


def test_plot_calibration_eval_mode_uses_the_typical_examples_statistics():
    """In eval mode the BN bars are x standardised with the mean and variance of x[2:], and RBN with
    w_m = w_v = 0 is that times sigmoid(w_b): read back from the bar heights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from minidistill.methods import rbn_plots

    x = rbn_plots.example_feature_map()
    fig = rbn_plots.plot_calibration(x, 0.0, 0.0, 1.0, eval_mode=True)
    bars = [p.get_height() for p in fig.axes[0].patches]
    n = x.shape[0]
    rest = x[2:].double()
    want_bn = (x.double().mean((1, 2, 3)) - rest.mean()) / torch.sqrt(rest.var() + 1e-5)
    torch.testing.assert_close(torch.tensor(bars[:n], dtype=torch.float64), want_bn, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(bars[n:], dtype=torch.float64), want_bn * rbn.initial_gate(), rtol=1e-4, atol=1e-5)
    assert want_bn[0] > 1 and want_bn[1] < -1   # the strong and the weak example stay far from 0
    plt.close("all")
