"""Chapter 7, IE-KD: the losses (the exploration-gradient identity, the bound, the cosine
variant), the channel split, the auto-encoder and the objectives on fit (frozen teacher factor,
trained encoders, IE-DML), the analysis helpers, the toy, the figures, the exercises' self-checks
(correct answers accepted, classic mistakes caught), and bad inputs."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F

from minidistill import train
from minidistill.data import make_shapes
from minidistill.exercises import iekd as ex
from minidistill.methods import dml, iekd
from minidistill.models import CifarResNet, create_model
from minidistill.train import Recipe

G = torch.Generator().manual_seed(0)
A = torch.randn(4, 6, 3, 3, generator=G, dtype=torch.float64)
B = torch.rand(4, 6, 3, 3, generator=G, dtype=torch.float64)


def _reference_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return (a - b).abs().sum() / a.numel()


def test_inheritance_is_the_normalised_l1_and_exploration_its_negative():
    d = _reference_distance(A, B)
    assert iekd.inheritance_loss(A, B).item() == pytest.approx(d.item(), rel=1e-6)
    assert iekd.exploration_loss(A, B).item() == pytest.approx(-d.item(), rel=1e-6)
    assert iekd.exploration_loss(A, B).item() < 0


@pytest.mark.parametrize("kind", ["l1", "cos"])
def test_exploration_gradient_is_minus_the_inheritance_gradient_at_equal_inputs(kind):
    a = B.clone().requires_grad_()        # B is positive, so cos(a, t) > 0 and |cos| = cos for "cos"
    t = torch.rand(4, 6, 3, 3, generator=G, dtype=torch.float64)
    (g_inh,) = torch.autograd.grad(iekd.inheritance_loss(a, t, kind), a)
    (g_exp,) = torch.autograd.grad(iekd.exploration_loss(a, t, kind), a)
    assert g_inh.abs().max() > 0
    assert torch.allclose(g_exp, -g_inh, rtol=1e-5, atol=1e-9)


def test_the_teacher_factor_gets_no_gradient():
    t = B.clone().requires_grad_()
    for fn in (iekd.inheritance_loss, iekd.exploration_loss):
        for kind in iekd.LOSS_KINDS:
            g = torch.autograd.grad(fn(A.clone().requires_grad_(), t, kind), t, allow_unused=True)[0]
            assert g is None or g.abs().max() == 0


def test_exploration_loss_is_bounded_and_the_bound_is_reached():
    d = 9
    flat = torch.ones(1, d, dtype=torch.float64) / 3
    assert -iekd.exploration_loss(flat, -flat).item() == pytest.approx(2 / math.sqrt(d), rel=1e-6)
    worst = max(-iekd.exploration_loss(torch.randn(64, d, generator=G), torch.randn(64, d, generator=G)).item()
                for _ in range(20))
    assert worst <= 2 / math.sqrt(d) + 1e-6


def test_minimising_the_exploration_loss_settles_above_the_floor_but_the_unnormalised_push_diverges():
    d = 8
    b = torch.randn(16, d, generator=G, dtype=torch.float64)
    a0 = torch.randn(16, d, generator=G, dtype=torch.float64)
    ends = {}
    for name, fn in (("normalised", iekd.exploration_loss), ("raw", lambda a, t: -(a - t).abs().mean())):
        a = a0.clone().requires_grad_()
        opt = torch.optim.Adam([a], lr=0.05)
        values = []
        for _ in range(300):
            loss = fn(a, b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            values.append(loss.item())
        ends[name] = values
    assert min(ends["normalised"]) >= -2 / math.sqrt(d)
    assert abs(ends["normalised"][-1] - ends["normalised"][-101]) < 1e-6          # settled
    assert ends["raw"][-1] < ends["raw"][-101] - 3                                 # still falling, without limit


def test_cosine_variant_pulls_with_one_minus_cos_and_pushes_towards_orthogonality():
    a, b = A.flatten(1), B.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert iekd.inheritance_loss(A, B, "cos").item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
    assert iekd.exploration_loss(A, B, "cos").item() == pytest.approx(cos.abs().mean().item(), rel=1e-5)
    e = torch.eye(2, dtype=torch.float64)
    assert iekd.exploration_loss(e[:1], e[1:], "cos").item() == pytest.approx(0.0, abs=1e-12)


def test_split_shapes_natural_and_ratio():
    f = torch.arange(2 * 8 * 2 * 2, dtype=torch.float32).reshape(2, 8, 2, 2)
    inh, exp = iekd.split_channels(f)
    assert inh.shape == (2, 4, 2, 2) and exp.shape == (2, 4, 2, 2)
    assert torch.equal(inh, f[:, :4]) and torch.equal(exp, f[:, 4:])
    inh, exp = iekd.split_channels(f, ratio=0.25)
    assert inh.shape[1] == 2 and exp.shape[1] == 6


def test_random_split_is_one_fixed_permutation_per_seed():
    i1, e1 = iekd.split_index(64, "random", seed=5)
    i2, e2 = iekd.split_index(64, "random", seed=5)
    i3, _ = iekd.split_index(64, "random", seed=6)
    assert torch.equal(i1, i2) and torch.equal(e1, e2)
    assert not torch.equal(i1, i3)
    assert not torch.equal(i1, torch.arange(32))
    assert sorted(torch.cat([i1, e1]).tolist()) == list(range(64)) and len(i1) == 32
    f = torch.randn(3, 64, 2, 2, generator=G)
    inh, exp = iekd.split_channels(f, "random", seed=5)
    assert torch.equal(inh, f[:, i1]) and torch.equal(exp, f[:, e1])


def test_factor_autoencoder_shapes():
    ae = iekd.FactorAutoEncoder(64)
    factor, rec = ae(torch.randn(2, 64, 8, 8, generator=G))
    assert factor.shape == (2, 32, 8, 8) and rec.shape == (2, 64, 8, 8)
    assert iekd.FactorAutoEncoder(16, 4)(torch.randn(2, 16, 4, 4, generator=G))[0].shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"\[N, 64, H, W\]"):
        ae(torch.randn(2, 32, 8, 8))


@pytest.fixture(scope="module")
def tiny():
    data = make_shapes(n_train=64, n_test=32, size=8)
    recipe = Recipe(epochs=1, batch_size=32, lr=0.05)
    torch.manual_seed(0)
    teacher = CifarResNet(8, (8, 8, 16, 32), data.num_classes).eval()
    return data, recipe, teacher


def _small():
    return CifarResNet(8, (8, 8, 8, 16), 10)


def test_ie_kd_on_fit_keeps_the_teacher_and_its_encoder_frozen_and_trains_the_encoders(tiny):
    data, recipe, teacher = tiny
    ae_run = iekd.train_factor_autoencoder(teacher, data, recipe)
    assert "train_rec" in ae_run.history.records[-1]
    ae = ae_run.model
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    e_before = {k: v.clone() for k, v in ae.encoder.state_dict().items()}
    objective = iekd.InheritExplore(teacher, ae, lambda_inh=1.0, lambda_exp=2.0, split="random", seed=1)
    run = train.train_model(_small, data, recipe, objective, seed=0)
    rec = run.history.records[-1]
    assert {"train_ce", "train_inh", "train_exp"} <= set(rec) and rec["train_exp"] < 0
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert all(torch.equal(e_before[k], v) for k, v in ae.encoder.state_dict().items())
    assert torch.equal(objective.inh_index.cpu(), iekd.split_index(16, "random", seed=1)[0])
    trainable = [n for n, p in objective.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("inh_encoder", "exp_encoder")) for n in trainable)
    student_ids = {id(p) for p in run.model.parameters()}
    assert not any(id(p) in student_ids for p in objective.parameters())      # fit would see them twice
    x = torch.randn(4, 3, 8, 8, generator=G)
    loss, logits, terms = objective(run.model, x, torch.zeros(4, dtype=torch.int64))
    want = terms["ce"] + 1.0 * terms["inh"] + 2.0 * terms["exp"]
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_ie_kd_resumes_from_a_checkpoint_like_an_uninterrupted_run(tiny, tmp_path):
    data, _, teacher = tiny
    ae = iekd.FactorAutoEncoder(32).eval()
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05)

    def run(checkpoint=None, crash=False):
        torch.manual_seed(0)
        net = _small()
        objective = iekd.InheritExplore(teacher, ae, split="random", seed=2)
        if crash:   # stop at the start of the second epoch, as a killed process would
            forward = objective.forward

            def crashing(model, x, y):
                if objective.epoch == 1:
                    raise KeyboardInterrupt
                return forward(model, x, y)

            objective.forward = crashing
        train.fit(net, data, objective, recipe, checkpoint=checkpoint)
        return net

    full = run()
    ck = tmp_path / "ie.pt"
    with pytest.raises(KeyboardInterrupt):
        run(ck, crash=True)
    state = torch.load(ck, weights_only=True)
    assert state["epoch"] == 1
    assert {"inh_index", "exp_index"} <= set(state["objective"])
    assert any(k.startswith("exp_encoder.") for k in state["objective"])
    assert not any(k.startswith("teacher.") for k in state["objective"])       # the frozen part is not saved
    resumed = run(ck)
    assert all(torch.allclose(a.float(), b.float(), atol=1e-6)
               for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_ie_dml_trains_two_networks_with_their_own_autoencoders(tiny):
    data, recipe, _ = tiny
    run = iekd.train_iedml([_small, _small], data, recipe, seed=0, lambda_exp=0.5)
    rec = run.history.records[-1]
    assert {"train_ce", "train_kl", "train_inh", "train_exp", "train_rec"} <= set(rec)
    assert len(run.test_acc) == 2


def test_analysis_helpers(tiny):
    data, _, teacher = tiny
    f = iekd.layer_features(teacher, data, n=16)
    assert f.shape == (16, 32, 2, 2) and f.dtype == torch.float32
    assert iekd.linear_cka(f.flatten(1), f.flatten(1)) == pytest.approx(1.0, abs=1e-9)
    acts = torch.zeros(10, 4, 2, 2)
    acts[:, 0] = 1.0
    acts[:, 1] = 0.5
    acts[:, 2] = 0.001
    acts[5:, 1] = 0.0                                                          # channel 1 fires on half the images
    assert iekd.active_channels(acts) == pytest.approx(1.5)
    assert iekd.active_channels(acts, threshold=0.0) == pytest.approx(2.5)
    assert iekd.active_channels(torch.zeros(3, 4)) == 0


def test_toy_is_deterministic_and_inheritance_raises_the_similarity():
    a = iekd.toy_inherit_explore(1.0, 1.0, steps=30)
    assert a == iekd.toy_inherit_explore(1.0, 1.0, steps=30)
    none = iekd.toy_inherit_explore(0.0, 0.0, steps=30)
    assert a["cka_inh"][-1] > none["cka_inh"][-1] + 0.2
    assert all(v <= 2 / math.sqrt(6) + 1e-6 for v in a["exp"])


def test_figures():
    curves = iekd.toy_inherit_explore(steps=5)
    fig = iekd.plot_toy({"a": curves}, dim=6, title="t")
    assert len(fig.axes) == 3
    ceilings = sorted(line.get_ydata()[0] for line in fig.axes[0].lines if "ceiling" in line.get_label())
    assert ceilings == pytest.approx([math.sqrt(2 / 6), 2 / math.sqrt(6)])
    fig = iekd.plot_accuracies({"alone": [80.0, 81.0], "KD": [82.0, 82.5]}, reference="alone", title="x")
    assert fig.axes[0].get_ylabel() == "test accuracy (%)"
    plt.close("all")


# --- the exercises' self-checks -----------------------------------------------------------------

def _ok(check, fn, capsys, tick):
    check(fn)
    assert tick in capsys.readouterr().out


def _farthest(b):
    flat = b.flatten(1)
    s = torch.where(flat > 0, -1.0, 1.0).to(flat.dtype)            # against b's signs; + where b = 0
    return (s / flat.shape[1] ** 0.5).reshape(b.shape)


def test_check_farthest_factor_accepts_every_farthest_vector(capsys):
    _ok(ex.check_farthest_factor, _farthest, capsys, "✓")
    _ok(ex.check_farthest_factor, lambda b: 5 * _farthest(b), capsys, "✓")            # any positive multiple
    _ok(ex.check_farthest_factor, lambda b: _farthest(b.float()), capsys, "✓")          # float32
    other_zero_sign = lambda b: -torch.sign(b) + (b == 0).to(b.dtype) * -1.0          # noqa: E731  (- where b = 0)
    _ok(ex.check_farthest_factor, other_zero_sign, capsys, "✓")


def test_farthest_factor_reaches_the_bound_for_a_flat_teacher_factor():
    b = torch.ones(1, 9, dtype=torch.float64)
    assert -iekd.exploration_loss(_farthest(b), b).item() == pytest.approx(2 / 3, rel=1e-12)   # 2 / sqrt(D)


@pytest.mark.parametrize("wrong, hint", [
    (lambda b: -b, "L2, not in L1"),
    (lambda b: torch.sign(b), "TOWARDS"),
    (lambda b: -torch.sign(b), "sign\\(b_i\\) = 0"),
    (lambda b: torch.zeros_like(b), "non-zero"),
    (lambda b: -torch.sign(b).flatten(1)[:, :2], "shape"),
    (lambda b: -F.one_hot(b.flatten(1).argmax(1), b.flatten(1).shape[1]).to(b.dtype).reshape(b.shape), "not the farthest"),
])
def test_check_farthest_factor_catches_classic_mistakes(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ex.check_farthest_factor(wrong)


def _cka_features(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return (y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm())


def _cka_gram(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    kx, ky = x @ x.T, y @ y.T
    return (kx * ky).sum() / (kx.norm() * ky.norm())


def test_check_linear_cka_accepts_both_forms_and_the_package(capsys):
    for fn in (_cka_features, _cka_gram, iekd.linear_cka):
        _ok(ex.check_linear_cka, fn, capsys, "✓")


@pytest.mark.parametrize("wrong, hint", [
    (lambda x, y: (y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm()), "centre"),
    (lambda x, y: _cka_features(x, y) / ((x - x.mean(0)).T @ (x - x.mean(0))).norm()
     / ((y - y.mean(0)).T @ (y - y.mean(0))).norm(), "squares"),
    (lambda x, y: ((y - y.mean(0)).T @ (x - x.mean(0))).norm() / (((x - x.mean(0)).T @ (x - x.mean(0))).norm()
                                                                  * ((y - y.mean(0)).T @ (y - y.mean(0))).norm()), "SQUARED"),
])
def test_check_linear_cka_catches_classic_mistakes(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ex.check_linear_cka(wrong)


def _dml_gradient_closed(logits, y):
    p = [torch.softmax(z, 1) for z in logits]
    q = F.one_hot(y, logits[0].shape[1]).to(logits[0].dtype)
    return (2 * p[0] - q - torch.stack(p[1:]).mean(0)) / len(y)


def _dml_gradient_autograd(logits, y):
    z1 = logits[0].clone().requires_grad_()
    loss = dml.dml_losses([z1, *logits[1:]], y)[0][0]
    return torch.autograd.grad(loss, z1)[0]


def test_check_dml_gradient_accepts_the_closed_form_and_autograd(capsys):
    _ok(ex.check_dml_gradient, _dml_gradient_closed, capsys, "✓")
    _ok(ex.check_dml_gradient, _dml_gradient_autograd, capsys, "✓")
    _ok(ex.check_dml_gradient, lambda zs, y: _dml_gradient_closed([z.float() for z in zs], y), capsys, "✓")   # float32


def _softmaxes(logits, y):
    p = [torch.softmax(z, 1) for z in logits]
    return p, F.one_hot(y, logits[0].shape[1]).to(logits[0].dtype)


@pytest.mark.parametrize("wrong, hint", [
    (lambda zs, y: -_dml_gradient_closed(zs, y), "sign"),
    (lambda zs, y: _dml_gradient_closed(zs, y) * len(y), "factor N"),
    (lambda zs, y: (_softmaxes(zs, y)[0][0] - torch.stack(_softmaxes(zs, y)[0][1:]).mean(0)) / len(y), "cross-entropy"),
    (lambda zs, y: (_softmaxes(zs, y)[0][0] - _softmaxes(zs, y)[1]) / len(y), "mimicry"),
    (lambda zs, y: (len(zs) * _softmaxes(zs, y)[0][0] - _softmaxes(zs, y)[1]
                    - torch.stack(_softmaxes(zs, y)[0][1:]).sum(0)) / len(y), "SUM over peers"),
    (lambda zs, y: _dml_gradient_closed(zs, y)[:, :2], "N, K"),
])
def test_check_dml_gradient_catches_classic_mistakes(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ex.check_dml_gradient(wrong)


def test_checks_say_not_attempted(capsys):
    def todo(*args):
        raise NotImplementedError

    for check in (ex.check_farthest_factor, ex.check_linear_cka, ex.check_dml_gradient):
        check(todo)
        assert "not attempted" in capsys.readouterr().out


# --- bad inputs and exports ------------------------------------------------------------------------

def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="one shape"):
        iekd.inheritance_loss(A, B[:, :3])
    with pytest.raises(ValueError, match="kind"):
        iekd.exploration_loss(A, B, "l2")
    with pytest.raises(ValueError, match="mode"):
        iekd.split_index(8, "relation")
    with pytest.raises(ValueError, match="channels"):
        iekd.split_index(1)
    with pytest.raises(ValueError, match="ratio"):
        iekd.split_index(8, ratio=1.0)
    with pytest.raises(TypeError, match="FactorAutoEncoder"):
        iekd.InheritExplore(create_model("resnet8", 10), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lambda_exp"):
        iekd.InheritExplore(create_model("resnet8", 10), iekd.FactorAutoEncoder(64), lambda_exp=-1.0)
    with pytest.raises(ValueError, match="unknown feature"):
        iekd.FactorReconstruction(create_model("resnet8", 10), layer="layer9")
    with pytest.raises(ValueError, match="threshold"):
        iekd.active_channels(torch.ones(2, 3), threshold=1.5)


def test_exports_exist():
    for name in iekd.__all__:
        assert hasattr(iekd, name), name
