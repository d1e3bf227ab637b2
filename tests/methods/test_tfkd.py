"""Chapter 2 (Tf-KD): the LSR/KD identities, the exact virtual-teacher values, the official
regulariser against a hand computation, bad inputs, the training recipes and the self-checks."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import train
from minidistill.exercises import tfkd as tfkd_exercises
from minidistill.losses import Objective, distillation_loss
from minidistill.models import create_model
from minidistill.methods import tfkd, tfkd_plots
from minidistill.train import Recipe

G = torch.Generator().manual_seed(0)
Z = torch.randn(6, 10, generator=G, dtype=torch.float64) * 2
Y = torch.tensor([0, 3, 9, 3, 5, 1])


def H(a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy -sum_k a_k log b_k."""
    return -(a * log_b).sum(-1).mean()


# -- targets -----------------------------------------------------------------------------------

def test_label_smoothing_targets_values_and_torch_agreement():
    t = tfkd.label_smoothing_targets(Y, 10, 0.1)
    assert t.shape == (6, 10) and torch.allclose(t.sum(-1), torch.ones(6))
    assert t[0, 0].item() == pytest.approx(0.91) and t[0, 1].item() == pytest.approx(0.01)
    # F.cross_entropy's label_smoothing uses the same target
    want = F.cross_entropy(Z, Y, label_smoothing=0.1)
    assert torch.allclose(H(t.double(), F.log_softmax(Z, -1)), want)
    assert torch.equal(tfkd.label_smoothing_targets(Y, 10, 0.0), F.one_hot(Y, 10).float())
    assert torch.allclose(tfkd.label_smoothing_targets(Y, 10, 1.0), torch.full((6, 10), 0.1))


def test_virtual_teacher_exact_values():
    p = tfkd.virtual_teacher(torch.tensor([2, 0]), 5, 0.6)
    assert torch.allclose(p, torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]]))
    p = tfkd.virtual_teacher(torch.tensor([7]), 100, 0.99)
    assert p[0, 7].item() == pytest.approx(0.99)
    assert p[0, 0].item() == pytest.approx(0.01 / 99) and torch.allclose(p.sum(-1), torch.ones(1))
    assert torch.equal(tfkd.virtual_teacher(Y, 10, 1.0), F.one_hot(Y, 10).float())


def test_tempered_virtual_teacher_values_for_cifar100():
    y = torch.tensor([0])
    for tau, want in ((10.0, 0.01103), (20.0, 0.01050), (40.0, 0.01025)):
        p = tfkd.tempered_virtual_teacher(y, 100, 0.99, tau)[0]
        assert p[0].item() == pytest.approx(want, abs=5e-6)
        assert p[1].item() == pytest.approx((1 - p[0].item()) / 99) and round(p[1].item(), 5) in (0.00999, 0.01)
    # probabilities used as logits differ by at most 1: within e^{1/tau} of uniform at any tau >= 1
    p = tfkd.tempered_virtual_teacher(y, 100, 0.99, 1.0)[0]
    assert (p.max() / p.min()).item() <= math.e
    assert p[0].item() == pytest.approx(0.02646, abs=5e-5)


def test_virtual_teachers_in_float64():
    p = tfkd.virtual_teacher(torch.tensor([1]), 100, 0.99, dtype=torch.float64)
    assert p.dtype == torch.float64 and p[0, 1].item() == 0.99 and p[0, 0].item() == (1 - 0.99) / 99
    t = tfkd.tempered_virtual_teacher(torch.tensor([1]), 100, 0.99, 20.0, dtype=torch.float64)
    pd = torch.full((1, 100), (1 - 0.99) / 99, dtype=torch.float64)
    pd[0, 1] = 0.99
    assert t.dtype == torch.float64 and torch.allclose(t, torch.softmax(pd / 20.0, -1), rtol=1e-14, atol=0)
    # the float32 default differs from it at float32's precision, not at float64's
    t32 = tfkd.tempered_virtual_teacher(torch.tensor([1]), 100, 0.99, 20.0)
    assert t32.dtype == torch.float32 and torch.allclose(t32.double(), t, rtol=1e-6)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        tfkd.virtual_teacher(Y, 10, 0.9, dtype=torch.int64)
    with pytest.raises(ValueError, match="dtype"):
        tfkd.tempered_virtual_teacher(Y, 10, 0.9, 2.0, dtype="float64")


def test_targets_reject_bad_inputs():
    with pytest.raises(ValueError, match=r"correct_prob must be a number in \(0, 1\]"):
        tfkd.virtual_teacher(Y, 10, 0.0)
    with pytest.raises(ValueError, match="correct_prob"):
        tfkd.virtual_teacher(Y, 10, 1.5)
    with pytest.raises(ValueError, match="correct_prob"):
        tfkd.virtual_teacher(Y, 10, True)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 9\]"):
        tfkd.virtual_teacher(torch.tensor([0, 10]), 10, 0.9)
    with pytest.raises(ValueError, match="targets must lie"):
        tfkd.label_smoothing_targets(torch.tensor([-1]), 10, 0.1)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 99\]"):
        tfkd.tempered_virtual_teacher(torch.tensor([100]), 100, 0.99, 20.0)
    with pytest.raises(ValueError, match="1-D int64"):
        tfkd.virtual_teacher(Y.float(), 10, 0.9)
    with pytest.raises(ValueError, match="1-D int64"):
        tfkd.virtual_teacher(Y.view(2, 3), 10, 0.9)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        tfkd.virtual_teacher(Y, 1, 0.9)
    with pytest.raises(ValueError, match=r"epsilon must be a number in \[0, 1\]"):
        tfkd.label_smoothing_targets(Y, 10, -0.1)
    with pytest.raises(ValueError, match="temperature"):
        tfkd.tempered_virtual_teacher(Y, 10, 0.9, 0.0)


# -- the identities of the derivation -------------------------------------------------------------

def test_lsr_loss_is_cross_entropy_plus_kl_to_uniform():
    a, k = 0.2, 10
    log_p = F.log_softmax(Z, -1)
    q, u = F.one_hot(Y, k).double(), torch.full((6, k), 1 / k, dtype=torch.float64)
    lhs = H(tfkd.label_smoothing_targets(Y, k, a).double(), log_p)
    kl_u = F.kl_div(log_p, u, reduction="batchmean")
    assert torch.allclose(lhs, (1 - a) * H(q, log_p) + a * (kl_u + math.log(k)))
    assert not torch.allclose(lhs, (1 - a) * H(q, log_p) + a * kl_u)  # H(u) = log K matters for the value


def test_kd_at_tau_one_is_cross_entropy_to_a_learned_smoothed_label():
    a = 0.3
    v = torch.randn(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = Z.clone().requires_grad_(True)
    kd = distillation_loss(z, v, Y, temperature=1.0, alpha=a)
    pt = torch.softmax(v, -1)
    mixed = (1 - a) * F.one_hot(Y, 10).double() + a * pt
    entropy = -(pt * pt.log()).sum(-1).mean()
    ce_mixed = H(mixed, F.log_softmax(z, -1))
    assert torch.allclose(kd, ce_mixed - a * entropy)
    g1, = torch.autograd.grad(kd, z)
    g2, = torch.autograd.grad(ce_mixed, z)
    assert torch.allclose(g1, g2)


def test_lsr_is_kd_with_a_uniform_teacher():
    a, k = 0.1, 10
    uniform_teacher = torch.zeros(6, k, dtype=torch.float64)  # equal logits: softmax is u
    kd = distillation_loss(Z, uniform_teacher, Y, temperature=1.0, alpha=a)
    lsr = F.cross_entropy(Z, Y, label_smoothing=a)
    assert torch.allclose(kd, lsr - a * math.log(k))


def test_kl_to_uniform_closed_form_and_high_temperature_limit():
    kl1 = tfkd.kl_to_uniform(Z, 1.0)
    p = torch.softmax(Z, -1)
    assert torch.allclose(kl1, (p * (p * 10).log()).sum(-1))
    assert kl1.dtype == torch.float64 and (kl1 > 0).all()
    var = Z.var(-1, unbiased=False)
    kl = [tfkd.kl_to_uniform(Z, t) for t in (10.0, 100.0, 1000.0)]
    assert (kl[0] > kl[1]).all() and (kl[1] > kl[2]).all()
    assert torch.allclose(kl[2] * 1000.0**2, var / 2, rtol=1e-2)
    assert not torch.allclose(kl[0] * 10.0**2, var / 2, rtol=1e-2)  # not yet at tau = 10
    with pytest.raises(ValueError, match="logits must be a float tensor"):
        tfkd.kl_to_uniform(Y, 1.0)


# -- the official regulariser ------------------------------------------------------------------

def official_tfkd_reg(z, y, alpha, temperature, multiplier, correct_prob=0.99):
    """The reference code's expression (my_loss_function.loss_kd_regularization), by hand."""
    k = z.shape[1]
    teacher = torch.full_like(z, (1 - correct_prob) / (k - 1))
    teacher[torch.arange(len(y)), y] = correct_prob
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.KLDivLoss()'s 'mean' warns that it is not 'batchmean'
        soft = nn.KLDivLoss()(F.log_softmax(z, dim=1), F.softmax(teacher / temperature, dim=1)) * multiplier
    return (1.0 - alpha) * F.cross_entropy(z, y) + alpha * soft


@pytest.mark.parametrize("name", sorted(tfkd.OFFICIAL_CONFIGS))
def test_tfkd_reg_loss_reproduces_the_official_code(name):
    c = tfkd.OFFICIAL_CONFIGS[name]
    z = torch.randn(8, 100, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    y = torch.randint(0, 100, (8,), generator=torch.Generator().manual_seed(3))
    w = tfkd.official_kl_weight(c["alpha"], c["multiplier"], 100)
    ours = tfkd.tfkd_reg_loss(z, y, 0.99, c["temperature"], c["alpha"], w)
    assert torch.allclose(ours, official_tfkd_reg(z, y, c["alpha"], c["temperature"], c["multiplier"]))
    # forgetting the 1/K of nn.KLDivLoss()'s mean would not match
    wrong = tfkd.tfkd_reg_loss(z, y, 0.99, c["temperature"], c["alpha"], c["alpha"] * c["multiplier"])
    assert not torch.allclose(wrong, ours)


def test_tfkd_reg_loss_by_hand_and_the_paper_form():
    z = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    t = torch.softmax(torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64) / 2.0, -1)
    p = torch.softmax(z, -1)
    want = 0.7 * -p[0, 0].log() + 0.5 * (t * (t.log() - p.log())).sum()
    got = tfkd.tfkd_reg_loss(z, y, correct_prob=0.9, temperature=2.0, alpha=0.3, kl_weight=0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    p2 = torch.softmax(z / 2.0, -1)  # the paper's form tempers the student too
    want2 = 0.7 * -p[0, 0].log() + 0.5 * (t * (t.log() - p2.log())).sum()
    got2 = tfkd.tfkd_reg_loss(z, y, 0.9, 2.0, 0.3, 0.5, form="paper")
    assert got2.item() == pytest.approx(want2.item(), rel=1e-12)
    assert got.item() != pytest.approx(got2.item())


def test_tfkd_reg_loss_low_precision_and_gradient():
    z = Z.float().to(torch.bfloat16).requires_grad_(True)
    loss = tfkd.tfkd_reg_loss(z, Y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad.float()).all()


def test_tfkd_reg_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"student_logits must be a float tensor \[N, K\]"):
        tfkd.tfkd_reg_loss(Z[0], Y[:1])
    with pytest.raises(ValueError, match="student_logits"):
        tfkd.tfkd_reg_loss(Y.view(2, 3), Y[:2])
    with pytest.raises(ValueError, match="targets has 5 entries but the logits have 6 rows"):
        tfkd.tfkd_reg_loss(Z, Y[:5])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 9\]"):
        tfkd.tfkd_reg_loss(Z, torch.tensor([0, 1, 2, 3, 4, 10]))
    with pytest.raises(ValueError, match="correct_prob"):
        tfkd.tfkd_reg_loss(Z, Y, correct_prob=1.01)
    with pytest.raises(ValueError, match="correct_prob"):
        tfkd.tfkd_reg_loss(Z, Y, correct_prob=-0.5)
    with pytest.raises(ValueError, match="temperature"):
        tfkd.tfkd_reg_loss(Z, Y, temperature=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        tfkd.tfkd_reg_loss(Z, Y, alpha=1.5)
    with pytest.raises(ValueError, match="kl_weight"):
        tfkd.tfkd_reg_loss(Z, Y, kl_weight=-0.1)
    with pytest.raises(ValueError, match="kl_weight"):
        tfkd.tfkd_reg_loss(Z, Y, kl_weight=float("inf"))
    with pytest.raises(ValueError, match="form must be one of"):
        tfkd.tfkd_reg_loss(Z, Y, form="papers")


def official_kd(z, v, y, alpha, temperature, multiplier=None):
    """The reference code's loss_kd (multiplier None) and loss_kd_self, by hand."""
    t = temperature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d_kl = nn.KLDivLoss()(F.log_softmax(z / t, dim=1), F.softmax(v / t, dim=1)) * (t * t)
    if multiplier is not None:
        d_kl = d_kl * multiplier
    return (1.0 - alpha) * F.cross_entropy(z, y) + alpha * d_kl


@pytest.mark.parametrize("name", sorted(tfkd.OFFICIAL_KD_CONFIGS))
def test_official_kd_losses_are_ce_plus_w_times_kd_loss(name):
    from minidistill.losses import kd_loss

    c = tfkd.OFFICIAL_KD_CONFIGS[name]
    g = torch.Generator().manual_seed(7)
    z = torch.randn(8, 100, generator=g, dtype=torch.float64)
    v = torch.randn(8, 100, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 100, (8,), generator=g)
    want = official_kd(z, v, y, c["alpha"], c["temperature"], c["multiplier"] if c["kind"] == "self" else None)
    w = tfkd.official_kl_weight(c["alpha"], c["multiplier"], 100)
    got = (1 - c["alpha"]) * F.cross_entropy(z, y) + w * kd_loss(z, v, c["temperature"])
    assert torch.allclose(got, want, rtol=1e-10)
    # Hinton's weighting (alpha on a batch-mean L_KD) is another loss unless the multiplier equals K
    same = c["multiplier"] == 100
    assert torch.allclose(distillation_loss(z, v, y, c["temperature"], c["alpha"]), want, rtol=1e-3) == same


def test_official_kd_configs_are_well_formed():
    assert {c["kind"] for c in tfkd.OFFICIAL_KD_CONFIGS.values()} == {"normal", "self"}
    for c in tfkd.OFFICIAL_KD_CONFIGS.values():
        assert set(c) == {"kind", "alpha", "temperature", "multiplier"} and 0 < c["alpha"] < 1
        assert c["kind"] == "self" or c["multiplier"] == 1.0  # loss_kd has no multiplier


def test_official_kl_weight():
    assert tfkd.official_kl_weight(0.1, 100, 100) == pytest.approx(0.1)
    assert tfkd.official_kl_weight(0.95, 1, 100) == pytest.approx(0.0095)
    assert tfkd.official_kl_weight(0.1, 100, 10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="multiplier"):
        tfkd.official_kl_weight(0.1, -1, 100)
    with pytest.raises(ValueError, match="num_classes"):
        tfkd.official_kl_weight(0.1, 1, 0)


def test_tfkd_reg_is_label_smoothing_with_scale_and_epsilon():
    k, a, tau, alpha, w = 10, 0.99, 20.0, 0.3, 0.4
    info = tfkd.tfkd_reg_as_lsr(k, a, tau, alpha, w)
    assert info["scale"] == pytest.approx(1 - alpha + w) and info["epsilon"] == pytest.approx(w / (1 - alpha + w))
    assert info["target_correct"] + (k - 1) * info["target_other"] == pytest.approx(1.0)
    z = Z.clone().requires_grad_(True)
    t = tfkd.tempered_virtual_teacher(Y, k, a, tau).double()
    q_eff = (1 - info["epsilon"]) * F.one_hot(Y, k).double() + info["epsilon"] * t
    assert torch.allclose(q_eff[0, 0], torch.tensor(info["target_correct"], dtype=torch.float64))
    g_reg, = torch.autograd.grad(tfkd.tfkd_reg_loss(z, Y, a, tau, alpha, w), z)
    g_lsr, = torch.autograd.grad(info["scale"] * H(q_eff, F.log_softmax(z, -1)), z)
    assert torch.allclose(g_reg, g_lsr)
    # the official ResNet18 run is label smoothing with epsilon 0.1, to four decimals
    r18 = tfkd.OFFICIAL_CONFIGS["ResNet18"]
    info = tfkd.tfkd_reg_as_lsr(100, 0.99, r18["temperature"], r18["alpha"],
                                tfkd.official_kl_weight(r18["alpha"], r18["multiplier"], 100))
    assert info["scale"] == pytest.approx(1.0) and info["epsilon"] == pytest.approx(0.1)
    assert info["target_correct"] == pytest.approx(0.90105, abs=1e-5)
    with pytest.raises(ValueError, match="no loss"):
        tfkd.tfkd_reg_as_lsr(10, alpha=1.0, kl_weight=0.0)


# -- objectives and training -------------------------------------------------------------------

def test_every_public_name_resolves_and_moved_names_are_re_exported():
    for name in tfkd.__all__:
        assert hasattr(tfkd, name), name
    for module in (tfkd_plots, tfkd_exercises):
        for name in module.__all__:
            assert name in tfkd.__all__ and getattr(tfkd, name) is getattr(module, name), name
    assert tfkd.train_model is train.train_model  # a re-export, not a copy of it


def test_regularization_objective_returns_the_loss_its_logits_and_named_terms():
    obj = tfkd.TfKDRegularization(0.9, 4.0, 0.2, 0.5)
    assert isinstance(obj, Objective)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10)).double()
    x = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss, logits, terms = obj(model, x, Y)
    assert torch.equal(logits, model(x))
    assert torch.allclose(loss, tfkd.tfkd_reg_loss(model(x), Y, 0.9, 4.0, 0.2, 0.5))
    assert set(terms) == {"ce", "reg"} and all(t.ndim == 0 and not t.requires_grad for t in terms.values())
    # the terms are unweighted: ce is the plain cross-entropy, reg the batch-mean KL to softmax(p^d / tau)
    assert torch.allclose(terms["ce"], F.cross_entropy(model(x), Y))
    target = tfkd.tempered_virtual_teacher(Y, 10, 0.9, 4.0).double()
    assert torch.allclose(terms["reg"], F.kl_div(F.log_softmax(model(x), -1), target, reduction="batchmean"))
    assert torch.allclose(loss, 0.8 * terms["ce"] + 0.5 * terms["reg"])
    assert "form='code'" in repr(obj)
    assert not list(obj.parameters()) and not list(obj.buffers())  # nothing to train, nothing in the checkpoint
    with pytest.raises(ValueError, match="correct_prob"):
        tfkd.TfKDRegularization(correct_prob=0.0)
    with pytest.raises(ValueError, match="form"):
        tfkd.TfKDRegularization(form="torch")


@pytest.mark.parametrize("labels, shown", [([0, 3, 9, 3, 5, 10], "from 0 to 10"), ([0, -1, 9, 3, 5, 1], "from -1 to 9"),
                                            ([0, 3, 99, 3, 5, 1], "from 0 to 99")])
def test_regularization_objective_rejects_labels_outside_the_classes(labels, shown):
    """Labels outside [0, K) get a ValueError that names the argument, not an index error from scatter_."""
    obj = tfkd.TfKDRegularization()
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    x = torch.randn(6, 3, 2, 2)
    with pytest.raises(ValueError, match=r"y \(the labels\) must lie in \[0, 9\] for 10 classes, got values " + shown):
        obj(model, x, torch.tensor(labels))


def test_regularization_objective_checks_labels_on_later_cpu_steps_and_their_type():
    obj = tfkd.TfKDRegularization()
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    x = torch.randn(6, 3, 2, 2)
    obj.step = 7  # as fit sets it after a few steps: on the CPU the check still runs
    with pytest.raises(ValueError, match=r"y \(the labels\) must lie"):
        obj(model, x, torch.tensor([0, 1, 2, 3, 4, 12]))
    with pytest.raises(ValueError, match=r"y \(the labels\) must be a 1-D int64 tensor"):
        obj(model, x, torch.tensor([0.0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match=r"y \(the labels\) has 5 entries but the logits have 6 rows"):
        obj(model, x, torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="the model's output must be a float tensor"):
        obj(nn.Flatten(0), x, torch.tensor([0, 1, 2, 3, 4, 5]))
    loss, _, _ = obj(model, x, torch.tensor([0, 1, 2, 3, 4, 9]))  # the right labels still pass
    assert torch.isfinite(loss)


def test_regularization_objective_on_an_accelerator_checks_the_first_step_only(monkeypatch):
    """Reading label values on a GPU makes the host wait: off the CPU, only step 0 is checked.
    (The 'meta' device stands in for an accelerator: tensors without values, no host copy.)"""
    calls = []
    monkeypatch.setattr(tfkd, "_check_targets", lambda *a, **k: calls.append(1))
    obj = tfkd.TfKDRegularization()
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10)).to("meta")
    x, y = torch.empty(6, 3, 2, 2, device="meta"), torch.empty(6, dtype=torch.int64, device="meta")
    obj(model, x, y)
    assert len(calls) == 1
    obj.step = 1
    loss, _, _ = obj(model, x, y)
    assert len(calls) == 1 and loss.device.type == "meta"
    obj(model.to_empty(device="cpu"), torch.randn(6, 3, 2, 2), Y)  # on the CPU every step is checked
    assert len(calls) == 2


def test_regularization_objective_paper_form_tempers_the_student():
    obj = tfkd.TfKDRegularization(0.9, 4.0, 0.2, 0.5, form="paper")
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10)).double()
    x = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    loss, _, terms = obj(model, x, Y)
    assert torch.allclose(loss, tfkd.tfkd_reg_loss(model(x), Y, 0.9, 4.0, 0.2, 0.5, form="paper"))
    target = tfkd.tempered_virtual_teacher(Y, 10, 0.9, 4.0).double()
    assert torch.allclose(terms["reg"], F.kl_div(F.log_softmax(model(x) / 4.0, -1), target, reduction="batchmean"))


def test_train_model_shares_initial_weights_across_objectives_and_logs_the_terms(tiny, monkeypatch):
    seen = []
    real_fit = train.fit

    def spy(model, data, objective, recipe, **kw):
        seen.append(({k: v.clone() for k, v in model.state_dict().items()}, objective))
        return real_fit(model, data, objective, recipe, **kw)

    monkeypatch.setattr(train, "fit", spy)
    recipe = Recipe(epochs=2, batch_size=128, lr=0.05)
    _, h1 = tfkd.train_model("resnet8", tiny, recipe, seed=5)
    obj = tfkd.TfKDRegularization()
    run = tfkd.train_model("resnet8", tiny, recipe, obj, seed=5, eval_every=None)
    assert isinstance(run, train.Run)
    model, h2 = run  # unpacks like the old (model, history) tuple
    (w1, o1), (w2, o2) = seen
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert o1 is None and o2 is obj
    assert len(h2) == 2 and h1.meta["objective"] == "CrossEntropy" and h2.meta["objective"] == "TfKDRegularization"
    assert {"train_ce", "train_reg"} <= set(h2.records[0]) and "train_reg" not in h1.records[0]
    assert all(r["train_loss"] == pytest.approx(0.9 * r["train_ce"] + 0.1 * r["train_reg"], rel=1e-4)
               for r in h2.records)
    assert math.isnan(h2["test_acc"][0]) and not math.isnan(h2.final("test_acc"))  # eval_every reached fit
    assert not math.isnan(h1["test_acc"][0])
    assert not model.training


def test_tfkd_self_trains_a_teacher_then_a_fresh_student(tiny):
    recipe = Recipe(epochs=1, batch_size=128, lr=0.05)
    out = tfkd.tfkd_self("resnet8", tiny, recipe, seed=1, temperature=2.0, alpha=0.5)
    assert out.teacher_history is not None and len(out.history) == 1
    assert out.history.meta["objective"] == "Distillation" and "train_kd" in out.history.records[0]
    assert not any(p.requires_grad for p in out.teacher.parameters()) and not out.teacher.training
    assert out.student is not out.teacher
    # the student started from the same seed but learned with another loss: different weights
    assert any(not torch.equal(a, b) for a, b in zip(out.student.state_dict().values(),
                                                     out.teacher.state_dict().values()))


def test_tfkd_self_with_a_given_teacher_leaves_it_untouched(tiny):
    recipe = Recipe(epochs=2, batch_size=256, lr=0.05)
    teacher = create_model("resnet8", tiny.num_classes)  # any network of the right shape will do here
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = tfkd.tfkd_self("resnet8", tiny, recipe, seed=2, teacher=teacher, eval_every=None)
    assert out.teacher_history is None and out.teacher is not teacher
    assert math.isnan(out.history["test_acc"][0]) and not math.isnan(out.history.final("test_acc"))  # fit got eval_every
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's model is not frozen


# -- figures -----------------------------------------------------------------------------------

def test_plot_distributions_labels_and_checks():
    fig = tfkd.plot_distributions({"a": torch.tensor([0.5, 0.5]), "b": [0.9, 0.1]}, ["x", "y"], title="T")
    ax = fig.axes[0]
    assert ax.get_title() == "T" and ax.get_xlabel() == "class" and ax.get_ylabel() == "probability"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    assert len(ax.patches) == 4
    with pytest.raises(ValueError, match="same length"):
        tfkd.plot_distributions({"a": [0.5, 0.5], "b": [1.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="class_names has 3 names for 2 classes"):
        tfkd.plot_distributions({"a": [0.5, 0.5]}, ["x", "y", "z"])
    with pytest.raises(ValueError, match="empty"):
        tfkd.plot_distributions({})


def test_plot_tfkd_targets_draws_the_five_targets():
    fig = tfkd.plot_tfkd_targets(100, 0.99, 20.0)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "K = 100" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 5 and any("label smoothing" in s for s in labels) and any("uniform" in s for s in labels)
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 10
    assert heights[0] == pytest.approx(0.99) and heights[2] == pytest.approx(0.010502, abs=1e-6)


# -- self-checks --------------------------------------------------------------------------------

def test_check_virtual_teacher_accepts_right_and_catches_classic_mistakes(capsys):
    tfkd.check_virtual_teacher(tfkd.virtual_teacher)
    assert "✓" in capsys.readouterr().out

    def over_k(y, k, a):  # shares 1-a among all K classes
        return torch.full((len(y), k), (1 - a) / k).scatter(1, y[:, None], a)

    def lsr_proper(y, k, a):
        return tfkd.label_smoothing_targets(y, k, 1 - a)

    def fixed_column(y, k, a):  # a always in column 0
        return tfkd.virtual_teacher(torch.zeros_like(y), k, a)

    with pytest.raises(AssertionError, match=r"\(1-a\)/\(K-1\)"):
        tfkd.check_virtual_teacher(over_k)
    with pytest.raises(AssertionError, match="label smoothing"):
        tfkd.check_virtual_teacher(lsr_proper)
    with pytest.raises(AssertionError, match="own label"):
        tfkd.check_virtual_teacher(fixed_column)
    with pytest.raises(AssertionError, match="shape"):
        tfkd.check_virtual_teacher(lambda y, k, a: tfkd.virtual_teacher(y, k, a)[0])


def test_check_tau_effect(capsys):
    ex = tfkd_exercises.TAU_EXERCISE
    y = torch.zeros(1, dtype=torch.int64)
    right = tuple(tfkd.tempered_virtual_teacher(y, ex["num_classes"], ex["correct_prob"], t)[0, 0].item()
                  for t in ex["temperatures"])
    assert right == pytest.approx((0.2128, 0.1172), abs=2e-4)
    for answer in (right, list(right), (0.213, 0.117)):
        tfkd.check_tau_effect(answer)
    out = capsys.readouterr().out
    assert out.count("✓") == 3 and "2.13× uniform" in out and "1.17× uniform" in out
    with pytest.raises(AssertionError, match="as if they were logits"):
        tfkd.check_tau_effect((0.9, 0.5))
    with pytest.raises(AssertionError, match="log-probabilities"):
        tfkd.check_tau_effect((0.9, 0.2111))      # softmax(log p^d / T): the proper tempering
    with pytest.raises(AssertionError, match="printed in the chapter"):
        tfkd.check_tau_effect((0.0265, 0.0105))   # K = 100, a = 0.99, copied from above
    with pytest.raises(AssertionError, match="direction"):
        tfkd.check_tau_effect((0.1172, 0.2128))
    with pytest.raises(AssertionError, match="in value"):
        tfkd.check_tau_effect((0.1, 0.1))
    with pytest.raises(AssertionError, match="pair"):
        tfkd.check_tau_effect(0.02)
    with pytest.raises(AssertionError, match="pair"):
        tfkd.check_tau_effect((True, 0.1))


def test_checks_report_unattempted_exercises(capsys):
    def todo(*args):
        raise NotImplementedError

    tfkd.check_virtual_teacher(todo)
    tfkd.check_tau_effect(...)
    assert capsys.readouterr().out.count("not attempted yet") == 2


def test_plot_tfkd_targets_draws_into_a_given_axis_without_resizing_its_figure():
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3))
    out = tfkd.plot_tfkd_targets(10, 0.9, 2.0, ax=a2)
    assert out is fig and tuple(fig.get_size_inches()) == (9, 3)
    assert len(a2.patches) == 10 and not a1.patches and "K = 10" in a2.get_title()
