"""Tests for chapter 10 (ManiDP): saliency, gating, lambda(x_i), similarity loss, thresholds, FLOPs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minidistill import models
from minidistill.methods import manidp


def _resnet(depth=8, widths=(4, 4, 8, 8), k=5, seed=0):
    torch.manual_seed(seed)
    return models.CifarResNet(depth, widths, k).eval()


def test_saliency_shapes_and_all_on_start():
    g = manidp.SaliencyModule(6, 10)
    pi = g(torch.randn(3, 6, 5, 5))
    assert pi.shape == (3, 10) and torch.allclose(pi, torch.ones_like(pi), atol=0.05)
    assert g(torch.randn(3, 6)).shape == (3, 10)
    assert g.fc1.bias is None and g.fc1.out_features == 10          # r = 1 below 80 channels
    assert manidp.SaliencyModule(6, 96).fc1.out_features == 48     # r = 2 from 80 channels
    g.fc2.bias.data.fill_(1e6)
    assert g(torch.randn(2, 6)).max() == manidp.SALIENCY_CAP


def test_gated_resnet_starts_as_the_dense_one_and_records():
    base = _resnet()
    gated = manidp.GatedResNet.from_resnet(base).eval()
    for gate in gated.gates():   # make pi exactly 1 to compare with the dense net exactly
        gate.saliency_module.fc2.weight.data.zero_()
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(gated(x), base(x), atol=1e-5)
    gates = gated.gates()
    assert len(gates) == 6 and all(g.mask.all() for g in gates)
    assert gates[0].saliency.shape == (4, 4) and gates[-1].feature.shape == (4, 8) and gates[-1].size == (4, 4)


def test_instance_weight_by_hand_and_gradients():
    ce = torch.tensor([0.0, 0.2, 0.4, 0.8, 2.0], requires_grad=True)
    lam = manidp.instance_weight(ce, 0.4, 0.01)
    assert torch.allclose(lam, torch.tensor([0.01, 0.005, 0.0, 0.0, 0.0]))
    assert not lam.requires_grad
    lam2 = manidp.instance_weight(ce, 0.8, 1.0, power=2.0, detach=False)
    assert torch.allclose(lam2, torch.tensor([1.0, 0.5625, 0.25, 0.0, 0.0]))
    lam2.sum().backward()   # d/dce ((C - ce)/C)^2 = -2 (C - ce) / C^2
    assert torch.allclose(ce.grad, torch.tensor([-2.5, -1.875, -1.25, 0.0, 0.0]))


def test_cosine_gram_and_similarity_loss_by_hand():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    r = 1 / math.sqrt(2)
    want = torch.tensor([[1, 0, r], [0, 1, r], [r, r, 1]])
    assert torch.allclose(manidp.cosine_gram(v), want)
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])   # T all ones
    # ||T - R||^2 = 2 * (1 - 0)^2 + 4 * (1 - r)^2, over N^2 = 9; two identical layers double it
    one = (2 + 4 * (1 - r) ** 2) / 9
    assert math.isclose(manidp.similarity_loss([v], [s]).item(), one, rel_tol=1e-6)
    assert math.isclose(manidp.similarity_loss([v, v], [s, s]).item(), 2 * one, rel_tol=1e-6)
    assert manidp.similarity_loss([v], [v * 5]).item() < 1e-10


def test_sparsity_is_mean_per_layer_summed():
    a, b = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0, 2.0, 6.0]])
    assert torch.allclose(manidp.sparsity([a, b]), torch.tensor([2.0 + 3.0]))


def test_keep_ratio_schedule_values():
    vals = [manidp.keep_ratio(e, 4, 0.6) for e in range(4)]
    want = [0.2 * math.cos(math.pi * (e + 1) / 4) + 0.8 for e in range(4)]
    assert vals == pytest.approx(want) and vals[-1] == pytest.approx(0.6) and vals[1] == pytest.approx(0.8)
    assert all(a > b for a, b in zip(vals, vals[1:]))


def test_layer_thresholds_keep_ceil_ratio():
    m = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    th = manidp.layer_thresholds([m, torch.tensor([2.0, 1.0])], 0.6)
    assert th[0].item() == pytest.approx(0.5) and th[1].item() == pytest.approx(1.0)   # k = 3 and k = 2
    assert (m >= th[0]).sum() == 3


def test_flops_counter_matches_torch_on_the_dense_net():
    for depth, widths, size in ((8, (4, 4, 8, 8), 16), (14, (16, 16, 32, 64), 32)):
        base = _resnet(depth, widths)
        x = torch.zeros(2, 3, size, size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            base(x)
        gated = manidp.GatedResNet.from_resnet(base).eval()
        with torch.no_grad():
            gated(x)
        macs = manidp.instance_macs(gated)
        assert macs.shape == (2,) and torch.allclose(macs, torch.full((2,), counter.get_total_flops() / 2 / 2))  # 2 FLOPs a MAC, 2 images


def test_flops_counter_with_pruned_channels_by_hand():
    base = _resnet(8, (4, 4, 8, 8))
    gated = manidp.GatedResNet.from_resnet(base).eval()
    x = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        gated(x)
    dense = manidp.instance_macs(gated).item()
    b = gated.layer1[0]
    b.gate1.static_mask[:3] = 0   # 1 of 4 channels left in layer1's first conv
    gated.set_dynamic(False)
    with torch.no_grad():
        gated(x)
    # conv1: 9*4*4*16*16 -> 9*4*1*16*16 ; conv2: 9*4*4*16*16 -> 9*1*4*16*16
    saved = 2 * 9 * 4 * 3 * 16 * 16
    assert manidp.instance_macs(gated).item() == pytest.approx(dense - saved)


def test_magnitude_masks_keep_largest_filters():
    gated = manidp.GatedResNet.from_resnet(_resnet())
    manidp.magnitude_masks(gated, 0.5)
    conv, gate = gated.layer2[0].body[0], gated.layer2[0].gate1
    norms = conv.weight.abs().sum(dim=(1, 2, 3))
    assert gate.static_mask.sum() == 4 and not gate.dynamic
    assert norms[gate.static_mask.bool()].min() >= norms[~gate.static_mask.bool()].max()


def test_objective_terms_and_epoch_rollover():
    gated = manidp.GatedResNet.from_resnet(_resnet()).train()
    obj = manidp.ManiDPObjective(lam=0.1, gamma_sim=1.0, target=0.5)
    obj.steps_per_epoch, obj.total_steps = 2, 4
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    obj.setup(gated, x[:2], device=torch.device("cpu"))
    for step in range(3):
        obj.epoch, obj.step = step // 2, step
        loss, logits, terms = obj(gated, x, y)
        if step == 0:
            ce = F.cross_entropy(logits, y, reduction="none")
            lam = manidp.instance_weight(ce, 0.5 * ce.mean(), 0.1)
            spars = manidp.sparsity([g.saliency for g in gated.gates()])
            sim = manidp.similarity_loss([g.feature for g in gated.gates()], [g.saliency for g in gated.gates()])
            assert torch.allclose(loss, (ce + lam * spars).mean() + sim, rtol=1e-5)
            assert set(terms) == {"ce", "sparsity", "sim", "lam", "keep"} and terms["keep"] == 1.0
            mean_ce_0 = ce.mean().item()
        loss.backward()
    # at step 2 (epoch 1 of 2) C' = 0.5 x the mean CE of epoch 0, thresholds at rho_1 = 0.5
    # (no optimiser step here, so both epoch-0 steps saw the same CE)
    assert obj.c_prime.item() == pytest.approx(0.5 * mean_ce_0, rel=1e-5) and terms["keep"] < 1.0
    theta = gated.layer3[0].gate2.threshold
    assert theta > 0 and obj.count.item() == 6 and mean_ce_0 > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="ce"):
        manidp.instance_weight(torch.zeros(2, 3), 0.5, 0.1)
    with pytest.raises(ValueError, match="c_prime"):
        manidp.instance_weight(torch.zeros(2), 0.0, 0.1)
    with pytest.raises(ValueError, match="target"):
        manidp.keep_ratio(0, 5, 1.5)
    with pytest.raises(ValueError, match="epoch"):
        manidp.keep_ratio(5, 5, 0.5)
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        manidp.cosine_gram(torch.zeros(3))
    with pytest.raises(ValueError, match="batch"):
        manidp.similarity_loss([torch.ones(3, 2)], [torch.ones(4, 2)])
    with pytest.raises(TypeError, match="CifarResNet"):
        manidp.GatedResNet.from_resnet(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="GatedResNet"):
        manidp.ManiDPObjective().setup(_resnet(), None, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="lam"):
        manidp.ManiDPObjective(lam=-1.0)
    with pytest.raises(ValueError, match="method"):
        manidp.train_pruned("magnitude", _resnet(), None)
    with pytest.raises(RuntimeError, match="forward"):
        manidp.instance_macs(manidp.GatedResNet(8, (4, 4, 8, 8), 5))
    with pytest.raises(ValueError, match="features"):
        manidp.SaliencyModule(6, 4)(torch.zeros(2, 5))


def test_exercise_checks_accept_right_and_catch_mistakes(capsys):
    manidp.check_instance_weight(lambda ce, c, lam: lam * ((c - ce) / c).clamp(min=0))
    manidp.check_instance_weight(lambda ce, c, lam: torch.where(ce < c, lam * (1 - ce / c), torch.zeros_like(ce)))
    manidp.check_cosine_gram(lambda v: F.cosine_similarity(v[:, None], v[None], dim=-1))
    manidp.check_cosine_gram(lambda v: F.normalize(v, dim=1) @ F.normalize(v, dim=1).T)
    assert capsys.readouterr().out.count("✓") == 4
    for wrong, hint in ((lambda ce, c, lam: lam * (c - ce) / c, "negative"),
                        (lambda ce, c, lam: lam * (ce / c).clamp(max=1), "reversed"),
                        (lambda ce, c, lam: lam * (ce < c).double(), "linearly")):
        with pytest.raises(AssertionError, match=hint):
            manidp.check_instance_weight(wrong)
    for wrong, hint in ((lambda v: v @ v.T, "plain Gram"), (lambda v: F.normalize(v, dim=0).T @ F.normalize(v, dim=0), "N x N")):
        with pytest.raises(AssertionError, match=hint):
            manidp.check_cosine_gram(wrong)


@pytest.mark.parametrize("method", manidp.METHODS)
def test_train_pruned_and_evaluate(tiny, method):
    from minidistill import train
    base = _resnet(8, (4, 4, 8, 8), k=tiny.num_classes)
    recipe = train.Recipe(epochs=2, batch_size=128, lr=0.05, schedule="cosine")
    run = manidp.train_pruned(method, base, tiny, recipe, target=0.5, gamma_sim=0.1, eval_every=None, progress=False)
    ev = manidp.evaluate_pruned(run.model, tiny)
    n = len(tiny.x_test)
    assert ev["ce"].shape == ev["macs"].shape == ev["keep"].shape == (n,)
    assert (ev["macs"] < ev["dense_macs"]).all() and ev["dense_macs"] > 0
    if method == "static":
        assert ev["macs"].std() == 0 and "train_sparsity" not in run.history.records[-1]
    else:   # the last epoch trains at rho_1 = target = 0.5
        assert 0 < run.history.final("train_keep") < 1 and run.model.layer1[0].gate1.threshold > 0
    # evaluate_pruned leaves the gates as it found them
    assert all(g.dynamic == (method != "static") for g in run.model.gates())


def test_saliency_means_and_evaluate_at_ratio(tiny):
    gated = manidp.GatedResNet.from_resnet(_resnet(8, (4, 4, 8, 8), k=tiny.num_classes))
    for gate in gated.gates():   # pi_c = c + 1 for every image: known means, no ties
        gate.saliency_module.fc2.weight.data.zero_()
        gate.saliency_module.fc2.bias.data.copy_(torch.arange(1.0, gate.static_mask.numel() + 1))
    gated.train()
    means = manidp.saliency_means(gated, tiny, max_images=7)
    assert gated.training and [m.shape[0] for m in means] == [4, 4, 8, 8, 8, 8]
    assert all(torch.allclose(m, torch.arange(1.0, m.numel() + 1)) for m in means)
    widths = [4, 4, 8, 8, 8, 8]
    ev = manidp.evaluate_at_ratio(gated, tiny, means, 0.5)
    kept = sum(math.ceil(0.5 * c) for c in widths) / sum(widths)
    assert torch.allclose(ev["keep"], torch.full_like(ev["keep"], kept))
    assert (ev["macs"] < ev["dense_macs"]).all()
    full = manidp.evaluate_at_ratio(gated, tiny, means, 1.0)
    assert torch.allclose(full["macs"], torch.full_like(full["macs"], full["dense_macs"]))
    assert all(g.threshold.item() == 0.0 for g in gated.gates())   # thresholds restored
    with pytest.raises(ValueError, match="one mean saliency per gate"):
        manidp.evaluate_at_ratio(gated, tiny, means[:2], 0.5)
    with pytest.raises(ValueError, match="ratio"):
        manidp.evaluate_at_ratio(gated, tiny, means, 0.0)
    with pytest.raises(ValueError, match="static"):
        manidp.saliency_means(manidp.magnitude_masks(gated, 0.5), tiny)


def test_block_macs_check_accepts_right_and_catches_mistakes(capsys):
    manidp.check_block_macs(lambda c_in, c_out, k1, k2, h, w: 9 * h * w * (c_in * k1 + k1 * k2))
    manidp.check_block_macs(lambda c_in, c_out, k1, k2, h, w: [9.0 * h * w * (c_in * a + a * b) for a, b in zip(k1.tolist(), k2.tolist())])
    manidp.check_block_macs(lambda c_in, c_out, k1, k2, h, w: (9 * c_in * k1 * h * w + 9 * k1 * k2 * h * w).float())
    assert capsys.readouterr().out.count("✓") == 3
    for wrong, hint in ((lambda c_in, c_out, k1, k2, h, w: 18 * h * w * (c_in * k1 + k1 * k2), "FLOPs"),
                        (lambda c_in, c_out, k1, k2, h, w: h * w * (c_in * k1 + k1 * k2), "3x3"),
                        (lambda c_in, c_out, k1, k2, h, w: 9 * h * w * (c_in * k1 + c_out * k2), "k1 \\* k2"),
                        (lambda c_in, c_out, k1, k2, h, w: 9 * h * w * (c_out * k1 + k1 * k2), "c_in input"),
                        (lambda c_in, c_out, k1, k2, h, w: 9 * h * w * (k1 * k1 + k1 * k2), "c_in input"),
                        (lambda c_in, c_out, k1, k2, h, w: torch.full(k1.shape, 9.0 * h * w * (c_in * c_out + c_out ** 2)), "dense"),
                        (lambda c_in, c_out, k1, k2, h, w: (9 * h * w * (c_in * k1 + k1 * k2))[:1], "one cost per image")):
        with pytest.raises(AssertionError, match=hint):
            manidp.check_block_macs(wrong)


def test_block_macs_formula_matches_the_counter():
    # the exercise's formula is what instance_macs adds for one gated block
    base = _resnet(8, (4, 4, 8, 8))
    gated = manidp.GatedResNet.from_resnet(base).eval()
    block = gated.layer2[0]
    block.gate1.static_mask[:3] = 0
    block.gate2.static_mask[:5] = 0
    x = torch.zeros(1, 3, 16, 16)
    gated.set_dynamic(False)
    with torch.no_grad():
        gated(x)
    pruned = manidp.instance_macs(gated).item()
    block.gate1.static_mask[:] = 1
    block.gate2.static_mask[:] = 1
    with torch.no_grad():
        gated(x)
    dense = manidp.instance_macs(gated).item()
    h, w = block.gate1.size
    block_cost = lambda k1, k2: 9 * h * w * (4 * k1 + k1 * k2)   # c_in = 4, c_out = 8
    assert dense - pruned == pytest.approx(block_cost(8, 8) - block_cost(5, 3))


def test_plot_budget_draws(tiny):
    import matplotlib
    matplotlib.use("Agg")
    from minidistill.methods import manidp_plots
    gated = manidp.GatedResNet.from_resnet(_resnet(8, (4, 4, 8, 8), k=tiny.num_classes))
    means = manidp.saliency_means(gated, tiny, max_images=64)
    ev = manidp.evaluate_at_ratio(gated, tiny, means, 0.5)
    fig = manidp_plots.plot_budget({"dyn": ev}, {"dense": (0.0, 50.0)}, 0.5)
    assert len(fig.axes) == 2 and len(fig.axes[1].lines) == 2
