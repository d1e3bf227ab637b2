"""Chapter 8, TriKD: the two losses against a hand computation, no gradient into the anchor, the
anchor term's gradient, generation 0 as mutual learning, the objective on fit, the generations'
bookkeeping (the anchor of generation g is the student of g - 1), the toy, the exercise checks,
and bad inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import train
from minidistill.data import make_shapes
from minidistill.methods import dml, trikd
from minidistill.train import Recipe

G = torch.Generator().manual_seed(0)
V, Z, A = (torch.randn(6, 5, generator=G, dtype=torch.float64) * 2 for _ in range(3))
Y = torch.tensor([0, 1, 2, 3, 4, 0])


def _kl(target: torch.Tensor, logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """T^2 KL(softmax(target/T) || softmax(logits/T)), batch mean, written out with explicit sums."""
    pa = torch.exp(target / t) / torch.exp(target / t).sum(1, keepdim=True)
    p = torch.exp(logits / t) / torch.exp(logits / t).sum(1, keepdim=True)
    return t * t * (pa * (pa.log() - p.log())).sum() / len(pa)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    return -p[torch.arange(len(y)), y].log().mean()


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_losses_equal_a_hand_computation(t):
    lm, la = 0.7, 1.9
    out = trikd.trikd_losses(V, Z, A, Y, lm, la, t)
    want_t = _ce(V, Y) + lm * _kl(Z, V, t) + la * _kl(A, V, t)
    want_s = _ce(Z, Y) + lm * _kl(V, Z, t) + la * _kl(A, Z, t)
    assert out.teacher.item() == pytest.approx(want_t.item(), rel=1e-10)
    assert out.student.item() == pytest.approx(want_s.item(), rel=1e-10)
    assert out.parts["teacher_anchor"].item() == pytest.approx(_kl(A, V, t).item(), rel=1e-10)  # unweighted
    assert out.parts["student_mutual"].item() == pytest.approx(_kl(V, Z, t).item(), rel=1e-10)
    assert abs(out.parts["teacher_anchor"].item() - _kl(V, A, t).item()) > 1e-3               # not reversed


def test_no_gradient_into_the_anchor_and_each_network_gets_its_own():
    v, z, a = V.clone().requires_grad_(), Z.clone().requires_grad_(), A.clone().requires_grad_()
    out = trikd.trikd_losses(v, z, a, Y, 1.0, 2.0)
    g_a = torch.autograd.grad(out.teacher + out.student, a, allow_unused=True, retain_graph=True)[0]
    assert g_a is None or g_a.abs().max() == 0
    g_z_from_teacher = torch.autograd.grad(out.teacher, z, allow_unused=True, retain_graph=True)[0]
    assert g_z_from_teacher is None or g_z_from_teacher.abs().max() == 0


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_anchor_gradient_is_t_times_p_teacher_minus_p_anchor(t):
    v = V.clone().requires_grad_()
    la = 1.7
    out = trikd.trikd_losses(v, Z, A, Y, 0.0, la, t)
    (g,) = torch.autograd.grad(out.teacher - out.parts["teacher_ce"], v)
    closed = la * t * ((V / t).softmax(1) - (A / t).softmax(1)) / len(V)
    assert torch.allclose(g, closed, atol=1e-12)


def test_normalize_divides_by_one_plus_the_weights_and_gives_a_mixture_target():
    lm, la = 0.5, 3.0
    raw = trikd.trikd_losses(V, Z, A, Y, lm, la)
    v = V.clone().requires_grad_()
    norm = trikd.trikd_losses(v, Z, A, Y, lm, la, normalize=True)
    assert norm.teacher.item() == pytest.approx(raw.teacher.item() / (1 + lm + la), rel=1e-12)
    assert norm.student.item() == pytest.approx(raw.student.item() / (1 + lm + la), rel=1e-12)
    (g,) = torch.autograd.grad(norm.teacher, v)
    mix = (F.one_hot(Y, 5).double() + lm * Z.softmax(1) + la * A.softmax(1)) / (1 + lm + la)
    assert torch.allclose(g, (V.softmax(1) - mix) / len(V), atol=1e-12)       # cross-entropy to the mixture
    no_anchor = trikd.trikd_losses(V, Z, None, Y, lm, la, normalize=True)
    assert no_anchor.student.item() == pytest.approx(
        trikd.trikd_losses(V, Z, None, Y, lm, la).student.item() / (1 + lm), rel=1e-12)


def test_generation_zero_is_mutual_learning_with_weight_lambda_m():
    out = trikd.trikd_losses(V, Z, None, Y, 1.0, 5.0)
    losses, _, _ = dml.dml_losses([Z, V], Y)
    assert out.student.item() == pytest.approx(losses[0].item(), rel=1e-12)
    assert out.teacher.item() == pytest.approx(losses[1].item(), rel=1e-12)
    assert out.parts["student_anchor"].item() == 0 and out.parts["teacher_anchor"].item() == 0


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))


DATA = make_shapes(n_train=64, n_test=32)
RECIPE = Recipe(epochs=1, batch_size=32, lr=0.05)


def test_objective_on_fit_trains_student_and_teacher_never_the_anchor():
    student, teacher, anchor = _net(0), _net(1), _net(2)
    before = {k: v.clone() for k, v in anchor.state_dict().items()}
    t_before = teacher[1].weight.detach().clone()
    obj = trikd.TripletDistillation(teacher, anchor, anchor_weight=2.0)
    assert obj.teacher is teacher and obj.anchor is anchor
    assert not any(p.requires_grad for p in anchor.parameters())
    hist = train.fit(student, DATA, obj, RECIPE, progress=False, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in anchor.state_dict().items())
    assert not anchor.training                                   # kept in eval mode by fit's train()
    assert not torch.equal(t_before, teacher[1].weight)          # the online teacher learned
    for name in ("ce", "mutual", "anchor", "teacher_ce", "teacher_mutual", "teacher_anchor"):
        assert f"train_{name}" in hist.records[-1]
    state = train._objective_state(obj)
    assert any(k.startswith("peers.0.") for k in state) and not any(k.startswith("frozen.") for k in state)
    x, y = DATA.x_train[:4].float(), DATA.y_train[:4]
    _, logits, _ = obj(student, x, y)
    assert torch.equal(logits, student(x))                       # the student's logits


def test_generations_bookkeeping_anchor_is_the_previous_student():
    gens = trikd.train_trikd(lambda: _net(), lambda: _net(), DATA, RECIPE, generations=3, progress=False,
                             device="cpu", eval_every=None)
    assert [g.index for g in gens] == [0, 1, 2]
    assert gens[0].anchor is None and gens[0].history.final("train_teacher_anchor") == 0
    for g in (1, 2):
        assert gens[g].anchor is gens[g - 1].student
        assert gens[g].student is not gens[g - 1].student and gens[g].teacher is not gens[g - 1].teacher
        assert gens[g].history.final("train_teacher_anchor") > 0
    assert all(0 <= g.student_acc <= 100 and 0 <= g.teacher_acc <= 100 for g in gens)
    more = trikd.train_trikd(lambda: _net(), lambda: _net(), DATA, RECIPE, generations=1, anchor=gens[2].student,
                             start=3, progress=False, device="cpu", eval_every=None)
    assert more[0].index == 3 and more[0].anchor is gens[2].student


def test_each_generation_starts_from_fresh_weights_seeded_by_its_index():
    firsts = []

    def builder() -> nn.Module:
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
        firsts.append(net[1].weight.detach().clone())
        return net

    trikd.train_trikd(builder, builder, DATA, RECIPE, generations=2, progress=False, device="cpu", eval_every=None)
    torch.manual_seed(trikd.GENERATION_SEED_STEP)          # generation 1's student: seed 0 + step * 1
    assert torch.equal(firsts[2], nn.Linear(3 * 16 * 16, 10).weight)
    assert not torch.equal(firsts[0], firsts[2])


def test_toy_anchor_weight_pulls_the_teacher_to_the_anchor():
    g0 = trikd.toy_triplet(0.0, steps=80)
    assert "teacher_to_anchor" not in g0 and g0["anchor"] is None
    weak, strong = (trikd.toy_triplet(w, anchor=g0["student"], steps=80, seed=1) for w in (0.0, 10.0))
    assert strong["teacher_to_anchor"] < 0.5 * weak["teacher_to_anchor"]
    assert weak["anchor_acc"] == strong["anchor_acc"]


def _right_term(z, a, t):
    return t * t * F.kl_div(F.log_softmax(z / t, 1), F.log_softmax(a.detach() / t, 1), reduction="batchmean",
                            log_target=True)


def test_anchor_term_check_accepts_right_forms_and_catches_mistakes(capsys):
    def by_entropy(z, a, t):   # H(p^a, p) - H(p^a): another correct form
        pa = (a.detach() / t).softmax(1)
        return t * t * ((pa * (pa.log() - (z / t).log_softmax(1))).sum(1)).mean()

    for fn in (_right_term, by_entropy):
        trikd.check_anchor_term(fn)
        assert "✓" in capsys.readouterr().out
    mistakes = {
        "reversed": lambda z, a, t: t * t * F.kl_div(F.log_softmax(a.detach() / t, 1), F.log_softmax(z / t, 1),
                                                     reduction="batchmean", log_target=True),
        "factor T": lambda z, a, t: _right_term(z, a, t) / t**2,
        "factor K": lambda z, a, t: _right_term(z, a, t) / z.shape[1],      # reduction="mean"
        "detach": lambda z, a, t: t * t * F.kl_div(F.log_softmax(z / t, 1), F.log_softmax(a / t, 1),
                                                   reduction="batchmean", log_target=True),
    }
    for hint, fn in mistakes.items():
        with pytest.raises(AssertionError, match=hint):
            trikd.check_anchor_term(fn)

    def todo(z, a, t):
        raise NotImplementedError

    trikd.check_anchor_term(todo)
    assert "not attempted" in capsys.readouterr().out


def test_anchor_gradient_check_accepts_the_closed_form_and_catches_mistakes(capsys):
    right = lambda v, a, t: t * ((v / t).softmax(1) - (a / t).softmax(1)) / len(v)  # noqa: E731
    trikd.check_anchor_gradient(right)
    assert "✓" in capsys.readouterr().out
    for hint, fn in {"sign": lambda v, a, t: -right(v, a, t), "1/N": lambda v, a, t: right(v, a, t) * len(v),
                     "power of T": lambda v, a, t: right(v, a, t) / t}.items():
        with pytest.raises(AssertionError, match=hint):
            trikd.check_anchor_gradient(fn)


@pytest.mark.parametrize("call, error", [
    (lambda: trikd.trikd_losses(V, Z[:, :4], A, Y, 1.0, 1.0), ValueError),
    (lambda: trikd.trikd_losses(V, Z, A[:3], Y, 1.0, 1.0), ValueError),
    (lambda: trikd.trikd_losses(V, Z, A, Y, -1.0, 1.0), ValueError),
    (lambda: trikd.trikd_losses(V, Z, A, Y, 1.0, float("nan")), ValueError),
    (lambda: trikd.trikd_losses(V, Z, A, Y.float(), 1.0, 1.0), ValueError),
    (lambda: trikd.trikd_losses(V, Z, A, Y, 1.0, 1.0, 0.0), ValueError),
    (lambda: trikd.trikd_losses(V.numpy(), Z, A, Y, 1.0, 1.0), TypeError),
    (lambda: trikd.TripletDistillation("resnet8", None), TypeError),
    (lambda: trikd.TripletDistillation(_net(), "anchor"), TypeError),
    (lambda: trikd.train_trikd("resnet8", "resnet20", DATA, RECIPE, generations=0), ValueError),
    (lambda: trikd.train_trikd("resnet8", "resnet20", DATA, RECIPE, start=-1), ValueError),
    (lambda: trikd.train_trikd("resnet8", "resnet20", DATA, RECIPE, anchor_weight=-2), ValueError),
])
def test_bad_inputs_raise_clear_errors(call, error):
    with pytest.raises(error):
        call()


def test_anchor_cannot_be_the_teacher_and_fit_model_must_be_the_student():
    net = _net()
    with pytest.raises(ValueError, match="another network"):
        trikd.TripletDistillation(net, net)
    teacher = _net(1)
    with pytest.raises(ValueError, match="student"):
        train.fit(teacher, DATA, trikd.TripletDistillation(teacher, _net(2)), RECIPE, progress=False, device="cpu")


def test_generation_records_the_anchor_the_objective_trained_with(monkeypatch):
    """The bookkeeping reads the anchor from the objective that trained, so a loop that forgets to hand the
    anchor to the objective shows up as a broken chain (what the chapter's check would print False for)."""
    class Forgetful(trikd.TripletDistillation):
        def __init__(self, teacher, anchor=None, **kwargs):
            super().__init__(teacher, None, **kwargs)

    monkeypatch.setattr(trikd, "TripletDistillation", Forgetful)
    gens = trikd.train_trikd(lambda: _net(), lambda: _net(), DATA, RECIPE, generations=2, progress=False,
                             device="cpu", eval_every=None)
    assert gens[1].anchor is None and gens[1].anchor is not gens[0].student


def _flip_loop(y, ps, pa, lm):
    best = float("inf")
    for k in range(len(pa)):
        if k != y and pa[k] > pa[y]:
            best = min(best, float((1 + lm * (ps[y] - ps[k])) / (pa[k] - pa[y])))
    return best


def _flip_vectorised(y, ps, pa, lm):       # another correct form, returning a 0-d tensor
    gap = pa - pa[y]
    ratio = (1 + lm * (ps[y] - ps)) / gap
    return torch.where(gap > 0, ratio, torch.full_like(ratio, float("inf"))).min()


def test_flip_weight_check_accepts_right_forms_and_catches_mistakes(capsys):
    for fn in (_flip_loop, _flip_vectorised):
        trikd.check_flip_weight(fn)
        assert "✓" in capsys.readouterr().out
    mistakes = {
        "is ignored": lambda y, ps, pa, lm: _flip_loop(y, ps, pa, 0.0),
        "top class": lambda y, ps, pa, lm: (float((1 + lm * (ps[y] - ps[int(pa.argmax())])) / (pa.max() - pa[y]))
                                            if int(pa.argmax()) != y else float("inf")),
        # right where the anchor is wrong, but 1 / (largest gap) -- a negative weight -- where it is right
        "math.inf": lambda y, ps, pa, lm: (_flip_loop(y, ps, pa, lm) if int(pa.argmax()) != y
                                           else float(1 / (torch.cat([pa[:y], pa[y + 1:]]).max() - pa[y]))),
    }
    for hint, fn in mistakes.items():
        with pytest.raises(AssertionError, match=hint):
            trikd.check_flip_weight(fn)

    def todo(y, ps, pa, lm):
        raise NotImplementedError

    trikd.check_flip_weight(todo)
    assert "not attempted" in capsys.readouterr().out


def _student_grad(z, v, a, y, lm, la, t):
    q = F.one_hot(y, z.shape[1]).to(z.dtype)
    p_t = (z / t).softmax(1)
    g = (z.softmax(1) - q) + t * lm * (p_t - (v / t).softmax(1)) + t * la * (p_t - (a / t).softmax(1))
    return g / ((1 + lm + la) * len(z))


def _student_grad_mixture(z, v, a, y, lm, la, t):    # the same, written around the mixture of the KL targets
    q = F.one_hot(y, z.shape[1]).to(z.dtype)
    target = (lm * (v / t).softmax(1) + la * (a / t).softmax(1)) / (lm + la)
    return ((z.softmax(1) - q) + t * (lm + la) * ((z / t).softmax(1) - target)) / ((1 + lm + la) * len(z))


def test_student_gradient_check_accepts_right_forms_and_catches_mistakes(capsys):
    for fn in (_student_grad, _student_grad_mixture):
        trikd.check_student_gradient(fn)
        assert "✓" in capsys.readouterr().out

    def ce_at_t(z, v, a, y, lm, la, t):
        return _student_grad(z, v, a, y, lm, la, t) + (((z / t).softmax(1) - z.softmax(1)) / ((1 + lm + la) * len(z)))

    def no_t(z, v, a, y, lm, la, t):
        q = F.one_hot(y, z.shape[1]).to(z.dtype)
        p_t = (z / t).softmax(1)
        g = (z.softmax(1) - q) + lm * (p_t - (v / t).softmax(1)) + la * (p_t - (a / t).softmax(1))
        return g / ((1 + lm + la) * len(z))

    mistakes = {"sign": lambda *args: -_student_grad(*args),
                "normalised": lambda z, v, a, y, lm, la, t: _student_grad(z, v, a, y, lm, la, t) * (1 + lm + la),
                "1/N": lambda *args: _student_grad(*args) * len(args[0]),
                "T = 1": ce_at_t, "factor is T": no_t}
    for hint, fn in mistakes.items():
        with pytest.raises(AssertionError, match=hint):
            trikd.check_student_gradient(fn)
