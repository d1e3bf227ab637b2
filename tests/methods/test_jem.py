"""Chapter 6 (JEM): energies, the shift property, SGLD, the replay buffer, the pixel space,
the objective (the loss it trains, its terms, its divergence guard), train_jem, OOD scores,
the 2-D toy, the figures and the exercises' self-checks (the last three live in jem_plots and
exercises.jem and are re-exported by jem)."""
from __future__ import annotations

import dataclasses
import math
import sys

import matplotlib.figure
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minidistill.train as train_module
from minidistill.data import Dataset, DeviceLoader, make_shapes
from minidistill.exercises import jem as jem_exercises
from minidistill.losses import Objective
from minidistill.methods import jem, jem_plots
from minidistill.models import PreActBlock, create_model
from minidistill.runtime import seed_everything
from minidistill.train import History, Recipe, TrainingDiverged

G = torch.Generator().manual_seed(0)
Z = torch.randn(7, 5, generator=G, dtype=torch.float64) * 3
Y = torch.randint(0, 5, (7,), generator=G)
ONE = Recipe(epochs=1, batch_size=64, lr=1e-3, weight_decay=0.0, optimizer="adam")


@pytest.fixture
def one_thread():
    """Sampler tests move tiny tensors many times: one thread avoids synchronisation overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Linear(nn.Module):
    """logits = W x + b on flattened inputs: small, smooth, deterministic."""

    def __init__(self, d: int, k: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(k, d, generator=g) * 0.1)
        self.b = nn.Parameter(torch.zeros(k))

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


# -- energies --------------------------------------------------------------------------------

def test_energy_is_minus_logsumexp():
    by_hand = -torch.log(torch.exp(Z).sum(-1))
    assert torch.allclose(jem.energy(Z), by_hand, atol=1e-12)
    assert jem.energy(torch.zeros(2, 3, 4)).shape == (2, 3)
    assert torch.allclose(jem.energy(torch.zeros(1, 4)), torch.tensor([-math.log(4)]))


def test_energy_is_finite_for_huge_logits_and_upcasts_half_precision():
    big = Z * 1000
    assert torch.isfinite(jem.energy(big)).all()
    assert torch.allclose(jem.energy(big), -big.max(-1).values, rtol=1e-3)
    assert jem.energy(Z.bfloat16()).dtype == torch.float32


def test_joint_energy_and_bayes_rule_give_the_softmax():
    e_xy, e_x = jem.joint_energy(Z, Y), jem.energy(Z)
    assert torch.allclose(e_xy, -Z[torch.arange(7), Y])
    # p(y|x) = p(x, y) / p(x) = exp(-E(x, y)) / exp(-E(x)): Z(theta) cancels
    assert torch.allclose((e_x - e_xy).exp(), Z.softmax(-1)[torch.arange(7), Y])


def test_shift_changes_the_energy_but_not_the_classifier():
    c = torch.randn(7, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5
    assert torch.allclose((Z + c).softmax(-1), Z.softmax(-1), atol=1e-12)
    assert torch.allclose(jem.energy(Z + c), jem.energy(Z) - c.squeeze(1), atol=1e-12)
    assert not torch.allclose(jem.energy(Z + c), jem.energy(Z))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 4, dtype=torch.int64), "floating-point"),
    (torch.tensor(1.0), r"\[\.\.\., K\]"),
    ([1.0, 2.0], "floating-point"),
])
def test_energy_rejects_bad_logits(bad, match):
    with pytest.raises(ValueError, match=match):
        jem.energy(bad)


def test_joint_energy_rejects_bad_targets():
    with pytest.raises(ValueError, match="y must be int64"):
        jem.joint_energy(Z, Y.int())
    with pytest.raises(ValueError, match=r"shape \[7\]"):
        jem.joint_energy(Z, Y[:3])
    with pytest.raises(ValueError, match="2-D"):
        jem.joint_energy(Z[0], Y[:1])


@pytest.mark.parametrize("bad, values", [(5, "from 0 to 5"), (-1, "from -1 to 4"), (100, "from 0 to 100")])
def test_functions_taking_labels_reject_labels_outside_the_classes(bad, values):
    y = Y.clone()
    y[0] = bad
    y[1] = 4 if bad < 0 else 0
    want = rf"y must hold class indices in \[0, 5\) for logits of 5 classes, got values {values}"
    with pytest.raises(ValueError, match=want):
        jem.joint_energy(Z, y)
    with pytest.raises(ValueError, match=want):
        jem.jem_loss(Z, y, Z)
    assert jem.joint_energy(Z[:0], Y[:0]).shape == (0,)        # an empty batch has no range to check


def test_toy_functions_reject_bad_labels():
    x, y = jem.toy_mixture(30, seed=0)
    with pytest.raises(ValueError, match=r"y must hold class indices in >= 0, got values from -1"):
        jem.train_toy_jem(x, torch.where(y == 0, -1, y), steps=1)
    model = jem.ToyClassifier(3, 8).double()
    with pytest.raises(ValueError, match=r"labels must hold class indices in \[0, 10\)"):
        jem.plot_energy_landscape(model, points=x, labels=y + 9, n=8)
    with pytest.raises(ValueError, match="labels must be int64"):
        jem.plot_energy_landscape(model, points=x, labels=y[:5], n=8)
    with pytest.raises(ValueError, match="pass points too"):
        jem.plot_energy_landscape(model, labels=y, n=8)


def test_px_loss_value_and_gradient_is_the_difference_of_expectations():
    model = Linear(3, 4).double()
    xd = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    xq = torch.randn(9, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss = jem.px_loss(model(xd), model(xq))
    assert torch.allclose(loss, jem.energy(model(xd)).mean() - jem.energy(model(xq)).mean())
    grads = torch.autograd.grad(loss, list(model.parameters()))

    def mean_grad(x):   # E[dE/dtheta] over a batch, one sample at a time
        per = [torch.autograd.grad(jem.energy(model(xi[None])).sum(), list(model.parameters())) for xi in x]
        return [torch.stack(g).mean(0) for g in zip(*per)]

    want = [a - b for a, b in zip(mean_grad(xd), mean_grad(xq))]
    assert all(torch.allclose(g, w, atol=1e-12) for g, w in zip(grads, want))


def test_jem_loss_combines_cross_entropy_and_the_px_term():
    lq = Z.flip(0) + 1
    ce, lse_d, lse_q = F.cross_entropy(Z, Y), torch.logsumexp(Z, -1).mean(), torch.logsumexp(lq, -1).mean()
    loss, terms = jem.jem_loss(Z, Y, None, px_weight=0.0)
    assert torch.allclose(loss, ce) and set(terms) == {"ce", "energy_data"}
    loss, terms = jem.jem_loss(Z, Y, lq)
    # the p(x) term, by hand: mean E(data) - mean E(samples) = -mean LSE(data) + mean LSE(samples)
    assert torch.allclose(loss, ce - lse_d + lse_q)
    loss, terms = jem.jem_loss(Z, Y, lq, px_weight=0.5, pyx_weight=2.0)
    assert torch.allclose(loss, 2 * ce + 0.5 * (lse_q - lse_d))
    assert set(terms) == {"ce", "energy_data", "energy_samples", "gap"}
    assert torch.allclose(terms["ce"], ce) and torch.allclose(terms["gap"], lse_q - lse_d)
    assert torch.allclose(terms["energy_data"], -lse_d) and torch.allclose(terms["energy_samples"], -lse_q)
    assert not any(t.requires_grad for t in terms.values())
    with pytest.raises(ValueError, match="needs logits_samples"):
        jem.jem_loss(Z, Y)
    with pytest.raises(ValueError, match="px_weight"):
        jem.jem_loss(Z, Y, lq, px_weight=-1.0)
    with pytest.raises(ValueError, match="same number of classes"):
        jem.px_loss(Z, Z[:, :3])


# -- the sampler -----------------------------------------------------------------------------

def test_the_objective_trains_what_jem_loss_computes_without_re_checking_labels(monkeypatch):
    model, obj, x, y = _gap_objective(px_weight=0.5, pyx_weight=2.0)
    want, want_terms = jem.jem_loss(model(x), y, model(obj.buffer.samples[:5]), 0.5, 2.0)
    monkeypatch.setattr(jem, "_check_targets", lambda *a, **k: pytest.fail("label range read per step"))
    loss, _, terms = obj(model, x, y)
    assert torch.allclose(loss, want, atol=1e-12) and all(torch.allclose(terms[k], want_terms[k]) for k in terms)


def test_langevin_noise_and_temperature():
    assert jem.langevin_noise(0.5) == pytest.approx(1.0)
    assert jem.sampler_temperature(0.5, 1.0) == pytest.approx(1.0)
    assert jem.sampler_temperature(1.0, 0.01) == pytest.approx(5e-5)
    assert jem.sampler_temperature(0.02, jem.langevin_noise(0.02)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step_size"):
        jem.langevin_noise(0.0)
    with pytest.raises(ValueError, match="noise"):
        jem.sampler_temperature(1.0, -0.1)


def quadratic(mu):
    return lambda x: 0.5 * ((x - mu) ** 2).sum(-1)


def test_sgld_without_noise_descends_a_quadratic_energy_exactly():
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    energies = [quadratic(mu)(x0)]
    x = x0
    for _ in range(5):
        x = jem.sgld(quadratic(mu), x, n_steps=1, step_size=0.3, noise=0.0)
        energies.append(quadratic(mu)(x))
    # gradient descent on |x - mu|^2 / 2: x_k - mu = (1 - alpha)^k (x_0 - mu)
    assert torch.allclose(x - mu, 0.7**5 * (x0 - mu), atol=1e-12)
    assert all(bool((a > b).all()) for a, b in zip(energies, energies[1:]))
    assert not x.requires_grad


def test_sgld_with_langevin_noise_samples_the_density_and_the_papers_noise_does_not(one_thread):
    # E = |x|^2 / 2 is N(0, I); unadjusted Langevin with step a has stationary variance
    # T / (1 - a/2) at temperature T = sigma^2 / (2a)
    a, g = 0.2, torch.Generator().manual_seed(5)
    x0 = torch.randn(5000, 2, generator=g, dtype=torch.float64) * 3
    xs = jem.sgld(quadratic(0.0), x0, 60, a, jem.langevin_noise(a), generator=g)
    assert xs.var().item() == pytest.approx(1 / (1 - a / 2), rel=0.06)      # 4 standard errors
    paper = jem.sgld(quadratic(0.0), x0, 60, a, math.sqrt(2 * a * 5e-5), generator=g)
    assert paper.var().item() == pytest.approx(5e-5 / (1 - a / 2), rel=0.06)


def test_sgld_is_reproducible_with_a_generator_and_clamps_to_bounds():
    x0 = torch.zeros(8, 3)
    a = jem.sgld(quadratic(5.0), x0, 3, 0.5, 0.1, generator=torch.Generator().manual_seed(0))
    b = jem.sgld(quadratic(5.0), x0, 3, 0.5, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    c = jem.sgld(quadratic(5.0), x0, 3, 0.5, 0.1, generator=torch.Generator().manual_seed(0), bounds=(-1.0, 1.0))
    assert c.max().item() <= 1.0 and a.max().item() > 1.0


def test_sgld_works_under_no_grad_and_zero_steps_is_the_identity():
    x0 = torch.ones(4, 2)
    with torch.no_grad():
        x = jem.sgld(quadratic(0.0), x0, 2, 0.5, 0.0)
    assert torch.allclose(x, 0.25 * x0)
    assert torch.equal(jem.sgld(quadratic(0.0), x0, 0), x0)


def test_sgld_rejects_bad_arguments():
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="one energy per chain"):
        jem.sgld(lambda x: (x**2).sum(), x0, 1)
    with pytest.raises(ValueError, match="n_steps"):
        jem.sgld(quadratic(0.0), x0, -1)
    with pytest.raises(ValueError, match="step_size"):
        jem.sgld(quadratic(0.0), x0, 1, step_size=float("nan"))
    with pytest.raises(ValueError, match="x must be a floating-point"):
        jem.sgld(quadratic(0.0), torch.zeros(4, 2, dtype=torch.int64), 1)


def test_replay_buffer_starts_uniform_and_restarts_at_the_given_rate():
    buf = jem.ReplayBuffer(5000, (3, 2, 2), low=-1.0, high=1.0, reinit_prob=0.05)
    assert buf.samples.shape == (5000, 3, 2, 2) and len(buf) == 5000
    assert buf.samples.min() >= -1 and buf.samples.max() <= 1
    assert abs(buf.samples.mean().item()) < 0.02 and buf.samples.var().item() == pytest.approx(1 / 3, rel=0.05)
    buf.samples.fill_(7.0)                      # a value no restart can produce
    g = torch.Generator().manual_seed(0)
    x0, idx = buf.sample(100_000, generator=g)
    fresh = (x0 != 7.0).flatten(1).all(1)
    assert ((x0 == 7.0).flatten(1).all(1) | fresh).all()     # whole states, never mixed
    assert fresh.double().mean().item() == pytest.approx(0.05, abs=0.003)   # 6 standard errors
    assert idx.min() >= 0 and idx.max() < 5000


def test_replay_buffer_extremes_and_update():
    buf = jem.ReplayBuffer(10, (2,), low=0.0, high=1.0, reinit_prob=0.0)
    buf.samples.fill_(3.0)
    assert (buf.sample(50)[0] == 3.0).all()
    buf.reinit_prob = 1.0
    assert (buf.sample(50)[0] <= 1.0).all()
    idx = torch.tensor([2, 5])
    buf.update(idx, torch.full((2, 2), -4.0))
    assert (buf.samples[idx] == -4.0).all() and (buf.samples[[0, 1, 3]] == 3.0).all()
    with pytest.raises(ValueError, match="must be"):
        buf.update(idx, torch.zeros(2, 3))
    # a row drawn twice keeps the last chain's state, whatever order the threads write in
    big = jem.ReplayBuffer(8, (4096,), reinit_prob=0.0)
    rows = torch.tensor([3, 1, 3, 3, 1, 6])
    big.update(rows, torch.arange(6.0)[:, None].expand(6, 4096))
    assert big.samples[3].eq(3.0).all() and big.samples[1].eq(4.0).all() and big.samples[6].eq(5.0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=0, shape=(2,)), "size"),
    (dict(size=4, shape=(2,), reinit_prob=1.5), "reinit_prob"),
    (dict(size=4, shape=(2,), low=1.0, high=1.0), "low < high"),
])
def test_replay_buffer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jem.ReplayBuffer(**kwargs)


# -- the input space -------------------------------------------------------------------------

def test_pixel_space_gives_exactly_what_the_loader_feeds_the_network(tiny):
    space = jem.PixelSpace.from_dataset(tiny)
    loader = DeviceLoader.from_dataset(tiny, "test", 32, train=False, device="cpu", channels_last=False)
    xb, _ = next(iter(loader))
    u = jem.PixelSpace.from_uint8(tiny.x_test[:32])
    assert u.min() >= -1 and u.max() <= 1
    assert torch.allclose(space.to_model(u), xb, atol=1e-5)
    assert torch.allclose(space.from_model(xb), u, atol=1e-5)
    # the ends of the pixel range: 0 -> -1 and 255 -> +1
    ends = jem.PixelSpace.from_uint8(torch.tensor([0, 255], dtype=torch.uint8))
    assert ends.tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="uint8"):
        jem.PixelSpace.from_uint8(torch.zeros(2))
    with pytest.raises(ValueError, match="std > 0"):
        jem.PixelSpace((0.5, 0.5), (0.2, 0.0))


def test_the_objective_samples_in_pixel_space_through_the_map(tiny):
    space = jem.PixelSpace.from_dataset(tiny)
    model = Linear(3 * 16 * 16, 10)
    buf = jem.ReplayBuffer(32, (3, 16, 16), reinit_prob=0.0)
    obj = jem.JEMObjective(buf, space, n_steps=1, step_size=1.0, noise=0.0)
    g = torch.Generator().manual_seed(0)
    u0 = buf.samples.clone()
    torch.manual_seed(0)
    xq = obj.sample(model, 8)
    torch.manual_seed(0)
    idx = torch.randint(0, 32, (8,))
    u = u0[idx].clone().requires_grad_(True)
    (grad_u,) = torch.autograd.grad(jem.energy(model(space.to_model(u))).sum(), u)
    # the step is taken in [-1, 1] pixels: the gradient carries the chain rule factor 1 / (2 std)
    assert torch.allclose(xq, u0[idx] - grad_u, atol=1e-6)
    x = space.to_model(u0[idx]).requires_grad_(True)
    (grad_x,) = torch.autograd.grad(jem.energy(model(x)).sum(), x)
    assert torch.allclose(grad_u, grad_x / (2 * space.std), atol=1e-6)
    assert torch.equal(buf.samples[idx], xq)


# -- the objective and its guard -------------------------------------------------------------

def test_objective_forward_trains_both_terms_and_writes_the_buffer_back(tiny):
    seed_everything(0)
    model = jem.energy_model("resnet8", 10)
    buf = jem.ReplayBuffer(100, (3, 16, 16))
    before = buf.samples.clone()
    obj = jem.JEMObjective(buf, jem.PixelSpace.from_dataset(tiny), n_steps=2, n_samples=16)
    x = jem.PixelSpace.from_dataset(tiny).to_model(jem.PixelSpace.from_uint8(tiny.x_train[:24]))
    loss, logits, terms = obj(model, x, tiny.y_train[:24])
    assert isinstance(obj, Objective)
    assert loss.ndim == 0 and logits.shape == (24, 10) and model.training
    assert set(terms) == {"ce", "energy_data", "energy_samples", "gap"}
    assert torch.allclose(terms["gap"], terms["energy_data"] - terms["energy_samples"])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    changed = (buf.samples != before).flatten(1).any(1)
    assert 1 <= int(changed.sum()) <= 16


def _gap_objective(px_weight=1.0, pyx_weight=1.0):
    """A linear model on 2-D points and an objective whose SGLD samples are all one known point
    (no SGLD steps, no restarts, every buffer row the same), so the loss can be written by hand."""
    model = Linear(2, 3).double()
    buf = jem.ReplayBuffer(8, (2,), reinit_prob=0.0, dtype=torch.float64)
    buf.samples.copy_(torch.tensor([2.0, -1.0], dtype=torch.float64).expand(8, 2))
    obj = jem.JEMObjective(buf, None, n_steps=0, data_noise=0.0, n_samples=5,
                           px_weight=px_weight, pyx_weight=pyx_weight)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2
    return model, obj, x, torch.tensor([0, 1, 2, 0, 1, 2])


def test_the_loss_the_objective_trains_is_ce_plus_the_energy_gap_written_by_hand():
    # written without jem.energy / jem_loss: a sign flipped in the p(x) term of the code that
    # trains (the objective or jem_loss) changes the value and the gradient
    model, obj, x, y = _gap_objective(px_weight=0.5, pyx_weight=2.0)
    loss, logits, terms = obj(model, x, y)
    lse_d = torch.logsumexp(model(x), -1).mean()
    lse_q = torch.logsumexp(model(obj.buffer.samples[:1]), -1).mean()
    want = 2.0 * F.cross_entropy(model(x), y) + 0.5 * (-lse_d + lse_q)
    assert torch.allclose(loss, want, atol=1e-12)
    grads, want_grads = (torch.autograd.grad(v, list(model.parameters())) for v in (loss, want))
    assert all(torch.allclose(g, w, atol=1e-12) for g, w in zip(grads, want_grads))
    assert torch.allclose(terms["gap"], (-lse_d + lse_q).detach(), atol=1e-12)


def test_a_step_on_the_px_term_lowers_the_data_energy_below_the_samples():
    model, obj, x, y = _gap_objective(pyx_weight=0.0)
    gaps = []
    for _ in range(2):
        loss, _, terms = obj(model, x, y)
        gaps.append(terms["gap"].item())
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
    # the gap E(data) - E(samples) falls: data energy down, sample energy up
    assert gaps[1] < gaps[0] - 1e-3


def test_objective_with_px_weight_zero_is_the_plain_classifier(tiny):
    model = Linear(3 * 16 * 16, 10)
    buf = jem.ReplayBuffer(10, (3, 16, 16))
    before = buf.samples.clone()
    obj = jem.JEMObjective(buf, jem.PixelSpace.from_dataset(tiny), px_weight=0.0, data_noise=0.0)
    x = torch.randn(5, 3, 16, 16)
    y = torch.arange(5)
    loss, logits, terms = obj(model, x, y)
    assert torch.allclose(loss, F.cross_entropy(model(x), y)) and torch.equal(buf.samples, before)
    assert set(terms) == {"ce", "energy_data"} and torch.allclose(terms["ce"], loss.detach())


def test_data_noise_is_added_in_pixel_space(tiny, monkeypatch):
    space = jem.PixelSpace.from_dataset(tiny)
    seen = []
    model = Linear(3 * 16 * 16, 10)
    obj = jem.JEMObjective(jem.ReplayBuffer(4, (3, 16, 16)), space, px_weight=0.0, data_noise=0.1)
    monkeypatch.setattr(model, "forward", lambda x: seen.append(x) or torch.zeros(len(x), 10))
    x = space.to_model(torch.zeros(4000, 3, 16, 16))
    obj(model, x, torch.zeros(4000, dtype=torch.int64))
    noise_u = space.from_model(seen[0])
    assert noise_u.std().item() == pytest.approx(0.1, rel=0.02) and abs(noise_u.mean().item()) < 0.01


def test_guard_raises_on_the_check_step_with_a_report():
    model = Linear(2, 3)
    obj = jem.JEMObjective(jem.ReplayBuffer(50, (2,)), None, n_steps=1, data_noise=0.0,
                           max_energy_gap=1e-9, check_every=3)
    obj.steps_per_epoch = obj.total_steps = 100        # as fit sets them: its step counter drives the guard
    x, y = torch.randn(8, 2) * 5, torch.zeros(8, dtype=torch.int64)
    for obj.step in (0, 1):                            # the gap is read only every 3 steps
        obj(model, x, y)
    obj.step = 2
    with pytest.raises(jem.JEMDiverged, match=r"by training step 3: the energy gap .* reached .*limit 1e-09"):
        obj(model, x, y)
    obj.step = 97
    obj(model, x, y)                                   # not a check step: the worst gap is only kept
    obj.step = 99
    with pytest.raises(jem.JEMDiverged, match="by training step 100"):   # the last step is checked too
        obj(model, x, y)
    assert issubclass(jem.JEMDiverged, TrainingDiverged)


def test_guard_holds_nothing_over_an_epochs_end():
    # checkpoints are written between epochs: a gap seen in an epoch is judged before it ends
    obj = jem.JEMObjective(jem.ReplayBuffer(50, (2,)), None, n_steps=1, data_noise=0.0,
                           max_energy_gap=1e-9, check_every=5)
    obj.steps_per_epoch, obj.total_steps = 4, 100
    x, y = torch.randn(8, 2) * 5, torch.zeros(8, dtype=torch.int64)
    for obj.step in (0, 1, 2):
        obj(Linear(2, 3), x, y)
    assert obj._worst is not None
    obj.step = 3                                       # the epoch's last step, not a multiple of check_every
    with pytest.raises(jem.JEMDiverged, match="by training step 4"):
        obj(Linear(2, 3), x, y)
    assert obj._worst is None


def test_guard_catches_a_nan_gap():
    class NanOnSamples(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2, 3))

        def forward(self, x):
            out = x @ self.w
            return torch.where(x.abs().sum(1, keepdim=True) > 50, torch.full_like(out, float("nan")), out)

    buf = jem.ReplayBuffer(20, (2,), low=100.0, high=200.0)         # every sample gives NaN logits
    obj = jem.JEMObjective(buf, None, n_steps=0, data_noise=0.0, check_every=1)
    with pytest.raises(jem.JEMDiverged, match="reached nan"):
        obj(NanOnSamples(), torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64))


def test_train_jem_stops_a_real_divergence_before_the_loss_is_nan(tiny):
    # with no SGLD steps the "samples" stay uniform noise, so nothing bounds the energy gap
    model = Linear(3 * 16 * 16, 10)
    with pytest.raises(jem.JEMDiverged, match="energy gap") as info:
        jem.train_jem(model, tiny, ONE.replace(epochs=20, lr=1.0, schedule="constant"), n_steps=0, buffer_size=200)
    worst = float(str(info.value).split("reached ")[1].split(" ")[0])
    assert 1e3 < worst < float("inf")                    # stopped on the gap, while still finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_steps=-1), "n_steps"), (dict(step_size=-1.0), "step_size"), (dict(data_noise=float("inf")), "data_noise"),
    (dict(max_energy_gap=0.0), "max_energy_gap"), (dict(check_every=0), "check_every"), (dict(n_samples=0), "n_samples"),
])
def test_objective_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jem.JEMObjective(jem.ReplayBuffer(4, (2,)), **kwargs)
    with pytest.raises(ValueError, match="ReplayBuffer"):
        jem.JEMObjective(torch.zeros(4, 2))


# -- the network and train_jem ---------------------------------------------------------------

def test_without_batchnorm_removes_batch_statistics_and_starts_residual_blocks_at_identity():
    seed_everything(0)
    model = jem.energy_model("wrn_16_2", 10).train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(6, 3, 16, 16)
    # one image's logits no longer depend on the rest of its batch, even in train mode
    assert torch.allclose(model(x)[:2], model(x[:2]), atol=1e-5)
    block = next(m for m in model.modules() if isinstance(m, PreActBlock) and m.shortcut is None)
    h = torch.randn(2, block.conv1.in_channels, 8, 8)
    assert torch.equal(block(h), h)
    kept = jem.without_batchnorm(create_model("resnet8", 10), zero_init_residual=False)
    assert all(m.weight.abs().sum() > 0 for m in kept.modules() if isinstance(m, nn.Conv2d))


def test_train_jem_runs_and_logs_the_objectives_terms(tiny):
    tiny = dataclasses.replace(tiny, x_train=tiny.x_train[:128], y_train=tiny.y_train[:128])
    result = jem.train_jem("resnet8", tiny, ONE.replace(epochs=2), n_steps=1, buffer_size=100, eval_every=None)
    model, history, objective = result
    assert isinstance(result, jem.JEMResult) and result.model is model
    assert len(history) == 2 and 0 <= history.final("test_acc") <= 100 and math.isnan(history["test_acc"][0])
    assert history.meta["jem"]["n_steps"] == 1 and history.meta["jem"]["step_size"] == 1.0
    assert objective.buffer.samples.shape == (100, 3, 16, 16)
    # the History carries the loss's terms; what fit minimised (train_loss) is ce + gap at weights 1
    for r in history.records:
        assert r["train_gap"] == pytest.approx(r["train_energy_data"] - r["train_energy_samples"], abs=1e-4)
        assert r["train_loss"] == pytest.approx(r["train_ce"] + r["train_gap"], rel=1e-4, abs=1e-4)
        assert abs(r["train_gap"]) > 1e-3                # so a flipped sign would show
    plain = jem.train_jem("resnet8", tiny, ONE, px_weight=0.0, buffer_size=10, eval_every=None).history
    assert "train_energy_data" in plain.records[0] and "train_gap" not in plain.records[0]
    assert plain.final("train_loss") == pytest.approx(plain.final("train_ce"), rel=1e-5)


def test_train_jem_builds_on_train_model_from_the_seed(tiny, monkeypatch):
    seen = []

    def fake_fit(model, data, objective, recipe, **kw):
        seen.append(({k: v.clone() for k, v in model.state_dict().items()}, objective, kw))
        return History()

    monkeypatch.setattr(train_module, "fit", fake_fit)
    jem.train_jem("resnet8", tiny, ONE, seed=3, eval_every=None)
    jem.train_jem("resnet8", tiny, ONE, seed=3, px_weight=0.0)
    jem.train_jem("resnet8", tiny, ONE, seed=4)
    (a, obj_a, kw_a), (b, obj_b, kw_b), (c, obj_c, _) = seen
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert obj_a.px_weight == 1.0 and obj_b.px_weight == 0.0
    # the replay buffer starts from the seed alone
    assert torch.equal(obj_a.buffer.samples, obj_b.buffer.samples)
    assert not torch.equal(obj_a.buffer.samples, obj_c.buffer.samples)
    assert kw_a["eval_every"] is None and kw_a["seed"] == 3 and kw_a["description"] == "JEM resnet8 (seed 3)"
    assert kw_b["description"] == "plain resnet8 (seed 3)"


class Killed(Exception):
    """Stands for kill -9: the process stops mid-epoch and keeps only the last checkpoint."""


def test_a_killed_jem_run_resumes_from_its_checkpoint_exactly(tiny, tmp_path, monkeypatch):
    tiny = dataclasses.replace(tiny, x_train=tiny.x_train[:128], y_train=tiny.y_train[:128])
    recipe, kw = ONE.replace(epochs=3), dict(n_steps=2, buffer_size=64, eval_every=None, progress=False)
    straight = jem.train_jem("resnet8", tiny, recipe, **kw)          # 2 steps per epoch, never stopped
    assert jem.JEMObjective.resumable

    path, real_sgld, calls = tmp_path / "jem.pt", jem.sgld, []

    def dying_sgld(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:                                          # epoch 3's first step
            raise Killed
        return real_sgld(*args, **kwargs)

    monkeypatch.setattr(jem, "sgld", dying_sgld)
    with pytest.raises(Killed):
        jem.train_jem("resnet8", tiny, recipe, checkpoint=path, **kw)
    monkeypatch.setattr(jem, "sgld", real_sgld)
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert state["epoch"] == 2
    saved = state["objective"]["buffer.samples"]                     # the chains are in the checkpoint ...
    fresh = jem.train_jem.__globals__["ReplayBuffer"]
    seed_everything(0)
    assert not torch.equal(saved, fresh(64, (3, 16, 16)).samples)     # ... as two epochs of SGLD left them

    resumed = jem.train_jem("resnet8", tiny, recipe, checkpoint=path, **kw)
    assert len(calls) == 5                                           # nothing ran twice before the kill
    assert torch.equal(resumed.objective.buffer.samples, straight.objective.buffer.samples)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                  straight.model.state_dict().values()))
    def drop(h):   # timings differ; NaN (no evaluation) never equals itself, so map it to None
        return [{k: (None if v != v else v) for k, v in r.items() if k != "seconds"} for r in h.records]
    assert drop(resumed.history) == drop(straight.history)


def test_train_jem_rejects_bad_input_and_warns_about_batchnorm(tiny, monkeypatch):
    with pytest.raises(ValueError, match="Dataset"):
        jem.train_jem("resnet8", (tiny.x_train, tiny.y_train), ONE)
    with pytest.raises(ValueError, match="Recipe"):
        jem.train_jem("resnet8", tiny, {"epochs": 1})
    with pytest.raises(ValueError, match="unknown model"):
        jem.train_jem("resnet9000", tiny, ONE)
    monkeypatch.setattr(train_module, "fit", lambda *a, **k: History())
    with pytest.warns(UserWarning, match="batch-norm"):
        jem.train_jem(create_model("resnet8", 10), tiny, ONE, buffer_size=10)


# -- out-of-distribution detection -----------------------------------------------------------

def test_make_gratings_is_deterministic_and_varied():
    a, b = jem.make_gratings(20, 16, seed=0), jem.make_gratings(20, 16, seed=0)
    assert a.dtype == torch.uint8 and a.shape == (20, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, jem.make_gratings(20, 16, seed=1))
    assert a.float().std(dim=(2, 3)).mean() > 10        # a pattern, not a flat image
    with pytest.raises(ValueError, match="n >= 1"):
        jem.make_gratings(0)


def test_ood_sets_for_shapes_and_for_cifar_sized_data(tiny):
    sets = jem.ood_sets(tiny, n=30)
    assert list(sets) == ["uniform noise", "constant colour", "interpolated test images", "gratings"]
    assert all(s.dtype == torch.uint8 and s.shape == (30, 3, 16, 16) for s in sets.values())
    assert (sets["constant colour"].flatten(2).float().std(-1) == 0).all()
    flat = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    flat[2:] = 200
    cifarish = Dataset("cifar10", flat, torch.arange(4), flat, torch.arange(4), tuple("abcd"), (0.5,) * 3, (0.25,) * 3)
    sets = jem.ood_sets(cifarish, n=40)
    assert "shapes" in sets and sets["shapes"].shape == (40, 3, 32, 32)
    assert set(sets["interpolated test images"].unique().tolist()) <= {0, 100, 200}   # means of pairs


def test_ood_scores_are_the_papers_three_scores(tiny):
    model = Linear(3 * 16 * 16, 10).train()
    space = jem.PixelSpace.from_dataset(tiny)
    images = tiny.x_test[:12]
    s = jem.ood_scores(model, images, space, batch_size=5)
    assert set(s) == {"-E(x)", "max p(y|x)", "approx. mass"} and all(v.shape == (12,) for v in s.values())
    u = jem.PixelSpace.from_uint8(images).requires_grad_(True)
    logits = model(space.to_model(u))
    (grad,) = torch.autograd.grad(torch.logsumexp(logits, -1).sum(), u)
    assert torch.allclose(s["-E(x)"], torch.logsumexp(logits, -1).detach(), atol=1e-5)
    assert torch.allclose(s["max p(y|x)"], logits.softmax(-1).max(-1).values.detach(), atol=1e-6)
    assert torch.allclose(s["approx. mass"], -grad.flatten(1).norm(dim=1), atol=1e-5)
    assert model.training                               # the mode is restored
    with pytest.raises(ValueError, match="uint8"):
        jem.ood_scores(model, images.float(), space)


def test_ood_aurocs_puts_in_distribution_first():
    s_in = {"-E(x)": torch.tensor([3.0, 4.0]), "max p(y|x)": torch.tensor([0.1, 0.2])}
    s_out = {"noise": {"-E(x)": torch.tensor([1.0, 2.0]), "max p(y|x)": torch.tensor([0.5, 0.6])}}
    assert jem.ood_aurocs(s_in, s_out) == {"noise": {"-E(x)": 1.0, "max p(y|x)": 0.0}}


# -- the 2-D toy -----------------------------------------------------------------------------

def test_toy_mixture_is_balanced_and_deterministic():
    x, y = jem.toy_mixture(300, num_classes=3, seed=1)
    assert x.shape == (300, 2) and x.dtype == torch.float64 and y.bincount().tolist() == [100, 100, 100]
    assert torch.equal(x, jem.toy_mixture(300, num_classes=3, seed=1)[0])
    centre = x[y == 0].mean(0)
    assert centre.norm().item() == pytest.approx(1.5, abs=0.15)
    with pytest.raises(ValueError, match="num_classes"):
        jem.toy_mixture(10, num_classes=1)


def test_toy_envelope_changes_p_x_but_not_the_classifier():
    seed_everything(0)
    model = jem.ToyClassifier(3, 16, envelope=2.0).double()
    x = torch.randn(50, 2, dtype=torch.float64) * 3
    assert torch.allclose(model(x).softmax(-1), model.net(x).softmax(-1), atol=1e-12)
    assert torch.allclose(jem.energy(model(x)), jem.energy(model.net(x)) + (x**2).sum(-1) / 8, atol=1e-12)


@pytest.fixture(scope="module")
def toy():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: threads only add synchronisation
    x, y = jem.toy_mixture(300, seed=0)
    model, history = jem.train_toy_jem(x, y, steps=120, grid=24, seed=0)
    torch.set_num_threads(threads)
    return x, y, model, history


def test_train_toy_jem_learns_the_classes_and_the_density(toy):
    x, y, model, history = toy
    assert history.final("train_acc") > 90
    with torch.no_grad():
        far = torch.tensor([[3.5, 3.5], [-3.5, -3.5]], dtype=torch.float64)
        assert jem.energy(model(x)).mean() < jem.energy(model(far)).min() - 3
    with pytest.raises(ValueError, match="points"):
        jem.train_toy_jem(x[:, :1], y)


def test_grid_density_is_normalised_and_histogram_tv_tells_samples_apart(toy):
    _, _, model, _ = toy
    centres, log_p = jem.grid_log_density(model, 4.0, 64)
    assert centres.shape == (64,) and log_p.shape == (64, 64)
    assert (log_p.exp().sum() * (8 / 64) ** 2).item() == pytest.approx(1.0, abs=1e-9)
    # exact draws from the grid density against draws at one point
    p = log_p.exp().flatten()
    idx = torch.multinomial(p / p.sum(), 4000, replacement=True, generator=torch.Generator().manual_seed(0))
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    exact = torch.stack([gx.flatten(), gy.flatten()], 1)[idx]
    assert jem.histogram_tv(exact, model, bins=8) < 0.05
    assert jem.histogram_tv(torch.zeros(100, 2, dtype=torch.float64), model, bins=8) > 0.8
    assert jem.histogram_tv(torch.full((10, 2), 9.0, dtype=torch.float64), model) == pytest.approx(1.0)


def test_langevin_follows_the_toy_density_and_the_papers_sampler_does_not(toy, one_thread):
    _, _, model, _ = toy
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(600, 2, generator=g, dtype=torch.float64) * 2 - 1) * 4
    energy = lambda v: jem.energy(model(v))  # noqa: E731
    lang = jem.sgld(energy, x0, 150, 0.05, jem.langevin_noise(0.05), generator=g)
    paper = jem.sgld(energy, x0, 150, 0.05, math.sqrt(2 * 0.05 * jem.sampler_temperature(1.0, 0.01)), generator=g)
    assert jem.histogram_tv(lang, model, bins=8) < 0.15
    assert jem.histogram_tv(paper, model, bins=8) > 0.4


# -- figures ---------------------------------------------------------------------------------

def test_toy_figures_are_labelled(toy):
    x, y, model, _ = toy
    fig = jem.plot_energy_landscape(model, points=x, labels=y, boundaries=True, n=40)
    ax = fig.axes[0]
    assert isinstance(fig, matplotlib.figure.Figure) and ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert ax.get_legend() is not None
    fig = jem.plot_toy_sgld(model, 0.05, jem.langevin_noise(0.05), n_steps=5, n_chains=50)
    assert "T = " in fig.axes[0].get_title() and "TV" in fig.axes[0].get_title()
    fig = jem.plot_toy_sgld(model, 50.0, 0.0, n_steps=3, n_chains=20)      # chains that fly off are out of view
    assert "T = " in fig.axes[0].get_title()


def test_image_figures_are_labelled():
    fig = jem.plot_ood_histograms(torch.randn(100), {"noise": torch.randn(50) - 2, "flat": torch.randn(50) + 1})
    ax = fig.axes[0]
    # the default score is -E(x), labelled as the unnormalised log density it is
    assert "unnormalised" in ax.get_xlabel() and "log Z" in ax.get_xlabel()
    assert ax.get_ylabel() == "density" and ax.get_title() and len(ax.get_legend().get_texts()) == 3
    fig = jem.plot_ood_histograms(torch.randn(100), {"noise": torch.randn(50)}, score="max p(y|x)")
    assert fig.axes[0].get_xlabel() == "max p(y|x)"
    fig = jem.plot_samples(torch.rand(10, 3, 8, 8) * 2 - 1, nrow=4, title="chains")
    assert fig.axes[0].get_title() == "chains"
    with pytest.raises(ValueError, match="images must be"):
        jem.plot_samples(torch.zeros(3, 8, 8))
    records = [{"epoch": e, "train_energy_data": -e, "train_energy_samples": -e + 0.5} for e in (1, 2, 3)]
    plain = [{"epoch": e, "train_energy_data": 1.0 - e} for e in (1, 2, 3)]
    fig = jem.plot_energy_trace({"JEM": History(records), "plain": History(plain)})
    ax = fig.axes[0]
    assert ax.get_xlabel() == "epoch" and len(ax.get_legend().get_texts()) == 3   # plain: data only
    assert list(ax.get_lines()[1].get_ydata()) == [-0.5, -1.5, -2.5]
    with pytest.raises(ValueError, match="JEMObjective run"):
        jem.plot_energy_trace({"bad": History([{"epoch": 1, "train_loss": 1.0}])})


# -- the re-exports --------------------------------------------------------------------------

def test_moved_names_are_re_exported_by_jem():
    moved = {**{n: jem_plots for n in jem_plots.__all__}, **{n: jem_exercises for n in jem_exercises.__all__}}
    assert set(moved) <= set(jem.__all__) and set(moved) <= set(dir(jem))
    assert all(getattr(jem, n) is getattr(mod, n) for n, mod in moved.items())
    assert all(hasattr(jem, n) for n in jem.__all__)
    with pytest.raises(AttributeError, match="no attribute 'plot_nothing'"):
        jem.plot_nothing  # noqa: B018


@pytest.mark.parametrize("first", ["minidistill.exercises.jem", "minidistill.methods.jem_plots"])
def test_the_chapters_modules_import_in_any_order(first, monkeypatch):
    # jem_plots and exercises.jem import jem, which re-exports their names lazily: no import cycle.
    # Import fresh copies (the originals are put back afterwards) starting from either module.
    import importlib

    import minidistill.exercises
    import minidistill.methods

    names = ("minidistill.methods.jem", "minidistill.methods.jem_plots", "minidistill.exercises.jem")
    for name in names:
        package, _, attr = name.rpartition(".")
        monkeypatch.setattr(sys.modules[package], attr, sys.modules[name])
        monkeypatch.delitem(sys.modules, name)
    importlib.import_module(first)
    fresh = importlib.import_module("minidistill.methods.jem")
    assert fresh is not jem and fresh.check_energy is sys.modules["minidistill.exercises.jem"].check_energy
    assert fresh.plot_samples is sys.modules["minidistill.methods.jem_plots"].plot_samples


# -- exercises -------------------------------------------------------------------------------

def _raise(*_):
    raise NotImplementedError


def test_check_energy(capsys):
    jem.check_energy(_raise)
    assert "not attempted" in capsys.readouterr().out

    def right(z):
        m = z.max(-1, keepdim=True).values
        return -(m.squeeze(-1) + (z - m).exp().sum(-1).log())

    jem.check_energy(right)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="wrong sign"):
        jem.check_energy(lambda z: torch.logsumexp(z, -1))
    with pytest.raises(AssertionError, match="inf/NaN"):
        jem.check_energy(lambda z: -z.exp().sum(-1).log())
    with pytest.raises(AssertionError, match="largest logit"):
        jem.check_energy(lambda z: -z.max(-1).values)
    with pytest.raises(AssertionError, match="shape"):
        jem.check_energy(lambda z: -torch.logsumexp(z, -1, keepdim=True))


def test_check_sgld_step(capsys):
    jem.check_sgld_step(_raise)
    assert "not attempted" in capsys.readouterr().out
    jem.check_sgld_step(lambda x, g, a, s, e: x - a * g + s * e)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="climb the energy"):
        jem.check_sgld_step(lambda x, g, a, s, e: x + a * g + s * e)
    with pytest.raises(AssertionError, match="not multiplied by the step size"):
        jem.check_sgld_step(lambda x, g, a, s, e: x - a * g + a * s * e)
    with pytest.raises(AssertionError, match="standard deviation"):
        jem.check_sgld_step(lambda x, g, a, s, e: x - a * g + s**2 * e)
    with pytest.raises(AssertionError, match="halves the step"):
        jem.check_sgld_step(lambda x, g, a, s, e: x - a / 2 * g + s * e)


def test_check_px_loss(capsys):
    jem.check_px_loss(_raise)
    assert "not attempted" in capsys.readouterr().out
    jem.check_px_loss(lambda d, q: -torch.logsumexp(d, -1).mean() + torch.logsumexp(q, -1).mean())
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="wrong sign"):
        jem.check_px_loss(lambda d, q: torch.logsumexp(d, -1).mean() - torch.logsumexp(q, -1).mean())
    with pytest.raises(AssertionError, match="largest logit"):
        jem.check_px_loss(lambda d, q: -d.max(-1).values.mean() + q.max(-1).values.mean())
    with pytest.raises(AssertionError, match="MEANS"):
        jem.check_px_loss(lambda d, q: -torch.logsumexp(d, -1).sum() + torch.logsumexp(q, -1).sum())
    with pytest.raises(AssertionError, match="scalar"):
        jem.check_px_loss(lambda d, q: -torch.logsumexp(d, -1))


def _simulated_forgetting(temperature, fraction=0.01):
    """The first step at which chains on E = x^2 / 2 (eta 0.1, start variance 9) are within
    ``fraction`` of their stationary variance, by running the exact variance recursion."""
    eta, v, k = 0.1, 9.0, 0
    v_inf = temperature / (1 - eta / 2)
    while v - v_inf > fraction * v_inf:
        v, k = (1 - eta) ** 2 * v + 2 * eta * temperature, k + 1
    return k


def test_check_forgetting_steps(capsys):
    jem.check_forgetting_steps(...)
    assert "not attempted" in capsys.readouterr().out
    want = (_simulated_forgetting(1.0), _simulated_forgetting(5e-5))     # the smallest whole numbers of steps
    assert want == (32, 80)
    for right in (want, [want[0] - 1, want[1] - 1], (31.45, 79.04), (31.7, 79.3)):   # rounded either way, exact, T s^2
        jem.check_forgetting_steps(right)
        assert "✓" in capsys.readouterr().out
    for wrong, match in (((80, 32), "wrong order"), ((63, 158), "twice too many"), ((16, 40), "half the steps"),
                         ((9.6, 57.2), "1 %"), ((21.3, 21.9), "START variance"), ((32, 57), "cold one"), ((5, 5), "not quite"),
                         ((32,), "two numbers"), ("31, 79", "two numbers"), ((31, float("nan")), "two numbers")):
        with pytest.raises(AssertionError, match=match):
            jem.check_forgetting_steps(wrong)
