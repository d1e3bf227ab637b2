"""Chapter 13's exercise self-checks (TSIT), re-exported by :mod:`minidistill.methods.tsit`: the
non-saturating generator loss, FADE's scale map on a constant feature with zero padding (what the
border sees), and the receptive field of a PatchGAN.

Each check prints a line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises ``NotImplementedError``, and raises an ``AssertionError``
with a hint that names the classic mistake when the answer is wrong.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..runtime import attempted

__all__ = ["check_nonsaturating_g_loss", "check_fade_scale_map", "check_receptive_field"]


def check_nonsaturating_g_loss(loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    r"""``loss_fn(d)`` takes the discriminator's logits on generated images and returns the
    non-saturating generator loss $-\mathbb E[\log \sigma(d)] = \mathbb E[\mathrm{softplus}(-d)]$ (a scalar)."""
    d = torch.tensor([[-4.0, -2.0, 0.0], [0.5, 3.0, 1.5]], dtype=torch.float64)
    if not attempted(loss_fn, d.clone()):
        return None
    out = loss_fn(d.clone())
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise AssertionError("return a scalar tensor: the mean over every logit")
    out = out.double().reshape(())
    want = F.softplus(-d).mean()
    if torch.isclose(out, torch.log1p(-torch.sigmoid(d)).mean()):
        raise AssertionError("that is the saturating (minimax) loss E[log(1 - sigmoid(d))]: its gradient vanishes "
                             "exactly when D confidently rejects the fakes")
    if torch.isclose(out, -want) or torch.isclose(out, F.softplus(d).mean()):
        raise AssertionError("wrong sign: the generator wants D's logits on its images to grow, so the loss must fall as d grows")
    if torch.isclose(out, F.softplus(-d).sum()):
        raise AssertionError("take the mean over the logits, not the sum")
    if torch.isclose(out, -d.mean()):
        raise AssertionError("-E[d] is the hinge generator loss; the non-saturating one is E[softplus(-d)]")
    if not torch.isclose(out, want, rtol=1e-5):
        raise AssertionError(f"expected {float(want):.6f} on the test logits, got {float(out):.6f}")
    extreme = torch.tensor([-800.0, 0.0, 800.0], dtype=torch.float64)     # D sure that an image is fake / real
    far = loss_fn(extreme.clone())
    if not (isinstance(far, torch.Tensor) and torch.isfinite(far).all()
            and torch.isclose(far.double().reshape(()), F.softplus(-extreme).mean())):
        raise AssertionError("not right for very negative logits (d = -800): log(sigmoid(d)) underflows to log(0); "
                             "write it as softplus(-d) (or F.logsigmoid)")
    print("✓ the non-saturating loss is E[softplus(-d)]: its gradient -sigmoid(-d) is largest where D rejects the fakes")


def _scale_map_ref(weight: torch.Tensor, bias: torch.Tensor, kappa: float, size: int) -> torch.Tensor:
    r"""$1 + \gamma(f)$ for $f \equiv \kappa$ through PyTorch's own zero-padded 3x3 convolution."""
    f = torch.full((1, weight.shape[1], size, size), kappa, dtype=weight.dtype)
    return 1 + F.conv2d(f, weight, bias, padding=1)[0]


def check_fade_scale_map(scale_fn: Callable[[torch.Tensor, torch.Tensor, float, int], torch.Tensor]) -> None:
    r"""``scale_fn(weight, bias, kappa, size)`` gets the weight ``[C, C_f, 3, 3]`` and bias ``[C]`` of FADE's
    $\gamma$ convolution (zero padding 1), the value ``kappa`` of a constant feature map $f \equiv \kappa$ and the
    map's side ``size``; it returns FADE's scale map $1 + \gamma(f)$, shape ``[C, size, size]``: one BatchNorm
    weight per channel in the interior, other values where the 3x3 window reaches into the padding."""
    g = torch.Generator().manual_seed(13)
    weight = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)       # no symmetry: flips and transposes show
    bias = torch.randn(2, generator=g, dtype=torch.float64)
    kappa = 0.7
    if not attempted(scale_fn, weight.clone(), bias.clone(), kappa, 5):
        return None
    for size in (5, 3, 2, 1):
        want = _scale_map_ref(weight, bias, kappa, size)
        got = scale_fn(weight.clone(), bias.clone(), kappa, size)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (2, size, size):
            raise AssertionError(f"size {size}: return a tensor of shape [C, size, size] = {(2, size, size)}, got "
                                 f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
        got = got.detach().double()
        if torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            continue
        if torch.allclose(got + 1, want, rtol=1e-6, atol=1e-9):
            raise AssertionError("that is gamma; FADE multiplies the normalised x by 1 + gamma")
        interior = 1 + kappa * weight.sum((1, 2, 3)) + bias
        if torch.allclose(got, interior.view(-1, 1, 1).expand_as(want), rtol=1e-6, atol=1e-9):
            raise AssertionError(f"size {size}: the same value at every pixel is the interior's; at the border the 3x3 "
                                 "window reaches into the zero padding, and those taps add nothing")
        if torch.allclose(got, want - bias.view(-1, 1, 1), rtol=1e-6, atol=1e-9):
            raise AssertionError("the convolution's bias is missing")
        if torch.allclose(got, _scale_map_ref(weight.flip(2, 3), bias, kappa, size), rtol=1e-6, atol=1e-9):
            raise AssertionError(f"size {size}: the kernel is flipped: PyTorch's convolution is a cross-correlation, "
                                 "tap (a, b) of output pixel (i, j) reads input pixel (i + a - 1, j + b - 1)")
        if torch.allclose(got, _scale_map_ref(weight.transpose(2, 3), bias, kappa, size), rtol=1e-6, atol=1e-9):
            raise AssertionError(f"size {size}: rows and columns are swapped: the kernel's first index is the row")
        raise AssertionError(f"size {size}: expected (channel 0)\n{want[0].numpy().round(4)}\ngot\n{got[0].numpy().round(4)}")
    print("✓ the scale map has up to 9 values per channel: the interior (BatchNorm's weight), 4 edges and 4 corners, where "
        "the window loses 3 or 5 of its 9 taps to the zero padding")


def check_receptive_field(rf_fn: Callable[[Sequence[int], Sequence[int]], int]) -> None:
    r"""``rf_fn(kernels, strides)`` returns the receptive field (in input pixels, along one axis) of one
    output pixel of a stack of convolutions: $r = 1 + \sum_l (k_l - 1) \prod_{m < l} s_m$."""
    cases = [((3,), (1,)), ((4, 4, 4, 4, 4), (2, 2, 2, 1, 1)), ((3, 3, 3), (2, 2, 2)), ((7, 1, 3), (2, 1, 1)),
             ((4, 4), (1, 1))]
    if not attempted(rf_fn, [3], [1]):
        return None

    def ref(k, s):
        r, jump = 1, 1
        for kk, ss in zip(k, s):
            r, jump = r + (kk - 1) * jump, jump * ss
        return r

    def own_stride(k, s):  # the classic slip: the layer's own stride counted in its jump
        r, jump = 1, 1
        for kk, ss in zip(k, s):
            jump *= ss
            r += (kk - 1) * jump
        return r

    for k, s in cases:
        got = rf_fn(list(k), list(s))
        try:        # a Python, NumPy or one-element torch number
            value = float(got)
        except (TypeError, ValueError, RuntimeError):
            value = float("nan")
        if isinstance(got, (bool, str, bytes)) or not value.is_integer():
            raise AssertionError(f"return a whole number of pixels, got {got!r}")
        got = int(value)
        if got == ref(k, s):
            continue
        if got == own_stride(k, s):
            raise AssertionError(f"kernels {k}, strides {s}: a layer's own stride does not widen its own window; only the "
                                 "strides of the layers *before* it multiply its kernel")
        if got == sum(k) or got == sum(k) - len(k) + 1:
            raise AssertionError(f"kernels {k}, strides {s}: adding kernel sizes ignores the strides: each earlier "
                                 "stride-2 layer doubles the step between a later layer's taps")
        raise AssertionError(f"kernels {k}, strides {s}: expected {ref(k, s)}, got {got}")
    print(f"✓ r = 1 + sum_l (k_l - 1) * prod_(m<l) s_m: the PatchGAN's default stack (kernels {cases[1][0]}, strides "
        f"{cases[1][1]}) sees a {ref(*cases[1])}-pixel window per output")
