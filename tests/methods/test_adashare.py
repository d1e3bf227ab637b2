"""Chapter 4, second half (AdaShare): the select-or-skip network, the regularisers, the objective,
the training phases on train.fit, the evaluation, the figures and the exercises' self-checks.
The sampler and the gradient estimators are tested in test_gumbel.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minidistill import train
from minidistill.data import make_shapes
from minidistill.losses import Objective
from minidistill.methods import adashare as A
from minidistill.train import Recipe, Run

TINY_NET = dict(widths=(4, 4, 8, 8), blocks_per_stage=1)  # 3 blocks: fast enough for the tests


@pytest.fixture(scope="module")
def micro():
    """128 training and 32 test images: the training-phase tests only check the plumbing."""
    return make_shapes(n_train=128, n_test=32)


def _logits_from(alpha: torch.Tensor) -> torch.Tensor:
    """Policy logits [tasks, blocks, 2] whose select probabilities are ``alpha``."""
    return torch.stack([alpha.log(), (1 - alpha).log()], -1)


# -- policy, regularisers, curriculum ---------------------------------------------------------

ALPHA = torch.tensor([[0.9, 0.5, 0.2], [0.7, 0.5, 0.8]], dtype=torch.float64)


def test_select_probabilities_and_shape_check():
    assert torch.allclose(A.select_probabilities(_logits_from(ALPHA)), ALPHA)
    assert torch.equal(A.select_probabilities(torch.full((2, 3, 2), 0.5)), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"\[tasks, blocks, 2\]"):
        A.select_probabilities(torch.zeros(2, 3))


def test_sharing_loss_paper_form_by_hand():
    # weights (L - l)/L for l = 0, 1, 2: 1, 2/3, 1/3; |differences| 0.2, 0, 0.6
    assert A.sharing_loss(_logits_from(ALPHA)).item() == pytest.approx(0.2 + 0.6 / 3)


def test_sharing_loss_code_form_uses_raw_logits_and_increasing_weights():
    logits = torch.zeros(2, 3, 2, dtype=torch.float64)
    logits[0, :, 0] = torch.tensor([2.0, 0.0, -1.0])
    logits[1, :, 0] = torch.tensor([1.0, 0.0, 1.0])
    logits[..., 1] = torch.randn(2, 3, dtype=torch.float64)  # the skip logits play no part
    # weights (l + 1)/L: 1/3, 2/3, 1; |select-logit differences| 1, 0, 2
    assert A.sharing_loss(logits, form="code").item() == pytest.approx(1 / 3 + 2.0)


def test_sharing_loss_sums_over_pairs_of_tasks():
    alpha = torch.tensor([[0.2], [0.5], [0.9]], dtype=torch.float64)  # one block, weight 1
    assert A.sharing_loss(_logits_from(alpha)).item() == pytest.approx(0.3 + 0.7 + 0.4)


def test_paper_and_code_sharing_weights_favour_opposite_ends():
    alpha = torch.tensor([[0.3] * 4, [0.7] * 4], dtype=torch.float64)
    grads = {}
    for form in A.FORMS:
        z = _logits_from(alpha).requires_grad_(True)
        (g,) = torch.autograd.grad(A.sharing_loss(z, form), z)
        grads[form] = g[0, :, 0].abs()
    assert (grads["paper"].diff() < 0).all()  # early blocks pulled together hardest
    assert (grads["code"].diff() > 0).all()   # late blocks pulled together hardest


def test_sparsity_loss_by_hand_in_both_forms_and_over_the_learnable_blocks():
    logits = _logits_from(ALPHA)
    assert A.sparsity_loss(logits).item() == pytest.approx(ALPHA.log().sum().item())
    assert A.sparsity_loss(logits, num_learnable=1).item() == pytest.approx(ALPHA[:, -1].log().sum().item())
    code = -(1 - ALPHA).log().mean(-1).sum()
    assert A.sparsity_loss(logits, form="code").item() == pytest.approx(code.item())
    code_last2 = -(1 - ALPHA[:, 1:]).log().mean(-1).sum()
    assert A.sparsity_loss(logits, 2, form="code").item() == pytest.approx(code_last2.item())


def test_sparsity_pushes_towards_skip_in_both_forms():
    for form in A.FORMS:
        z = _logits_from(ALPHA).requires_grad_(True)
        (g,) = torch.autograd.grad(A.sparsity_loss(z, form=form), z)
        assert (g[..., 0] > 0).all() and (g[..., 1] < 0).all()  # descent lowers select, raises skip


def test_regularisers_reject_bad_form_and_num_learnable():
    with pytest.raises(ValueError, match="form"):
        A.sharing_loss(_logits_from(ALPHA), form="both")
    with pytest.raises(ValueError, match="form"):
        A.sparsity_loss(_logits_from(ALPHA), form="released")
    with pytest.raises(ValueError, match="num_learnable"):
        A.sparsity_loss(_logits_from(ALPHA), num_learnable=4)


def test_curriculum_schedule():
    assert A.curriculum_schedule(7, 3, 2) == [1, 1, 2, 2, 3, 3, 3]
    assert A.curriculum_schedule(4, 6, 1) == [1, 2, 3, 4]
    # rounds p = 1, 2, ... learn ceil(p / c) blocks; the released code's p_epoch // c + 1 counts from 0
    assert A.curriculum_schedule(18, 6, 3) == [min(6, -(-p // 3)) for p in range(1, 19)]
    assert A.curriculum_schedule(18, 6, 3) == [min(6, e // 3 + 1) for e in range(18)]
    with pytest.raises(ValueError, match="curriculum_speed"):
        A.curriculum_schedule(3, 3, 0)


def test_sample_policy_follows_the_probabilities():
    logits = _logits_from(ALPHA)
    assert torch.equal(A.sample_policy(logits, greedy=True), torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([A.sample_policy(logits, g) for _ in range(1500)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(draws.mean(0).double(), ALPHA, atol=0.05)


def test_sample_policy_selects_the_blocks_outside_the_curriculum():
    logits = _logits_from(torch.full((2, 4), 0.01, dtype=torch.float64))  # every block almost surely skipped
    g = torch.Generator().manual_seed(0)
    for greedy in (False, True):
        policy = A.sample_policy(logits, g, greedy=greedy, num_learnable=1)
        assert torch.equal(policy, torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2))
    assert A.sample_policy(logits, g, num_learnable=0).eq(1).all()
    assert A.sample_policy(logits, greedy=True, num_learnable=4).eq(0).all()
    with pytest.raises(ValueError, match="num_learnable"):
        A.sample_policy(logits, num_learnable=5)


def test_random_policy_selects_exactly_num_selected_pairs():
    g = torch.Generator().manual_seed(0)
    assert A.random_policy(3, 5, 15, g).eq(1).all() and A.random_policy(3, 5, 0, g).eq(0).all()
    draws = torch.stack([A.random_policy(3, 4, 5, g) for _ in range(2000)])
    assert draws.shape == (2000, 3, 4) and (draws.sum((1, 2)) == 5).all()
    assert torch.allclose(draws.mean(0), torch.full((3, 4), 5 / 12), atol=0.04)  # every pair equally likely
    for bad in (13, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_selected"):
            A.random_policy(3, 4, bad)


def test_policy_entropy():
    assert A.policy_entropy(torch.full((2, 3), 0.5)) == pytest.approx(1.0)
    assert A.policy_entropy(torch.tensor([[0.0, 1.0]])) == 0.0
    p = 0.1
    assert A.policy_entropy(torch.tensor([[p, 1 - p]])) == pytest.approx(-(p * math.log2(p) + (1 - p) * math.log2(1 - p)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.policy_entropy(torch.tensor([1.5]))


# -- the network ------------------------------------------------------------------------------

def test_network_shapes_and_policy_logits():
    net = A.AdaShareNet(num_classes=7, widths=(4, 4, 8, 8), blocks_per_stage=2).eval()
    assert net.num_blocks == 6 and net.policy_logits.shape == (3, 6, 2)
    assert torch.equal(A.select_probabilities(net.policy_logits.detach()), torch.full((3, 6), 0.5))
    outs = net.forward_tasks(torch.randn(5, 3, 16, 16))
    assert [tuple(o.shape) for o in outs] == [(5, 7), (5, 4), (5, 1, 4, 4)]
    x = torch.randn(5, 3, 16, 16)
    assert torch.allclose(net(x), net.forward_tasks(x)[0], atol=1e-6)


def test_a_task_output_depends_only_on_its_own_policy():
    torch.manual_seed(0)
    net = A.AdaShareNet(**TINY_NET).eval()
    x = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    base = net.forward_tasks(x)
    policy = torch.ones(3, 3)
    policy[1, 1] = 0.0  # the rotation task skips block 2
    changed = net.fix_policy(policy).forward_tasks(x)
    assert torch.allclose(changed[0], base[0], atol=1e-6) and torch.allclose(changed[2], base[2], atol=1e-6)
    assert not torch.allclose(changed[1], base[1], atol=1e-4)


def test_a_skipped_block_is_replaced_by_its_shortcut():
    torch.manual_seed(0)
    net = A.AdaShareNet(("class",), **TINY_NET).eval()
    net.fix_policy(torch.tensor([[1.0, 0.0, 1.0]]))
    x = torch.randn(4, 3, 16, 16)
    before = net(x)
    with torch.no_grad():
        for p in net.blocks[1].body.parameters():
            p.add_(torch.randn_like(p))  # the skipped block's body no longer matters
    assert torch.allclose(net(x), before, atol=1e-6)
    with torch.no_grad():
        h = net.blocks[0](net.stem(x))
        h = net.blocks[1].shortcut(h)      # block 2 downsamples: its 1x1 shortcut still runs
        want = net.heads["class"](net.blocks[2](h))
    assert torch.allclose(before, want, atol=1e-5)


def test_gumbel_gating_curriculum_and_gradient():
    torch.manual_seed(0)
    net = A.AdaShareNet(**TINY_NET).use_gumbel(tau=1.0, num_learnable=1).train()
    v = net.gates()
    assert v.shape == (3, 3) and torch.equal(v[:, :2], torch.ones(3, 2)) and ((v[:, 2] > 0) & (v[:, 2] < 1)).all()
    loss = sum(o.float().square().mean() for o in net.forward_tasks(torch.randn(4, 3, 16, 16)))
    (g,) = torch.autograd.grad(loss, net.policy_logits)
    assert g[:, :2].abs().sum() == 0 and g[:, 2].abs().sum() > 0
    net.eval()
    with torch.no_grad():
        net.policy_logits[0, 2] = torch.tensor([2.0, 0.0])
        net.policy_logits[1, 2] = torch.tensor([0.0, 2.0])
    assert torch.equal(net.gates()[:2, 2], torch.tensor([1.0, 0.0]))  # eval: the most likely policy


def test_gates_follow_the_select_column_of_the_policy_logits():
    """Column 0 of policy_logits is "select", column 1 "skip": a task whose logits favour select
    runs the block (gate near 1), one whose logits favour skip passes it by (gate near 0), in
    training (Gumbel-softmax samples) and in eval (the most likely choice). Reading the skip
    column would swap the two."""
    torch.manual_seed(0)
    net = A.AdaShareNet(**TINY_NET).use_gumbel(tau=0.5)
    with torch.no_grad():
        net.policy_logits.copy_(torch.tensor([[8.0, -8.0], [-8.0, 8.0], [8.0, -8.0]])[:, None].expand(3, 3, 2))
    for mode in (True, False):
        v = net.train(mode).gates()
        assert (v[[0, 2]] > 0.99).all() and (v[1] < 0.01).all(), (mode, v)
    assert torch.allclose(A.select_probabilities(net.policy_logits.detach())[1], torch.zeros(3), atol=1e-6)


def test_stochastic_depth_gates():
    net = A.AdaShareNet(widths=(4, 4, 8, 8), blocks_per_stage=2).use_stochastic_depth(0.5)
    assert torch.allclose(net.survival(), torch.tensor([1 - l / 6 * 0.5 for l in range(1, 7)]))
    assert torch.allclose(net.eval().gates(), net.survival().expand(3, 6))
    torch.manual_seed(0)
    draws = torch.stack([net.train().gates() for _ in range(3000)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(draws.mean((0, 1)), net.survival(), atol=0.03)


def test_network_rejects_bad_input():
    with pytest.raises(ValueError, match="tasks"):
        A.AdaShareNet(("class", "depth"))
    with pytest.raises(ValueError, match="tasks"):
        A.AdaShareNet(("class", "class"))
    with pytest.raises(ValueError, match="widths"):
        A.AdaShareNet(widths=(8,))
    net = A.AdaShareNet(**TINY_NET)
    with pytest.raises(ValueError, match=r"\[tasks, blocks\]"):
        net.fix_policy(torch.ones(3, 4))
    with pytest.raises(ValueError, match="only 0"):
        net.fix_policy(torch.full((3, 3), 0.5))
    with pytest.raises(ValueError, match="num_learnable"):
        net.use_gumbel(1.0, num_learnable=4)
    with pytest.raises(ValueError, match="tau"):
        net.use_gumbel(0.0)
    with pytest.raises(ValueError, match="p_last"):
        net.use_stochastic_depth(0.0)
    with pytest.raises(ValueError, match="one per task"):
        net.forward_tasks([torch.zeros(2, 3, 16, 16)] * 2)


def test_independent_nets_and_deployed_parameters():
    torch.manual_seed(0)
    ind = A.IndependentNets(**TINY_NET)
    shared = A.AdaShareNet(**TINY_NET)
    outs = ind.forward_tasks(torch.randn(2, 3, 16, 16))
    assert [tuple(o.shape) for o in outs] == [(2, 10), (2, 4), (2, 1, 4, 4)]
    assert A.deployed_parameters(ind) == sum(A.deployed_parameters(n) for n in ind.nets)
    all_params = sum(p.numel() for n, p in shared.named_parameters() if n != "policy_logits")
    assert A.deployed_parameters(shared) == all_params
    policy = torch.ones(3, 3)
    policy[:, 1] = 0.0  # nobody runs block 2
    block2 = sum(p.numel() for p in shared.blocks[1].parameters())
    assert A.deployed_parameters(shared.fix_policy(policy)) == all_params - block2
    policy[0, 1] = 1.0  # one task runs it: it is needed again
    assert A.deployed_parameters(shared.fix_policy(policy)) == all_params
    with pytest.raises(ValueError, match="AdaShareNet"):
        A.deployed_parameters(torch.nn.Linear(2, 2))


# -- tasks, objective -------------------------------------------------------------------------

def test_rotate_batch_labels_and_inverse():
    x = torch.randn(9, 3, 8, 8)
    xr, k = A.rotate_batch(x)
    assert torch.equal(k, torch.arange(9) % 4)
    for i in range(9):
        assert torch.equal(xr[i].rot90(-int(k[i]), dims=(1, 2)), x[i])
    assert not torch.equal(xr[1], x[1])
    xo, ko = A.rotate_batch(x, offset=3)
    assert torch.equal(ko, (torch.arange(9) + 3) % 4) and torch.equal(xo[1], x[1])  # image 1 + 3 = 4: not turned
    assert torch.equal(xo[0], x[0].rot90(3, dims=(1, 2)))
    with pytest.raises(ValueError, match="square"):
        A.rotate_batch(torch.zeros(2, 3, 8, 6))


def test_edge_map_by_hand():
    x = torch.zeros(1, 3, 8, 8)
    x[..., 4:] = 1.0  # a vertical unit step between columns 3 and 4
    full = A.edge_map(x, (8, 8))
    assert full.shape == (1, 1, 8, 8) and full.dtype == torch.float32
    assert torch.allclose(full[0, 0, :, 3:5], torch.full((8, 2), 0.5), atol=1e-5)
    assert full[0, 0, :, :3].max() < 1e-5 and full[0, 0, :, 5:].max() < 1e-5
    assert A.edge_map(x, (1, 1)).item() == pytest.approx(2 * 0.5 / 8, abs=1e-5)
    assert A.edge_map(torch.full((2, 3, 8, 8), 0.7), 2).abs().max() < 1e-5


def test_multitask_loss_is_the_weighted_sum_and_returns_class_logits(tiny):
    torch.manual_seed(0)
    net = A.AdaShareNet(**TINY_NET).eval()
    x = tiny.x_test[:8].float() / 255
    y = tiny.y_test[:8]
    losses, outs = A.MultiTaskLoss().task_losses(net, x, y)
    assert losses[0].item() == pytest.approx(F.cross_entropy(outs[0], y).item())
    assert losses[1].item() == pytest.approx(F.cross_entropy(outs[1], torch.arange(8) % 4).item())
    assert losses[2].item() == pytest.approx((outs[2] - A.edge_map(x, (4, 4))).abs().mean().item())
    objective = A.MultiTaskLoss(weights=(1.0, 2.0, 0.5))
    assert isinstance(objective, Objective)
    total, logits, terms = objective(net, x, y)
    assert total.item() == pytest.approx(losses[0].item() + 2 * losses[1].item() + 0.5 * losses[2].item(), rel=1e-6)
    assert torch.equal(logits, outs[0])
    assert list(terms) == ["class_loss", "rotation_loss", "edges_loss"]  # no regularisers at weight 0
    assert [terms[f"{t}_loss"].item() for t in A.TASKS] == pytest.approx([l.item() for l in losses])
    assert not any(t.requires_grad for t in terms.values())


def test_multitask_loss_adds_the_regularisers_over_the_curriculum_blocks(tiny):
    torch.manual_seed(0)
    net = A.AdaShareNet(**TINY_NET).use_gumbel(tau=1.0, num_learnable=2).eval()  # eval: fixed gates
    with torch.no_grad():
        net.policy_logits.copy_(torch.randn(3, 3, 2))
    x, y = tiny.x_test[:8].float() / 255, tiny.y_test[:8]
    plain, _, _ = A.MultiTaskLoss()(net, x, y)
    for form in A.FORMS:
        total, _, terms = A.MultiTaskLoss(sparsity_weight=0.3, sharing_weight=0.7, form=form)(net, x, y)
        sp, sh = A.sparsity_loss(net.policy_logits, 2, form), A.sharing_loss(net.policy_logits, form)
        assert terms["sparsity"].item() == pytest.approx(sp.item()) and terms["sharing"].item() == pytest.approx(sh.item())
        assert total.item() == pytest.approx((plain + 0.3 * sp + 0.7 * sh).item(), rel=1e-6)
    with pytest.raises(ValueError, match="AdaShareNet"):
        A.MultiTaskLoss(sharing_weight=0.1)(A.IndependentNets(**TINY_NET), x, y)
    with pytest.raises(ValueError, match="sparsity_weight"):
        A.MultiTaskLoss(sparsity_weight=-1.0)
    with pytest.raises(ValueError, match="form"):
        A.MultiTaskLoss(form="released")


def test_multitask_loss_rejects_bad_configuration():
    with pytest.raises(ValueError, match="include 'class'"):
        A.MultiTaskLoss(("rotation", "edges"))
    with pytest.raises(ValueError, match="weights"):
        A.MultiTaskLoss(weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="differ"):
        A.MultiTaskLoss(("class", "rotation"))(A.AdaShareNet(**TINY_NET), torch.zeros(2, 3, 16, 16),
                                               torch.zeros(2, dtype=torch.int64))


# -- training phases and evaluation -----------------------------------------------------------

def _spy_fit(monkeypatch, module, fail_at=None):
    """Record, for every train.fit call made through ``module``, what it trains and how."""
    calls, real_fit = [], train.fit

    def spy(model, data, objective, recipe, **kw):
        calls.append(dict(trainable={n for n, p in model.named_parameters() if p.requires_grad}, recipe=recipe,
                          objective=objective, n_train=len(data.x_train), kw=kw, gating=getattr(model, "gating", None),
                          state={k: v.clone() for k, v in model.state_dict().items()}))
        if len(calls) == fail_at:
            raise RuntimeError("stop")
        return real_fit(model, data, objective, recipe, **kw)

    monkeypatch.setattr(module, "fit", spy)
    return calls


def test_learn_policy_alternates_fit_passes_and_learns_only_the_curriculum_blocks(micro, monkeypatch):
    calls = _spy_fit(monkeypatch, A)
    torch.manual_seed(0)
    net = A.AdaShareNet(**TINY_NET)
    h = A.learn_policy(net, micro, A.MultiTaskLoss(), rounds=2, batch_size=32, curriculum_speed=5, policy_lr=0.05,
                       form="code")
    weights = {n for n, _ in net.named_parameters()} - {"policy_logits"}
    assert [c["trainable"] for c in calls] == [weights, {"policy_logits"}] * 2  # weights, then policy, each round
    assert [(c["recipe"].optimizer, c["recipe"].epochs, c["n_train"]) for c in calls] == [("sgd", 1, 64), ("adam", 1, 64)] * 2
    assert [c["objective"].sparsity_weight for c in calls] == [0.0, 0.05] * 2 and calls[1]["objective"].form == "code"
    assert all(c["kw"]["eval_splits"] == () for c in calls)
    assert [r["num_learnable"] for r in h.records] == [1, 1]
    assert h.records[1]["tau"] == pytest.approx(5.0 * 0.965)
    for column in ("train_loss", "train_class_loss", "train_edges_loss", "train_sparsity", "train_sharing",
                   "weights_train_loss", "weights_train_rotation_loss", "seconds"):
        assert all(math.isfinite(v) for v in h[column]), column
    assert "weights_train_sparsity" not in h.records[0]  # the weight pass has no regularisers
    assert len(h.meta["probabilities"]) == 2
    alpha = h.meta["probabilities"][-1]
    assert torch.equal(alpha[:, :2], torch.full((3, 2), 0.5))  # outside the curriculum: untouched
    assert (alpha[:, 2] - 0.5).abs().min() > 1e-3
    assert net.gating == "gumbel" and net.num_learnable == 1 and not net.training  # the curriculum as it ended
    assert all(p.requires_grad for p in net.parameters())


def test_learn_policy_unfreezes_everything_when_a_pass_fails(micro, monkeypatch):
    _spy_fit(monkeypatch, A, fail_at=2)  # the first policy pass raises, weights still frozen
    net = A.AdaShareNet(**TINY_NET)
    with pytest.raises(RuntimeError, match="stop"):
        A.learn_policy(net, micro, A.MultiTaskLoss(), rounds=1, batch_size=32, form="paper")
    assert all(p.requires_grad for p in net.parameters())


def test_learn_policy_rejects_bad_arguments(micro):
    tiny = micro
    net = A.AdaShareNet(**TINY_NET)
    obj = A.MultiTaskLoss()
    with pytest.raises(ValueError, match="rounds"):
        A.learn_policy(net, tiny, obj, rounds=0)
    with pytest.raises(ValueError, match="form"):
        A.learn_policy(net, tiny, obj, rounds=1, form="released")
    with pytest.raises(ValueError, match="AdaShareNet"):
        A.learn_policy(A.IndependentNets(**TINY_NET), tiny, obj, rounds=1)
    with pytest.raises(ValueError, match="batch_size"):
        A.learn_policy(net, tiny, obj, rounds=1, batch_size=65)


def test_train_adashare_retrains_the_sampled_policy_from_the_initial_weights(micro, monkeypatch):
    seen = _spy_fit(monkeypatch, train)  # train_model's fit calls: the warm-up and the re-training
    run = A.train_adashare(micro, Recipe(epochs=1, batch_size=32, lr=0.05), warmup_epochs=1, rounds=1,
                           seed=3, model_kwargs=TINY_NET, policy_kwargs={"curriculum_speed": 1, "form": "paper"})
    warm_call, re_call = seen
    (w_warm, gating_warm), (w_re, gating_re) = [(c["state"], c["gating"]) for c in seen]
    assert gating_warm == "all" and gating_re == "policy" and re_call["recipe"].epochs == 1
    assert warm_call["kw"]["eval_every"] is None and "eval_every" not in re_call["kw"]  # the warm-up is scored once
    assert all(torch.equal(w_warm[k], w_re[k]) for k in w_warm if k not in ("policy",))
    assert run.num_learnable == 1  # one round at c = 1: only the last block was learned
    resampled = A.sample_policy(_logits_from(run.probabilities.double()), torch.Generator().manual_seed(3), num_learnable=1)
    assert torch.equal(run.policy, resampled) and run.policy[:, :2].eq(1).all()
    assert torch.equal(run.greedy, A.sample_policy(_logits_from(run.probabilities.double()), greedy=True, num_learnable=1))
    assert torch.equal(run.model.policy, run.policy) and run.model.gating == "policy"
    assert len(run.warmup) == 1 and len(run.policy_history) == 1 and len(run.history) == 1
    assert set(run.warm_state) == set(run.model.state_dict())
    assert not all(torch.equal(run.warm_state[k], w_warm[k]) for k in w_warm)  # the warm-up trained something


@pytest.mark.parametrize("kind", A.BASELINES)
def test_train_baseline_kinds(micro, kind):
    run = A.train_baseline(kind, micro, Recipe(epochs=1, batch_size=64, lr=0.05), seed=1, model_kwargs=TINY_NET)
    assert isinstance(run, Run)
    model, hist = run
    assert len(hist) == 1 and 0 <= hist.final("test_acc") <= 100
    assert all(math.isfinite(hist.final(f"train_{t}_loss")) for t in A.TASKS)
    expected = {"independent": None, "hard_sharing": "all", "random": "policy", "stochastic_depth": "stochastic_depth"}
    assert getattr(model, "gating", None) == expected[kind]
    if kind == "independent":
        assert isinstance(model, A.IndependentNets)
    if kind == "random":  # default: half of the 3 x 3 (task, block) pairs, rounded down
        assert int(model.policy.sum()) == 4


def test_random_baseline_selects_exactly_as_many_pairs_as_asked(micro):
    run = A.train_baseline("random", micro, Recipe(epochs=1, batch_size=64, lr=0.05), seed=2, num_selected=7,
                           model_kwargs=TINY_NET)
    assert int(run.model.policy.sum()) == 7 and run.model.gating == "policy"


def test_train_baseline_rejects_unknown_kind(micro):
    with pytest.raises(ValueError, match="kind"):
        A.train_baseline("cross_stitch", micro, Recipe(epochs=1))


class _Constant(torch.nn.Module):
    """Predicts class 0, rotation 0 and an all-zero edge map."""

    tasks = A.TASKS

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward_tasks(self, inputs):
        n = len(inputs[0])
        logits = torch.zeros(n, 10)
        logits[:, 0] = 1.0
        return [logits, logits[:, :4], torch.zeros(n, 1, 4, 4)]


def test_evaluate_tasks_by_hand(tiny):
    scores = A.evaluate_tasks(_Constant(), tiny, batch_size=50)
    assert scores["class_acc"] == pytest.approx(100 * (tiny.y_test == 0).float().mean().item())
    assert scores["rotation_acc"] == pytest.approx(25.0)  # 128 test images, a quarter at each angle
    x = (tiny.x_test.float() / 255 - torch.tensor(tiny.mean).view(1, 3, 1, 1)) / torch.tensor(tiny.std).view(1, 3, 1, 1)
    assert scores["edges_mae"] == pytest.approx(A.edge_map(x, (4, 4)).mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="AdaShareNet"):
        A.evaluate_tasks(torch.nn.Linear(2, 2), tiny)


def test_results_markdown_by_hand():
    scores = {
        "independent": [{"class_acc": 80.0, "edges_mae": 0.10}, {"class_acc": 82.0, "edges_mae": 0.10}],
        "shared": [{"class_acc": 84.0, "edges_mae": 0.12}, {"class_acc": 82.0, "edges_mae": 0.08}],
    }
    md = A.results_markdown(scores, {"independent": 2000, "shared": 1000})
    lines = md.splitlines()
    assert lines[0].startswith("| method | parameters | class acc. (%) ↑ | edge MAE ↓ | Δ vs independent (%) ↑ |")
    # seed 0: (+5 % - 20 %)/2 = -7.5 %; seed 1: (0 % + 20 %)/2 = +10 %
    assert "| shared | 1,000 | 83.00 ± 1.41 (n=2) | 0.100 ± 0.028 (n=2) | 1.25 ± 12.37 (n=2) |" in lines
    assert len(lines) == 4 and lines[1].count("|") == lines[0].count("|")
    assert "| independent | 2,000 |" in lines[2] and "0.00 ± 0.00 (n=2)" in lines[2]
    assert A.relative_gain(scores)["shared"] == pytest.approx([-7.5, 10.0])
    with pytest.raises(ValueError, match="reference"):
        A.results_markdown(scores, {}, reference="hard")
    with pytest.raises(ValueError, match="pair them"):
        A.results_markdown({"independent": scores["independent"], "x": scores["shared"][:1]}, {"independent": 1, "x": 1})


# -- figures ----------------------------------------------------------------------------------

def test_plot_relaxed_samples_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    fig = A.plot_relaxed_samples(torch.tensor([1.0, 0.0, -1.0]), taus=(0.2, 2.0), num_samples=50)
    assert torch.equal(state, torch.get_rng_state())
    axes = fig.axes
    assert len(axes) == 2 and axes[0].get_title() == "$\\tau$ = 0.2" and axes[-1].get_legend() is not None
    with pytest.raises(ValueError, match="exactly 3"):
        A.plot_relaxed_samples(torch.zeros(4))
    with pytest.raises(ValueError, match="tau"):
        A.plot_relaxed_samples(torch.zeros(3), taus=(0.0,))


def _quadratic(y):
    return ((y - torch.tensor([0.1, 0.6, 0.3, 0.0], dtype=y.dtype)) ** 2).sum(-1)


THETA = torch.tensor([0.3, -0.2, 0.8, 0.0], dtype=torch.float64)


def test_plot_estimator_race_panels_and_bad_input():
    torch.manual_seed(0)
    race = A.estimator_race(THETA, _quadratic, taus=(0.5, 1.0, 2.0), draws=(2, 4), num_samples=500)
    fig = A.plot_estimator_race(race, budgets=(8, 64))
    axes = fig.axes
    assert len(axes) == 3 and all(ax.get_xlabel() == "temperature τ" for ax in axes)
    assert "per evaluation" in axes[0].get_title() and "MSE" in axes[2].get_title()
    # the MSE panel: two relaxed curves per budget, at bias^2 + v / B
    curves = [line for line in axes[2].get_lines() if len(line.get_xdata()) == 3]
    assert len(curves) == 4
    want = [A.mse_at_budget(race["gumbel_softmax", t], 8) for t in (0.5, 1.0, 2.0)]
    assert any(list(c.get_ydata()) == pytest.approx(want) for c in curves)
    labels = axes[0].get_legend_handles_labels()[1]
    assert "REINFORCE + LOO, J = 2" in labels and "REINFORCE + LOO, J = 4" in labels
    with pytest.raises(ValueError, match="race"):
        A.plot_estimator_race({k: v for k, v in race.items() if k[0] != "straight_through"})
    with pytest.raises(ValueError, match="budgets"):
        A.plot_estimator_race(race, budgets=(0,))


def test_plot_estimator_budget_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    fig = A.plot_estimator_budget(THETA, _quadratic, tau=0.5, hard=True, draws=3, budget=10, num_samples=500,
                                  num_points=40)
    assert torch.equal(state, torch.get_rng_state())
    ax0, ax1 = fig.axes
    assert "budget" in ax0.get_xlabel() and "B = 10" in ax1.get_title()
    assert any("straight-through, τ = 0.5" in t for t in ax1.get_legend_handles_labels()[1])
    assert len(ax1.collections) == 2 and all(len(c.get_offsets()) == 40 for c in ax1.collections)
    for kwargs in (dict(draws=1), dict(draws=4, budget=3), dict(tau=0.0)):
        with pytest.raises(ValueError, match="draws|tau"):
            A.plot_estimator_budget(THETA, _quadratic, **kwargs)


def test_plot_policy_grid():
    fig = A.plot_policy(ALPHA, ("class", "rotation"))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "task" and "block" in ax.get_ylabel() and ax.get_title()
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in ALPHA.flatten().tolist())
    fig = A.plot_policy(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ("a", "b"))
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["·", "·", "✓", "✓"]
    assert len(fig.axes) == 2  # the grid and its colour bar
    assert len(A.plot_policy(ALPHA, ("class", "rotation"), colorbar=False).axes) == 1
    with pytest.raises(ValueError, match=r"\[tasks, blocks\]"):
        A.plot_policy(ALPHA, ("class",))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.plot_policy(ALPHA * 2, ("class", "rotation"))


# -- self-checks --------------------------------------------------------------------------------

def _right_gumbel_max(logits, n):
    u = torch.rand(n, len(logits), dtype=logits.dtype)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def test_check_gumbel_max(capsys):
    A.check_gumbel_max(_right_gumbel_max)
    assert "✓" in capsys.readouterr().out
    def gumbel(l, n):
        return -torch.log(-torch.log(torch.rand(n, len(l), dtype=l.dtype)))

    mistakes = {
        "exponential": lambda l, n: (l - torch.log(torch.rand(n, len(l), dtype=l.dtype))).argmax(-1),
        "probabilities": lambda l, n: (l.softmax(-1) + gumbel(l, n)).argmax(-1),
        "argmin": lambda l, n: (l + gumbel(l, n)).argmin(-1),
    }
    for hint, fn in mistakes.items():
        with pytest.raises(AssertionError, match=hint):
            A.check_gumbel_max(fn)
    with pytest.raises(AssertionError, match="integer indices"):
        A.check_gumbel_max(lambda l, n: torch.rand(n))


def test_check_straight_through(capsys):
    A.check_straight_through(lambda y: F.one_hot(y.argmax(-1), y.shape[-1]).to(y) - y.detach() + y)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="no gradient"):
        A.check_straight_through(lambda y: F.one_hot(y.argmax(-1), y.shape[-1]).to(y))
    with pytest.raises(AssertionError, match="hard \\+ soft"):
        A.check_straight_through(lambda y: F.one_hot(y.argmax(-1), y.shape[-1]).to(y) + y)
    with pytest.raises(AssertionError, match="identity"):  # detached the wrong soft term
        A.check_straight_through(lambda y: F.one_hot(y.argmax(-1), y.shape[-1]).to(y) - y + y.detach() * 1.0)
    with pytest.raises(AssertionError, match="one-hot"):
        A.check_straight_through(lambda y: y)


def _paper_sharing(alpha):
    k, n = alpha.shape
    w = (n - torch.arange(n, dtype=alpha.dtype)) / n
    return sum((w * (alpha[i] - alpha[j]).abs()).sum() for i in range(k) for j in range(i + 1, k))


def test_check_sharing_loss(capsys):
    A.check_sharing_loss(_paper_sharing)
    assert "✓" in capsys.readouterr().out

    def code_weights(alpha):
        k, n = alpha.shape
        w = (torch.arange(n, dtype=alpha.dtype) + 1) / n
        return sum((w * (alpha[i] - alpha[j]).abs()).sum() for i in range(k) for j in range(i + 1, k))

    with pytest.raises(AssertionError, match="released code"):
        A.check_sharing_loss(code_weights)
    with pytest.raises(AssertionError, match="twice"):
        A.check_sharing_loss(lambda a: 2 * _paper_sharing(a))
    with pytest.raises(AssertionError, match="no depth weights"):
        A.check_sharing_loss(lambda a: sum((a[i] - a[j]).abs().sum()
                                           for i in range(len(a)) for j in range(i + 1, len(a))))
    with pytest.raises(AssertionError, match="scalar"):
        A.check_sharing_loss(lambda a: a)


def test_checks_report_unattempted_exercises(capsys):
    def todo(*args):
        raise NotImplementedError

    A.check_gumbel_max(todo)
    A.check_straight_through(todo)
    A.check_sharing_loss(todo)
    assert capsys.readouterr().out.count("not attempted yet") == 3
