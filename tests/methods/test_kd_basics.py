"""Chapter 1 (Hinton KD): closed-form gradients, the student trainer (on train.train_model),
the re-exported self-checks, and the fast teacher that chapters 1 and 2 share."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from minidistill import fast_teacher, train
from minidistill.data import make_shapes
from minidistill.exercises import kd_basics as kd_exercises
from minidistill.losses import Distillation, kd_loss, soft_targets
from minidistill.methods import kd_basics
from minidistill.train import Recipe

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

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


def test_every_public_name_resolves_and_the_checks_are_re_exported():
    for name in kd_basics.__all__:
        assert hasattr(kd_basics, name), name
    for name in kd_exercises.__all__:
        assert name in kd_basics.__all__ and getattr(kd_basics, name) is getattr(kd_exercises, name), name


def test_train_student_alone_and_with_kd_share_initial_weights(tiny, monkeypatch):
    """Same seed: same initial weights and data order, so only the objective differs; the work is
    train.train_model's (train_student is a few lines on it)."""
    seen = []
    real_fit = train.fit

    def spy(model, data, objective, recipe, **kw):
        seen.append(({k: v.clone() for k, v in model.state_dict().items()}, objective, kw))
        return real_fit(model, data, objective, recipe, **kw)

    monkeypatch.setattr(train, "fit", spy)
    recipe = Recipe(epochs=1, batch_size=128, lr=0.05)
    teacher, _ = kd_basics.train_student("resnet8", tiny, recipe, seed=3)
    student, hist = kd_basics.train_student("resnet8", tiny, recipe, seed=3, teacher=teacher, temperature=2.0, alpha=0.5)
    (w_alone, obj_alone, kw_alone), (w_kd, obj_kd, kw_kd) = seen
    assert all(torch.equal(w_alone[k], w_kd[k]) for k in w_alone)
    assert obj_alone is None and isinstance(obj_kd, Distillation)
    assert obj_kd.temperature == 2.0 and obj_kd.alpha == 0.5 and obj_kd.teacher is teacher
    assert kw_alone["seed"] == kw_kd["seed"] == 3
    assert kw_alone["description"] == "resnet8 (alone, seed 3)" and kw_kd["description"] == "resnet8 (KD, T=2, seed 3)"
    assert len(hist) == 1 and 0 <= hist.final("test_acc") <= 100
    assert {"train_ce", "train_kd"} <= set(hist.records[0])  # the objective's terms, averaged by fit
    assert not student.training and isinstance(student, torch.nn.Module)


def test_train_student_passes_fit_keywords_through(tiny):
    """eval_every=None (for runs whose curves are not plotted) reaches fit: only the last epoch is scored."""
    recipe = Recipe(epochs=2, batch_size=256, lr=0.05)
    out = kd_basics.train_student("resnet8", tiny, recipe, seed=0, eval_every=None)
    assert isinstance(out, tuple) and len(out) == 2
    _, hist = out
    assert math.isnan(hist["test_acc"][0]) and not math.isnan(hist.final("test_acc"))


# -- the teacher chapters 1 and 2 share ----------------------------------------------------------

def _teacher_calls(notebook: str) -> list[str]:
    """The code lines of a notebook that ask for a teacher (fast_teacher(...) or pretrained(...))."""
    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    lines = [ln.strip() for c in cells if c["cell_type"] == "code" for ln in "".join(c["source"]).splitlines()]
    return [ln for ln in lines if "fast_teacher(" in ln or "pretrained(" in ln]


def _data_lines(notebook: str) -> list[str]:
    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    lines = [ln.strip() for c in cells if c["cell_type"] == "code" for ln in "".join(c["source"]).splitlines()]
    return [ln for ln in lines if re.match(r"ds\s*=", ln)]


def test_chapters_1_and_2_ask_for_the_same_fast_teacher():
    """One teacher group: both notebooks build their data the same way and ask fast_teacher for
    the teacher with the same arguments (seed 0, the profile), so chapter 2 finds chapter 1's in
    the cache."""
    ch1 = [ln for ln in _teacher_calls("01_kd_basics.ipynb") if "fast_teacher(" in ln]
    ch2 = [ln for ln in _teacher_calls("02_kd_as_lsr.ipynb") if "fast_teacher(" in ln]
    assert len(ch1) == 1 and len(ch2) == 1, (ch1, ch2)
    call = re.search(r"fast_teacher\.fast_teacher\((.*?)\)", ch1[0])
    assert call and call.group(0) in ch2[0], (ch1, ch2)
    assert "seed" not in call.group(1) or "seed=0" in call.group(1)
    assert _data_lines("01_kd_basics.ipynb") == _data_lines("02_kd_as_lsr.ipynb")
    groups = [json.loads((NOTEBOOKS / nb).read_text())["metadata"]["minidistill"].get("teacher_group")
              for nb in ("01_kd_basics.ipynb", "02_kd_as_lsr.ipynb")]
    assert groups[0] and groups[0] == groups[1], groups  # publish.py keeps them together, chapter 1 first


def test_the_shared_teacher_is_trained_once_and_then_read_from_the_cache(data_dir, monkeypatch):
    """What the two chapters do, on a tiny shapes set in an empty data root: the first call trains
    and caches the teacher, the second (chapter 2's) loads it, and the root holds one checkpoint."""
    small = make_shapes(n_train=300, n_test=60)
    first = fast_teacher.fast_teacher(small, profile="smoke", device="cpu", progress=False)
    monkeypatch.setattr(fast_teacher, "train_fast_teacher", lambda *a, **k: pytest.fail("trained the teacher twice"))
    second = fast_teacher.fast_teacher(small, profile="smoke", device="cpu", progress=False)
    assert not first.cached and second.cached and first.path == second.path
    assert [p.name for p in (data_dir / "checkpoints").iterdir()] == [first.path.name]
    x = small.x_test[:8].float()
    assert torch.equal(first.model(x), second.model(x)) and not second.model.training


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
