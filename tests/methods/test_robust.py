"""Chapter 12 (robust transfer): PGD stays in the ball (both norms) and the image box, raises the
loss, is deterministic with a seed; the projections and ascent steps against closed forms;
adversarial training on fit; class splits; the probe trains only the head; bad inputs; the
exercise self-checks accept right answers and catch the classic mistakes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import train
from minidistill.data import make_shapes
from minidistill.exercises import robust as robust_exercises
from minidistill.methods import robust


def test_all_names_exist_and_are_re_exported():
    for name in robust.__all__:
        assert hasattr(robust, name), name
    for name in robust_exercises.__all__:
        assert name in robust.__all__ and getattr(robust, name) is getattr(robust_exercises, name), name


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 4)).double()


def _batch(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("norm", robust.ATTACK_NORMS)
@pytest.mark.parametrize("random_start", [False, True])
def test_attack_stays_in_ball_and_box_and_raises_the_loss(norm, random_start):
    model, (x, y) = _net(), _batch()
    eps = 0.5 if norm == "l2" else 8 / 255
    adv = robust.pgd_attack(model, x, y, eps, norm, steps=5, random_start=random_start, seed=3)
    d = (adv - x).flatten(1)
    size = d.norm(dim=1) if norm == "l2" else d.abs().amax(1)
    assert (size <= eps * (1 + 1e-9)).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert (size > 0.5 * eps).all()              # the budget is used, not ignored
    ce = lambda u: F.cross_entropy(model(u), y, reduction="none")  # noqa: E731
    assert (ce(adv) > ce(x)).all()


@pytest.mark.parametrize("norm", robust.ATTACK_NORMS)
def test_attack_is_deterministic_with_a_seed(norm):
    model, (x, y) = _net(), _batch()
    a = robust.pgd_attack(model, x, y, 0.3, norm, steps=3, random_start=True, seed=7)
    b = robust.pgd_attack(model, x, y, 0.3, norm, steps=3, random_start=True, seed=7)
    c = robust.pgd_attack(model, x, y, 0.3, norm, steps=3, random_start=True, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attack_leaves_parameters_without_gradients_and_zero_eps_is_identity():
    model, (x, y) = _net(), _batch()
    adv = robust.pgd_attack(model, x, y, 0.0, "linf", steps=3)
    assert torch.equal(adv, x) and adv is not x
    robust.pgd_attack(model, x, y, 0.1, "l2", steps=2)
    assert all(p.grad is None for p in model.parameters())


def test_one_step_matches_the_closed_form():
    """One step from delta = 0: l-inf gives eps * sign(g) (clamped to the box), l2 eps * g / ||g||."""
    model, (x, y) = _net(), _batch()
    x = 0.25 + 0.5 * x                                # away from the box edges
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    eps = 0.01
    a = robust.pgd_attack(model, x, y, eps, "linf", steps=1, step_size=eps)
    assert torch.allclose(a - x, eps * g.sign(), atol=1e-12)
    a = robust.pgd_attack(model, x, y, eps, "l2", steps=1, step_size=eps)
    gn = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(a - x, eps * g / gn, atol=1e-12)


def test_project_and_direction():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    d[0] *= 1e-3
    p = robust.project(d, 1.0, "l2")
    n = d.flatten(1).norm(dim=1)
    assert torch.equal(p[0], d[0])
    assert torch.allclose(p[1:].flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(robust.project(d, 0.2, "linf"), d.clamp(-0.2, 0.2))
    s = robust.ascent_direction(d, "l2")
    assert torch.allclose(s.flatten(1).norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose((s * d).flatten(1).sum(1), n)          # <g, g/||g||> = ||g||_2
    assert torch.equal(robust.ascent_direction(torch.zeros(2, 3), "l2"), torch.zeros(2, 3))
    assert torch.allclose((robust.ascent_direction(d, "linf") * d).flatten(1).sum(1), d.flatten(1).abs().sum(1))
    assert math.isclose(robust.linf_corner_l2(2 / 255, (3, 32, 32)), 2 / 255 * math.sqrt(3072))


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=-0.1), "eps"), (dict(eps=float("nan")), "eps"), (dict(norm="l1"), "norm"),
    (dict(steps=-1), "steps"), (dict(step_size=-1.0), "step_size"), (dict(scale=2.0), r"\[0, 1\]"),
])
def test_bad_inputs(kwargs, match):
    model, (x, y) = _net(), _batch()
    args = dict(eps=0.1, norm="l2", steps=2)
    scale = kwargs.pop("scale", 1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        robust.pgd_attack(model, x * scale, y, **args)
    with pytest.raises(ValueError, match="norm"):
        robust.project(x, 0.1, "l3")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        robust.pgd_attack(model, x - 0.5, y, 0.1)


def test_class_split_and_few_shot():
    ds = make_shapes(n_train=300, n_test=100, size=8)
    src = robust.class_split(ds, [4, 1, 2])
    assert src.num_classes == 3 and src.classes == (ds.classes[4], ds.classes[1], ds.classes[2])
    assert len(src.x_train) == int(sum((ds.y_train == c).sum() for c in (4, 1, 2)))
    first = src.x_train[src.y_train == 0]
    assert torch.equal(first, ds.x_train[ds.y_train == 4])
    fs = robust.few_shot(src, 5, seed=0)
    assert torch.equal(torch.bincount(fs.y_train), torch.full((3,), 5))
    assert torch.equal(fs.x_test, src.x_test)
    assert torch.equal(robust.few_shot(src, 5, seed=0).x_train, fs.x_train)
    with pytest.raises(ValueError):
        robust.class_split(ds, [1, 1])
    with pytest.raises(ValueError):
        robust.class_split(ds, [0, ds.num_classes])
    with pytest.raises(ValueError):
        robust.few_shot(src, 0)


def _tiny_source(k: int) -> nn.Module:
    from minidistill.models import create_model
    torch.manual_seed(0)
    return create_model("resnet8", k)


def test_probe_trains_only_the_head_and_keeps_bn_statistics():
    ds = robust.few_shot(robust.class_split(make_shapes(n_train=300, n_test=60, size=8), [0, 1, 2]), 16)
    src = _tiny_source(5)
    run = robust.transfer(src, ds, "probe", train.Recipe(epochs=2, batch_size=16, lr=0.05), progress=False,
                          eval_every=None)
    body = run.model.body
    for (name, p), q in zip(body.named_parameters(), src.parameters()):
        if name.startswith("fc"):
            continue
        assert torch.equal(p.detach().cpu(), q.detach()), name
    for (name, b), c in zip(body.named_buffers(), src.buffers()):
        assert torch.equal(b.cpu(), c), name                      # running statistics untouched
    assert run.model.head.out_features == 3
    assert not torch.equal(run.model.head.weight.detach().cpu(),
                           robust.TransferModel(src, 3, frozen=True).head.weight.detach())  # the head moved
    fine = robust.transfer(src, ds, "finetune", train.Recipe(epochs=1, batch_size=16, lr=0.05), progress=False,
                           eval_every=None)
    assert not torch.equal(fine.model.body.stem[0].weight.detach().cpu(), src.stem[0].weight.detach())
    with pytest.raises(ValueError, match="mode"):
        robust.transfer(src, ds, "linear")


def test_adversarial_training_on_fit_and_robust_accuracy():
    ds = robust.class_split(make_shapes(n_train=200, n_test=40, size=8), [0, 1])
    obj = robust.AdversarialTraining.for_data(ds, 0.25, "l2", steps=2)
    run = train.train_model("resnet8", ds, train.Recipe(epochs=1, batch_size=32, lr=0.05), obj, progress=False,
                            eval_every=None)
    assert {"train_adv_ce", "train_delta"} <= set(run.history.records[0])
    assert 0 < run.history["train_delta"][-1] <= 0.25 * (1 + 1e-5)
    clean = robust.robust_accuracy(run.model, ds, 0.0, n=40)
    assert math.isclose(clean, run.history.final("test_acc"), abs_tol=1e-4)
    assert robust.robust_accuracy(run.model, ds, 1.0, "l2", steps=3, n=40) <= clean
    plain = robust.AdversarialTraining.for_data(ds, 0.0)
    _, _, terms = plain(run.model, torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))
    assert float(terms["delta"]) == 0
    with pytest.raises(ValueError):
        robust.AdversarialTraining.for_data(ds, 0.1, "l1")
    with pytest.raises(ValueError):
        robust.AdversarialTraining.for_data(ds, 0.1, steps=0)


def _accepts(check, fn, capsys) -> None:
    check(fn)
    assert capsys.readouterr().out.startswith("✓")


def _rejects(check, fn) -> None:
    with pytest.raises(AssertionError):
        check(fn)


def test_self_checks_accept_right_answers_and_catch_mistakes(capsys):
    def l1_step(g):
        i = g.abs().argmax(1, keepdim=True)
        return torch.zeros_like(g).scatter(1, i, g.gather(1, i).sign())
    _accepts(robust.check_l1_step, l1_step, capsys)
    _accepts(robust.check_l1_step, lambda g: torch.nn.functional.one_hot(g.abs().argmax(1), g.shape[1]) * g.sign(),
             capsys)
    for wrong in (torch.sign, lambda g: -l1_step(g), lambda g: g / g.abs().sum(1, keepdim=True),
                  lambda g: g / g.norm(dim=1, keepdim=True),
                  lambda g: torch.nn.functional.one_hot(g.argmax(1), g.shape[1]).double(),   # largest g, not |g|
                  lambda g: torch.zeros(3)):
        _rejects(robust.check_l1_step, wrong)

    def l1_proj_sort(d, eps):                       # Duchi et al.'s sort-based projection
        a = d.abs()
        srt = a.sort(1, descending=True).values
        css = srt.cumsum(1) - eps
        k = torch.arange(1, d.shape[1] + 1, dtype=d.dtype)
        rho = ((srt - css / k) > 0).sum(1, keepdim=True)
        tau = css.gather(1, rho - 1) / rho
        out = d.sign() * (a - tau).clamp_min(0)
        return torch.where(a.sum(1, keepdim=True) <= eps, d, out)

    def l1_proj_loop(d, eps):                       # row by row, tau by bisection
        rows = []
        for r in d:
            if r.abs().sum() <= eps:
                rows.append(r)
                continue
            lo, hi = 0.0, float(r.abs().max())
            for _ in range(100):
                t = (lo + hi) / 2
                lo, hi = (t, hi) if float((r.abs() - t).clamp_min(0).sum()) > eps else (lo, t)
            rows.append(r.sign() * (r.abs() - lo).clamp_min(0))
        return torch.stack(rows)
    _accepts(robust.check_l1_projection, l1_proj_sort, capsys)
    _accepts(robust.check_l1_projection, l1_proj_loop, capsys)
    for wrong in (lambda d, e: d.clamp(-e, e),
                  lambda d, e: d * torch.clamp(e / d.abs().sum(1, keepdim=True), max=1),     # rescale
                  lambda d, e: e * d / d.abs().sum(1, keepdim=True),                         # rescale every row
                  lambda d, e: d * torch.clamp(e / d.norm(dim=1, keepdim=True), max=1),      # l2 projection
                  lambda d, e: torch.where(torch.arange(len(d)).view(-1, 1) == 0, 0.5 * d, l1_proj_sort(d, e)),
                  lambda d, e: d.sign() * (d.abs() - 0.1).clamp_min(0),                      # fixed tau
                  lambda d, e: d):
        _rejects(robust.check_l1_projection, wrong)

    _accepts(robust.check_l2_budget, lambda e, a, b: e * math.sqrt(math.prod(b) / math.prod(a)), capsys)
    _accepts(robust.check_l2_budget, lambda e, a, b: e * torch.ones(b).norm().item() / torch.ones(a).norm().item(),
             capsys)
    for wrong in (lambda e, a, b: e * math.prod(b) / math.prod(a), lambda e, a, b: e * b[-1] / a[-1],
                  lambda e, a, b: e * math.sqrt(math.prod(a) / math.prod(b)), lambda e, a, b: e):
        _rejects(robust.check_l2_budget, wrong)

    def todo(*args):
        raise NotImplementedError
    for check in (robust.check_l1_step, robust.check_l1_projection, robust.check_l2_budget):
        assert check(todo) is None
        assert "not attempted" in capsys.readouterr().out


def test_attack_through_normalize_equals_attack_on_the_composed_model():
    model, (x, y) = _net(), _batch()
    norm = robust.Normalizer((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)).double()
    a = robust.pgd_attack(model, x, y, 0.3, "l2", steps=3, normalize=norm)
    b = robust.pgd_attack(nn.Sequential(norm, model), x, y, 0.3, "l2", steps=3)
    assert torch.allclose(a, b, atol=1e-12)
    assert not torch.allclose(a, robust.pgd_attack(model, x, y, 0.3, "l2", steps=3), atol=1e-6)
    u = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    assert torch.allclose(norm.inverse(norm(u)), u)
