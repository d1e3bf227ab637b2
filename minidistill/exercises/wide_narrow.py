"""Chapter 9's exercise self-checks (Go Wide, Then Narrow), re-exported by
:mod:`minidistill.methods.wide_narrow`.

Each check prints a line starting with a tick when the answer is right, says "not attempted
yet" while the exercise still raises ``NotImplementedError``, and raises an ``AssertionError``
with a hint that names the classic mistake when the answer is wrong.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..runtime import attempted

__all__ = ["check_fold", "check_imitation_loss", "check_mergeable", "MERGEABLE_QUESTIONS"]


def check_fold(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Exercise 1 (folding *backwards*): ``fn(weight, bias, m)`` -> ``(weight', bias')`` of one
    convolution that computes ``m`` applied to the output channels of ``conv2d(x, weight, bias)``;
    ``weight`` is ``[C_out, C_in, r, r]``, ``bias`` is ``[C_out]``, ``m`` is ``[C_out, C_out]`` and maps
    output channel vectors ``c -> m @ c``."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    m = torch.randn(5, 5, generator=g, dtype=torch.float64)
    if not attempted(fn, w.clone(), b.clone(), m.clone()):
        return
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    want = torch.einsum("ij,njhw->nihw", m, F.conv2d(x, w, b, padding=1))
    out = fn(w.clone(), b.clone(), m.clone())
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise AssertionError("return a pair (weight, bias) of tensors")
    got_w, got_b = out
    if got_w.shape != w.shape or got_b.shape != b.shape:
        raise AssertionError(f"the weight must keep the shape {tuple(w.shape)} and the bias {tuple(b.shape)}, got "
                             f"{tuple(got_w.shape)} and {tuple(got_b.shape)}")
    got_w, got_b = got_w.to(torch.float64), got_b.to(torch.float64)
    tol = dict(rtol=1e-5, atol=1e-5 * float(want.abs().max()))  # float32 answers are right too

    def gives(weight: torch.Tensor, bias: torch.Tensor) -> bool:
        return torch.allclose(F.conv2d(x, weight, bias, padding=1), want, **tol)

    if gives(got_w, got_b):
        print("✓ fold: one convolution now does the convolution and then the map")
        return
    right_w = torch.einsum("ij,jcab->icab", m, w)
    if torch.allclose(F.conv2d(x, got_w, None, padding=1), F.conv2d(x, right_w, None, padding=1), **tol):
        raise AssertionError("the weight is right, the bias is not: the map acts on the whole output, bias included, "
                             "so the new bias is m @ bias")
    if torch.allclose(got_w, torch.einsum("ji,jcab->icab", m, w), **tol):
        raise AssertionError("transposed: output channel i of the map is sum_j m[i, j] * out[j], so the new weight "
                             "mixes the *output* channels (the first index of W) with m, not m.T")
    raise AssertionError("the folded convolution does not give m applied to conv2d(x, W, b): per kernel tap the new "
                         "weight is m @ W[:, :, a, b] (the map acts on the output channels, the first index of W)")


def check_imitation_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    r"""Exercise 2: ``fn(thin_out, wide_out)`` -> the *paper's* imitation loss
    $\mathbb E_x \|B_{(:i)}(x) - \bar S_{(:i)}(x)\|^2$: the squared difference summed over the
    features of each example and averaged over the batch (``[N, C, H, W]`` inputs)."""
    g = torch.Generator().manual_seed(1)
    s, b = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    if not attempted(fn, s, b):
        return
    got = float(fn(s, b))
    d = s.double() - b.double()
    want = float((d ** 2).flatten(1).sum(1).mean())
    n, features = s.shape[0], s[0].numel()

    def near(value: float) -> bool:
        return abs(got - value) <= 1e-5 * abs(value)

    if near(want):
        print("✓ imitation loss: the paper's form (the package's imitation_loss is it divided by "
              f"the {features} features)")
        return
    if near(want / features):
        raise AssertionError(f"that is the chapter's normalised loss (the mean over the {features} features too, "
                             "like F.mse_loss): the paper sums over the features of an example and averages only "
                             "over the examples")
    if near(want * n):
        raise AssertionError("summed over the batch as well: the paper's E_x averages over the N examples")
    if near(float(d.abs().flatten(1).sum(1).mean())):
        raise AssertionError("that is the absolute difference: square the differences")
    if near(float(d.flatten(1).norm(dim=1).mean())):
        raise AssertionError("that is the mean norm ||B - S||: the loss uses the squared norm")
    raise AssertionError(f"expected {want:.6f} (per example, the sum of (thin_out - wide_out)**2; then the batch "
                         f"mean), got {got:.6f}")


#: the boundaries of exercise 3: after which layer a pair of linear maps would be inserted
MERGEABLE_QUESTIONS = {
    "PlainCNN(7): between stem and layer1": "PlainCNN(7, (8, 16, 32), 10); layer1 starts with conv-BN-ReLU",
    "PlainCNN(7): between layer1 and layer2": "layer2 starts with a 2x2 max-pool",
    "PlainCNN(7): between layer3 and pool": "global average pooling, then the fully connected layer",
    "WRN-16-2: between layer1 and layer2": "a pre-activation block: BN-ReLU first, a 1x1 projection shortcut "
                                           "reading the activated input",
    "resnet20: between layer1.0 and layer1.1": "a basic block with an identity shortcut",
}
_TRUTH = {
    "PlainCNN(7): between stem and layer1": (True, "a convolution sees the whole input tensor: fold M into its weight"),
    "PlainCNN(7): between layer1 and layer2": (False, "max-pooling does not commute with a map mixing channels"),
    "PlainCNN(7): between layer3 and pool": (True, "average pooling is linear and acts on each channel alike, so the "
                                                   "map passes through it into the fully connected layer"),
    "WRN-16-2: between layer1 and layer2": (False, "the BatchNorm and ReLU come before any convolution, and the "
                                                   "shortcut reads their output: nothing linear sees the raw input"),
    "resnet20: between layer1.0 and layer1.1": (False, "the identity shortcut adds M x to the output unchanged"),
}


def check_mergeable(answers: Mapping[str, bool]) -> None:
    """Exercise 3: ``answers[question] = True`` when a pair inserted at that boundary can be
    merged exactly into the next layers, ``False`` otherwise (questions: ``MERGEABLE_QUESTIONS``)."""
    if not isinstance(answers, Mapping):
        raise TypeError(f"answers must be a dict {{question: True or False}}, got {type(answers).__name__}")
    missing = [q for q in _TRUTH if q not in answers or answers[q] is None]
    if len(missing) == len(_TRUTH):
        print("… not attempted yet: answer True or False for each question and run the cell again")
        return
    if missing:
        raise AssertionError(f"answer every question; missing: {missing}")
    wrong = [(q, why) for q, (truth, why) in _TRUTH.items() if bool(answers[q]) != truth]
    if wrong:
        raise AssertionError(f"{len(wrong)} of {len(_TRUTH)} wrong; first: {wrong[0][0]!r}: {wrong[0][1]}")
    print(f"✓ mergeable: all {len(_TRUTH)} boundaries right")
