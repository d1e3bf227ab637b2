"""minidistill.models: the CIFAR ResNets / WRNs, parameter counts, and feature access."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from minidistill import models as models_mod
from minidistill.models import (
    MODELS,
    CifarResNet,
    PlainCNN,
    WideResNet,
    count_parameters,
    create_model,
    feature_extractor,
    feature_names,
)

from _core_helpers import new_model

STAGES = ["stem", "layer1", "layer2", "layer3", "pool", "fc"]


def test_all_names_exist():
    for name in models_mod.__all__:
        assert hasattr(models_mod, name), name


# Parameter counts (100 classes) as reported in the RepDistiller / CRD benchmark (Tian et al., 2020)
# and, for WRN-28-10, in Zagoruyko & Komodakis (2016).
@pytest.mark.parametrize("name, millions", [
    ("resnet32x4", 7.43), ("resnet8x4", 1.23), ("resnet20", 0.28), ("resnet32", 0.47),
    ("resnet56", 0.86), ("resnet110", 1.74), ("wrn_16_2", 0.70), ("wrn_40_2", 2.26), ("wrn_28_10", 36.54),
])
def test_parameter_counts_match_the_benchmark(name, millions):
    assert round(count_parameters(create_model(name, 100)) / 1e6, 2) == millions


def test_parameter_count_by_hand_for_a_tiny_net():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    assert count_parameters(net) == 3 * 4 + 4 + 4 * 2
    net[0].requires_grad_(False)
    assert count_parameters(net) == 8
    assert count_parameters(net, trainable_only=False) == 24


@pytest.mark.parametrize("name", [n for n in MODELS if n != "wrn_28_10"])
def test_every_model_gives_logits_on_cifar_input(name):
    model = new_model(name, num_classes=7)
    assert feature_names(model) == STAGES
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_wrn_28_10_single_forward():
    model = create_model("wrn_28_10", 10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_models_take_other_image_sizes():
    """The smoke data are 16x16; the global pool makes any size work."""
    with torch.no_grad():
        assert new_model("resnet8").eval()(torch.randn(3, 3, 16, 16)).shape == (3, 10)


def test_create_model_is_fresh_each_time_and_seedable():
    a, b = new_model("resnet8", seed=0), new_model("resnet8", seed=0)
    c = new_model("resnet8", seed=1)
    assert a is not b
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*resnet8"):
        create_model("resnet9", 10)


@pytest.mark.parametrize("k", [1, 0, 10.0, "10"])
def test_bad_num_classes_raises(k):
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet8", k)


def test_bad_depths_raise():
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(9, (16, 16, 32, 64), 10)
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(15, 2, 10)


def test_cifar_resnet_stage_shapes():
    """RepDistiller's layout: 32x32 -> 32, 16, 8 spatial; widths (stem, l1, l2, l3)."""
    model = CifarResNet(14, (8, 12, 20, 24), 5).eval()
    fx = feature_extractor(model, STAGES)
    with torch.no_grad():
        out = fx(torch.randn(2, 3, 32, 32))
    assert list(out) == STAGES
    assert out["stem"].shape == (2, 8, 32, 32)
    assert out["layer1"].shape == (2, 12, 32, 32)
    assert out["layer2"].shape == (2, 20, 16, 16)
    assert out["layer3"].shape == (2, 24, 8, 8)
    assert out["pool"].shape == (2, 24)
    assert out["fc"].shape == (2, 5)


def test_feature_extractor_wrn_shapes_and_logits_match_model():
    model = new_model("wrn_16_2").eval()
    fx = feature_extractor(model, ["layer1", "layer2", "layer3", "fc"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = fx(x)
        logits = model(x)
    assert set(out) == {"layer1", "layer2", "layer3", "fc"}
    assert out["layer1"].shape == (2, 32, 32, 32)
    assert out["layer2"].shape == (2, 64, 16, 16)
    assert out["layer3"].shape == (2, 128, 8, 8)
    assert (out["layer3"] >= 0).all()  # ends with the final BN-ReLU
    assert torch.allclose(out["fc"], logits, atol=1e-5)


def test_feature_extractor_module_path():
    model = new_model("resnet8").eval()
    with torch.no_grad():
        out = feature_extractor(model, ["layer2.0.body"])(torch.randn(2, 3, 32, 32))
    assert out["layer2.0.body"].shape == (2, 32, 16, 16)


def test_feature_extractor_gradient_reaches_the_model():
    """The extractor shares the model's parameters: a loss on a feature trains the model."""
    model = new_model("resnet8").train()
    fx = feature_extractor(model, ["layer2", "fc"])
    out = fx(torch.randn(4, 3, 16, 16))
    out["layer2"].pow(2).mean().backward()
    assert model.stem[0].weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0
    assert model.layer2[0].body[0].weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # layer2 does not depend on fc
    # and an update through the extractor's parameters is an update of the model's
    assert {id(p) for p in fx.parameters()} <= {id(p) for p in model.parameters()}


def test_unknown_feature_name_raises():
    model = new_model("resnet8")
    with pytest.raises(ValueError, match=r"unknown feature name\(s\) \['layer4'\].*layer3"):
        feature_extractor(model, ["layer1", "layer4"])


def test_feature_is_the_modules_own_output_whatever_else_is_requested():
    """A tapped BatchNorm output (pre-activation, as OFD-style methods need) is the BN output,
    with its negative values, also when the logits are read in the same pass."""
    model = new_model("resnet8").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        bn_out = model.stem[1](model.stem[0](x))
        alone = feature_extractor(model, ["stem.1"])(x)["stem.1"]
        with_logits = feature_extractor(model, ["stem.1", "fc"])(x)["stem.1"]
    assert torch.allclose(alone, bn_out, atol=1e-6)
    assert (bn_out < 0).any()
    assert torch.allclose(with_logits, bn_out, atol=1e-6)


def test_plain_cnn_stage_shapes_and_depth():
    """FitNet-shaped plain nets: ``depth`` convs, maps 32 -> 32, 16, 8, no shortcuts."""
    model = PlainCNN(13, (4, 6, 8), 5).eval()
    assert feature_names(model) == STAGES
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    with torch.no_grad():
        out = feature_extractor(model, STAGES)(torch.randn(2, 3, 32, 32))
    assert out["stem"].shape == (2, 4, 32, 32) and out["layer1"].shape == (2, 4, 32, 32)
    assert out["layer2"].shape == (2, 6, 16, 16) and out["layer3"].shape == (2, 8, 8, 8)
    assert out["fc"].shape == (2, 5) and (out["layer2"] >= 0).all()
    assert count_parameters(model) == sum(c.weight.numel() for c in convs) + 2 * (4 * 5 + 6 * 4 + 8 * 4) + 8 * 5 + 5


@pytest.mark.parametrize("depth, split", [(4, (1, 1, 1)), (5, (1, 1, 2)), (6, (1, 2, 2)), (7, (2, 2, 2)), (19, (6, 6, 6))])
def test_plain_cnn_splits_convs_evenly_extra_ones_late(depth, split):
    assert PlainCNN.convs_per_stage(depth) == split
    model = PlainCNN(depth, (2, 3, 4), 10)
    assert [sum(isinstance(m, nn.Conv2d) for m in s.modules()) for s in (model.layer1, model.layer2, model.layer3)] == list(split)


def test_plain_cnn_without_batch_norm_has_biases_and_no_bn():
    model = PlainCNN(7, (4, 4, 4), 10, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None and torch.equal(c.bias, torch.zeros_like(c.bias)) for c in convs)
    assert "batch_norm=False" in repr(model)
    assert all(m.bias is None for m in PlainCNN(7, (4, 4, 4), 10).modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("depth, widths, match", [(3, (4, 4, 4), "depth"), (7.0, (4, 4, 4), "depth"),
                                                  (7, (4, 4), "widths"), (7, (4, 0, 4), "widths")])
def test_plain_cnn_rejects_bad_arguments(depth, widths, match):
    with pytest.raises(ValueError, match=match):
        PlainCNN(depth, widths, 10)


def test_feature_extractor_follows_the_models_own_mode():
    """No second train/eval flag: model.eval() is what the extractor sees (dropout and
    BatchNorm behave as in the model), and extractor.train() switches the model."""
    model = new_model("resnet8")
    fx = feature_extractor(model, ["layer1", "fc"])
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(fx(x)["fc"], model(x))
    fx.train()
    assert model.training


def test_feature_extractor_stops_after_the_last_feature_unless_logits_are_asked():
    model = new_model("resnet8").eval()
    calls = []
    model.fc.register_forward_hook(lambda *a: calls.append(1))
    feature_extractor(model, ["layer2"])(torch.randn(2, 3, 16, 16))
    assert calls == []
    feature_extractor(model, ["layer2", "fc"])(torch.randn(2, 3, 16, 16))
    assert calls == [1]


def test_feature_shapes_reads_the_image_size_given():
    from minidistill.models import feature_shapes
    model = new_model("resnet8").train()
    assert feature_shapes(model, ["layer2", "fc"], (3, 16, 16)) == {"layer2": (32, 8, 8), "fc": (10,)}
    assert feature_shapes(model, ["layer2"], (3, 32, 32)) == {"layer2": (32, 16, 16)}
    assert model.training
    with pytest.raises(ValueError, match="image_shape"):
        feature_shapes(model, ["layer2"], (32, 32))
