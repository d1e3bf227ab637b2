"""Chapter 9 (Go Wide, Then Narrow): the linear pairs and where they may go, the exact merge,
the imitation loss and objective, the three-stage trainer, the figures and the self-checks."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import train
from minidistill.exercises import wide_narrow as wn_exercises
from minidistill.methods import wide_narrow as wn
from minidistill.methods import wide_narrow_plots
from minidistill.models import CifarResNet, PlainCNN, WideResNet, count_parameters, create_model
from minidistill.runtime import seed_everything


def test_all_names_exist_and_are_re_exported():
    for name in wn.__all__:
        assert hasattr(wn, name), name
    for module in (wide_narrow_plots, wn_exercises):
        for name in module.__all__:
            assert name in wn.__all__ and getattr(wn, name) is getattr(module, name), name


def _pair(depth: int = 8, factor: int = 2, seed: int = 0):
    seed_everything(seed)
    return wn.wide_resnet(depth, 1, 10), wn.wide_resnet(depth, factor, 10)


def _randomise_bn(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval mode tests something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


# -- merging is exact -------------------------------------------------------------------------

@pytest.mark.parametrize("train_mode", [False, True])
def test_merged_model_equals_augmented_model(train_mode):
    thin, wide = _pair(8, 4)
    _randomise_bn(thin)
    aug = wn.insert_linear_pairs(thin, wide, image_shape=(3, 16, 16)).train(train_mode)
    merged = wn.merge_linear_pairs(aug).train(train_mode)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = aug(x), merged(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item()), (a - b).abs().max()
    # and the pairs are not the identity: without the merge the thin network computes something else
    with torch.no_grad():
        plain = thin.train(train_mode)(x)
    assert not torch.allclose(plain, a, rtol=1e-2, atol=1e-3)


def test_merged_model_has_exactly_the_thin_architecture():
    thin, wide = _pair(20, 4)
    fresh = create_model("resnet20", 10)
    aug = wn.insert_linear_pairs(thin, wide)
    merged = wn.merge_linear_pairs(aug)
    assert count_parameters(merged) == count_parameters(fresh) == 272_474
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    assert count_parameters(aug) > count_parameters(fresh)
    # the merge copies: the augmented network (and the thin modules inside it) are left as they were
    assert merged.layer2[0].body[0].weight is not thin.layer2[0].body[0].weight
    assert torch.equal(aug.thin.layer2[0].body[0].weight, thin.layer2[0].body[0].weight)


def test_fold_into_conv_and_linear_against_composition():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=True).double()
    m = torch.randn(4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64)
    want = conv(torch.einsum("ij,njhw->nihw", m, x)).detach()   # map first, with padding on the mapped input
    wn.fold_into(conv, m)
    assert torch.allclose(conv(x), want, rtol=1e-10, atol=1e-10)  # exact at the zero-padded border too
    lin = nn.Linear(4, 3).double()
    v = torch.randn(5, 4, generator=g, dtype=torch.float64)
    want = lin(v @ m.T).detach()
    wn.fold_into(lin, m)
    assert torch.allclose(lin(v), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="must be \\[3, 3\\]"):
        wn.fold_into(nn.Linear(3, 2), m)
    with pytest.raises(TypeError, match="only into nn.Linear or nn.Conv2d"):
        wn.fold_into(nn.BatchNorm2d(4), m)


def test_merge_targets_name_body_and_projection():
    thin, _ = _pair(8)
    assert wn.merge_targets(thin, ("layer2",)) == ["layer2.0.body.0", "layer2.0.shortcut.0"]
    assert wn.merge_targets(thin, ("pool", "fc")) == ["fc"]
    plain = PlainCNN(7, (8, 16, 32), 10)
    assert wn.merge_targets(plain, ("layer1",)) == ["layer1.0"]


def test_folding_into_the_body_alone_is_not_exact_at_an_identity_shortcut():
    """The claim behind the refusal, checked by hand: fold a map into layer1.0's first conv of a
    resnet (identity shortcut) and the output differs from applying the map to the input."""
    thin, _ = _pair(8)
    block = thin.layer1[0].eval()
    g = torch.Generator().manual_seed(2)
    m = torch.randn(16, 16, generator=g)
    x = torch.randn(2, 16, 8, 8, generator=g)
    with torch.no_grad():
        want = block(torch.einsum("ij,njhw->nihw", m, x))
        other = copy.deepcopy(block)
        wn.fold_into(other.body[0], m)
        got = other(x)
    assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3)


# -- clear errors -----------------------------------------------------------------------------

def test_mismatched_depths_are_refused():
    thin, _ = _pair(20)
    with pytest.raises(ValueError, match="same depth: stage 'layer1' has 3 .* and 2"):
        wn.insert_linear_pairs(thin, wn.wide_resnet(14, 4, 10))
    with pytest.raises(ValueError, match="same depth: stage 'layer1' has 1 .* and 18"):
        wn.insert_linear_pairs(create_model("resnet8", 10), PlainCNN(19, (8, 16, 32), 10),
                               (("stem", "layer1"), ("layer2",), ("layer3",), ("pool", "fc")))
    with pytest.raises(ValueError, match="outputs must match"):
        wn.insert_linear_pairs(thin, wn.wide_resnet(20, 2, 100))


@pytest.mark.parametrize("thin, wide, blocks, match", [
    (lambda: create_model("resnet8", 10), lambda: wn.wide_resnet(8, 2, 10),
     (("stem",), ("layer1", "layer2"), ("layer3", "pool", "fc")), "'layer1.0': its identity shortcut"),
    (lambda: PlainCNN(7, (8, 16, 32), 10), lambda: PlainCNN(7, (16, 32, 64), 10),
     (("stem", "layer1"), ("layer2",), ("layer3", "pool", "fc")), "'layer2.0': max-pooling"),
    (lambda: WideResNet(10, 1, 10), lambda: WideResNet(10, 2, 10),
     (("stem", "layer1"), ("layer2",), ("layer3", "pool", "fc")), "'layer2.0': PreActBlock is not a layer"),
    (lambda: WideResNet(10, 1, 10), lambda: WideResNet(10, 2, 10),
     (("stem", "layer1", "layer2"), ("layer3", "pool", "fc")), "'layer3.0'"),
    (lambda: PlainCNN(7, (8, 16, 32), 10), lambda: PlainCNN(7, (16, 32, 64), 10),
     (("stem",), ("layer1", "layer2", "layer3", "pool", "fc")), None),
])
def test_boundaries_where_merging_is_not_exact_are_refused(thin, wide, blocks, match):
    if match is None:   # a convolution right after the boundary: accepted, and the merge is exact
        aug = wn.insert_linear_pairs(thin(), wide(), blocks, (3, 16, 16)).eval()
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(aug(x), wn.merge_linear_pairs(aug).eval()(x), rtol=1e-4, atol=1e-5)
        return
    with pytest.raises(ValueError, match=match):
        wn.insert_linear_pairs(thin(), wide(), blocks, (3, 16, 16))


def test_bad_blocks_and_types_are_refused():
    thin, wide = _pair(8)
    with pytest.raises(ValueError, match="split the thin network's stages"):
        wn.insert_linear_pairs(thin, wide, (("stem", "layer1"), ("layer3",), ("layer2", "pool", "fc")))
    with pytest.raises(ValueError, match="at least two"):
        wn.insert_linear_pairs(thin, wide, (("stem", "layer1", "layer2", "layer3", "pool", "fc"),))
    with pytest.raises(TypeError, match="wide_model must be an nn.Module"):
        wn.insert_linear_pairs(thin, "resnet8x4")
    with pytest.raises(TypeError, match="WideNarrowNet"):
        wn.merge_linear_pairs(thin)
    with pytest.raises(ValueError, match="factor must be an int >= 1"):
        wn.wide_resnet(8, 0, 10)
    aug = wn.insert_linear_pairs(thin, wide, image_shape=(3, 16, 16))
    with pytest.raises(ValueError, match="upto must be a block index in 0..3"):
        aug(torch.zeros(1, 3, 16, 16), upto=4)


# -- the imitation loss and objective ---------------------------------------------------------

def test_imitation_loss_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    total = 0.0
    for n in range(3):   # the definition, one example at a time: squared norm, over N * D
        total += sum(float(d) ** 2 for d in (s[n] - b[n]).detach().flatten())
    loss = wn.imitation_loss(s, b)
    assert abs(loss.item() - total / (3 * 100)) <= 1e-12 * total
    loss.backward()
    assert torch.allclose(s.grad, 2 * (s - b).detach() / 300)
    with pytest.raises(ValueError, match="same shape"):
        wn.imitation_loss(s, b[:, :2])


def test_imitation_objective_trains_only_its_block():
    thin, wide = _pair(8)
    aug = wn.insert_linear_pairs(thin, wide, image_shape=(3, 16, 16))
    objective = wn.ImitationObjective(wide, aug.blocks, 1)
    assert not objective.teacher.training and not any(p.requires_grad for p in objective.teacher.parameters())
    assert {id(p) for p in objective.teacher.parameters()} == {
        id(p) for n in ("stem", "layer1", "layer2") for p in getattr(wide, n).parameters()}
    aug.requires_grad_(False)
    for p in aug.block_parameters(1):
        p.requires_grad_(True)
    x = torch.randn(4, 3, 16, 16)
    loss, logits, terms = objective(aug, x, torch.zeros(4, dtype=torch.long))
    assert logits is None and set(terms) == {"imitation"} and not terms["imitation"].requires_grad
    with torch.no_grad():
        want = F.mse_loss(aug(x, upto=1), wide.eval().layer2(wide.layer1(wide.stem(x))))
    assert torch.allclose(loss.detach(), want, rtol=1e-5)
    loss.backward()
    trained = {id(p) for p in aug.block_parameters(1)}
    assert {id(aug.shrink[0].weight), id(aug.expand[1].weight), id(thin.layer2[0].body[0].weight)} <= trained
    for name, p in aug.named_parameters():
        assert (p.grad is not None) == (id(p) in trained), name
    with pytest.raises(ValueError, match="block must be in 0..3"):
        wn.ImitationObjective(wide, aug.blocks, 4)


def test_imitation_errors_are_zero_for_a_copy_and_restore_modes():
    thin, wide = _pair(8, 1)
    wide.load_state_dict(thin.state_dict())
    aug = wn.insert_linear_pairs(thin, wide, image_shape=(3, 16, 16)).train()
    for e, s in zip(aug.expand, aug.shrink):   # identity pairs: the augmented network is the wide one
        nn.init.eye_(e.weight[:, :, 0, 0]), nn.init.eye_(s.weight[:, :, 0, 0])
    errors = wn.imitation_errors(aug, wide, torch.randn(4, 3, 16, 16))
    assert len(errors) == 4 and max(errors) < 1e-10
    assert aug.training and wide.training


def test_network_costs_and_their_figure():
    costs = wn.network_costs(8, 2, image_shape=(3, 16, 16))
    thin, aug, merged, wide = costs.values()
    assert list(costs)[3] == "wide B (x2)"
    assert merged == thin and aug[0] > thin[0] and aug[1] > thin[1] and wide[0] > aug[0]
    # each pair adds 2 * thin * wide weights at the block boundaries (16/32, 32/64, 64/128 channels)
    assert aug[0] - thin[0] == 2 * (16 * 32 + 32 * 64 + 64 * 128)
    wn.plot_costs(costs)
    with pytest.raises(ValueError, match="at least one"):
        wn.plot_costs({})


def test_count_macs_of_resnet20():
    # resnet20 on a 32x32 image: about 41 million multiply-accumulates
    assert 40_000_000 < wn.count_macs(create_model("resnet20", 10)) < 42_000_000


# -- the trainer ------------------------------------------------------------------------------

def test_train_wide_narrow_runs_all_stages(tiny):
    small = dataclasses.replace(tiny, x_train=tiny.x_train[:128], y_train=tiny.y_train[:128])
    _, wide = _pair(8)
    recipe = train.Recipe(epochs=1, batch_size=64, lr=0.05)
    run = wn.train_wide_narrow(lambda: wn.wide_resnet(8, 1, 10), wide, small, imitation_recipe=recipe,
                               finetune_recipe=recipe, n_probe=32)
    assert len(run.imitation_histories) == 4 and all("train_imitation" in h.records[0] for h in run.imitation_histories)
    assert len(run.errors_before) == len(run.errors_after) == 4
    assert count_parameters(run.model) == count_parameters(create_model("resnet8", 10))
    assert isinstance(run.model, CifarResNet) and "test_acc" in run.history.records[0]
    assert 0 <= run.merged_scores["acc"] <= 100
    model, history = run
    assert model is run.model and history is run.history


def test_train_wide_caches(tiny, data_dir):
    small = dataclasses.replace(tiny, x_train=tiny.x_train[:64], y_train=tiny.y_train[:64])
    recipe = train.Recipe(epochs=1, batch_size=32, lr=0.05)
    first = wn.train_wide(8, 2, small, recipe, profile_name="smoke")
    again = wn.train_wide(8, 2, small, recipe, profile_name="smoke")
    assert not first.cached and again.cached and first.path == again.path
    assert again.model.layer3[0].body[0].out_channels == 128


# -- figures and exercises --------------------------------------------------------------------

def test_figures_draw():
    wn.plot_stages(4, ["stem+layer1", "layer2", "layer3", "head"])
    wn.plot_imitation_errors({"before": [[1.0, 1.1, 0.9, 1.2]], "after": [[0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.2, 0.2]]},
                             ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="n_blocks"):
        wn.plot_stages(1)
    with pytest.raises(ValueError, match="4-long lists"):
        wn.plot_imitation_errors({"x": [[1.0, 2.0]]}, ["a", "b", "c", "d"])


def test_check_fold_accepts_right_answers_and_catches_the_classic_mistakes(capsys):
    wn.check_fold(lambda w, b, m: (torch.einsum("ij,jcab->icab", m, w), m @ b))
    wn.check_fold(lambda w, b, m: ((m @ w.flatten(1)).view_as(w), (m @ b[:, None])[:, 0]))   # another form
    wn.check_fold(lambda w, b, m: (torch.einsum("ij,jcab->icab", m, w).float(), (m @ b).float()))  # float32
    assert capsys.readouterr().out.count("✓") == 3
    with pytest.raises(AssertionError, match="transposed"):
        wn.check_fold(lambda w, b, m: (torch.einsum("ji,jcab->icab", m, w), m.T @ b))
    with pytest.raises(AssertionError, match="the bias is not"):
        wn.check_fold(lambda w, b, m: (torch.einsum("ij,jcab->icab", m, w), b))
    with pytest.raises(AssertionError, match="does not give"):
        wn.check_fold(lambda w, b, m: (w, b))
    with pytest.raises(AssertionError, match="pair"):
        wn.check_fold(lambda w, b, m: w)

    def todo(w, b, m):
        raise NotImplementedError
    wn.check_fold(todo)
    assert "not attempted" in capsys.readouterr().out


def test_check_imitation_loss_wants_the_papers_form(capsys):
    wn.check_imitation_loss(lambda s, b: ((s - b) ** 2).flatten(1).sum(1).mean())
    wn.check_imitation_loss(lambda s, b: F.mse_loss(s, b, reduction="sum") / s.shape[0])
    wn.check_imitation_loss(lambda s, b: wn.imitation_loss(s, b) * s[0].numel())
    assert capsys.readouterr().out.count("✓") == 3
    for wrong, match in [(F.mse_loss, "chapter's normalised"),
                         (lambda s, b: ((s - b) ** 2).sum() * s.shape[0], "expected"),
                         (lambda s, b: ((s - b) ** 2).flatten(1).sum(1).sum(), "summed over the batch"),
                         (lambda s, b: (s - b).abs().flatten(1).sum(1).mean(), "absolute"),
                         (lambda s, b: (s - b).flatten(1).norm(dim=1).mean(), "squared norm")]:
        with pytest.raises(AssertionError, match=match):
            wn.check_imitation_loss(wrong)


def test_check_mergeable_agrees_with_merge_targets(capsys):
    """The self-check's answers are the ones insert_linear_pairs enforces (computed here)."""
    def exact(thin, block):
        try:
            wn.merge_targets(thin, block)
            return True
        except ValueError:
            return False
    plain, wrn, res = PlainCNN(7, (8, 16, 32), 10), WideResNet(16, 2, 10), create_model("resnet20", 10)
    answers = {
        "PlainCNN(7): between stem and layer1": exact(plain, ("layer1",)),
        "PlainCNN(7): between layer1 and layer2": exact(plain, ("layer2",)),
        "PlainCNN(7): between layer3 and pool": exact(plain, ("pool", "fc")),
        "WRN-16-2: between layer1 and layer2": exact(wrn, ("layer2",)),
        "resnet20: between layer1.0 and layer1.1": not isinstance(res.layer1[1].shortcut, nn.Identity),
    }
    assert set(answers) == set(wn.MERGEABLE_QUESTIONS)
    wn.check_mergeable(answers)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="1 of 5 wrong"):
        wn.check_mergeable({**answers, "PlainCNN(7): between layer1 and layer2": True})
    with pytest.raises(AssertionError, match="missing"):
        wn.check_mergeable({"PlainCNN(7): between stem and layer1": True})
    wn.check_mergeable({q: None for q in wn.MERGEABLE_QUESTIONS})
    assert "not attempted" in capsys.readouterr().out
