"""Chapter 5 (learning from ensembles): BatchEnsemble layers, the vmapped Deep Ensemble, ODS,
one-to-one distillation, the Jacobian view, evaluation helpers, figures and self-checks (the
last three in their own modules, re-exported by ``methods.ensembles``)."""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import metrics, train
from minidistill.data import DeviceLoader, make_shapes
from minidistill.exercises import ensembles as exercises
from minidistill.losses import Objective, TeacherObjective, kd_loss
from minidistill.methods import batchensemble, ensembles_eval, ensembles_jacobian, ensembles_plots
from minidistill.methods import ensembles as E
from minidistill.models import create_model
from minidistill.runtime import seed_everything
from minidistill.train import Recipe, fit

D64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def small():
    """256 training and 32 test images of 8x8 pixels: enough for a few SGD steps, fast on a CPU."""
    return make_shapes(n_train=256, n_test=32, size=8)


def test_all_names_exist():
    for name in E.__all__:
        assert hasattr(E, name), name


def test_moved_names_are_re_exported_from_the_method_module():
    """Notebooks and assignments call every chapter name as ``ensembles.<name>``: the figures,
    self-checks, BatchEnsemble layers and evaluation helpers are the very objects of their rooms."""
    for room in (batchensemble, ensembles_eval, ensembles_jacobian, ensembles_plots, exercises):
        for name in room.__all__:
            assert name in E.__all__ and getattr(E, name) is getattr(room, name), (room.__name__, name)


# --- BatchEnsemble layers -----------------------------------------------------------------------

def test_batch_ensemble_linear_has_the_issue_parameters():
    layer = E.BatchEnsembleLinear(5, 7, 3)
    shapes = {k: tuple(v.shape) for k, v in layer.named_parameters()}
    assert shapes == {"weight": (7, 5), "r": (3, 5), "gamma": (3, 7), "bias": (3, 7)}  # Wen et al.'s s = gamma
    assert E.BatchEnsembleLinear(5, 7, 3, bias=False).bias is None


@pytest.mark.parametrize("bias", [True, False])
def test_batch_ensemble_linear_equals_explicit_member_weights(bias):
    m, b = 3, 4
    layer = E.BatchEnsembleLinear(5, 6, m, bias=bias).double()
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randn(m * b, 5, generator=gen(0), dtype=D64)
    want = []
    for j in range(m):
        w_j = layer.weight * torch.outer(layer.gamma[j], layer.r[j])  # W o (gamma_j r_j^T)
        want.append(F.linear(x[j * b:(j + 1) * b], w_j, layer.bias[j] if bias else None))
    assert torch.allclose(layer(x), torch.cat(want), atol=1e-12)


@pytest.mark.parametrize("stride,padding,bias", [(1, 1, True), (2, 1, False), (1, 0, True)])
def test_batch_ensemble_conv_equals_explicit_member_kernels(stride, padding, bias):
    m, b = 2, 3
    conv = E.BatchEnsembleConv2d(3, 4, 3, m, stride=stride, padding=padding, bias=bias).double()
    if bias:
        nn.init.normal_(conv.bias)
    assert tuple(conv.weight.shape) == (4, 3, 3, 3) and tuple(conv.r.shape) == (2, 3) and tuple(conv.gamma.shape) == (2, 4)
    x = torch.randn(m * b, 3, 7, 7, generator=gen(1), dtype=D64)
    want = []
    for j in range(m):
        k_j = conv.weight * torch.outer(conv.gamma[j], conv.r[j])[:, :, None, None]
        want.append(F.conv2d(x[j * b:(j + 1) * b], k_j, conv.bias[j] if bias else None, stride, padding))
    assert torch.allclose(conv(x), torch.cat(want), atol=1e-12)


def test_batch_layout_is_consecutive_blocks():
    """Changing block 1 of the rows changes only block 1 of the outputs."""
    layer = E.BatchEnsembleLinear(4, 3, 3).double()
    x = torch.randn(3 * 2, 4, generator=gen(2), dtype=D64)
    x2 = x.clone()
    x2[2:4] += 1.0
    diff = (layer(x2) - layer(x)).abs().sum(1)
    assert diff[2:4].min() > 0 and diff[:2].max() == 0 and diff[4:].max() == 0


def test_batch_ensemble_layers_reject_bad_inputs():
    with pytest.raises(ValueError, match="multiple of ensemble_size=3"):
        E.BatchEnsembleLinear(4, 3, 3)(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"\[M\*N, 4\]"):
        E.BatchEnsembleLinear(4, 3, 3)(torch.randn(6, 5))
    with pytest.raises(ValueError, match="multiple of ensemble_size=2"):
        E.BatchEnsembleConv2d(3, 4, 3, 2)(torch.randn(3, 3, 5, 5))
    with pytest.raises(ValueError, match="in_channels"):
        E.BatchEnsembleConv2d(0, 4, 3, 2)
    with pytest.raises(ValueError, match="ensemble_size"):
        E.BatchEnsembleLinear(4, 3, 0)


def _fold_member(be: E.BatchEnsembleResNet, depth: int, width: int, j: int) -> nn.Module:
    """A plain CIFAR ResNet with member j's weights W o (gamma_j r_j^T), biases b_j, and the shared BatchNorm."""
    plain = E.create_member(depth, width, be.fc.out_features).double()
    be_modules, be_state = dict(be.named_modules()), be.state_dict()
    state = {}
    for key in plain.state_dict():
        module_name, leaf = key.rsplit(".", 1)
        module = be_modules[module_name]
        if isinstance(module, (E.BatchEnsembleConv2d, E.BatchEnsembleLinear)):
            if leaf == "weight":
                fold = torch.outer(module.gamma[j], module.r[j])
                state[key] = module.weight * (fold[:, :, None, None] if module.weight.ndim == 4 else fold)
            else:
                state[key] = module.bias[j]
        else:
            state[key] = be_state[key]
    plain.load_state_dict({k: v.detach() for k, v in state.items()})
    return plain.eval()


def test_batch_ensemble_resnet_member_equals_folded_plain_resnet():
    torch.manual_seed(0)
    be = E.BatchEnsembleResNet(8, 4, 10, ensemble_size=3).double()
    be.train()
    be.member_logits(torch.randn(6, 3, 12, 12, dtype=D64))  # move the shared BatchNorm statistics
    be.eval()
    x = torch.randn(5, 3, 12, 12, generator=gen(3), dtype=D64)
    logits = be.member_logits(x)
    assert logits.shape == (3, 5, 10)
    for j in range(3):
        assert torch.allclose(logits[j], _fold_member(be, 8, 4, j)(x), atol=1e-10)
    assert torch.allclose(be(x), E.ensemble_log_probs(logits))


def test_batch_ensemble_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        E.BatchEnsembleResNet(9, 4, 10)


# --- the Deep Ensemble with torch.func --------------------------------------------------------

def _members(n: int = 3, seed: int = 0) -> list[nn.Module]:
    out = []
    for j in range(n):
        seed_everything(seed + j)
        out.append(E.create_member(8, 4, 10))
    return out


def test_create_member_is_the_model_zoo_resnet():
    seed_everything(4)
    a = E.create_member(20, 16, 10).eval()
    seed_everything(4)
    b = create_model("resnet20", 10).eval()
    x = torch.randn(2, 3, 32, 32, generator=gen(4))
    assert torch.allclose(a(x), b(x), atol=1e-6)
    with pytest.raises(ValueError, match="width"):
        E.create_member(8, 0, 10)


@pytest.mark.parametrize("training", [False, True])
def test_vmap_ensemble_equals_a_loop_over_members(training):
    members = _members()
    loop = [m.train(training) for m in (type(m)(8, (4, 4, 8, 16), 10) for m in members)]
    for m, ref in zip(members, loop):
        ref.pool = E.GlobalAvgPool()
        ref.load_state_dict(m.state_dict())
    de = E.DeepEnsemble(members).train(training)
    x = torch.randn(6, 3, 12, 12, generator=gen(5))
    got = de.member_logits(x)
    for j, ref in enumerate(loop):
        assert torch.allclose(got[j], ref(x), atol=1e-5)
    # in training mode the BatchNorm statistics moved in each member's own slice, as in the loop
    for j, ref in enumerate(loop):
        mine = de.member(j).state_dict()
        for k, v in ref.state_dict().items():
            assert torch.allclose(mine[k].float(), v.float(), atol=1e-6), k
    assert torch.allclose(de(x), E.ensemble_log_probs(got))


def test_deep_ensemble_per_member_inputs_and_single_member():
    de = E.DeepEnsemble(_members()).eval()
    xs = torch.randn(3, 4, 3, 12, 12, generator=gen(6))
    got = de.member_logits(xs, per_member=True)
    for j in range(3):
        assert torch.allclose(got[j], de.member_forward(j, xs[j]), atol=1e-5)
        assert torch.allclose(got[j], de.member(j)(xs[j]), atol=1e-5)
    with pytest.raises(ValueError, match="per_member"):
        de.member_logits(xs[:2], per_member=True)
    with pytest.raises(ValueError, match="member index"):
        de.member_forward(3, xs[0])


def test_deep_ensemble_rejects_bad_members():
    with pytest.raises(ValueError, match="at least 2"):
        E.DeepEnsemble(_members(1))
    with pytest.raises(ValueError, match="another architecture"):
        E.DeepEnsemble([E.create_member(8, 4, 10), E.create_member(8, 8, 10)])


def test_deep_ensemble_survives_channels_last_conversion():
    de = E.DeepEnsemble(_members()).eval()
    x = torch.randn(2, 3, 12, 12, generator=gen(7))
    before = de(x)
    de.to("cpu", memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow vmap fallback (adaptive pooling on channels_last)
        after = de(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(before, after, atol=1e-5)


def test_training_the_vmapped_ensemble_equals_training_members_alone(small):
    """One fit of the stacked ensemble = one fit per member with the same batches."""
    recipe = Recipe(epochs=1, batch_size=128, lr=0.1)  # two steps: momentum and weight decay matter
    de = E.new_deep_ensemble(8, 4, 10, size=2, seed=0)
    hist = fit(de, small, E.EnsembleCrossEntropy(), recipe, seed=0)
    assert 0 <= hist.final("test_acc") <= 100
    rec = hist.records[0]  # the terms: the members' mean CE (the loss is their sum) and mean accuracy
    assert rec["train_loss"] == pytest.approx(2 * rec["train_ce"], rel=1e-5) and 0 <= rec["train_member_acc"] <= 100
    for j in range(2):
        seed_everything(j)
        alone = E.create_member(8, 4, 10)
        fit(alone, small, None, recipe, seed=0)
        mine = de.member(j).state_dict()
        for k, v in alone.state_dict().items():
            assert torch.allclose(mine[k].double(), v.double(), atol=1e-5), k


def test_members_with_their_own_data_orders_equal_members_trained_alone(small):
    """EnsembleCrossEntropy(data, seeds): member j sees the batches of fit(seed=seeds[j]), so one fit of the
    stacked ensemble equals separate fits with seeds 3 and 5 (different orders: the two fits differ)."""
    recipe = Recipe(epochs=1, batch_size=128, lr=0.1)
    de = E.new_deep_ensemble(8, 4, 10, size=2, seed=0)
    objective = E.EnsembleCrossEntropy(small, seeds=(3, 5))
    hist = fit(de, small, objective, recipe, seed=0)  # fit's own seed (its batch) plays no part
    rec = hist.records[0]
    assert "train_acc" not in rec and 0 <= rec["train_member_acc"] <= 100  # members see different images
    for j, data_seed in enumerate((3, 5)):
        seed_everything(j)
        alone = E.create_member(8, 4, 10)
        fit(alone, small, None, recipe, seed=data_seed)
        mine = de.member(j).state_dict()
        for k, v in alone.state_dict().items():
            assert torch.allclose(mine[k].double(), v.double(), atol=1e-5), k
    objective.epoch = objective.step = 0
    xs, _ = objective.member_batches(128, torch.device("cpu"))
    assert not torch.equal(xs[0], xs[1])  # two data orders, not one


def test_member_batches_replay_any_step_as_a_resumed_run_needs(small):
    objective = E.EnsembleCrossEntropy(small, seeds=(3, 5))
    objective.steps_per_epoch = len(small.x_train) // 64
    want = []
    for seed in (3, 5):
        loader = DeviceLoader.from_dataset(small, "train", 64, device="cpu", channels_last=False, seed=seed)
        loader.set_epoch(1)
        want.append(list(loader)[2])
    objective.epoch, objective.step = 1, objective.steps_per_epoch + 2  # a fresh objective, mid-epoch (a resume)
    x, y = objective.member_batches(64, torch.device("cpu"))
    assert x.shape == (2, 64, 3, 8, 8) and y.shape == (2, 64)
    for j in range(2):
        assert torch.equal(x[j], want[j][0]) and torch.equal(y[j], want[j][1])
    objective.step += 1  # the next step continues the same iterators
    x3, _ = objective.member_batches(64, torch.device("cpu"))
    assert not torch.equal(x3, x)
    objective.step = objective.steps_per_epoch * 2  # out of epoch 1
    with pytest.raises(ValueError, match="not in epoch"):
        objective.member_batches(64, torch.device("cpu"))


def test_ensemble_cross_entropy_rejects_bad_arguments(small):
    with pytest.raises(ValueError, match="seeds"):
        E.EnsembleCrossEntropy(small)
    with pytest.raises(ValueError, match="data"):
        E.EnsembleCrossEntropy(seeds=(0, 1))
    with pytest.raises(ValueError, match="data must be"):
        E.EnsembleCrossEntropy("shapes", seeds=(0, 1))
    with pytest.raises(ValueError, match="seeds"):
        E.EnsembleCrossEntropy(small, seeds=(0,))
    with pytest.raises(ValueError, match=r"seeds\[1\]"):
        E.EnsembleCrossEntropy(small, seeds=(0, -1))
    with pytest.raises(ValueError, match="member_batches"):
        E.EnsembleCrossEntropy().member_batches(8, torch.device("cpu"))
    de = E.new_deep_ensemble(8, 4, 10, size=2, seed=0)
    with pytest.raises(ValueError, match="3 data orders"):
        E.EnsembleCrossEntropy(small, seeds=(0, 1, 2))(de, torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))


def test_ensemble_cross_entropy_is_the_sum_of_member_losses():
    de = E.DeepEnsemble(_members()).eval()
    x, y = torch.randn(4, 3, 12, 12, generator=gen(8)), torch.tensor([0, 3, 5, 9])
    objective = E.EnsembleCrossEntropy()
    assert isinstance(objective, Objective)
    loss, logits, terms = objective(de, x, y)
    z = de.member_logits(x)
    assert torch.allclose(loss, sum(F.cross_entropy(z[j], y) for j in range(3)), atol=1e-5)
    assert torch.allclose(logits, E.ensemble_log_probs(z))
    assert set(terms) == {"ce", "member_acc"} and not any(t.requires_grad for t in terms.values())
    assert torch.allclose(terms["ce"], loss / 3)
    member_acc = sum((z[j].argmax(-1) == y).float().mean() for j in range(3)) / 3 * 100
    assert torch.allclose(terms["member_acc"], member_acc)
    with pytest.raises(TypeError, match="member_logits"):
        objective(E.create_member(8, 4, 10), x, y)


def test_ensemble_log_probs_is_the_log_of_mean_probabilities():
    z = torch.randn(3, 5, 4, generator=gen(9), dtype=D64)
    assert torch.allclose(E.ensemble_log_probs(z).exp().double(), z.softmax(-1).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[M, N, K\]"):
        E.ensemble_log_probs(z[0])


def test_pretrained_ensemble_caches_and_refuses_stale_files(small, data_dir, monkeypatch):
    tiny = E.subset(small, 128)
    recipe = Recipe(epochs=1, batch_size=128, lr=0.05)
    calls = []
    monkeypatch.setattr(E, "fit", lambda *a, **kw: calls.append(kw) or fit(*a, **kw))
    first = E.pretrained_ensemble(tiny, 8, 4, 2, recipe=recipe, profile="smoke")
    assert not first.cached and first.path.exists() and first.path.parent == data_dir / "checkpoints"
    # nobody plots the cached teacher's curves: its splits are scored after the last epoch only
    assert calls[0]["eval_every"] is None and isinstance(calls[0]["checkpoint"], type(first.path))
    assert "train_ce" in first.history.records[0]
    # member j sees its own data order, that of fit(seed=seed + j), like an independently trained member
    assert calls[0]["seed"] == 0 and "-own-" in first.path.name
    second = E.pretrained_ensemble(tiny, 8, 4, 2, recipe=recipe, profile="smoke")
    assert second.cached
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    # corrupt weights: retrained with a warning, never loaded silently
    state = torch.load(second.path, weights_only=False)
    next(iter(state["model"].values())).add_(1.0)
    torch.save(state, second.path)
    with pytest.warns(UserWarning, match="digest"):
        third = E.pretrained_ensemble(tiny, 8, 4, 2, recipe=recipe, profile="smoke")
    assert not third.cached
    # other training images of the same size: another data digest, so not the cached ensemble
    shuffled = dataclasses.replace(tiny, y_train=tiny.y_train.roll(1))
    with pytest.warns(UserWarning, match="metadata"):
        fourth = E.pretrained_ensemble(shuffled, 8, 4, 2, recipe=recipe, profile="smoke")
    assert not fourth.cached


# --- images in [0, 1] and subsets ---------------------------------------------------------------

def test_unit_range_round_trip_and_loader_images(tiny):
    loader = DeviceLoader.from_dataset(tiny, "test", 64, train=False, channels_last=False)
    x, _ = next(iter(loader))
    u = E.to_unit_range(x, tiny.mean, tiny.std)
    assert torch.allclose(u, tiny.x_test[:64].float() / 255, atol=1e-5)
    assert torch.allclose(E.from_unit_range(u, tiny.mean, tiny.std), x, atol=1e-5)
    with pytest.raises(ValueError, match="one mean and std per channel"):
        E.to_unit_range(x, (0.5, 0.5), (0.2, 0.2))


def test_subset_draws_fixed_random_images(tiny):
    a = E.subset(tiny, 100, 50, seed=1)
    b = E.subset(tiny, 100, 50, seed=1)
    assert len(a.x_train) == 100 and len(a.x_test) == 50 and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.y_train, E.subset(tiny, 100, seed=2).y_train)
    assert len(E.subset(tiny, n_test=10).x_train) == len(tiny.x_train)
    with pytest.raises(ValueError, match="n_train"):
        E.subset(tiny, 10_000)


# --- ODS, ConfODS, Gaussian ---------------------------------------------------------------------

class _Toy(nn.Module):
    """A small smooth classifier of images (float64)."""

    def __init__(self, k: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, k)).double()

    def forward(self, x):
        return self.net(x)


def test_ods_direction_equals_autograd_per_sample_and_has_unit_norm():
    model = _Toy()
    x = torch.rand(4, 3, 4, 4, generator=gen(10), dtype=D64)
    w = torch.rand(4, 5, generator=gen(11), dtype=D64) * 2 - 1
    for temperature in (1.0, 3.0):
        d = E.ods_direction(model, x, w, temperature)
        for i in range(4):
            xi = x[i:i + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad((w[i] * torch.softmax(model(xi) / temperature, -1)[0]).sum(), xi)
            assert torch.allclose(d[i], (g / g.norm())[0], atol=1e-12)
        assert torch.allclose(d.flatten(1).norm(dim=1), torch.ones(4, dtype=D64))


def test_ods_direction_is_odd_in_w_and_lies_in_the_jacobian_row_space():
    model = _Toy()
    x = torch.rand(3, 3, 4, 4, generator=gen(12), dtype=D64)
    w = torch.rand(3, 5, generator=gen(13), dtype=D64) * 2 - 1
    assert torch.allclose(E.ods_direction(model, x, -w), -E.ods_direction(model, x, w), atol=1e-12)
    jac = torch.func.jacrev(lambda v: model(v.unsqueeze(0)).softmax(-1)[0])  # [K, C, H, W]
    for i in range(3):
        g = torch.einsum("k,k...->...", w[i], jac(x[i]))
        assert torch.allclose(E.ods_direction(model, x[i:i + 1], w[i:i + 1])[0], g / g.norm(), atol=1e-10)


def test_ods_direction_draws_w_when_not_given_and_rejects_bad_input():
    model = _Toy()
    x = torch.rand(2, 3, 4, 4, generator=gen(14), dtype=D64)
    torch.manual_seed(0)
    a = E.ods_direction(model, x)
    b = E.ods_direction(model, x)
    assert not torch.allclose(a, b)  # a fresh w each call
    with pytest.raises(ValueError, match="w must have the outputs' shape"):
        E.ods_direction(model, x, torch.zeros(2, 4, dtype=D64))
    with pytest.raises(ValueError, match="temperature"):
        E.ods_direction(model, x, temperature=0.0)
    with pytest.raises(ValueError, match=r"\[N=2, K\]"):
        E.ods_direction(lambda v: v.sum(), x)


def test_ods_perturb_moves_each_pixel_by_eta_in_rms():
    model = _Toy()
    x = 0.25 + 0.5 * torch.rand(4, 3, 4, 4, generator=gen(15), dtype=D64)  # far from the clip
    w = torch.rand(4, 5, generator=gen(16), dtype=D64) * 2 - 1
    eta = 2 / 255
    xt = E.ods_perturb(model, x, eta, w=w)
    rms = (xt - x).pow(2).flatten(1).mean(1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, eta), rtol=1e-9)
    assert torch.allclose((xt - x) / (eta * math.sqrt(48)), E.ods_direction(model, x, w), atol=1e-10)
    conf = model(x).softmax(-1).max(-1).values
    xc = E.ods_perturb(model, x, eta, w=w, confidence=True)
    assert torch.allclose((xc - x).pow(2).flatten(1).mean(1).sqrt(), eta * conf, rtol=1e-9)
    # a unit step would be sqrt(D) times smaller: about 55 times on CIFAR-10 (D = 3 * 32 * 32)
    assert math.sqrt(3 * 32 * 32) == pytest.approx(55.4, abs=0.05)


def test_perturbations_clip_to_unit_range_and_reject_normalised_images():
    model = _Toy()
    x = torch.zeros(2, 3, 4, 4, dtype=D64)
    x[:, :, :2] = 1.0
    xt = E.ods_perturb(model, x, 50 / 255)
    assert xt.min() >= 0 and xt.max() <= 1 and not torch.equal(xt, x)
    xg = E.gaussian_perturb(x, 50 / 255, generator=gen(0))
    assert xg.min() >= 0 and xg.max() <= 1
    with pytest.raises(ValueError, match="to_unit_range"):
        E.ods_perturb(model, x - 0.5)
    with pytest.raises(ValueError, match="to_unit_range"):
        E.gaussian_perturb(x + 2)
    with pytest.raises(ValueError, match="eta"):
        E.gaussian_perturb(x, -1.0)


def test_gaussian_perturb_has_rms_eta_and_follows_the_generator():
    x = torch.full((8, 3, 16, 16), 0.5, dtype=D64)
    a = E.gaussian_perturb(x, 1 / 255, generator=gen(1))
    assert torch.equal(a, E.gaussian_perturb(x, 1 / 255, generator=gen(1)))
    assert (a - x).pow(2).mean().sqrt().item() == pytest.approx(1 / 255, rel=0.05)


# --- one-to-one distillation ------------------------------------------------------------------

def _teacher_and_student(m: int = 2):
    de = E.new_deep_ensemble(8, 4, 10, size=m, seed=0).eval()
    seed_everything(3)
    return de, E.BatchEnsembleResNet(8, 4, 10, m)


def test_one_to_one_kd_loss_by_hand():
    de, student = _teacher_and_student()
    x, y = torch.randn(3, 3, 12, 12, generator=gen(20)), torch.tensor([1, 2, 3])
    obj = E.OneToOneDistillation(de, temperature=4.0, alpha=0.9)
    assert isinstance(obj, TeacherObjective)
    student.eval()
    loss, logits, terms = obj(student, x, y)
    t, s = de.member_logits(x), student.member_logits(x)
    ce = sum(F.cross_entropy(s[j], y) for j in range(2)) / 2
    kl = sum(kd_loss(s[j], t[j], 4.0) for j in range(2)) / 2  # member j against teacher j only
    assert torch.allclose(loss, 0.1 * ce + 0.9 * kl, atol=1e-5)
    assert set(terms) == {"ce", "kd"} and torch.allclose(terms["ce"], ce, atol=1e-5)
    assert torch.allclose(terms["kd"], kl, atol=1e-5) and not terms["kd"].requires_grad
    crossed = sum(kd_loss(s[j], t[1 - j], 4.0) for j in range(2)) / 2
    assert not torch.allclose(loss, 0.1 * ce + 0.9 * crossed, atol=1e-5)
    assert torch.allclose(logits, E.ensemble_log_probs(s))
    assert torch.equal(obj.teacher_forward(x), t) and not obj.teacher_forward(x).requires_grad
    obj.train()  # the base class keeps the teacher frozen
    assert obj.teacher.training is False and not any(p.requires_grad for p in obj.teacher.parameters())


def test_perturbed_kd_uses_clean_inputs_for_ce_and_perturbed_for_kd(tiny, monkeypatch):
    de, student = _teacher_and_student()
    student.eval()
    obj = E.OneToOneDistillation(de, 2.0, 0.5, "gaussian", mean=tiny.mean, std=tiny.std)
    x, y = torch.randn(3, 3, 16, 16, generator=gen(21)), torch.tensor([0, 1, 2])
    shifted = x + 0.3
    monkeypatch.setattr(obj, "perturb", lambda v: shifted)
    loss, _, terms = obj(student, x, y)
    s, s_kd, t = student.member_logits(x), student.member_logits(shifted), de.member_logits(shifted)
    ce, kd = F.cross_entropy(s.flatten(0, 1), y.repeat(2)), kd_loss(s_kd.flatten(0, 1), t.flatten(0, 1), 2.0)
    assert torch.allclose(loss, 0.5 * ce + 0.5 * kd, atol=1e-5)
    assert torch.allclose(terms["ce"], ce, atol=1e-5) and torch.allclose(terms["kd"], kd, atol=1e-5)


@pytest.mark.parametrize("method", ["gaussian", "ods", "confods"])
def test_perturb_works_in_unit_range_and_moves_pixels_by_about_eta(tiny, method):
    de, _ = _teacher_and_student()
    obj = E.OneToOneDistillation(de, 4.0, 0.9, method, eta=4 / 255, mean=tiny.mean, std=tiny.std)
    x, _ = next(iter(DeviceLoader.from_dataset(tiny, "test", 16, train=False, channels_last=False)))
    torch.manual_seed(0)
    u, ut = E.to_unit_range(x, tiny.mean, tiny.std), E.to_unit_range(obj.perturb(x), tiny.mean, tiny.std)
    assert ut.min() >= -1e-6 and ut.max() <= 1 + 1e-6
    rms = (ut - u).pow(2).flatten(1).mean(1).sqrt() * 255
    # 4/255 per pixel in RMS, less where the clip at 0 and 1 bites; ConfODS scales the step by the
    # teacher's confidence, which is at least 1/K
    floor = 0.3 * 4.0 * (0.1 if method == "confods" else 1.0)
    assert (rms <= 4.0 + 1e-3).all() and (rms > floor).all()


def _confident_teacher(m: int = 2) -> E.DeepEnsemble:
    """A Deep Ensemble whose logits are large (classifier weights x 30): there the tempered softmax
    is far from its linear regime, so the ODS direction depends on the temperature."""
    members = []
    for j in range(m):
        seed_everything(j)
        member = E.create_member(8, 4, 10)
        member.fc.weight.data.mul_(30.0)
        members.append(member)
    return E.DeepEnsemble(members).eval()


@pytest.mark.parametrize("method", ["ods", "confods"])
def test_objective_ods_step_is_taken_at_the_kd_temperature(tiny, method):
    """The perturbation of OneToOneDistillation is the ODS step of teacher member j at the KD
    temperature tau, computed here independently (torch.func.vjp of softmax(T_j(x)/tau), per-sample
    norm, sqrt(D) step, ConfODS's confidence at tau), and not the step at temperature 1."""
    de, tau, eta = _confident_teacher(), 4.0, 2 / 255
    obj = E.OneToOneDistillation(de, tau, 0.9, method, eta=eta, mean=tiny.mean, std=tiny.std)
    x, _ = next(iter(DeviceLoader.from_dataset(tiny, "test", 6, train=False, channels_last=False)))
    u = E.to_unit_range(x, tiny.mean, tiny.std).clamp(0, 1)
    w = torch.rand(6, 10, generator=gen(50)) * 2 - 1
    got = obj.perturb_unit(u, member=1, w=w)

    def step_at(temperature: float) -> torch.Tensor:
        probs_fn = lambda v: torch.softmax(de.member_forward(1, E.from_unit_range(v, tiny.mean, tiny.std)) / temperature, -1)  # noqa: E731
        probs, vjp = torch.func.vjp(probs_fn, u)
        (g,) = vjp(w)
        scale = eta * math.sqrt(u[0].numel()) / g.flatten(1).norm(dim=1)
        if method == "confods":
            scale = scale * probs.max(-1).values
        return (u + scale.view(-1, 1, 1, 1) * g).clamp(0, 1)

    want, at_one = step_at(tau), step_at(1.0)
    assert (want - at_one).abs().max() > 1e-3  # the temperature matters here: the checks below tell them apart
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, at_one, atol=1e-4)


@pytest.mark.parametrize("method", ["kd", "ods"])
def test_objective_runs_a_teacher_cast_to_bfloat16_under_autocast(tiny, method):
    """On a GPU, TeacherObjective.setup casts the teacher once to the autocast dtype; autocast may
    skip ops inside vmap (conv2d on the CPU), so the ensemble feeds its members inputs of their own
    dtype (simulated on the CPU: a bfloat16 copy of the teacher, float32 loader images)."""
    de, student = _teacher_and_student()
    obj = E.OneToOneDistillation(de, 4.0, 0.9, method, mean=tiny.mean, std=tiny.std)
    cast = copy.deepcopy(de).to(dtype=torch.bfloat16).eval()
    obj._fast = [cast, cast]  # what setup() builds on a GPU with bfloat16 autocast
    x, y = next(iter(DeviceLoader.from_dataset(tiny, "train", 8, channels_last=False)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits, terms = obj(student, x, y)
        assert obj.teacher_forward(x).dtype == torch.bfloat16
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and logits.shape == (8, 10)
    assert student.fc.r.grad is not None and de.fc__weight.grad is None and cast.fc__weight.grad is None


def test_one_to_one_rejects_bad_configuration(tiny):
    de, student = _teacher_and_student(2)
    with pytest.raises(ValueError, match="mean and std"):
        E.OneToOneDistillation(de, perturbation="ods")
    with pytest.raises(ValueError, match="perturbation"):
        E.OneToOneDistillation(de, perturbation="fgsm", mean=tiny.mean, std=tiny.std)
    with pytest.raises(ValueError, match="alpha"):
        E.OneToOneDistillation(de, alpha=1.5)
    with pytest.raises(ValueError, match="DeepEnsemble"):
        E.OneToOneDistillation(student)
    with pytest.raises(ValueError, match="ensemble_size=3"):
        E.OneToOneDistillation(de)(E.BatchEnsembleResNet(8, 4, 10, 3), torch.randn(2, 3, 12, 12), torch.tensor([0, 1]))


def test_train_student_same_start_for_every_method(small, monkeypatch):
    """train_student goes through train.train_model (so through train.fit), seeded the same way for every method."""
    de = E.new_deep_ensemble(8, 4, 10, size=2, seed=0)
    seen = []
    real_fit = train.fit

    def spy(model, data, objective, recipe, **kw):
        seen.append(({k: v.clone() for k, v in model.state_dict().items()}, objective, kw))
        return real_fit(model, data, objective, recipe, **kw)

    monkeypatch.setattr(train, "fit", spy)
    recipe = Recipe(epochs=1, batch_size=128, lr=0.05)
    tiny = E.subset(small, 128)
    with_val = dataclasses.replace(tiny, x_val=tiny.x_test[:16], y_val=tiny.y_test[:16])
    for method in ("kd", "ods"):
        student, hist = E.train_student(de, with_val, recipe, method, depth=8, width=4, seed=5, eval_every=None)
        assert isinstance(student, E.BatchEnsembleResNet) and not student.training and len(hist) == 1
        rec = hist.records[0]
        assert "val_acc" not in rec and math.isfinite(rec["test_acc"])
        assert rec["train_loss"] == pytest.approx(0.1 * rec["train_ce"] + 0.9 * rec["train_kd"], rel=1e-5)
    (w_kd, o_kd, kw), (w_ods, o_ods, _) = seen
    assert all(torch.equal(w_kd[k], w_ods[k]) for k in w_kd)
    assert tuple(kw["eval_splits"]) == ("test",) and kw["eval_every"] is None and kw["seed"] == 5
    assert o_kd.perturbation == "kd" and o_ods.perturbation == "ods"
    with pytest.raises(ValueError, match="method"):
        E.train_student(de, tiny, recipe, "mixup", depth=8, width=4)


# --- the Jacobian view ----------------------------------------------------------------------------

def _toy_pair(shift_student: bool):
    t = _Toy(seed=0)
    g = _Toy(seed=1)
    x0 = torch.rand(3, 3, 4, 4, generator=gen(30), dtype=D64)
    if shift_student:  # matches the teacher at x0, another Jacobian
        return t, (lambda v: t(v) + g(v) - g(x0)), x0
    return t, _Toy(seed=2), x0


def test_kl_first_order_is_the_derivative():
    t, s, x = _toy_pair(False)
    delta = torch.randn(x.shape, generator=gen(34), dtype=D64)
    eps = 1e-6
    for temperature in (1.0, 2.0):
        fd = (E.perturbed_kl(t, s, x, delta, eps, temperature) - E.perturbed_kl(t, s, x, delta, -eps, temperature)) / (2 * eps)
        assert torch.allclose(E.kl_first_order(t, s, x, delta, temperature), fd, rtol=1e-6, atol=1e-9)
    assert torch.allclose(E.perturbed_kl(t, t, x, delta, 0.1), torch.zeros(3, dtype=D64), atol=1e-12)


def test_jacobian_matching_penalty_is_the_second_order_term():
    t, s, x = _toy_pair(True)
    delta = torch.randn(x.shape, generator=gen(31), dtype=D64)
    assert torch.allclose(E.kl_first_order(t, s, x, delta), torch.zeros(3, dtype=D64), atol=1e-12)
    pen = E.jacobian_matching_penalty(t, s, x, delta)
    ratios = [(E.perturbed_kl(t, s, x, delta, eta) / (eta**2 * pen)) for eta in (1e-1, 1e-2, 1e-3)]
    errs = [(r - 1).abs().max().item() for r in ratios]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2
    with pytest.raises(ValueError, match="delta"):
        E.jacobian_matching_penalty(t, s, x, delta[:1])


# --- evaluation -------------------------------------------------------------------------------------

def test_predict_members_matches_member_logits(tiny):
    de = E.DeepEnsemble(_members(2)).eval()
    got = E.predict_members(de, tiny, "test", batch_size=50)
    x, _ = next(iter(DeviceLoader.from_dataset(tiny, "test", len(tiny.x_test), train=False, channels_last=False)))
    assert got.shape == (2, len(tiny.x_test), 10)
    assert torch.allclose(got, de.member_logits(x), atol=1e-5)
    same = E.predict_members(de, tiny, "test", perturbation=lambda u: u)
    assert torch.allclose(same, got, atol=1e-4)
    moved = E.predict_members(de, tiny, "test", perturbation=lambda u: (u + 0.1).clamp(0, 1))
    assert not torch.allclose(moved, got, atol=1e-3)


def test_ensemble_scores_by_hand():
    p = torch.tensor([[[0.8, 0.2], [0.4, 0.6]], [[0.6, 0.4], [0.2, 0.8]]], dtype=D64)  # [M=2, N=2, K=2]
    y = torch.tensor([0, 1])
    s = E.ensemble_scores(p.log(), y)
    mean = torch.tensor([[0.7, 0.3], [0.3, 0.7]])
    assert s["acc"] == pytest.approx(100.0)
    assert s["nll"] == pytest.approx(-math.log(0.7), rel=1e-6)
    assert s["brier"] == pytest.approx(2 * 0.3**2, rel=1e-6)
    assert s["ece"] == pytest.approx(0.3, rel=1e-6)
    kl = lambda a, b: sum(ai * math.log(ai / bi) for ai, bi in zip(a, b))  # noqa: E731
    d0 = (kl([0.8, 0.2], [0.6, 0.4]) + kl([0.6, 0.4], [0.8, 0.2])) / 2
    d1 = (kl([0.4, 0.6], [0.2, 0.8]) + kl([0.2, 0.8], [0.4, 0.6])) / 2
    assert s["diversity"] == pytest.approx((d0 + d1) / 2, rel=1e-6)
    assert "cnll" not in s and mean.sum() == 2
    with pytest.raises(ValueError, match="val_targets"):
        E.ensemble_scores(p.log(), y, p.log())


def test_ensemble_ladder_averages_every_subset():
    z = torch.randn(3, 40, 4, generator=gen(32), dtype=D64) * 2
    y = torch.randint(0, 4, (40,), generator=gen(33))
    lad = E.ensemble_ladder(z, y, z, y)
    assert lad["size"] == [1, 2, 3]
    singles = [E.ensemble_scores(z[[j]], y, z[[j]], y)["nll"] for j in range(3)]
    assert lad["nll"][0] == pytest.approx(sum(singles) / 3)
    assert lad["nll"][2] == pytest.approx(E.ensemble_scores(z, y)["nll"])
    assert len(lad["cnll"]) == 3 and lad["diversity"][0] == 0.0


def test_metrics_table_formats_mean_std_and_dee_beyond_the_ladder():
    runs = {"KD": [{"acc": 80.0, "ece": 0.05, "dee": 1.5}, {"acc": 82.0, "ece": 0.07, "dee": 2.5}],
            "ODS": [{"acc": 90.0, "ece": 0.01, "dee": math.inf}, {"acc": 91.0, "ece": 0.02, "dee": math.inf}]}
    table = E.metrics_table(runs, ("acc", "ece", "dee"), dee_cap=4)
    lines = table.splitlines()
    assert lines[0] == "| method | ACC (%) | ECE (%) | DEE |" and len(lines) == 4
    assert "81.00 ± 1.41 (n=2)" in lines[2] and "6.00 ± 1.41 (n=2)" in lines[2] and "2.00 ± 0.71 (n=2)" in lines[2]
    assert "> 4 (n=2)" in lines[3]
    mixed = E.metrics_table({"KD": [{"dee": 1.5}, {"dee": 2.5}, {"dee": math.inf}]}, ("dee",), dee_cap=4)
    assert mixed.splitlines()[2] == "| KD | 2.00 ± 0.71 (n=2); 1 more runs > 4 |"
    assert E.metrics_table({"KD": [{"acc": 80.0}]}, ("acc", "nll")).splitlines()[2] == "| KD | 80.00 (n=1) | – |"
    worse = E.metrics_table({"KD": [{"dee": -math.inf}], "mix": [{"dee": 1.5}, {"dee": -math.inf}],
                             "both": [{"dee": math.inf}, {"dee": -math.inf}]}, ("dee",), dee_cap=4).splitlines()
    assert worse[2] == "| KD | ≤ 1 (n=1) |" and worse[3] == "| mix | 1.50 (n=1); 1 more runs ≤ 1 |"
    assert worse[4] == "| both | 1 runs > 4; 1 more runs ≤ 1 |"
    with pytest.raises(ValueError, match="unknown column"):
        E.metrics_table(runs, ("accuracy",))


# --- figures ------------------------------------------------------------------------------------

def test_plot_diversity_by_confidence_labels_everything():
    probs = (torch.randn(3, 50, 5, generator=gen(40)) * 2).softmax(-1)
    fig = E.plot_diversity_by_confidence({"train": probs, "test": probs.flip(0)})
    ax, ax_n = fig.axes
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() and ax_n.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("train (mean ") and len(labels) == 2
    mean = metrics.pairwise_kl(probs).mean().item()
    assert labels[0] == f"train (mean {mean:.3g})"
    assert len(E.plot_diversity_by_confidence({"train": probs}, show_counts=False).axes) == 1
    with pytest.raises(ValueError, match="at least one"):
        E.plot_diversity_by_confidence({})


def test_plot_perturbation_draws_images_changes_and_bars():
    img = torch.rand(3, 8, 8, generator=gen(41))
    probs = (torch.randn(3, 5, generator=gen(42))).softmax(-1)
    fig = E.plot_perturbation(img, {"ODS": (img + 0.01).clamp(0, 1)}, {"clean": probs, "ODS": probs.flip(0)},
                              [f"c{i}" for i in range(5)], title="t")
    assert len(fig.axes) == 6
    assert fig.axes[4].get_ylabel() == "probability" and "pairwise KL" in fig.axes[5].get_title()
    with pytest.raises(ValueError, match="lacks"):
        E.plot_perturbation(img, {"ODS": img}, {"clean": probs}, list("abcde"))


# --- self-checks ----------------------------------------------------------------------------------

def test_check_batch_ensemble_linear(capsys):
    def right(x, weight, r, gamma, bias):
        m = r.shape[0]
        xb = x.view(m, -1, x.shape[1])
        return ((xb * r[:, None]) @ weight.T * gamma[:, None] + bias[:, None]).flatten(0, 1)

    E.check_batch_ensemble_linear(right)
    assert "✓" in capsys.readouterr().out

    def swapped(x, weight, r, gamma, bias):
        return right(x, weight, gamma, r, bias)

    with pytest.raises(AssertionError, match="r scales the"):
        E.check_batch_ensemble_linear(swapped)

    def interleaved(x, weight, r, gamma, bias):
        m = r.shape[0]
        return ((x * r.repeat(len(x) // m, 1)) @ weight.T * gamma.repeat(len(x) // m, 1) + bias.repeat(len(x) // m, 1))

    with pytest.raises(AssertionError, match="consecutive blocks"):
        E.check_batch_ensemble_linear(interleaved)
    with pytest.raises(AssertionError, match="own bias"):
        E.check_batch_ensemble_linear(lambda x, w, r, g, b: right(x, w, r, g, b[:1].expand_as(b)))
    with pytest.raises(AssertionError, match="values differ"):
        E.check_batch_ensemble_linear(lambda x, w, r, g, b: right(x, w, r, g, b) * 1.01)


def test_check_ods_step(capsys):
    def right(x, grad, eta):
        d = x[0].numel()
        unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return (x + eta * d**0.5 * unit).clamp(0, 1)

    E.check_ods_step(right)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="sqrt\\(D\\)"):
        E.check_ods_step(lambda x, g, eta: (x + eta * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1))
    with pytest.raises(AssertionError, match="each sample"):
        E.check_ods_step(lambda x, g, eta: (x + eta * x[0].numel() ** 0.5 * g / g.norm()).clamp(0, 1))
    with pytest.raises(AssertionError, match="clip"):
        E.check_ods_step(lambda x, g, eta: x + eta * x[0].numel() ** 0.5 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    with pytest.raises(AssertionError, match="shape"):
        E.check_ods_step(lambda x, g, eta: x.flatten(1))


def test_check_pairwise_kl(capsys):
    E.check_pairwise_kl(metrics.pairwise_kl)
    assert "✓" in capsys.readouterr().out

    def all_pairs(p):
        m = p.shape[0]
        return sum((p[j] * (p[j].log() - p[i].log())).sum(-1) for i in range(m) for j in range(m)) / m**2

    with pytest.raises(AssertionError, match="M\\(M-1\\)"):
        E.check_pairwise_kl(all_pairs)

    def to_mean(p):
        mean = p.mean(0)
        return (p * (p.log() - mean.log())).sum(-1).mean(0)

    with pytest.raises(AssertionError, match="ensemble mean"):
        E.check_pairwise_kl(to_mean)
    with pytest.raises(AssertionError, match="one value per input"):
        E.check_pairwise_kl(lambda p: p.mean())


def test_checks_report_unattempted_exercises(capsys):
    def todo(*args):
        raise NotImplementedError

    E.check_batch_ensemble_linear(todo)
    E.check_ods_step(todo)
    E.check_pairwise_kl(todo)
    assert capsys.readouterr().out.count("not attempted yet") == 3


# --- the opening picture ----------------------------------------------------------------------------

def test_toy_ensemble_members_agree_on_training_points_and_not_between():
    toy = E.toy_ensemble_1d()
    assert toy["probs"].shape == (4, 401, 2) and toy["grid"].shape == (401,)
    assert bool((toy["train_acc"] == 1).all())
    assert toy["diversity_train"].max() < 0.01 * toy["diversity"].max()
    short = E.toy_ensemble_1d(size=2, steps=3)
    assert torch.equal(short["probs"], E.toy_ensemble_1d(size=2, steps=3)["probs"])  # deterministic (float64, seeds)
    fig = E.plot_toy_ensemble(toy)
    ax, ax_d = fig.axes
    assert ax.get_ylabel() and ax_d.get_xlabel() == "input x" and ax.get_legend() is not None


def test_batch_ensemble_layers_keep_bf16_and_channels_last_under_autocast():
    """Fast weights are cast to the activations' dtype: bf16 stays bf16 (no silent float32 copies)."""
    conv = E.BatchEnsembleConv2d(3, 8, 3, 2, padding=1)
    lin = E.BatchEnsembleLinear(8, 3, 2)
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        z = lin(y.mean((2, 3)))
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert z.dtype == torch.bfloat16 and z.shape == (4, 3)


# --- issue 15: DEE below one member, the row space of the teacher's Jacobian, ODS's clipping ----------

def test_dee_score_marks_a_model_worse_than_one_member():
    ladder = [0.80, 0.72, 0.69, 0.68]
    assert E.dee_score(0.70, ladder) == pytest.approx(2 + 0.02 / 0.03)
    assert E.dee_score(0.80, ladder) == 1.0  # exactly one member's
    assert E.dee_score(0.95, ladder) == -math.inf  # worse than one member: shown "≤ 1", not "1.00"
    assert metrics.deep_ensemble_equivalent(0.95, ladder) == 1.0  # (the definition's value)
    assert E.dee_score(0.60, ladder) == math.inf
    with pytest.raises(ValueError, match="ensemble_nlls"):
        E.dee_score(0.7, [])
    with pytest.raises(ValueError, match="nll_value"):
        E.dee_score(float("nan"), ladder)


def _mlp(seed: int, d: int = 48, k: int = 5, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k)).double()


def test_softmax_jacobian_is_the_finite_difference_jacobian_of_rank_k_minus_1():
    model = _mlp(0)
    x = torch.rand(2, 3, 4, 4, generator=gen(50), dtype=D64)
    jac = E.softmax_jacobian(model, x, temperature=2.0)
    assert jac.shape == (2, 5, 48)
    h, i, col = 1e-6, 1, 17
    bump = torch.zeros(1, 48, dtype=D64)
    bump[0, col] = h
    f = lambda v: torch.softmax(model(v) / 2.0, -1)  # noqa: E731
    fd = (f(x[i:i + 1].flatten(1) + bump) - f(x[i:i + 1].flatten(1) - bump))[0] / (2 * h)
    assert torch.allclose(jac[i, :, col], fd, rtol=1e-6, atol=1e-10)
    assert torch.linalg.matrix_rank(jac[0]).item() == 4  # probabilities sum to one: K - 1 directions
    assert torch.allclose(jac.sum(1), torch.zeros(2, 48, dtype=D64), atol=1e-15)
    with pytest.raises(ValueError, match="temperature"):
        E.softmax_jacobian(model, x, 0.0)
    with pytest.raises(ValueError, match="batch"):
        E.softmax_jacobian(model, x[0, 0, 0])


def test_row_space_fraction_is_one_for_ods_and_about_sqrt_r_over_d_for_gaussian_steps():
    d, k = 3 * 16 * 16, 10
    model = _mlp(1, d, k, 32)
    x = torch.rand(1, 3, 16, 16, generator=gen(51), dtype=D64)
    jac = E.softmax_jacobian(model, x)[0]
    w = torch.rand(8, k, generator=gen(52), dtype=D64) * 2 - 1
    ods = E.ods_direction(model, x.repeat(8, 1, 1, 1), w)
    assert torch.allclose(E.row_space_fraction(jac, ods), torch.ones(8, dtype=D64), atol=1e-9)
    xi = torch.randn(3000, d, generator=gen(53), dtype=D64)
    rms = E.row_space_fraction(jac, xi).pow(2).mean().sqrt().item()
    assert rms == pytest.approx(math.sqrt((k - 1) / d), rel=0.02)  # sqrt(k / d) is 5 % off: K - 1, not K
    assert rms != pytest.approx(math.sqrt(k / d), rel=0.02)
    # a direction orthogonal to the row space: fraction 0; one in it: 1
    _, _, vh = torch.linalg.svd(jac, full_matrices=False)
    assert E.row_space_fraction(jac, vh[:1]).item() == pytest.approx(1.0, abs=1e-9)
    assert E.row_space_fraction(jac, vh[-1:]).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        E.row_space_fraction(jac.unsqueeze(0), xi)
    with pytest.raises(ValueError, match="D = 768"):
        E.row_space_fraction(jac, xi[:, :10])


def test_frobenius_jacobian_penalty_is_the_gaussian_expectation_of_the_directional_penalty():
    t, s = _mlp(2), _mlp(3)
    x = torch.rand(2, 3, 4, 4, generator=gen(54), dtype=D64)
    full = E.frobenius_jacobian_penalty(t, s, x, temperature=2.0)
    # exact: the sum of the directional penalties over the D coordinate directions (E[xi xi^T] = I)
    eye = torch.eye(48, dtype=D64).view(48, 3, 4, 4)
    for i in range(2):
        per_axis = E.jacobian_matching_penalty(t, s, x[i:i + 1].expand(48, -1, -1, -1), eye, 2.0)
        assert full[i].item() == pytest.approx(per_axis.sum().item(), rel=1e-10)
    # restricted to a basis of the whole space: unchanged; to nothing but one axis: that axis's penalty
    assert torch.allclose(E.frobenius_jacobian_penalty(t, s, x, 2.0, within=torch.eye(48, dtype=D64)), full)
    one_axis = E.frobenius_jacobian_penalty(t, s, x[:1], 2.0, within=torch.eye(48, dtype=D64)[5:6])
    assert one_axis.item() == pytest.approx(
        E.jacobian_matching_penalty(t, s, x[:1], eye[5:6], 2.0).item(), rel=1e-10)
    with pytest.raises(ValueError, match="within"):
        E.frobenius_jacobian_penalty(t, s, x, within=torch.eye(3, dtype=D64))


def test_ods_perturb_clips_exactly_the_pixels_that_leave_the_unit_range():
    """The clipping path, on a non-linear model and images with saturated pixels, against a step built
    independently (torch.func.vjp for J^T w, a torch.where for the clip)."""
    model = _mlp(4)
    x = torch.rand(4, 3, 4, 4, generator=gen(55), dtype=D64)
    x[:, 0] = 0.0
    x[:, 1, :2] = 1.0  # saturated pixels, as in real images
    w = torch.rand(4, 5, generator=gen(56), dtype=D64) * 2 - 1
    eta, temperature = 16 / 255, 2.0
    _, vjp = torch.func.vjp(lambda v: torch.softmax(model(v) / temperature, -1), x)
    (g,) = vjp(w)
    unit = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    conf = torch.softmax(model(x) / temperature, -1).max(-1).values.view(-1, 1, 1, 1)
    for confidence, c in ((False, 1.0), (True, conf)):
        raw = x + eta * math.sqrt(48) * c * unit
        want = torch.where(raw > 1, torch.ones_like(raw), torch.where(raw < 0, torch.zeros_like(raw), raw))
        got = E.ods_perturb(model, x, eta, w=w, temperature=temperature, confidence=confidence)
        assert ((raw < 0) | (raw > 1)).sum() > 10  # the clip is exercised
        assert torch.allclose(got, want, atol=1e-12)
    # ConfODS moves no pixel further than ODS: c <= 1
    ods = E.ods_perturb(model, x, eta, w=w, temperature=temperature)
    conf_ods = E.ods_perturb(model, x, eta, w=w, temperature=temperature, confidence=True)
    assert ((conf_ods - x).abs() <= (ods - x).abs() + 1e-15).all() and (conf <= 1).all() and (conf >= 1 / 5).all()


@pytest.mark.parametrize("call, name", [
    (lambda: E.create_member(20, 16, 0), "num_classes"),
    (lambda: E.create_member(20, 16, 1), "num_classes"),
    (lambda: E.create_member(20, 16, 10.0), "num_classes"),
    (lambda: E.create_member(21, 16, 10), "depth"),
    (lambda: E.create_member(2, 16, 10), "depth"),
    (lambda: E.create_member(20, True, 10), "width"),
    (lambda: E.create_member(20, -4, 10), "width"),
    (lambda: E.new_deep_ensemble(8, 4, 10, size=1), "size"),
    (lambda: E.new_deep_ensemble(8, 4, 10, size=2.0), "size"),
    (lambda: E.new_deep_ensemble(8, 4, 10, seed=-1), "seed"),
    (lambda: E.new_deep_ensemble(8, 4, 1), "num_classes"),
    (lambda: E.BatchEnsembleResNet(8, 4, 1), "num_classes"),
    (lambda: E.BatchEnsembleResNet(8, 0, 10), "width"),
    (lambda: E.BatchEnsembleResNet(8, 4, 10, ensemble_size=0), "ensemble_size"),
    (lambda: E.BatchEnsembleResNet("8", 4, 10), "depth"),
    (lambda: E.BatchEnsembleConv2d(3, 4, 3, 2, padding=-1), "padding"),
    (lambda: E.BatchEnsembleConv2d(3, 4, 0, 2), "kernel_size"),
    (lambda: E.BatchEnsembleLinear(4, 0, 2), "out_features"),
    (lambda: E.BatchEnsembleLinear(4, 3, True), "ensemble_size"),
])
def test_constructors_reject_bad_sizes_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_train_and_pretrain_reject_bad_sizes_before_training(small, data_dir):
    de = E.new_deep_ensemble(8, 4, 10, size=2, seed=0)
    recipe = Recipe(epochs=1, batch_size=128, lr=0.05)
    with pytest.raises(ValueError, match="depth"):
        E.train_student(de, small, recipe, "kd", depth=9, width=4)
    with pytest.raises(ValueError, match="width"):
        E.train_student(de, small, recipe, "kd", depth=8, width=0)
    with pytest.raises(ValueError, match="size"):
        E.pretrained_ensemble(small, 8, 4, 1, recipe=recipe, profile="smoke")
    with pytest.raises(ValueError, match="data"):
        E.pretrained_ensemble("shapes", 8, 4, 2, recipe=recipe, profile="smoke")
    assert not (data_dir / "checkpoints").exists()  # nothing trained, nothing written
