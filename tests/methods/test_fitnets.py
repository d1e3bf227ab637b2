"""Chapter 3 (FitNets): the regressor, the hint loss, the stage-2 KD loss and its schedule,
the two-stage trainer, multiplication counts, the figures and the exercises' self-checks."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill.losses import FeatureDistillation, FeatureRegressor, kd_loss, soft_targets
from minidistill import train
from minidistill.exercises import fitnets as fitnets_exercises
from minidistill.methods import fitnets, fitnets_plots
from minidistill.methods.fitnets import HintObjective, HintRegressor, FitNetsKD
from minidistill.models import PlainCNN, create_model, feature_extractor
from minidistill.runtime import seed_everything
from minidistill.train import Recipe, TrainingDiverged, fit

from _core_helpers import assert_state_equal, state_equal


def test_all_names_exist():
    for name in fitnets.__all__:
        assert hasattr(fitnets, name), name


def test_figures_and_checks_are_re_exported_from_the_method_module():
    for module in (fitnets_plots, fitnets_exercises):
        for name in module.__all__:
            assert name in fitnets.__all__ and getattr(fitnets, name) is getattr(module, name), name


def _student(depth: int = 7, widths=(4, 8, 8), seed: int = 0) -> PlainCNN:
    seed_everything(seed)
    return PlainCNN(depth, widths, 10)


def _teacher(seed: int = 1) -> nn.Module:
    seed_everything(seed)
    return create_model("resnet8", 10).eval()


def _small_teacher(seed: int = 1) -> nn.Module:
    """A cheap stand-in teacher for the training tests (wider than the students, same stages)."""
    seed_everything(seed)
    return PlainCNN(4, (8, 8, 16), 10).eval()


@pytest.fixture(scope="module")
def small(tiny):
    """256 training images of the tiny set: the training tests check plumbing, not accuracy."""
    return dataclasses.replace(tiny, x_train=tiny.x_train[:256], y_train=tiny.y_train[:256])


# -- the regressor ---------------------------------------------------------------------------

@pytest.mark.parametrize("g, h, k", [(32, 16, (17, 17)), (16, 16, (1, 1)), ((20, 12), (8, 8), (13, 5)), (9, 1, (9, 9))])
def test_kernel_size_is_guided_minus_hint_plus_one(g, h, k):
    assert fitnets.regressor_kernel_size(g, h) == k


@pytest.mark.parametrize("g, h", [(8, 16), ((16, 8), (8, 16)), ((16, 16), (17, 4))])
def test_kernel_size_rejects_a_larger_teacher_map(g, h):
    with pytest.raises(ValueError, match="larger than the student's guided map"):
        fitnets.regressor_kernel_size(g, h)


@pytest.mark.parametrize("bad", [0, -3, 2.5, (4,), (4, 4, 4), "16", True])
def test_kernel_size_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="student_size"):
        fitnets.regressor_kernel_size(bad, 4)


@pytest.mark.parametrize("c_s, c_t, s, t", [(8, 20, 16, 8), (32, 16, (12, 10), (4, 6)), (5, 7, None, None), (3, 3, 6, 6)])
def test_regressor_maps_guided_shape_to_hint_shape(c_s, c_t, s, t):
    reg = HintRegressor(c_s, c_t, s, t)
    size = (9, 11) if s is None else ((s, s) if isinstance(s, int) else s)
    out = reg(torch.randn(2, c_s, *size))
    want = size if t is None else ((t, t) if isinstance(t, int) else t)
    assert out.shape == (2, c_t, *want)
    assert (out >= 0).all()  # ReLU, like the hint layer


def test_linear_regressor_can_go_negative_and_relu_cannot():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5)
    assert (HintRegressor(6, 4, 5, 3, activation=None)(x) < 0).any()
    assert (HintRegressor(6, 4, 5, 3)(x) >= 0).all()


def test_regressor_rejects_features_of_the_wrong_shape():
    reg = HintRegressor(8, 16, 16, 8)
    with pytest.raises(ValueError, match=r"expects guided features \[N, 8, 16, 16\], got \(2, 4, 16, 16\)"):
        reg(torch.randn(2, 4, 16, 16))
    with pytest.raises(ValueError, match="expects guided features"):
        reg(torch.randn(2, 8, 12, 12))
    with pytest.raises(ValueError, match="expects guided features"):
        HintRegressor(8, 16)(torch.randn(2, 8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(student_channels=0, teacher_channels=4), "student_channels"),
    (dict(student_channels=4, teacher_channels=2.0), "teacher_channels"),
    (dict(student_channels=4, teacher_channels=4, student_size=8), "both"),
    (dict(student_channels=4, teacher_channels=4, student_size=4, teacher_size=8), "larger"),
    (dict(student_channels=4, teacher_channels=4, activation="tanh"), "activation"),
])
def test_regressor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HintRegressor(**kwargs)


def test_regressor_from_models_reads_the_shapes_off_the_models():
    student, teacher = _student(widths=(4, 6, 8)), _teacher()
    student.train()
    reg = HintRegressor.from_models(student, "layer1", teacher, "layer2", (3, 16, 16))
    assert reg.conv.in_channels == 4 and reg.conv.out_channels == 32   # resnet8's layer2 has 32 channels
    assert reg.conv.kernel_size == (9, 9)                              # 16x16 guided -> 8x8 hint
    assert student.training and not teacher.training                   # modes are restored
    same = HintRegressor.from_models(student, "layer2", teacher, "layer2", (3, 32, 32))
    assert same.conv.kernel_size == (1, 1) and same.conv.in_channels == 6
    with pytest.raises(ValueError, match="larger than the student's"):
        HintRegressor.from_models(student, "layer3", teacher, "layer2", (3, 32, 32))
    with pytest.raises(ValueError, match="convolutional maps"):
        HintRegressor.from_models(student, "pool", teacher, "layer2", (3, 32, 32))


def test_regressor_parameters_by_hand():
    counts = fitnets.regressor_parameters((32, 16, 16), (128, 16, 16))
    assert counts == {"fully_connected": 16 * 16 * 32 * 16 * 16 * 128, "convolutional": 32 * 128, "kernel": (1, 1)}
    counts = fitnets.regressor_parameters((16, 32, 32), (128, 16, 16))
    assert counts["convolutional"] == 17 * 17 * 16 * 128 == 591872
    assert counts["fully_connected"] == 32 * 32 * 16 * 16 * 16 * 128
    # the count is the real layer's weight count
    assert HintRegressor(16, 128, 32, 16).conv.weight.numel() == counts["convolutional"]
    with pytest.raises(ValueError, match="channels, height, width"):
        fitnets.regressor_parameters((16, 32), (128, 16, 16))


# -- the hint loss ---------------------------------------------------------------------------

def test_hint_loss_by_hand():
    r = torch.zeros(2, 1, 1, 2)
    u = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])
    # per example 0.5 * (1 + 4) = 2.5 and 0.5 * (9 + 16) = 12.5; batch mean 7.5
    assert fitnets.hint_loss(r, u).item() == 7.5
    assert fitnets.hint_loss(u, u).item() == 0.0


def test_hint_loss_gradient_is_residual_over_batch_and_teacher_gets_none():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fitnets.hint_loss(r, u).backward()
    assert torch.allclose(r.grad, (r - u).detach() / 4)
    assert u.grad is None


def test_hint_loss_is_float32_under_half_precision():
    r, u = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    out = fitnets.hint_loss(r, u)
    assert out.dtype == torch.float32
    assert torch.allclose(out, fitnets.hint_loss(r.float(), u.float()))


@pytest.mark.parametrize("shape_r, shape_u", [((2, 3, 4, 4), (2, 3, 2, 2)), ((2, 3, 4, 4), (2, 4, 4, 4)), ((5,), (5,))])
def test_hint_loss_rejects_shapes_that_cannot_match(shape_r, shape_u):
    with pytest.raises(ValueError, match="HintRegressor"):
        fitnets.hint_loss(torch.zeros(shape_r), torch.zeros(shape_u))


# -- the stage-2 KD loss and its schedule ----------------------------------------------------

def test_fitnets_kd_loss_by_hand_has_no_tau_squared():
    g = torch.Generator().manual_seed(3)
    z, v = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    tau, lam = 3.0, 4.0
    p = torch.exp(v / tau) / torch.exp(v / tau).sum(1, keepdim=True)
    q = torch.exp(z / tau) / torch.exp(z / tau).sum(1, keepdim=True)
    ce = -torch.log(torch.exp(z) / torch.exp(z).sum(1, keepdim=True))[torch.arange(5), y].mean()
    want = ce + lam * (-(p * q.log()).sum(1).mean())
    assert torch.allclose(fitnets.fitnets_kd_loss(z, v, y, tau, lam), want)
    assert torch.allclose(fitnets.fitnets_kd_loss(z, v, y, tau, 0.0), F.cross_entropy(z, y))


def test_soft_term_gradient_is_q_minus_p_over_tau_and_hinton_is_tau_squared_larger():
    g = torch.Generator().manual_seed(4)
    z, v = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (6,), generator=g)
    zz = z.clone().requires_grad_(True)
    soft = fitnets.fitnets_kd_loss(zz, v, y, 3.0, 1.0) - F.cross_entropy(zz, y)
    (grad,) = torch.autograd.grad(soft, zz)
    assert torch.allclose(grad, (soft_targets(z, 3.0) - soft_targets(v, 3.0)) / 3.0 / 6)
    b = fitnets.soft_term_balance(z, v, y, [1.0, 3.0, 8.0])
    assert b["temperature"] == [1.0, 3.0, 8.0]
    for t, f, h in zip(b["temperature"], b["fitnets"], b["hinton"]):
        assert h == pytest.approx(f * t**2)
    assert b["fitnets"][2] < b["fitnets"][1]  # without tau^2 the soft term fades at high tau


@pytest.mark.parametrize("lam, t", [(2.5, 3.0), (4.0, 3.0), (1.0, 8.0), (0.0, 2.0)])
def test_equivalent_alpha_gives_hintons_loss_the_same_gradient_up_to_one_minus_alpha(lam, t):
    g = torch.Generator().manual_seed(7)
    z0 = torch.randn(6, 10, generator=g, dtype=torch.float64) * 2
    v = torch.randn(6, 10, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, 10, (6,), generator=g)
    alpha = fitnets.equivalent_alpha(lam, t)
    z = z0.clone().requires_grad_(True)
    (g_fitnets,) = torch.autograd.grad(fitnets.fitnets_kd_loss(z, v, y, t, lam), z)
    z = z0.clone().requires_grad_(True)
    (g_hinton,) = torch.autograd.grad((1 - alpha) * F.cross_entropy(z, y) + alpha * kd_loss(z, v, t), z)
    assert torch.allclose(g_hinton, (1 - alpha) * g_fitnets, rtol=1e-10, atol=1e-14)
    assert fitnets.equivalent_alpha(2.5, 3.0) == pytest.approx(2.5 / 11.5)


def test_equivalent_alpha_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kd_weight"):
        fitnets.equivalent_alpha(-1.0, 3.0)
    with pytest.raises(ValueError, match="temperature"):
        fitnets.equivalent_alpha(1.0, 0.0)


def test_fitnets_kd_loss_rejects_bad_input():
    z, y = torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="same shape"):
        fitnets.fitnets_kd_loss(z, torch.zeros(3, 5), y)
    with pytest.raises(ValueError, match="temperature"):
        fitnets.fitnets_kd_loss(z, z, y, temperature=0.0)
    with pytest.raises(ValueError, match="kd_weight"):
        fitnets.fitnets_kd_loss(z, z, y, kd_weight=-1.0)
    with pytest.raises(ValueError, match="targets"):
        fitnets.fitnets_kd_loss(z, z, y.float())


def test_kd_weight_follows_the_official_schedule():
    step = 3.0 / 396  # (4 - 1) / (400 - 5 + 1)
    assert fitnets.kd_weight(0) == 4.0 and fitnets.kd_weight(4) == 4.0
    assert fitnets.kd_weight(5) == pytest.approx(4.0 - step)
    assert fitnets.kd_weight(399) == pytest.approx(4.0 - 395 * step)
    assert fitnets.kd_weight(400) == 1.0 and fitnets.kd_weight(1000) == 1.0
    assert fitnets.kd_weight(288) == pytest.approx(1.848, abs=1e-3)  # where the 288-epoch CIFAR runs stop
    values = [fitnets.kd_weight(e) for e in range(410)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    # MNIST: towards 0 by epoch 150, never below
    assert fitnets.kd_weight(150, final=0.0, saturate=150) == 0.0
    assert fitnets.kd_weight(10, initial=1.0, final=-5.0, start=0, saturate=2) == 0.0


def test_kd_weight_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epoch"):
        fitnets.kd_weight(-1)
    with pytest.raises(ValueError, match="start < saturate"):
        fitnets.kd_weight(3, start=10, saturate=10)


def _as_fit_would(obj: FitNetsKD, epoch: int, steps_per_epoch: int, epochs: int, step_in_epoch: int = 0) -> None:
    obj.epoch, obj.steps_per_epoch, obj.total_steps = epoch, steps_per_epoch, steps_per_epoch * epochs
    obj.step = epoch * steps_per_epoch + step_in_epoch


def test_fitnets_kd_objective_reads_the_epoch_fit_sets_and_decays_from_4_to_1():
    teacher = _teacher()
    obj = FitNetsKD(teacher)  # the decay compressed into whatever run fit reports
    obj.train()
    assert not obj.teacher.training and not any(p.requires_grad for p in obj.teacher.parameters())
    weights = []
    for epoch in range(5):
        for step in range(3):
            _as_fit_would(obj, epoch, steps_per_epoch=3, epochs=5, step_in_epoch=step)
            weights.append(obj.weight)
    assert weights[::3] == pytest.approx([4.0, 3.25, 2.5, 1.75, 1.0])
    assert weights[0] == weights[1] == weights[2]  # once per epoch
    explicit = FitNetsKD(teacher, start=1, saturate=4, initial=2.0, final=0.5)
    _as_fit_would(explicit, 2, steps_per_epoch=3, epochs=50)  # explicit epochs do not depend on the run's length
    # fit's epoch 2 (from 0) is the third epoch: kd_weight counts from 1, as the official code does
    assert explicit.weight == pytest.approx(fitnets.kd_weight(3, initial=2.0, final=0.5, start=1, saturate=4))
    with pytest.raises(ValueError, match="both start and saturate"):
        FitNetsKD(teacher, start=1)
    with pytest.raises(ValueError, match="temperature"):
        FitNetsKD(teacher, temperature=0.0)


def test_fitnets_kd_objective_returns_logits_and_its_terms():
    teacher, student = _teacher(), _student(widths=(4, 4, 4))
    obj = FitNetsKD(teacher, temperature=2.0).train()
    _as_fit_would(obj, 1, steps_per_epoch=2, epochs=3)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    loss, logits, terms = obj(student, x, y)
    assert set(terms) == {"ce", "kd", "weight"} and terms["weight"].item() == obj.weight == 2.5
    with torch.no_grad():
        z, v = student(x), teacher(x)
    assert torch.allclose(logits.detach(), z)
    assert torch.allclose(loss.detach(), fitnets.fitnets_kd_loss(z, v, y, 2.0, 2.5))
    assert torch.allclose(terms["ce"], F.cross_entropy(z, y))
    assert torch.allclose(terms["kd"], fitnets.fitnets_kd_loss(z, v, y, 2.0, 1.0) - F.cross_entropy(z, y))
    assert not any(t.requires_grad for t in terms.values())


class _OfficialDecay:
    """The official ``TeacherDecayOverEpoch`` driven the way pylearn2's ``Train.main_loop``
    drives its extensions: ``setup`` (count = epochs seen = 0), ``on_monitor`` once before the
    first epoch, then once after every epoch. A transcription of the official code, written
    independently of :func:`fitnets.kd_weight`."""

    def __init__(self, start, saturate, final_wteach, wteach):
        self.start, self.saturate, self.final, self.wteach = start, saturate, final_wteach, wteach
        self.init, self.step = wteach, (wteach - final_wteach) / (saturate - start + 1)
        self.count = 0

    def current(self):
        if self.count >= self.start:
            w = self.init - self.step * (self.count - self.start + 1) if self.count < self.saturate else self.final
        else:
            w = self.init
        return max(w, 0)

    def weights_during_epochs(self, epochs):
        self.wteach = self.current()          # setup()
        self.count += 1                       # on_monitor() before the first epoch
        self.wteach = self.current()
        seen = []
        for _ in range(epochs):
            seen.append(self.wteach)          # the epoch trains with this weight
            self.count += 1                   # on_monitor() after the epoch
            self.wteach = self.current()
        return seen


@pytest.mark.parametrize("start, saturate, final", [(5, 400, 1.0), (5, 9, 1.0), (2, 6, 0.0), (1, 3, 0.5)])
def test_fitnets_kd_uses_the_official_weight_in_every_epoch(start, saturate, final):
    official = _OfficialDecay(start, saturate, final, 4.0).weights_during_epochs(12)
    obj = FitNetsKD(_teacher(), start=start, saturate=saturate, final=final)
    ours = []
    for epoch in range(12):                   # fit's epochs count from 0
        _as_fit_would(obj, epoch, steps_per_epoch=2, epochs=12)
        ours.append(obj.weight)
    assert ours == pytest.approx(official)
    if start == 5:
        assert ours[3] == 4.0 and ours[4] < 4.0  # the decay reaches the fifth epoch, not the sixth


class _Interrupted(Exception):
    pass


class _StoppableKD(FitNetsKD):
    """FitNetsKD that raises at the start of epoch ``stop_at`` (a run killed mid-way)."""

    stop_at: int | None = None

    def forward(self, model, x, y):
        if self.training and self.epoch == self.stop_at:
            raise _Interrupted
        return super().forward(model, x, y)


def test_fitnets_kd_schedule_continues_when_a_run_is_resumed(small, tmp_path):
    recipe = Recipe(epochs=4, batch_size=128, lr=0.05)
    teacher = _small_teacher()

    def run(stop_at=None, checkpoint=None):
        obj = _StoppableKD(teacher)
        obj.stop_at = stop_at
        student = _student(depth=4, widths=(4, 4, 4), seed=3)
        history = fit(student, small, obj, recipe, seed=3, checkpoint=checkpoint, eval_every=None, progress=False)
        return student, history, obj

    whole, whole_history, _ = run()
    path = tmp_path / "kd.pt"
    with pytest.raises(_Interrupted):
        run(stop_at=2, checkpoint=path)                   # killed after two epochs
    resumed, history, obj = run(checkpoint=path)          # a fresh objective, resumed from the file
    assert len(history) == 4 and obj.epoch == 3
    assert history["train_weight"] == pytest.approx([4.0, 3.0, 2.0, 1.0]) == whole_history["train_weight"]
    assert obj.weight == 1.0                             # a private step counter would restart: 3.0 here
    assert_state_equal(resumed, whole)                    # so the weights match the uninterrupted run


# -- feature access and stage 1 --------------------------------------------------------------

def test_feature_shape_takes_the_image_shape():
    student = _student(widths=(4, 6, 8))
    assert fitnets.feature_shape(student, "layer2", (3, 24, 20)) == (6, 12, 10)
    assert fitnets.feature_shape(student, "layer1", (3, 32, 32)) == (4, 32, 32)
    with pytest.raises(TypeError):
        fitnets.feature_shape(student, "layer1")  # no silent 32x32 default


def test_student_trunk_shares_parameters_and_stops_at_the_guided_layer():
    student = _student().eval()
    trunk = fitnets.student_trunk(student, "layer2")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(trunk(x), feature_extractor(student, ["layer2"])(x)["layer2"])
    trunk_ids = {id(p) for p in trunk.parameters()}
    assert trunk_ids <= {id(p) for p in student.parameters()}
    assert not trunk_ids & {id(p) for p in (*student.layer3.parameters(), *student.fc.parameters())}
    assert trunk_ids == {id(p) for m in (student.stem, student.layer1, student.layer2) for p in m.parameters()}
    nested = fitnets.student_trunk(student, "layer1.0")
    assert {id(p) for p in nested.parameters()} == {id(p) for m in (student.stem, student.layer1) for p in m.parameters()}
    with pytest.raises(ValueError, match="unknown feature name"):
        fitnets.student_trunk(student, "layer9")


def test_student_trunk_follows_train_and_eval_mode():
    student = _student()
    trunk = fitnets.student_trunk(student, "layer2")
    trunk.train()
    assert student.layer2.training and student.stem.training
    trunk.eval()
    assert not student.layer2.training and not student.layer1.training


def test_hint_objective_has_no_logits_logs_the_hint_and_ignores_labels():
    teacher, student = _small_teacher(), _student(widths=(4, 6, 8))
    reg = HintRegressor.from_models(student, "layer2", teacher, "layer2", (3, 16, 16))
    trunk = fitnets.student_trunk(student, "layer2")
    x = torch.randn(3, 3, 16, 16)
    obj = HintObjective(teacher, "layer2", reg)
    loss, logits, terms = obj(trunk, x, torch.zeros(3, dtype=torch.int64))
    loss2, _, _ = obj(trunk, x, torch.full((3,), 7))
    with torch.no_grad():
        target = feature_extractor(teacher, ["layer2"])(x)["layer2"]
    raw = fitnets.hint_loss(reg(trunk(x)), target)
    assert torch.allclose(loss, raw / target[0].numel()) and torch.equal(loss, loss2)
    assert logits is None and set(terms) == {"hint"} and torch.allclose(terms["hint"], raw)
    assert not terms["hint"].requires_grad
    assert torch.allclose(HintObjective(teacher, "layer2", reg, normalize=False)(trunk, x, None)[0], raw)
    assert [n for n, _ in obj.named_children()] == ["teacher", "regressor"]  # the teacher is registered once


def test_stage_1_updates_only_the_trunk_and_the_regressor(small):
    teacher, student = _small_teacher(), _student(widths=(4, 6, 8))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = {k: v.clone() for k, v in student.state_dict().items()}
    reg = HintRegressor.from_models(student, "layer2", teacher, "layer2", (3, 16, 16))
    reg_before = reg.conv.weight.detach().clone()
    hist = fit(fitnets.student_trunk(student, "layer2"), small, HintObjective(teacher, "layer2", reg),
               Recipe(epochs=1, batch_size=128, lr=0.05), progress=False, eval_splits=())
    after = student.state_dict()
    trunk_keys = [k for k in before if k.split(".")[0] in ("stem", "layer1", "layer2")]
    rest_keys = [k for k in before if k not in trunk_keys]
    assert rest_keys and all(k.startswith(("layer3", "fc")) for k in rest_keys)
    assert all(torch.equal(before[k], after[k]) for k in rest_keys)        # weights and BN statistics
    changed = [k for k in trunk_keys if not torch.equal(before[k], after[k])]
    assert set(changed) == set(trunk_keys)                                 # every trunk tensor moved
    assert state_equal(teacher, teacher_before)                            # the teacher never moves
    assert not torch.equal(reg.conv.weight.detach(), reg_before)
    record = hist.records[0]
    assert "test_acc" not in record and "train_acc" not in record          # nothing scored, no fake accuracy
    assert record["train_hint"] > record["train_loss"] > 0                 # the paper's sum, and per feature


def test_train_fitnet_runs_both_stages_and_leaves_the_teacher_alone(small):
    teacher, student = _small_teacher(), _student(widths=(4, 6, 8))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    fc_before = student.fc.weight.detach().clone()
    run = fitnets.train_fitnet(student, teacher, small, hint_recipe=Recipe(epochs=2, batch_size=128, lr=0.05),
                               recipe=Recipe(epochs=1, batch_size=128, lr=0.05), progress=False)
    assert run.student is student and isinstance(run.regressor, HintRegressor)
    assert len(run.hint_history) == 2 and "train_acc" not in run.hint_history.records[0]
    assert run.hint_history.meta["stage"] == "hints" and run.history.meta["stage"] == "kd"
    assert run.history.meta["objective"] == "FitNetsKD" and 0 <= run.history.final("test_acc") <= 100
    assert {"train_ce", "train_kd", "train_weight", "train_acc"} <= set(run.history.records[0])
    assert not torch.equal(student.fc.weight.detach(), fc_before)  # stage 2 trains the whole student
    assert state_equal(teacher, teacher_before)


def test_train_fitnet_sizes_the_regressor_for_the_data_and_checkpoints_both_stages(small, tmp_path):
    teacher, student = _small_teacher(), _student(widths=(4, 6, 8))
    path = tmp_path / "fitnet.pt"
    run = fitnets.train_fitnet(student, teacher, small, guided="layer1", hint_recipe=Recipe(epochs=1, batch_size=256),
                               recipe=Recipe(epochs=1, batch_size=256), checkpoint=path, progress=False)
    assert run.regressor.conv.kernel_size == (9, 9)  # 16x16 images: a 16x16 guided map onto an 8x8 hint
    assert path.exists() and (tmp_path / "fitnet-hints.pt").exists()


def test_train_student_gives_every_method_the_same_start(small, monkeypatch):
    seen = []
    real_fit = train.fit

    def spy(model, data, objective, recipe, **kw):
        seen.append((type(objective).__name__, {k: v.clone() for k, v in model.state_dict().items()}))
        return real_fit(model, data, objective, recipe, **kw)

    monkeypatch.setattr(train, "fit", spy)     # what train_model calls
    monkeypatch.setattr(fitnets, "fit", spy)   # what train_fitnet calls
    teacher, recipe = _small_teacher(), Recipe(epochs=1, batch_size=128, lr=0.05)
    runs = {m: fitnets.train_student(m, lambda: PlainCNN(4, (4, 4, 4), 10), teacher, small, recipe=recipe,
                                     hint_recipe=recipe, seed=5, progress=False) for m in fitnets.METHODS}
    names = [n for n, _ in seen]
    assert names == ["NoneType", "FitNetsKD", "HintObjective", "FitNetsKD", "FeatureDistillation"]
    w_alone, w_kd, w_hint, w_one = seen[0][1], seen[1][1], seen[2][1], seen[4][1]
    assert all(torch.equal(w_alone[k], w_kd[k]) and torch.equal(w_alone[k], w_one[k]) for k in w_alone)
    assert all(torch.equal(w_alone[k], w_hint[f"stages.{k}"]) for k in w_alone if k.startswith("stem"))
    assert runs["alone"].regressor is None and runs["FitNet"].hint_history is not None


def test_one_stage_trains_hint_and_kd_together_with_fitnets_balance(small):
    teacher, recipe = _small_teacher(), Recipe(epochs=2, batch_size=128, lr=0.05)
    made = []

    def make():
        made.append(PlainCNN(4, (4, 4, 4), 10))
        return made[-1]

    run = fitnets.train_student("one-stage", make, teacher, small, recipe=recipe, progress=False)
    assert run.student is made[0] and run.hint_history is None and run.history.meta["objective"] == "FeatureDistillation"
    assert isinstance(run.regressor, FeatureRegressor) and not run.regressor.training
    assert {"train_ce", "train_kd", "train_hint", "train_acc"} <= set(run.history.records[0])
    assert len(run.history) == 2 and 0 <= run.history.final("test_acc") <= 100
    # the objective the method builds: the guided and hint layers, beta, T and the lambda-matched alpha
    seen = {}
    real = fitnets.FeatureDistillation

    class Spy(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.update(layers=self.layers, weight=self.weight, temperature=self.temperature, alpha=self.alpha)

    try:
        fitnets.FeatureDistillation = Spy
        fitnets.train_student("one-stage", make, teacher, small, recipe=Recipe(epochs=1, batch_size=256),
                              guided="layer1", hint="layer2", progress=False)
        assert seen == dict(layers=("layer1", "layer2"), weight=100.0, temperature=3.0, alpha=pytest.approx(2.5 / 11.5))
        fitnets.train_student("one-stage", make, teacher, small, recipe=Recipe(epochs=1, batch_size=256),
                              hint_weight=5.0, alpha=0.9, temperature=4.0, progress=False)
        assert seen["weight"] == 5.0 and seen["alpha"] == 0.9 and seen["temperature"] == 4.0
    finally:
        fitnets.FeatureDistillation = real
    assert FeatureDistillation is real


def test_train_student_passes_eval_every_on(small):
    run = fitnets.train_student("KD", lambda: PlainCNN(4, (4, 4, 4), 10), _small_teacher(), small,
                                recipe=Recipe(epochs=2, batch_size=256), eval_every=None, progress=False)
    assert math.isnan(run.history["test_acc"][0]) and not math.isnan(run.history.final("test_acc"))


def test_train_student_reports_divergence_instead_of_crashing(small):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 10)

        def forward(self, x):
            return self.fc(x.mean((2, 3))) * float("nan")

    run = fitnets.train_student("alone", Broken, None, small, recipe=Recipe(epochs=1, batch_size=128), progress=False)
    assert "diverged" in run.history.meta and math.isnan(run.history.final("test_acc"))
    assert isinstance(run.student, Broken) and not run.student.training
    with pytest.raises(TrainingDiverged):
        fitnets.train_student("alone", Broken, None, small, recipe=Recipe(epochs=1, batch_size=128),
                              catch_divergence=False, progress=False)


def test_train_student_rejects_bad_methods(tiny):
    r = Recipe(epochs=1)
    with pytest.raises(ValueError, match="method must be one of 'alone', 'KD', 'FitNet', 'one-stage'"):
        fitnets.train_student("hints", lambda: None, None, tiny, recipe=r)
    with pytest.raises(ValueError, match="needs a teacher"):
        fitnets.train_student("one-stage", lambda: None, None, tiny, recipe=r)
    with pytest.raises(ValueError, match="needs a teacher"):
        fitnets.train_student("KD", lambda: None, None, tiny, recipe=r)
    with pytest.raises(ValueError, match="hint_recipe"):
        fitnets.train_student("FitNet", lambda: None, _teacher(), tiny, recipe=r)


# -- multiplications -------------------------------------------------------------------------

def test_multiplications_by_hand_for_a_tiny_net():
    # 4x4 input, one channel everywhere: stem 16*9*3, layer1 16*9, layer2 (2x2) 4*9, layer3 (1x1) 9, fc 10
    assert fitnets.plain_cnn_multiplications(4, (1, 1, 1), image_size=4) == 432 + 144 + 36 + 9 + 10


@pytest.mark.parametrize("depth, widths, size", [(4, (5, 7, 9), 32), (7, (16, 32, 64), 32), (11, (8, 8, 16), 16), (13, (3, 6, 12), 32)])
def test_closed_form_multiplications_match_the_flop_counter(depth, widths, size):
    net = PlainCNN(depth, widths, 10, batch_norm=depth % 2 == 0)
    assert fitnets.count_multiplications(net, (3, size, size)) == fitnets.plain_cnn_multiplications(depth, widths, size)


def test_width_for_budget_is_the_closest_width():
    budget = fitnets.plain_cnn_multiplications(13, (16, 32, 64))
    assert fitnets.width_for_budget(13, budget) == 16
    for depth in (4, 7, 19):
        w = fitnets.width_for_budget(depth, budget)
        gap = abs(fitnets.plain_cnn_multiplications(depth, (w, 2 * w, 4 * w)) - budget)
        for other in (w - 1, w + 1):
            assert gap <= abs(fitnets.plain_cnn_multiplications(depth, (other, 2 * other, 4 * other)) - budget)
    with pytest.raises(ValueError, match="budget"):
        fitnets.width_for_budget(7, 0)


# -- figures and map comparisons -------------------------------------------------------------

def test_channel_maps():
    f = torch.randn(3, 5, 4, 4)
    m = fitnets.channel_maps(f)
    assert m.shape == (3, 4, 4) and m.min() >= 0 and m.max() <= 1
    assert torch.allclose(m.flatten(1).amax(1), torch.ones(3)) and torch.allclose(m.flatten(1).amin(1), torch.zeros(3))
    assert torch.equal(fitnets.channel_maps(torch.ones(1, 2, 3, 3)), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        fitnets.channel_maps(torch.zeros(3, 4))


def test_hint_r2_is_one_for_a_linear_hint_and_near_zero_for_noise():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20, 5, 4, 4, generator=g)
    w = torch.randn(3, 5, generator=g)
    u = torch.einsum("nchw,tc->nthw", v, w) + 1.5
    assert fitnets.hint_r2(v, u) == pytest.approx(1.0, abs=1e-6)
    noise = fitnets.hint_r2(v, torch.randn(20, 3, 4, 4, generator=g))
    assert -0.2 < noise < 0.1
    assert noise < fitnets.hint_r2(v, torch.relu(u)) < 1.0
    with pytest.raises(ValueError, match="same N, H, W"):
        fitnets.hint_r2(v, u[:, :, :2])
    with pytest.raises(ValueError, match="holdout"):
        fitnets.hint_r2(v, u, holdout=1.0)


def test_short_schedule_runs_from_initial_to_final():
    weights = [fitnets.kd_weight(e, **fitnets.short_schedule(5)) for e in range(1, 6)]  # epochs 1..5
    assert weights == pytest.approx([4.0, 3.25, 2.5, 1.75, 1.0])
    assert [fitnets.kd_weight(e, **fitnets.short_schedule(3)) for e in (1, 2, 3)] == pytest.approx([4.0, 2.5, 1.0])
    assert [fitnets.kd_weight(e, **fitnets.short_schedule(2)) for e in (1, 2)] == pytest.approx([4.0, 2.5])
    assert fitnets.kd_weight(1, **fitnets.short_schedule(1)) == 4.0
    with pytest.raises(ValueError, match="epochs"):
        fitnets.short_schedule(0)


def test_conv_layers_lists_the_main_path():
    assert [c for _, c in fitnets.conv_layers(PlainCNN(7, (4, 6, 8), 10))] == [4, 4, 4, 6, 6, 8, 8]
    layers = fitnets.conv_layers(create_model("resnet8", 10))
    assert [c for _, c in layers] == [16, 16, 16, 32, 32, 64, 64]
    assert not any("shortcut" in name for name, _ in layers) and layers[0][0] == "stem.0"


def test_plot_hint_diagram_and_plot_budget_are_labelled():
    fig = fitnets.plot_hint_diagram([32, 64, 128], [8, 8, 16, 16, 32], hint=1, guided=3, title="d")
    ax = fig.axes[0]
    assert ax.get_title() == "d" and len(ax.get_legend().get_texts()) == 3
    with pytest.raises(ValueError, match="guided"):
        fitnets.plot_hint_diagram([32, 64], [8, 16], hint=0, guided=2)
    fig = fitnets.plot_budget([4, 7, 13], {"alone": [80.0, 81.0, float("nan")], "KD": [81.0, 82.0, 83.0]}, 26_000_000)
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and "26M" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["alone", "KD"]
    with pytest.raises(ValueError, match="one accuracy per depth"):
        fitnets.plot_budget([4, 7], {"alone": [80.0]}, 1)


def _history(epochs, acc=None, loss=None, stage=None):
    records = []
    for e in range(1, epochs + 1):
        r = {"epoch": e, "train_loss": (loss or (lambda e: 1.0 / e))(e)}
        if acc is not None:
            r["test_acc"] = acc(e)
        records.append(r)
    return train.History(records, {"stage": stage} if stage else {})


def test_plot_training_shifts_second_stages_and_uses_integer_epoch_ticks():
    hints = [_history(3, stage="hints"), _history(3, loss=lambda e: 2.0 / e)]
    curves = {"alone": [_history(4, acc=lambda e: 10.0 * e)] * 2,
              "KD, equal compute": [_history(7, acc=lambda e: 9.0 * e)],
              "FitNet": [_history(4, acc=lambda e: float("nan") if e == 2 else 11.0 * e)]}
    fig = fitnets.plot_training(hints, curves, offsets={"FitNet": 3}, title="t")
    left, right = fig.axes
    assert left.get_xlabel() == "stage-1 epoch" and left.lines[0].get_xdata().tolist() == [1, 2, 3]
    assert left.lines[0].get_ydata().tolist() == pytest.approx([1.5, 0.75, 0.5])  # mean of the two runs
    xs = {line.get_label().split(" (")[0]: line.get_xdata().tolist() for line in right.lines if line.get_label()[0] != "_"}
    assert xs == {"alone": [1, 2, 3, 4], "KD, equal compute": [1, 2, 3, 4, 5, 6, 7], "FitNet": [4, 6, 7]}  # NaN skipped
    assert "stage 1 counted" in right.get_xlabel() and right.get_ylabel() == "test accuracy (%)"
    for ax in (left, right):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert fig._suptitle.get_text() == "t"


def test_plot_training_leaves_out_a_one_epoch_stage_1_and_checks_its_input():
    fig = fitnets.plot_training([_history(1)], {"alone": [_history(3, acc=lambda e: 50.0)]})
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "epoch"   # no one-point stage-1 curve
    with pytest.raises(ValueError, match="offsets name labels"):
        fitnets.plot_training([], {"alone": [_history(3, acc=lambda e: 50.0)]}, offsets={"FitNet": 2})
    with pytest.raises(ValueError, match="at least one History"):
        fitnets.plot_training([], {"alone": []})


def test_plot_kd_balance_is_labelled():
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g) * 4
    fig = fitnets.plot_kd_balance(z, v, torch.randint(0, 10, (8,), generator=g), weight=4.0, temperature=3.0)
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and "4" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("FitNets" in t for t in labels) and any("Hinton" in t for t in labels)
    assert len(ax.lines) == 4


def test_plot_hint_maps_has_a_row_per_entry():
    imgs = torch.rand(3, 3, 8, 8)
    fig = fitnets.plot_hint_maps(imgs, {"teacher": torch.rand(3, 4, 4, 4), "student": torch.rand(3, 2, 4, 4)}, title="t")
    assert len(fig.axes) == 9 and fig.axes[3].get_ylabel() == "teacher" and fig._suptitle.get_text() == "t"
    with pytest.raises(ValueError, match="one per image"):
        fitnets.plot_hint_maps(imgs, {"teacher": torch.rand(2, 4, 4, 4)})


# -- exercises' self-checks ------------------------------------------------------------------

def test_check_kernel_size(capsys):
    fitnets.check_kernel_size(lambda g, h: fitnets.regressor_kernel_size(g, h)[0])
    fitnets.check_kernel_size(fitnets.regressor_kernel_size)  # (k, k) is accepted too
    assert capsys.readouterr().out.count("✓") == 2

    def no_error(g, h):
        return g - h + 1

    with pytest.raises(AssertionError, match="sign"):
        fitnets.check_kernel_size(lambda g, h: h - g + 1)
    with pytest.raises(AssertionError, match="off by one"):
        fitnets.check_kernel_size(lambda g, h: g - h)
    with pytest.raises(AssertionError, match="raise ValueError"):
        fitnets.check_kernel_size(no_error)
    with pytest.raises(AssertionError, match="kernel is"):
        fitnets.check_kernel_size(lambda g, h: 3)


def test_check_hint_loss(capsys):
    fitnets.check_hint_loss(fitnets.hint_loss)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="that is F.mse_loss, which averages over the features"):
        fitnets.check_hint_loss(lambda r, u: F.mse_loss(r, u))
    with pytest.raises(AssertionError, match=r"that is 0.5 \* F.mse_loss: the per-feature loss that stage 1 minimises"):
        fitnets.check_hint_loss(lambda r, u: 0.5 * F.mse_loss(r, u))
    fitnets.check_hint_loss(lambda r, u: 0.5 * F.mse_loss(r, u, reduction="sum") / len(r))  # another correct form
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="1/2"):
        fitnets.check_hint_loss(lambda r, u: (u - r).pow(2).flatten(1).sum(1).mean())
    with pytest.raises(AssertionError, match="over the batch"):
        fitnets.check_hint_loss(lambda r, u: 0.5 * (u - r).pow(2).sum())
    with pytest.raises(AssertionError, match="scalar"):
        fitnets.check_hint_loss(lambda r, u: 0.5 * (u - r).pow(2).flatten(1).sum(1))


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides")
def test_check_fitnets_kd_loss(capsys):
    fitnets.check_fitnets_kd_loss(fitnets.fitnets_kd_loss)
    assert "✓" in capsys.readouterr().out

    def hinton(z, v, y, tau, lam):
        return F.cross_entropy(z, y) + lam * tau**2 * (fitnets.fitnets_kd_loss(z, v, y, tau, 1.0) - F.cross_entropy(z, y))

    def kl(z, v, y, tau, lam, reduction="batchmean"):
        return F.cross_entropy(z, y) + lam * F.kl_div(F.log_softmax(z / tau, -1), soft_targets(v, tau), reduction=reduction)

    def untempered(z, v, y, tau, lam):
        return F.cross_entropy(z, y) - lam * (soft_targets(v, tau) * F.log_softmax(z, -1)).sum(-1).mean()

    def by_hand(z, v, y, tau, lam):  # the cross-entropy written out with softmax and log
        p_t, p_s = torch.softmax(v / tau, -1), torch.softmax(z / tau, -1)
        return -torch.log_softmax(z, -1)[torch.arange(len(y)), y].mean() - lam * (p_t * p_s.log()).sum(-1).mean()

    # the KL form has the same gradient: accepted, with a note saying so
    fitnets.check_fitnets_kd_loss(kl)
    out = capsys.readouterr().out
    assert "✓" in out and "KL form" in out and "same gradient" in out
    fitnets.check_fitnets_kd_loss(by_hand)
    assert "✓ FitNets KD loss: correct\n" == capsys.readouterr().out

    with pytest.raises(AssertionError, match="T²"):
        fitnets.check_fitnets_kd_loss(hinton)
    with pytest.raises(AssertionError, match="T²"):  # Hinton's T² on the KL form
        fitnets.check_fitnets_kd_loss(lambda z, v, y, t, lam: kl(z, v, y, t, lam * t**2))
    with pytest.raises(AssertionError, match="batchmean"):
        fitnets.check_fitnets_kd_loss(lambda z, v, y, t, lam: kl(z, v, y, t, lam, reduction="mean"))
    with pytest.raises(AssertionError, match="soften the student"):
        fitnets.check_fitnets_kd_loss(untempered)
    with pytest.raises(AssertionError, match="value"):
        fitnets.check_fitnets_kd_loss(lambda z, v, y, tau, lam: fitnets.fitnets_kd_loss(z, v, y, tau, 2 * lam))


def test_checks_report_unattempted_exercises(capsys):
    def todo(*args):
        raise NotImplementedError

    fitnets.check_kernel_size(todo)
    fitnets.check_hint_loss(todo)
    fitnets.check_fitnets_kd_loss(todo)
    assert capsys.readouterr().out.count("not attempted yet") == 3
