"""Chapter 1 (Hinton KD): closed-form gradients, the class-by-class soft targets, the figures,
the student trainer (on train.train_model), the re-exported self-checks, and the fast teacher
that chapters 1 and 2 share."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from minidistill import fast_teacher, train
from minidistill.runtime import Profile
from minidistill.data import make_shapes
from minidistill.exercises import kd_basics as kd_exercises
from minidistill.losses import Distillation, kd_loss, soft_targets
from minidistill.methods import kd_basics, kd_basics_plots
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
    assert n["scaled"][0] == pytest.approx(n["raw"][0] * 16**2, rel=1e-9)


def test_gradient_norms_raw_is_computed_independently_of_kd_loss(monkeypatch):
    """'raw' is its own backward pass, not the scaled norm divided by T²: a kd_loss that lost its
    T² factor changes 'scaled' and leaves 'raw' alone, so the chapter's 'T² x raw = scaled' can fail."""
    good = kd_basics.gradient_norms(Z, V, [2.0, 8.0])
    monkeypatch.setattr(kd_basics, "kd_loss", lambda z, v, t: kd_loss(z, v, t) / t**2)
    broken = kd_basics.gradient_norms(Z, V, [2.0, 8.0])
    assert broken["raw"] == pytest.approx(good["raw"], rel=1e-12)
    assert broken["scaled"] == pytest.approx(good["raw"], rel=1e-9)  # now equal to raw: the check would say False


def test_scaled_gradient_is_flat_only_at_high_temperature_for_confident_logits():
    """The chapter's claim, with the condition: T² keeps the scale at high T, not at low T."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(32, 10, generator=g, dtype=torch.float64) * 2
    v = torch.randn(32, 10, generator=g, dtype=torch.float64) * 2
    v = v + 10 * torch.nn.functional.one_hot(torch.randint(0, 10, (32,), generator=g), 10)
    s = kd_basics.gradient_norms(z, v, [1, 4, 256, 1024])["scaled"]
    assert max(s[:2]) / min(s[:2]) > 1.5 and max(s[2:]) / min(s[2:]) < 1.02


def test_gradient_norms_reject_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        kd_basics.gradient_norms(Z, V[:, :3], [1.0])
    with pytest.raises(ValueError, match="temperature"):
        kd_basics.gradient_norms(Z, V, [1.0, 0.0])
    with pytest.raises(ValueError, match="temperature"):
        kd_basics.gradient_norms(Z, V, [-2.0])


# -- the teacher's class-by-class soft targets ------------------------------------------------------

def test_mean_soft_targets_by_hand_and_rows_sum_to_one():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [4.0, 0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    m = kd_basics.mean_soft_targets(logits, labels, 2.0)
    p = torch.softmax(logits / 2.0, -1)
    assert m.shape == (3, 3) and m.dtype == torch.float64
    assert torch.allclose(m[0], (p[0] + p[2]) / 2) and torch.allclose(m[1], p[1])
    assert torch.isnan(m[2]).all()  # no example of class 2
    assert torch.allclose(m[:2].sum(-1), torch.ones(2, dtype=torch.float64))
    # a float32 teacher on any device is fine; T = 1 is the default
    assert torch.allclose(kd_basics.mean_soft_targets(logits.float(), labels)[1], torch.softmax(logits[1], -1),
                          atol=1e-6)


def test_mean_soft_targets_flattens_with_temperature():
    labels = torch.arange(10).repeat(5)
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0)) + 6 * torch.nn.functional.one_hot(labels, 10)
    d1, d4 = (kd_basics.mean_soft_targets(logits, labels, t).diagonal().mean() for t in (1.0, 4.0))
    assert d1 > d4 > 0.1


def test_mean_soft_targets_rejects_bad_inputs():
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="labels must lie in"):
        kd_basics.mean_soft_targets(logits, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="labels must be an int64"):
        kd_basics.mean_soft_targets(logits, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="labels must be an int64"):
        kd_basics.mean_soft_targets(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="logits must be a float tensor"):
        kd_basics.mean_soft_targets(torch.zeros(4, 3, dtype=torch.int64), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="num_classes=5"):
        kd_basics.mean_soft_targets(logits, torch.tensor([0, 1, 2, 0]), num_classes=5)
    with pytest.raises(ValueError, match="temperature"):
        kd_basics.mean_soft_targets(logits, torch.tensor([0, 1, 2, 0]), 0.0)


# -- figures ---------------------------------------------------------------------------------------

def test_plot_soft_targets_log_option():
    logits = torch.tensor([9.0, 2.0, -3.0])
    lin = kd_basics.plot_soft_targets(logits, (1, 4), ["a", "b", "c"], title="lin").axes[0]
    assert lin.get_yscale() == "linear" and lin.get_ylabel() == "probability" and len(lin.patches) == 6
    ax = kd_basics.plot_soft_targets(logits, (1, 4), ["a", "b", "c"], title="log", log=True).axes[0]
    assert ax.get_yscale() == "log" and "log" in ax.get_ylabel() and ax.get_title() == "log"
    smallest = min(p.get_height() for p in ax.patches)
    assert ax.get_ylim()[0] < smallest < 1e-4  # the tiny T = 1 probability of 'c' is inside the axis
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["T = 1", "T = 4"]
    with pytest.raises(ValueError, match="class_names"):
        kd_basics.plot_soft_targets(logits, (1,), ["a"], log=True)


def test_plot_soft_targets_log_draws_into_a_given_axis():
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2)
    out = kd_basics.plot_soft_targets(torch.tensor([1.0, 0.0]), (1,), log=True, ax=a2)
    assert out is fig and a2.get_yscale() == "log" and a1.get_yscale() == "linear" and not a1.patches


def test_plot_class_soft_targets_panels_labels_and_checks():
    labels = torch.arange(4).repeat(3)
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(1)) + 5 * torch.nn.functional.one_hot(labels, 4)
    mats = {t: kd_basics.mean_soft_targets(logits, labels, t) for t in (1, 4)}
    fig = kd_basics.plot_class_soft_targets(mats, ["w", "x", "y", "z"], title="M")
    panels = [ax for ax in fig.axes if ax.get_title().startswith("T = ")]
    assert [ax.get_title() for ax in panels] == ["T = 1", "T = 4"]
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["w", "x", "y", "z"]
    assert panels[0].get_ylabel() == "true class" and fig._suptitle.get_text() == "M"
    assert len(panels[0].texts) == 16  # annotated, K <= 10
    img = panels[0].images[0]
    assert img.norm.__class__.__name__ == "LogNorm" and img.norm.vmax == 1.0
    assert torch.allclose(torch.as_tensor(img.get_array().data), mats[1].clamp_min(img.norm.vmin))
    lin = kd_basics.plot_class_soft_targets(mats, log=False, annotate=False)
    assert not [ax for ax in lin.axes if ax.get_title() == "T = 1"][0].texts
    with pytest.raises(ValueError, match="empty"):
        kd_basics.plot_class_soft_targets({})
    with pytest.raises(ValueError, match="square"):
        kd_basics.plot_class_soft_targets({1: torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="same size"):
        kd_basics.plot_class_soft_targets({1: torch.eye(2), 2: torch.eye(3)})
    with pytest.raises(ValueError, match="class_names has 2 names for 4 classes"):
        kd_basics.plot_class_soft_targets(mats, ["a", "b"])
    with pytest.raises(ValueError, match="temperature"):
        kd_basics.plot_class_soft_targets({0.0: torch.eye(2)})


def test_every_public_name_resolves_and_the_checks_and_figures_are_re_exported():
    for name in kd_basics.__all__:
        assert hasattr(kd_basics, name), name
    for module in (kd_exercises, kd_basics_plots):
        for name in module.__all__:
            assert name in kd_basics.__all__ and getattr(kd_basics, name) is getattr(module, name), name


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
    # chapter 1 names its data set per profile (the paper profile's is CIFAR-100); its course entry must be
    # the data set chapter 2 reads from the profile
    source = "".join("".join(c["source"]) for c in json.loads((NOTEBOOKS / "01_kd_basics.ipynb").read_text())["cells"])
    course = re.search(r"course=dict\((.*?)\),\n", source, re.S)
    assert course and f'dataset="{Profile("course", torch.device("cpu")).dataset}"' in course.group(1)
    ch1_data = [ln.replace('cfg["dataset"]', "profile.dataset") for ln in _data_lines("01_kd_basics.ipynb")]
    assert ch1_data == _data_lines("02_kd_as_lsr.ipynb")
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
    kd_basics.check_kd_gradient_limit(...)
    assert capsys.readouterr().out.count("not attempted yet") == 3


def test_check_kd_loss_accepts_every_correct_form(capsys):
    """Any correct way of writing T² · batch-mean KL passes: F.kl_div, log-space by hand, or
    cross-entropy minus the teacher's entropy."""
    import torch.nn.functional as F

    forms = [
        lambda z, v, T: T**2 * F.kl_div(F.log_softmax(z / T, -1), F.softmax(v / T, -1), reduction="batchmean"),
        lambda z, v, T: T**2 * (F.softmax(v / T, -1) * (F.log_softmax(v / T, -1) - F.log_softmax(z / T, -1))).sum(-1).mean(),
        lambda z, v, T: T**2 * (-(F.softmax(v / T, -1) * F.log_softmax(z / T, -1)).sum(-1)
                                + (F.softmax(v / T, -1) * F.log_softmax(v / T, -1)).sum(-1)).mean(),
    ]
    for form in forms:
        kd_basics.check_kd_loss(form)
    assert capsys.readouterr().out.count("✓") == 3


def test_check_kd_gradient_limit_accepts_right_answers_and_names_classic_mistakes(capsys):
    z = torch.tensor(kd_exercises.LIMIT_EXERCISE["z"], dtype=torch.float64)
    v = torch.tensor(kd_exercises.LIMIT_EXERCISE["v"], dtype=torch.float64)
    k = len(z)
    right = ((z - z.mean()) - (v - v.mean())) / k                     # (-2/3, -1/3, 1)
    for answer in (right.tolist(), tuple(right.tolist()), right, right.float(), [-0.667, -0.333, 1.0]):
        kd_basics.check_kd_gradient_limit(answer)
    assert capsys.readouterr().out.count("✓") == 5
    with pytest.raises(AssertionError, match="without"):
        kd_basics.check_kd_gradient_limit([0, 0, 0])                 # the unscaled limit
    with pytest.raises(AssertionError, match="sign"):
        kd_basics.check_kd_gradient_limit((-right).tolist())
    with pytest.raises(AssertionError, match="raw logits"):
        kd_basics.check_kd_gradient_limit(((z - v) / k).tolist())     # no centring
    with pytest.raises(AssertionError, match="factor K"):
        kd_basics.check_kd_gradient_limit((right * k).tolist())
    with pytest.raises(AssertionError, match="step 4"):
        kd_basics.check_kd_gradient_limit([1, 2, 3])
    with pytest.raises(AssertionError, match="three"):
        kd_basics.check_kd_gradient_limit([1, 2])
    with pytest.raises(AssertionError, match="three"):
        kd_basics.check_kd_gradient_limit("one two three")
