"""Chapter 7, deep mutual learning: the KL direction and the peers' detachment, the mean/sum
switch, the two update orders as objectives on fit (gradients, recomputed targets, the held batch,
resumability), train_mutual's seeding, and bad inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import train
from minidistill.data import make_shapes
from minidistill.methods import dml
from minidistill.models import CifarResNet
from minidistill.train import Recipe

G = torch.Generator().manual_seed(0)
Z1, Z2, Z3 = (torch.randn(5, 4, generator=G, dtype=torch.float64) * 2 for _ in range(3))
Y = torch.tensor([0, 1, 2, 3, 0])


def _kl(p_target_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) batch mean, written out with explicit sums (the reference)."""
    lp, lq = torch.log_softmax(p_target_logits, 1), torch.log_softmax(q_logits, 1)
    return (lp.exp() * (lp - lq)).sum() / len(lp)


def test_kl_direction_peer_first_and_gradient_p1_minus_p2():
    z1, z2 = Z1.clone().requires_grad_(), Z2.clone().requires_grad_()
    losses, ce, kl = dml.dml_losses([z1, z2], Y)
    assert kl[0].item() == pytest.approx(_kl(Z2, Z1).item(), rel=1e-10)      # KL(p2 || p1) for network 1
    assert kl[1].item() == pytest.approx(_kl(Z1, Z2).item(), rel=1e-10)
    assert abs(kl[0].item() - _kl(Z1, Z2).item()) > 1e-3                      # not the reversed KL
    assert ce[0].item() == pytest.approx(F.cross_entropy(Z1, Y).item(), rel=1e-12)
    (g1,) = torch.autograd.grad(kl[0], z1)
    closed = (torch.softmax(Z1, 1) - torch.softmax(Z2, 1)) / len(Z1)
    assert torch.allclose(g1, closed, atol=1e-12)


def test_peers_are_detached_so_one_backward_gives_each_network_its_own_gradient():
    z1, z2 = Z1.clone().requires_grad_(), Z2.clone().requires_grad_()
    losses, _, _ = dml.dml_losses([z1, z2], Y)
    g2_from_l1 = torch.autograd.grad(losses[0], z2, allow_unused=True, retain_graph=True)[0]
    assert g2_from_l1 is None or g2_from_l1.abs().max() == 0
    g_sum = torch.autograd.grad(losses[0] + losses[1], [z1, z2], retain_graph=True)
    g_own = (torch.autograd.grad(losses[0], z1, retain_graph=True)[0], torch.autograd.grad(losses[1], z2)[0])
    assert all(torch.allclose(a, b, atol=1e-14) for a, b in zip(g_sum, g_own))


def test_mean_over_peers_is_the_sum_divided_by_m_minus_1_and_equal_for_two():
    zs = [Z1, Z2, Z3]
    _, _, kl_mean = dml.dml_losses(zs, Y, reduction="mean")
    _, _, kl_sum = dml.dml_losses(zs, Y, reduction="sum")
    want = _kl(Z2, Z1) + _kl(Z3, Z1)
    assert kl_sum[0].item() == pytest.approx(want.item(), rel=1e-10)
    assert kl_mean[0].item() == pytest.approx(want.item() / 2, rel=1e-10)
    two_mean = dml.dml_losses([Z1, Z2], Y, reduction="mean")[2][0]
    two_sum = dml.dml_losses([Z1, Z2], Y, reduction="sum")[2][0]
    assert two_mean.item() == pytest.approx(two_sum.item(), rel=1e-12)


def test_temperature_scales_like_kd():
    _, _, kl = dml.dml_losses([Z1, Z2], Y, temperature=3.0)
    assert kl[0].item() == pytest.approx(9 * _kl(Z2 / 3, Z1 / 3).item(), rel=1e-10)


class _Lin(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_simultaneous_objective_returns_the_summed_losses_and_network_1_logits():
    a, b = _Lin(0), _Lin(1)
    obj = dml.MutualLearning([b])
    x = torch.randn(5, 3, generator=G)
    loss, logits, terms = obj(a, x, Y)
    losses, ce, kl = dml.dml_losses([a(x), b(x)], Y)
    assert loss.item() == pytest.approx((losses[0] + losses[1]).item(), rel=1e-6)
    assert torch.equal(logits, a(x))
    assert set(terms) == {"ce", "kl"} and terms["kl"].item() == pytest.approx((kl[0] + kl[1]).item() / 2, rel=1e-6)
    assert [p is q for p, q in zip(obj.parameters(), b.parameters())] == [True, True]   # the peer is trained by fit


def test_alternating_updates_one_network_per_step_on_the_held_batch_with_recomputed_targets():
    a, b = _Lin(0), _Lin(1)
    obj = dml.MutualLearning([b], update="alternating")
    x1, x2 = torch.randn(5, 3, generator=G), torch.randn(5, 3, generator=G)
    obj.step = 0
    loss, logits, terms = obj(a, x1, Y)
    loss.backward()
    assert a.fc.weight.grad is not None and b.fc.weight.grad is None            # only network 1 this step
    assert logits is not None
    with torch.no_grad():                                                      # "update network 1"
        a.fc.weight -= 0.5 * a.fc.weight.grad
    a.zero_grad(), b.zero_grad()
    obj.step = 1
    loss2, logits2, _ = obj(a, x2, Y)                                          # x2 is skipped: same batch
    want = F.cross_entropy(b(x1), Y) + _kl(a(x1).detach().double(), b(x1).double())
    assert loss2.item() == pytest.approx(want.item(), rel=1e-5)                # against the UPDATED network 1
    assert logits2 is None
    loss2.backward()
    assert a.fc.weight.grad is None and b.fc.weight.grad is not None
    assert obj.resumable is False
    assert dml.MutualLearning([b], update="alternating", same_batch=False).resumable is True


def test_alternating_without_same_batch_takes_the_fresh_batch():
    a, b = _Lin(0), _Lin(1)
    obj = dml.MutualLearning([b], update="alternating", same_batch=False)
    x2 = torch.randn(5, 3, generator=G)
    obj.step = 1
    loss, _, _ = obj(a, x2, Y)
    want = F.cross_entropy(b(x2), Y) + _kl(a(x2).detach().double(), b(x2).double())
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_train_mutual_trains_both_networks_and_network_1_starts_like_train_model():
    data = make_shapes(n_train=96, n_test=32, size=8)
    recipe = Recipe(epochs=1, batch_size=32, lr=0.05)
    inits = []

    def builder():
        net = CifarResNet(8, (8, 8, 8, 16), data.num_classes)
        inits.append({k: v.clone() for k, v in net.state_dict().items()})
        return net

    train.train_model(builder, data, recipe, seed=3)
    run = dml.train_mutual([builder, builder], data, recipe, seed=3)
    alone, first, peer = inits
    assert all(torch.equal(alone[k], first[k]) for k in alone)                 # train_model's init of seed 3
    assert not torch.equal(first["stem.0.weight"], peer["stem.0.weight"])       # the peer starts elsewhere
    assert len(run.models) == 2 and len(run.test_acc) == 2
    assert run.test_acc[0] == run.history.final("test_acc")
    assert {"train_ce", "train_kl"} <= set(run.history.records[-1])
    trained_peer = run.models[1].state_dict()
    assert not torch.equal(trained_peer["stem.0.weight"].cpu(), peer["stem.0.weight"])   # fit optimised the peer


@pytest.mark.parametrize("kwargs, match", [
    (dict(update="both"), "update must be one of"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(temperature=0.0), "temperature"),
])
def test_mutual_learning_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dml.MutualLearning([_Lin(0)], **kwargs)


def test_dml_losses_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        dml.dml_losses([Z1], Y)
    with pytest.raises(ValueError, match="one shape"):
        dml.dml_losses([Z1, Z2[:, :3]], Y)
    with pytest.raises(ValueError, match="int64"):
        dml.dml_losses([Z1, Z2], Y.float())
    with pytest.raises(TypeError, match="peers"):
        dml.MutualLearning([])
    with pytest.raises(ValueError, match="at least 2 networks"):
        dml.train_mutual(["resnet8"], make_shapes(n_train=8, n_test=4, size=8))
