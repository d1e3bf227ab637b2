"""Chapter 1 (Hinton KD): closed-form gradients, the student trainer, and the self-checks."""
from __future__ import annotations

import pytest
import torch

from minidistill.losses import kd_loss, soft_targets
from minidistill.methods import kd_basics
from minidistill.train import Recipe

G = torch.Generator().manual_seed(0)
Z = torch.randn(6, 10, generator=G, dtype=torch.float64)
V = torch.randn(6, 10, generator=G, dtype=torch.float64)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 20.0])
def test_soft_target_gradient_matches_autograd(T):
    z = Z.clone().requires_grad_(True)
    c = -(soft_targets(V, T) * torch.log_softmax(z / T, -1)).sum()
    (auto,) = torch.autograd.grad(c, z)
    assert torch.allclose(auto, kd_basics.soft_target_gradient(Z, V, T), atol=1e-12)


def test_logit_matching_is_the_high_temperature_limit():
    errs = []
    for T in (10.0, 100.0, 1000.0):
        exact = kd_basics.soft_target_gradient(Z, V, T)
        approx = kd_basics.logit_matching_gradient(Z, V, T)
        errs.append(((exact - approx).norm() / approx.norm()).item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3
    # at low temperature the approximation is poor: the test can tell the two apart
    assert ((kd_basics.soft_target_gradient(Z, V, 1.0) - kd_basics.logit_matching_gradient(Z, V, 1.0)).norm()
            / kd_basics.logit_matching_gradient(Z, V, 1.0).norm()).item() > 0.05


def test_logit_matching_ignores_a_constant_shift():
    shifted = kd_basics.logit_matching_gradient(Z + 7.0, V - 3.0, 50.0)
    assert torch.allclose(shifted, kd_basics.logit_matching_gradient(Z, V, 50.0))


def test_gradients_reject_mismatched_shapes_and_bad_temperature():
    with pytest.raises(ValueError, match="same shape"):
        kd_basics.soft_target_gradient(Z, V[:, :5], 2.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_basics.logit_matching_gradient(Z, V, 0.0)


def test_gradient_norms_raw_falls_as_one_over_T_squared_and_scaled_is_flat():
    n = kd_basics.gradient_norms(Z, V, [16, 32, 64])
    assert n["temperature"] == [16.0, 32.0, 64.0]
    assert n["raw"][1] / n["raw"][2] == pytest.approx(4.0, rel=0.02)
    assert n["scaled"][1] / n["scaled"][2] == pytest.approx(1.0, rel=0.02)
    assert n["scaled"][0] == pytest.approx(n["raw"][0] * 16**2)


def test_train_student_alone_and_with_kd_share_initial_weights(tiny, monkeypatch):
    """Same seed: same initial weights and data order, so only the objective differs."""
    seen = []
    import minidistill.methods.kd_basics as mod

    real_fit = mod.fit

    def spy(model, data, objective, recipe, **kw):
        seen.append(({k: v.clone() for k, v in model.state_dict().items()}, objective, kw["seed"]))
        return real_fit(model, data, objective, recipe, **kw)

    monkeypatch.setattr(mod, "fit", spy)
    recipe = Recipe(epochs=1, batch_size=128, lr=0.05)
    teacher, _ = kd_basics.train_student("resnet8", tiny, recipe, seed=3)
    student, hist = kd_basics.train_student("resnet8", tiny, recipe, seed=3, teacher=teacher, temperature=2.0, alpha=0.5)
    (w_alone, obj_alone, _), (w_kd, obj_kd, seed_kd) = seen
    assert all(torch.equal(w_alone[k], w_kd[k]) for k in w_alone)
    assert obj_alone is None and obj_kd.temperature == 2.0 and obj_kd.alpha == 0.5 and seed_kd == 3
    assert len(hist) == 1 and 0 <= hist.final("test_acc") <= 100
    assert not student.training


def test_check_soft_targets_accepts_right_and_rejects_wrong(capsys):
    kd_basics.check_soft_targets(soft_targets)
    assert "✓" in capsys.readouterr().out

    def naive(z, T):  # overflows for large logits
        e = torch.exp(z / T)
        return e / e.sum(-1, keepdim=True)

    with pytest.raises(AssertionError, match="maximum"):
        kd_basics.check_soft_targets(naive)
    with pytest.raises(AssertionError, match="divide the logits"):
        kd_basics.check_soft_targets(lambda z, T: torch.softmax(z, -1))


def test_check_kd_loss_recognises_classic_mistakes(capsys):
    kd_basics.check_kd_loss(kd_loss)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="T²"):
        kd_basics.check_kd_loss(lambda z, v, T: kd_loss(z, v, T) / T**2)
    with pytest.raises(AssertionError, match="batchmean"):
        kd_basics.check_kd_loss(lambda z, v, T: kd_loss(z, v, T) / z.shape[1])
    with pytest.raises(AssertionError, match="direction"):
        kd_basics.check_kd_loss(lambda z, v, T: kd_loss(v, z, T))


def test_checks_report_unattempted_exercises(capsys):
    def todo(*args):
        raise NotImplementedError

    kd_basics.check_soft_targets(todo)
    kd_basics.check_kd_loss(todo)
    kd_basics.check_shrink_factor(...)
    assert capsys.readouterr().out.count("not attempted yet") == 3


def test_check_shrink_factor(capsys):
    kd_basics.check_shrink_factor(4)
    assert "✓" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="chain rule"):
        kd_basics.check_shrink_factor(2)
    with pytest.raises(AssertionError):
        kd_basics.check_shrink_factor(16)
    with pytest.raises(AssertionError, match="number"):
        kd_basics.check_shrink_factor("four")
