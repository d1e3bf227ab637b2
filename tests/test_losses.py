"""minidistill.losses: soft targets, the KD loss, the CE/KD mix and the two objectives."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import losses as losses_mod
from minidistill.models import create_model
from minidistill.losses import (
    CrossEntropy,
    Distillation,
    check_logits_pair,
    check_temperature,
    distillation_loss,
    kd_loss,
    soft_targets,
)

BAD_TEMPERATURES = [0, 0.0, -1.0, float("inf"), float("nan"), "4", None]
BAD_ALPHAS = [-0.1, 1.01, float("nan"), "0.5", None]


def _logits(n=5, k=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, k, generator=g, dtype=torch.float64)


def _kd_by_hand(z, v, t):
    """T^2 * (1/N) sum_n sum_k p_t log(p_t / p_s), one number at a time."""
    total = 0.0
    for zn, vn in zip(z.tolist(), v.tolist()):
        es = [math.exp(a / t) for a in zn]
        et = [math.exp(a / t) for a in vn]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return t * t * total / len(z)


def test_all_names_exist():
    for name in losses_mod.__all__:
        assert hasattr(losses_mod, name), name


# --- checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.5, 1, 4.0, torch.tensor(2.0), torch.tensor([1.0, 3.0])])
def test_check_temperature_accepts_positive_finite(t):
    check_temperature(t)


@pytest.mark.parametrize("t", BAD_TEMPERATURES + [torch.tensor(0.0), torch.tensor(float("inf")),
                                                  torch.tensor([1.0, -1.0])])
def test_check_temperature_rejects(t):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        check_temperature(t)


@pytest.mark.parametrize("s_shape, t_shape", [((4, 10), (4, 9)), ((4, 10), (5, 10)), ((10,), (10,)),
                                              ((2, 4, 10), (2, 4, 10))])
def test_check_logits_pair_rejects_mismatch(s_shape, t_shape):
    with pytest.raises(ValueError, match=r"student .* and teacher"):
        check_logits_pair(torch.zeros(s_shape), torch.zeros(t_shape))


# --- soft targets ---------------------------------------------------------------------------

def test_soft_targets_is_the_tempered_softmax():
    z = _logits()
    for t in (0.5, 1.0, 4.0):
        p = soft_targets(z, t)
        by_hand = torch.exp(z / t) / torch.exp(z / t).sum(-1, keepdim=True)
        assert torch.allclose(p.double(), by_hand, atol=1e-6)
        assert torch.allclose(p.sum(-1).double(), torch.ones(len(z), dtype=torch.float64), atol=1e-6)
        assert (p > 0).all()


def test_soft_targets_flatten_as_temperature_grows():
    z = _logits()
    spreads = [(soft_targets(z, t).max(-1).values - soft_targets(z, t).min(-1).values).max().item()
               for t in (1, 4, 16, 64, 1e4)]
    assert all(a > b for a, b in zip(spreads, spreads[1:]))
    assert torch.allclose(soft_targets(z, 1e4).double(), torch.full_like(z, 1 / 7), atol=1e-3)


def test_soft_targets_sharpen_to_argmax_as_temperature_shrinks():
    z = _logits()
    p = soft_targets(z, 1e-3)
    assert torch.equal(p.argmax(-1), z.argmax(-1))
    assert (p.max(-1).values > 0.999).all()


def test_soft_targets_keep_ordering_and_accept_1d():
    p = soft_targets(torch.tensor([3.0, 1.0, 2.0]), 2.0)
    assert p.shape == (3,) and p[0] > p[2] > p[1]


@pytest.mark.parametrize("t", BAD_TEMPERATURES)
def test_soft_targets_reject_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        soft_targets(_logits(), t)


# --- kd_loss --------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 10.0])
def test_kd_loss_matches_hand_computation(t):
    z, v = _logits(seed=0), _logits(seed=1)
    loss = kd_loss(z, v, t)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(_kd_by_hand(z, v, t), rel=1e-5)


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    z = _logits()
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z, z + 5.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax is shift-invariant
    assert kd_loss(z, _logits(seed=1), 4.0).item() > 1e-3


def test_kd_loss_is_averaged_over_the_batch_not_summed():
    z, v = _logits(n=3), _logits(n=3, seed=1)
    one = kd_loss(z, v, 2.0)
    doubled = kd_loss(torch.cat([z, z]), torch.cat([v, v]), 2.0)
    assert doubled.item() == pytest.approx(one.item(), rel=1e-6)


@pytest.mark.parametrize("t", [1.0, 4.0, 8.0])
def test_kd_loss_gradient_is_t_times_prob_difference_over_n(t):
    """d/dz [T^2 KL(p_t || p_s)] / N = T^2 * (1/T) (p_s - p_t) / N = T (p_s - p_t) / N."""
    n = 6
    z = _logits(n=n).float().requires_grad_()
    v = _logits(n=n, seed=1).float().requires_grad_()
    kd_loss(z, v, t).backward()
    closed_form = t * (torch.softmax(z.detach().double() / t, -1) - torch.softmax(v.detach().double() / t, -1)) / n
    assert torch.allclose(z.grad.double(), closed_form, atol=1e-6, rtol=1e-4)
    assert v.grad is None  # the teacher is the target: no gradient flows to it


def test_kd_loss_no_gradient_to_teacher_even_when_it_is_a_model_output():
    teacher = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    z = torch.randn(5, 3, requires_grad=True)
    kd_loss(z, teacher(x), 2.0).backward()
    assert teacher.weight.grad is None and z.grad is not None


def test_kd_loss_computes_bf16_logits_in_float32():
    """bf16 logits (autocast) are computed in float32, not in bf16."""
    z, v = _logits().bfloat16(), _logits(seed=1).bfloat16()
    loss = kd_loss(z, v, 4.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_kd_by_hand(z.double(), v.double(), 4.0), rel=1e-4)


@pytest.mark.parametrize("s_shape, t_shape", [((4, 10), (4, 9)), ((4, 10), (5, 10)), ((10,), (10,))])
def test_kd_loss_rejects_shape_mismatch(s_shape, t_shape):
    with pytest.raises(ValueError, match=r"student .* and teacher"):
        kd_loss(torch.zeros(s_shape), torch.zeros(t_shape))


@pytest.mark.parametrize("t", BAD_TEMPERATURES)
def test_kd_loss_rejects_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(_logits(), _logits(seed=1), t)


# --- distillation_loss ----------------------------------------------------------------------

def _targets(n=5, k=7):
    return torch.arange(n) % k


def test_distillation_loss_alpha_zero_is_cross_entropy():
    z, v, y = _logits(), _logits(seed=1), _targets()
    loss = distillation_loss(z, v, y, temperature=4.0, alpha=0.0)
    by_hand = -torch.log_softmax(z, -1)[torch.arange(5), y].mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_distillation_loss_alpha_one_is_kd_loss():
    z, v, y = _logits(), _logits(seed=1), _targets()
    assert distillation_loss(z, v, y, temperature=3.0, alpha=1.0).item() == pytest.approx(
        _kd_by_hand(z, v, 3.0), rel=1e-5)


def test_distillation_loss_mixes_linearly():
    z, v, y = _logits(), _logits(seed=1), _targets()
    ce = F.cross_entropy(z, y).item()
    kd = _kd_by_hand(z, v, 4.0)
    assert distillation_loss(z, v, y, 4.0, 0.3).item() == pytest.approx(0.7 * ce + 0.3 * kd, rel=1e-5)
    assert distillation_loss(z, v, y).item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-5)  # defaults


@pytest.mark.parametrize("alpha", BAD_ALPHAS)
def test_distillation_loss_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\]"):
        distillation_loss(_logits(), _logits(seed=1), _targets(), 4.0, alpha)


@pytest.mark.parametrize("t", BAD_TEMPERATURES)
def test_distillation_loss_rejects_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(_logits(), _logits(seed=1), _targets(), t, 0.5)


def test_distillation_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"student .* and teacher"):
        distillation_loss(_logits(k=7), _logits(k=6), _targets())


@pytest.mark.parametrize("y", [torch.zeros(5), torch.zeros(4, dtype=torch.int64),
                               torch.zeros(5, 1, dtype=torch.int64), torch.zeros(5, dtype=torch.int32)])
def test_distillation_loss_rejects_bad_targets(y):
    with pytest.raises(ValueError, match="targets must be int64"):
        distillation_loss(_logits(), _logits(seed=1), y)


# --- objectives -----------------------------------------------------------------------------

def _linear_net(seed, k=4, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(12, k))


def test_cross_entropy_objective_returns_loss_and_logits():
    model = _linear_net(0)
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0, 1])
    loss, logits, terms = CrossEntropy()(model, x, y)
    assert terms == {}
    assert torch.equal(logits, model(x))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    smooth, _, _ = CrossEntropy(label_smoothing=0.2)(model, x, y)
    assert smooth.item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.2).item(), rel=1e-6)
    assert smooth.item() != pytest.approx(loss.item())


@pytest.mark.parametrize("ls", [-0.1, 1.0, 1.5])
def test_cross_entropy_rejects_bad_label_smoothing(ls):
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(ls)


def test_distillation_objective_freezes_teacher_in_eval_mode():
    teacher = _linear_net(1, dropout=0.5).train()
    obj = Distillation(teacher, temperature=2.0, alpha=0.7)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    obj.train()
    assert obj.training and not teacher.training  # .train() on the objective keeps the teacher in eval


def test_distillation_objective_computes_distillation_loss():
    teacher, student = _linear_net(1, dropout=0.5), _linear_net(2)
    obj = Distillation(teacher, temperature=2.0, alpha=0.7).train()
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0, 1])
    loss, logits, terms = obj(student, x, y)
    with torch.no_grad():
        t_logits = teacher(x)  # eval mode: dropout off, so this is what the objective saw
    assert torch.equal(logits, student(x))
    assert loss.item() == pytest.approx(distillation_loss(logits, t_logits, y, 2.0, 0.7).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(kd_loss(logits, t_logits, 2.0).item(), rel=1e-6)
    assert not terms["kd"].requires_grad
    loss.backward()
    assert student[2].weight.grad is not None
    assert teacher[2].weight.grad is None


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=float("nan")),
                                    dict(alpha=1.5), dict(alpha=-0.5)])
def test_distillation_objective_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        Distillation(_linear_net(0), **kwargs)


# --- inputs that look wrong ------------------------------------------------------------------

def test_kd_loss_warns_when_given_probabilities_and_not_for_logits():
    z, v = _logits(seed=1), _logits(seed=2)
    with pytest.warns(UserWarning, match="teacher_logits look like probabilities"):
        kd_loss(z, torch.softmax(v, -1), 4.0)
    with pytest.warns(UserWarning, match="student_logits look like probabilities"):
        kd_loss(torch.softmax(z, -1), v, 4.0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kd_loss(z, v, 4.0)                                   # ordinary logits: silent
        kd_loss(z, torch.softmax(v, -1), 4.0, check_inputs=False)
        kd_loss(z.abs() / 100, v, 4.0)                       # in [0, 1] but rows do not sum to 1


def test_kd_and_distillation_loss_reject_an_empty_batch():
    empty = torch.zeros(0, 5)
    with pytest.raises(ValueError, match="empty batch"):
        kd_loss(empty, empty)
    with pytest.raises(ValueError, match="empty batch"):
        distillation_loss(empty, empty, torch.zeros(0, dtype=torch.int64))


# --- the objective base classes and the feature objective ------------------------------------

def test_objective_progress_and_setup_default():
    obj = losses_mod.Objective()
    assert (obj.epoch, obj.step, obj.progress) == (0, 0, 0.0)
    obj.step, obj.total_steps = 5, 20
    assert obj.progress == 0.25
    obj.setup(nn.Linear(2, 2), torch.zeros(2, 2), device=torch.device("cpu"))  # does nothing


def test_teacher_objective_freezes_and_runs_the_teacher_without_gradients():
    teacher = _linear_net(1, dropout=0.5).train()
    obj = losses_mod.TeacherObjective(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    obj.train()
    assert not teacher.training
    x = torch.randn(3, 3, 2, 2)
    out = obj.teacher_forward(x)
    assert not out.requires_grad and torch.equal(out, teacher(x))
    # on the CPU without mixed precision, setup keeps the teacher itself (no copy)
    obj.setup(nn.Linear(1, 1), x, device=torch.device("cpu"), dtype=None)
    assert obj._fast[0] is teacher
    with pytest.raises(TypeError, match="teacher"):
        losses_mod.TeacherObjective("resnet8")


def test_feature_regressor_maps_to_the_teacher_shape():
    for s_shape, t_shape in (((4, 8, 8), (6, 4, 4)), ((4, 4, 4), (6, 8, 8)), ((4, 8, 8), (6, 8, 8))):
        r = losses_mod.FeatureRegressor(s_shape, t_shape)
        assert r(torch.randn(2, *s_shape)).shape == (2, *t_shape)
    with pytest.raises(ValueError, match="student_shape"):
        losses_mod.FeatureRegressor((4, 8), (6, 4, 4))


def test_feature_regressor_relu_like_repdistillers_convreg():
    torch.manual_seed(0)
    plain, relu = losses_mod.FeatureRegressor((4, 8, 8), (6, 8, 8)), losses_mod.FeatureRegressor((4, 8, 8), (6, 8, 8), relu=True)
    relu.load_state_dict(plain.state_dict())        # same conv and BatchNorm: the ReLU is the only difference
    f = torch.randn(3, 4, 8, 8)
    assert (plain(f) < 0).any()
    torch.testing.assert_close(relu(f), plain(f).clamp_min(0))
    teacher = create_model("resnet8", 10)
    obj = losses_mod.FeatureDistillation(teacher, regressor_relu=True)
    obj.setup(create_model("resnet8", 10), torch.randn(2, 3, 16, 16), device=torch.device("cpu"))
    assert isinstance(obj.regressor.proj[-1], torch.nn.ReLU)
    with pytest.raises(ValueError, match="regressor_relu"):
        losses_mod.FeatureDistillation(teacher, regressor_relu="yes")


@pytest.mark.parametrize("kwargs, match", [(dict(layers="layer2"), "layers"), (dict(weight=-1.0), "weight"),
                                           (dict(temperature=0.0), "temperature"), (dict(alpha=2.0), "alpha")])
def test_feature_distillation_rejects_bad_arguments(kwargs, match):
    from minidistill.models import create_model
    with pytest.raises(ValueError, match=match):
        losses_mod.FeatureDistillation(create_model("resnet8", 10), **kwargs)


def test_feature_distillation_trains_the_student_and_regressor_only():
    """Through fit: the regressor is built from the real shapes (16x16 images: the teacher's
    layer2 map is 8x8), trained with the student; the teacher is untouched; the loss is the
    documented sum of its three logged terms."""
    from minidistill.data import make_shapes
    from minidistill.models import create_model, feature_extractor
    from minidistill.train import Recipe, fit
    from minidistill.runtime import seed_everything

    data = make_shapes(n_train=256, n_test=64)
    seed_everything(0)
    teacher, student = create_model("resnet14", 10), create_model("resnet8", 10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    obj = losses_mod.FeatureDistillation(teacher, ("layer2", "layer3"), weight=5.0, temperature=2.0, alpha=0.5)
    h = fit(student, data, obj, Recipe(epochs=1, batch_size=64), device="cpu")
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert obj.regressor is not None and tuple(obj.regressor.size) == (4, 4)
    assert {"train_ce", "train_kd", "train_hint"} <= set(h.records[0])
    # one step by hand equals the objective's loss
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    obj.eval(), student.eval()
    loss, logits, terms = obj(student, x, y)
    with torch.no_grad():
        f_s = feature_extractor(student, ["layer2"])(x)["layer2"]
        f_t = feature_extractor(teacher, ["layer3"])(x)["layer3"]
        hint = F.mse_loss(obj.regressor(f_s), f_t)
        expected = distillation_loss(student(x), teacher(x), y, 2.0, 0.5) + 5.0 * hint
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["hint"].item() == pytest.approx(hint.item(), rel=1e-5)
