"""Chapter 13 (TSIT): FAdaIN moments and blending, FADE's reduction to BatchNorm's affine, stream,
generator and discriminator shapes at 16 and 32, the hinge, feature-matching and perceptual losses
against hand computations, Sobel edges, bad inputs, the exercise self-checks, and a tiny training run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill.data import make_shapes
from minidistill.exercises import tsit as tsit_exercises
from minidistill.methods import tsit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many tiny convolutions: one thread avoids OpenMP hand-off costs that dominate on a busy
    two-core machine (10x here); the suite's thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_all_names_exist_and_are_re_exported():
    for name in tsit.__all__:
        assert hasattr(tsit, name), name
    for name in tsit_exercises.__all__:
        assert name in tsit.__all__ and getattr(tsit, name) is getattr(tsit_exercises, name), name


def _maps(seed=0, shape=(3, 5, 6, 7)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1,
            torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5 - 3)


def test_adain_output_has_the_style_moments():
    x, s = _maps()
    out = tsit.adain(x, s, eps=0.0)
    assert torch.allclose(out.mean((2, 3)), s.mean((2, 3)), atol=1e-12)
    assert torch.allclose(out.std((2, 3), unbiased=False), s.std((2, 3), unbiased=False), rtol=1e-12)
    # with eps > 0 the std is shrunk by sqrt(var_x / (var_x + eps)) and inflated by sqrt(var_s + eps) / std_s
    out_eps = tsit.adain(x, s, eps=1e-2)
    vx, vs = x.var((2, 3), unbiased=False), s.var((2, 3), unbiased=False)
    assert torch.allclose(out_eps.std((2, 3), unbiased=False), ((vs + 1e-2) * vx / (vx + 1e-2)).sqrt(), rtol=1e-10)


def test_fadain_blends_linearly():
    x, s = _maps(1)
    full = tsit.fadain(x, s, 1.0)
    assert torch.equal(tsit.fadain(x, s, 0.0), x)
    assert torch.allclose(tsit.fadain(x, s, 0.3), 0.3 * full + 0.7 * x, atol=1e-12)
    assert torch.allclose(full, tsit.adain(x, s), atol=1e-12)


@pytest.mark.parametrize("bad, match", [(dict(alpha=1.5), "alpha"), (dict(alpha=True), "alpha"),
                                         (dict(style=torch.zeros(3, 4, 6, 7)), "style"),
                                         (dict(x=torch.zeros(3, 5, 6)), "x"), (dict(eps=-1.0), "eps")])
def test_fadain_bad_inputs(bad, match):
    x, s = _maps()
    kw = dict(x=x, style=s, alpha=0.5) | bad
    eps = kw.pop("eps", 1e-5)
    with pytest.raises(ValueError, match=match):
        tsit.fadain(kw["x"], kw["style"], kw["alpha"], eps=eps)


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
def test_fade_reduces_to_batchnorm_affine_on_a_constant_feature(padding_mode):
    torch.manual_seed(0)
    fade = FADE = tsit.FADE(5, 2, padding_mode=padding_mode).double()
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64) * 3 + 1
    f = torch.full((4, 2, 6, 6), 0.7, dtype=torch.float64)
    out = FADE(x, f)
    gamma = 0.7 * fade.gamma.weight.sum((1, 2, 3)) + fade.gamma.bias     # the conv of a constant, written out
    beta = 0.7 * fade.beta.weight.sum((1, 2, 3)) + fade.beta.bias
    bn = nn.BatchNorm2d(5).double().train()
    with torch.no_grad():
        bn.weight.copy_(1 + gamma)
        bn.bias.copy_(beta)
    ref = bn(x)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.allclose(out[inner], ref[inner], atol=1e-10)
    assert torch.allclose(out, ref, atol=1e-10) == (padding_mode == "replicate")   # zero padding breaks the border


def test_fade_bad_inputs():
    with pytest.raises(ValueError, match="channels"):
        tsit.FADE(0, 2)
    with pytest.raises(ValueError, match="padding_mode"):
        tsit.FADE(3, 2, padding_mode="reflect")
    fade = tsit.FADE(3, 2)
    with pytest.raises(ValueError, match="f must be"):
        fade(torch.zeros(2, 3, 4, 4), torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="x must be"):
        fade(torch.zeros(2, 3, 4), torch.zeros(2, 2, 4, 4))


@pytest.mark.parametrize("size, scales", [(16, 3), (32, 4)])
def test_stream_generator_discriminator_shapes(size, scales):
    torch.manual_seed(0)
    c, s = torch.randn(2, 1, size, size), torch.randn(2, 3, size, size)
    G = tsit.TSITGenerator(size, ngf=8)
    assert G.n_scales == scales
    feats = G.content(c)
    assert [tuple(f.shape) for f in feats] == [(2, 8 * 2 ** i, size >> i, size >> i) for i in range(scales)]
    out = G(c, s)
    assert out.shape == (2, 3, size, size) and out.abs().max() <= 1
    for style, fade in ((False, True), (True, False), (False, False)):
        g = tsit.TSITGenerator(size, ngf=8, style=style, fade=fade)
        assert g(c, s if style else None).shape == (2, 3, size, size)
    D = tsit.MultiScaleDiscriminator(4, ndf=8)
    d = D(torch.cat([c, out], 1))
    assert len(d) == 2 and all(len(layers) == 5 and layers[-1].shape[1] == 1 for layers in d)
    assert d[1][0].shape[-1] < d[0][0].shape[-1]


def test_generator_bad_inputs():
    with pytest.raises(ValueError, match="image_size"):
        tsit.TSITGenerator(3)
    with pytest.raises(ValueError, match="n_scales"):
        tsit.TSITGenerator(24, n_scales=5)
    G = tsit.TSITGenerator(16, ngf=4)
    with pytest.raises(ValueError, match="content"):
        G(torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="style"):
        G(torch.zeros(2, 1, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="alpha"):
        G(torch.zeros(2, 1, 16, 16), torch.zeros(2, 3, 16, 16), alpha=2.0)
    with pytest.raises(ValueError, match="noise"):
        G(torch.zeros(2, 1, 16, 16), torch.zeros(2, 3, 16, 16), noise=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="n_scales"):
        tsit.Stream(3, 8, 0)
    with pytest.raises(ValueError, match="too small"):
        tsit.Stream(3, 8, 4)(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="in_channels"):
        tsit.PatchDiscriminator(0)
    with pytest.raises(ValueError, match="x must have 4"):
        tsit.MultiScaleDiscriminator(4)(torch.zeros(1, 3, 16, 16))


def test_hinge_losses_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    fake = torch.tensor([[-2.0, 0.0], [0.5, -0.5]])
    # real: max(0, 1 - d) = 0, 0.5, 2, 0 -> mean 0.625; fake: max(0, 1 + d) = 0, 1, 1.5, 0.5 -> mean 0.75
    assert math.isclose(float(tsit.hinge_d_loss(real, fake)), 1.375, rel_tol=1e-6)
    assert math.isclose(float(tsit.hinge_g_loss(fake)), 0.5, rel_tol=1e-6)   # -(-2 + 0 + 0.5 - 0.5) / 4
    # two scales are averaged; a discriminator's feature lists are read at their last entry
    two = tsit.hinge_d_loss([[torch.zeros(1), real], [torch.zeros(1), real + 10]], [[torch.zeros(1), fake], [fake - 10]])
    assert math.isclose(float(two), (1.375 + 0.0) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="real"):
        tsit.hinge_d_loss("x", fake)
    with pytest.raises(ValueError, match="same number of scales"):
        tsit.hinge_d_loss([real, real], [fake])
    with pytest.raises(ValueError, match="fake"):
        tsit.hinge_g_loss([])


def test_feature_matching_by_hand():
    r = [[torch.zeros(2, 3), torch.ones(2, 2), torch.full((2, 1), 9.0)], [torch.zeros(4), torch.full((1,), 5.0)]]
    f = [[torch.ones(2, 3), torch.full((2, 2), 3.0), torch.zeros(2, 1)], [torch.full((4,), -2.0), torch.zeros(1)]]
    # scale 0: |1 - 0| + |3 - 1| = 3 (logits excluded); scale 1: |-2 - 0| = 2; mean over the 2 scales: 2.5
    assert math.isclose(float(tsit.feature_matching_loss(r, f)), 2.5, rel_tol=1e-6)
    with pytest.raises(ValueError, match="real"):
        tsit.feature_matching_loss([torch.zeros(1)], f)
    with pytest.raises(ValueError, match="fake"):
        tsit.feature_matching_loss(r, [[torch.zeros(1)]])
    with pytest.raises(ValueError, match="same discriminator"):
        tsit.feature_matching_loss(r, f[:1])


def test_perceptual_loss_by_hand_and_gradients():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("a", nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("b", nn.Conv2d(4, 2, 1))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    P = tsit.PerceptualLoss(net, ["a", "b"], [0.5, 2.0], mean, std)
    fake = (torch.rand(3, 3, 8, 8) * 2 - 1).requires_grad_(True)
    target = torch.rand(3, 3, 8, 8) * 2 - 1
    norm = lambda t: ((t + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    fa, ta = net.a(norm(fake)), net.a(norm(target))
    want = 0.5 * (fa - ta).abs().mean() + 2.0 * (net.b(fa) - net.b(ta)).abs().mean()
    got = P(fake, target)
    assert torch.allclose(got, want, rtol=1e-5)
    assert float(P(target, target)) == 0.0
    got.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())            # the classifier is frozen
    with pytest.raises(ValueError, match="weights"):
        tsit.PerceptualLoss(net, ["a"], [-1.0], mean, std)
    with pytest.raises(ValueError, match="layers"):
        tsit.PerceptualLoss(net, ["a", "b"], [1.0], mean, std)
    with pytest.raises(ValueError, match="same shape"):
        P(fake, target[:1])
    with pytest.raises(TypeError, match="classifier"):
        tsit.PerceptualLoss("resnet8", ["a"], [1.0], mean, std)


def test_sobel_edges_by_hand():
    x = torch.zeros(1, 3, 6, 6)
    x[..., 3:] = 1.0                                        # a vertical unit step between columns 2 and 3
    e = tsit.sobel_edges(x)
    assert e.shape == (1, 1, 6, 6)
    assert torch.allclose(e[0, 0, :, 2], torch.full((6,), 4.0), atol=1e-5)   # (1 + 2 + 1) * 1
    assert torch.allclose(e[0, 0, :, 3], torch.full((6,), 4.0), atol=1e-5)
    assert float(e[0, 0, :, [0, 1, 4, 5]].abs().max()) == 0.0
    assert float(tsit.sobel_edges(torch.full((2, 3, 5, 5), 0.3)).abs().max()) < 1e-6    # flat: no edges
    assert torch.allclose(tsit.sobel_edges(x.transpose(2, 3)), e.transpose(2, 3), atol=1e-6)   # rotation-equivariant
    with pytest.raises(ValueError, match="3 channels"):
        tsit.sobel_edges(torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="images"):
        tsit.sobel_edges(torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="images"):
        tsit.sobel_edges(torch.zeros(1, 3, 5, 5, dtype=torch.uint8))


def _tiny():
    ds = make_shapes(n_train=32, n_test=8, size=16)
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("a", nn.Conv2d(3, 4, 3, padding=1))
    return ds, tsit.PerceptualLoss(net, ["a"], [1.0], ds.mean, ds.std)


def test_train_tsit_tiny_run_is_finite_and_samples():
    ds, P = _tiny()
    run = tsit.train_tsit(ds, P, batch_size=8, ngf=4, ndf=4, max_steps=3, sample_every=2,
                          sample_images=ds.x_test[:4], progress=False)
    assert run.steps == 3 and all(len(v) == 3 and all(math.isfinite(a) for a in v) for v in run.history.values())
    assert [s for s, _ in run.samples] == [2, 3] and run.samples[-1][1].shape == (4, 3, 16, 16)
    out = tsit.generate(run.generator, ds.x_test[:4], ds.x_test[4:8], alpha=0.5)
    assert out.shape == (4, 3, 16, 16) and torch.isfinite(out).all()
    assert torch.equal(tsit.generate(run.generator, ds.x_test[:4], seed=3), tsit.generate(run.generator, ds.x_test[:4], seed=3))


def test_train_tsit_bad_inputs():
    ds, P = _tiny()
    with pytest.raises(TypeError, match="data"):
        tsit.train_tsit(ds.x_train, P)
    with pytest.raises(TypeError, match="perceptual"):
        tsit.train_tsit(ds, nn.L1Loss())
    with pytest.raises(ValueError, match="batch_size"):
        tsit.train_tsit(ds, P, batch_size=0)
    with pytest.raises(ValueError, match="lambda_fm"):
        tsit.train_tsit(ds, P, lambda_fm=-1.0)
    with pytest.raises(ValueError, match="lr_d"):
        tsit.train_tsit(ds, P, lr_d=float("nan"))
    with pytest.raises(ValueError, match="style_images"):
        tsit.generate(tsit.TSITGenerator(16, ngf=4), ds.x_test[:4], ds.x_test[:2])
    with pytest.raises(ValueError, match="images"):
        tsit.generate(tsit.TSITGenerator(16, ngf=4), ds.x_test[:4].float())


# ----- exercise self-checks -------------------------------------------------------------------

def test_check_nonsaturating_g_loss(capsys):
    tsit.check_nonsaturating_g_loss(lambda d: F.softplus(-d).mean())
    tsit.check_nonsaturating_g_loss(lambda d: -F.logsigmoid(d).mean())
    tsit.check_nonsaturating_g_loss(lambda d: F.binary_cross_entropy_with_logits(d, torch.ones_like(d)))
    assert capsys.readouterr().out.count("✓") == 3
    for wrong, hint in [(lambda d: torch.log1p(-torch.sigmoid(d)).mean(), "saturating"),
                        (lambda d: -torch.log(torch.sigmoid(d)).mean(), "underflows"),
                        (lambda d: F.softplus(d).mean(), "sign"),
                        (lambda d: F.softplus(-d).sum(), "mean"),
                        (lambda d: -d.mean(), "hinge")]:
        with pytest.raises(AssertionError, match=hint):
            tsit.check_nonsaturating_g_loss(wrong)


def _scale_by_hand(weight, bias, kappa, size):
    w = weight.sum(1)                                       # [C, 3, 3]: a constant feature sums the input channels
    inside = F.pad(torch.ones(size, size, dtype=weight.dtype), (1, 1, 1, 1))     # 1 in the image, 0 in the padding
    gamma = bias.view(-1, 1, 1).expand(-1, size, size).clone()
    for a in range(3):
        for b in range(3):
            gamma = gamma + kappa * w[:, a, b, None, None] * inside[a:a + size, b:b + size]
    return 1 + gamma


def _scale_by_counting(weight, bias, kappa, size):       # another correct route: loop over pixels and taps
    out = torch.empty(weight.shape[0], size, size, dtype=torch.float32)
    for i in range(size):
        for j in range(size):
            taps = [(a, b) for a in range(3) for b in range(3) if 0 <= i + a - 1 < size and 0 <= j + b - 1 < size]
            out[:, i, j] = (1 + bias + kappa * sum(weight[:, :, a, b].sum(1) for a, b in taps)).float()
    return out


def test_check_fade_scale_map(capsys):
    tsit.check_fade_scale_map(_scale_by_hand)
    tsit.check_fade_scale_map(_scale_by_counting)
    tsit.check_fade_scale_map(lambda w, b, k, n: 1 + F.conv2d(torch.full((1, w.shape[1], n, n), k, dtype=w.dtype), w, b,
                                                              padding=1)[0])
    assert capsys.readouterr().out.count("✓") == 3
    interior = lambda w, b, k, n: (1 + k * w.sum((1, 2, 3)) + b).view(-1, 1, 1).expand(-1, n, n)
    for wrong, hint in [(lambda w, b, k, n: _scale_by_hand(w, b, k, n) - 1, "1 \\+ gamma"),
                        (interior, "zero padding"),
                        (lambda w, b, k, n: _scale_by_hand(w, b, k, n) - b.view(-1, 1, 1), "bias"),
                        (lambda w, b, k, n: _scale_by_hand(w.flip(2, 3), b, k, n), "flipped"),
                        (lambda w, b, k, n: _scale_by_hand(w.transpose(2, 3), b, k, n), "swapped"),
                        (lambda w, b, k, n: _scale_by_hand(w, b, k, n)[0], "shape"),
                        (lambda w, b, k, n: _scale_by_hand(w, b, 2 * k, n), "expected")]:
        with pytest.raises(AssertionError, match=hint):
            tsit.check_fade_scale_map(wrong)


def test_check_receptive_field(capsys):
    def right(k, s):
        r, jump = 1, 1
        for kk, ss in zip(k, s):
            r, jump = r + (kk - 1) * jump, jump * ss
        return r

    def backwards(k, s):    # from the output back: r <- s * r + (k - s), an equivalent recursion
        r = 1
        for kk, ss in reversed(list(zip(k, s))):
            r = ss * r + (kk - ss)
        return r

    import numpy as np

    tsit.check_receptive_field(right)
    tsit.check_receptive_field(backwards)
    tsit.check_receptive_field(lambda k, s: np.int64(right(k, s)))      # NumPy and torch integers are whole numbers
    tsit.check_receptive_field(lambda k, s: torch.tensor(right(k, s)))
    tsit.check_receptive_field(lambda k, s: float(right(k, s)))
    assert capsys.readouterr().out.count("✓") == 5
    for not_whole in (lambda k, s: right(k, s) + 0.5, lambda k, s: "70", lambda k, s: torch.tensor([1, 2])):
        with pytest.raises(AssertionError, match="whole number"):
            tsit.check_receptive_field(not_whole)
    def own(k, s):
        r, jump = 1, 1
        for kk, ss in zip(k, s):
            jump *= ss
            r += (kk - 1) * jump
        return r
    with pytest.raises(AssertionError, match="own stride"):
        tsit.check_receptive_field(own)
    with pytest.raises(AssertionError, match="ignores the strides"):
        tsit.check_receptive_field(lambda k, s: sum(k) - len(k) + 1)


def test_checks_say_not_attempted(capsys):
    def todo(*args):
        raise NotImplementedError
    for check in (tsit.check_nonsaturating_g_loss, tsit.check_fade_scale_map, tsit.check_receptive_field):
        assert check(todo) is None
    assert capsys.readouterr().out.count("not attempted") == 3


def test_plots_draw_and_label():
    import matplotlib.pyplot as plt

    from minidistill.methods import tsit_plots

    fig = tsit_plots.draw_architecture(3, 16)
    assert "TSIT" in fig.axes[0].get_title()
    texts = {t.get_text(): t.get_position()[1] for t in fig.axes[0].texts}
    noise = next(y for t, y in texts.items() if t.startswith("noise 4x4"))     # 16 / 2^(3 - 1) = 4
    image = next(y for t, y in texts.items() if t.endswith("-> image"))
    assert noise < texts["x2 up"] < image          # the generator starts at the bottom (coarsest) and ends at the top
    imgs = torch.rand(4, 3, 8, 8) * 2 - 1
    fig2 = tsit_plots.show_rows({"a": imgs, "edges": imgs[:3, :1]}, ["w", "x", "y", "z"], "grid")
    assert len(fig2.axes) == 8 and fig2.axes[0].get_ylabel() == "a" and fig2.axes[0].get_title() == "w"
    fig3 = tsit_plots.plot_losses({"run": {"d_loss": [1.0, 0.5, 0.2], "g_p": [2.0, 1.0, 0.5]}}, window=2)
    assert [ax.get_xlabel() for ax in fig3.axes] == ["training step"] * 2
    plt.close("all")
