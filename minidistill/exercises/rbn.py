"""Chapter 11's exercise self-checks (Representative Batch Normalization), re-exported by
:mod:`minidistill.methods.rbn`.

Each check prints a line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises ``NotImplementedError``, and raises an ``AssertionError``
with a hint that names the classic mistake when the answer is wrong.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..runtime import attempted

__all__ = ["check_centering", "check_gate_variance", "check_eval_form"]


def check_centering(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 1: ``fn(x, w_m)`` -> the centering calibration ``X_cm = X + w_m * K_m`` for a feature
    map ``x`` of shape ``[N, C, H, W]`` and weights ``w_m`` of shape ``[C]``, without changing ``x``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64) + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    w_m = torch.tensor([0.5, -0.3, 2.0], dtype=torch.float64)
    if not attempted(fn, x.clone(), w_m.clone()):
        return
    x_in = x.clone()
    out = fn(x_in, w_m.clone())
    if not torch.equal(x_in, x):
        raise AssertionError("your function changed its input x in place (x += ... or x.add_): the caller's tensor "
                             "is the previous layer's output; write x = x + ... (the official code has this bug)")
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise AssertionError(f"return a tensor of the input's shape {tuple(x.shape)}, got {got}")
    out = out.to(torch.float64)
    w = w_m.view(1, 3, 1, 1)
    # the instance mean of each (example, channel), written as a loop so that it is independent of a .mean call
    k_m = torch.stack([torch.stack([x[n, c].sum() / x[n, c].numel() for c in range(3)]) for n in range(4)])
    want = x + w * k_m.view(4, 3, 1, 1)
    if torch.allclose(out, want, rtol=1e-5, atol=1e-6):
        print("✓ centering calibration: each example's channel mean, weighted by w_m, is added to its feature map")
        return
    wrong = {
        "you used the *batch* mean of each channel (mean over N, H, W): K_m is the instance mean, one per example "
        "and channel (mean over H and W only)": x + w * x.mean((0, 2, 3), keepdim=True),
        "you averaged over the channels: K_m is a mean over the spatial positions H, W of one channel":
            x + w * x.mean((1, 2, 3), keepdim=True),
        "you subtracted the weighted mean: the calibration *adds* w_m * K_m (BN subtracts the mean afterwards)":
            x - w * x.mean((2, 3), keepdim=True),
        "w_m is missing: the instance mean is weighted per channel by w_m": x + x.mean((2, 3), keepdim=True),
    }
    for hint, value in wrong.items():
        if torch.allclose(out, value, rtol=1e-5, atol=1e-6):
            raise AssertionError(hint)
    raise AssertionError("X_cm = X + w_m * K_m with K_m = x.mean((2, 3), keepdim=True) and w_m shaped [1, C, 1, 1]")


def check_gate_variance(fn: Callable[[float], float]) -> None:
    """Exercise 2: ``fn(f)`` -> the ``w_b`` that makes a fresh RBN layer (``w_v = 0``) multiply the
    variance of its standardised map by the factor ``f`` (0 < f < 1)."""
    if not attempted(fn, 0.5):
        return
    values = (0.1, 0.5, 0.9, 0.99)
    got = []
    for f in values:
        out = fn(f)
        try:
            got.append(float(out))
        except (TypeError, ValueError):
            raise AssertionError(f"return a number, got {type(out).__name__}") from None
    got_t = torch.tensor(got, dtype=torch.float64)
    f = torch.tensor(values, dtype=torch.float64)
    gate = 1.0 / (1.0 + torch.exp(-got_t))
    if torch.allclose(gate * gate, f, rtol=1e-6):
        print(f"✓ gate and variance: w_b = {got[1]:.4f} halves the variance; the gate is sigmoid(w_b), "
              "the variance factor its square")
        return
    if torch.allclose(gate, f, rtol=1e-6):
        raise AssertionError("that w_b makes the *gate* equal f; the variance is multiplied by the gate squared")
    if torch.allclose(got_t, f.sqrt(), rtol=1e-6):
        raise AssertionError("that is the gate r = sqrt(f) itself; w_b is the number whose sigmoid is r")
    raise AssertionError("with w_v = 0 the gate is the constant r = sigmoid(w_b) and Var(r X) = r**2 Var(X): "
                         "solve sigmoid(w_b)**2 = f for w_b")


def check_eval_form(fn: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Exercise 3: ``fn(layer)`` -> ``(a, b, d)``, three tensors of shape ``[C]`` such that, for an
    RBN layer in eval mode with ``w_v = 0``, ``layer(x) = a x + b mu + d`` per channel, ``mu`` being
    each example's channel mean of ``x``. The layer's ``eps`` is large (0.01) so that an answer
    without it is told apart from a right one."""
    from ..methods.rbn import RepresentativeBatchNorm2d

    g = torch.Generator().manual_seed(0)
    layer = RepresentativeBatchNorm2d(3, eps=1e-2).double().eval()
    with torch.no_grad():
        layer.center_weight.copy_(torch.tensor([0.5, -0.3, 1.2]))
        layer.scale_bias.copy_(torch.tensor([1.0, -0.5, 2.0]))
        layer.weight.copy_(torch.tensor([1.5, 0.7, -0.4]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        layer.running_mean.copy_(torch.tensor([0.4, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
    if not attempted(fn, layer):
        return
    out = fn(layer)
    if not (isinstance(out, (tuple, list)) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)):
        raise AssertionError("return three tensors (a, b, d), each of shape [C]")
    a, b, d = (t.detach().to(torch.float64).reshape(-1) for t in out)
    if not all(t.numel() == 3 for t in (a, b, d)):
        raise AssertionError("a, b and d must each hold one number per channel ([C])")
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) + torch.randn(4, 3, 1, 1, generator=g, dtype=torch.float64)
    mu = x.mean((2, 3), keepdim=True)
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    with torch.no_grad():
        want = layer(x)
    if torch.allclose(v(a) * x + v(b) * mu + v(d), want, rtol=1e-5, atol=1e-6):
        print("✓ eval form: a x + b mu + d; the mu term is what no convolution before the layer can absorb")
        return
    with torch.no_grad():
        s = layer.weight / torch.sqrt(layer.running_var + layer.eps)
        r = torch.sigmoid(layer.scale_bias)
        rm, wm, beta = layer.running_mean, layer.center_weight, layer.bias
        s_no_eps = layer.weight / torch.sqrt(layer.running_var)
    if torch.allclose(a, s_no_eps * r) or torch.allclose(a, s_no_eps):
        raise AssertionError("eps is missing: the layer divides by sqrt(running_var + eps); use layer.eps")
    if torch.allclose(a, s):
        raise AssertionError("the gate is missing: with w_v = 0 it is the constant sigmoid(w_b), a factor on a and b "
                             "(and on the running-mean term of d)")
    if torch.allclose(b, wm):
        raise AssertionError("b is w_m only before the standardisation: the layer then divides by sqrt(running_var + "
                             "eps) and multiplies by the gate and gamma, so b = a * w_m")
    if torch.allclose(a, s * r) and torch.allclose(b, s * wm):
        raise AssertionError("b: the w_m mu term is standardised and then gated like x, so b = a * w_m (the gate "
                             "is in b too)")
    if torch.allclose(a, s * r) and torch.allclose(b, s * r * wm) and torch.allclose(d, beta - s * rm):
        raise AssertionError("d: the running mean is subtracted *before* the gate, so it is scaled by the gate too")
    raise AssertionError("follow the four steps with w_v = 0: X_cm = x + w_m mu; X-hat = (X_cm - running_mean) / "
                         "sqrt(running_var + eps); times sigmoid(w_b); times gamma plus beta")
