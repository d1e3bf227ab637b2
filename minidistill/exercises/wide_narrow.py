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


def check_fold(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 1: ``fn(weight, m)`` -> the weight of one convolution that computes
    ``conv2d(apply m to the channels of x, weight)``; ``weight`` is ``[C_out, C, k, k]``, ``m`` is
    ``[C, C]`` and maps input channel vectors ``c -> m @ c``."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64)
    if not attempted(fn, w.clone(), m.clone()):
        return
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    want = F.conv2d(torch.einsum("ij,njhw->nihw", m, x), w, padding=1)
    got_w = fn(w.clone(), m.clone())
    if not isinstance(got_w, torch.Tensor) or got_w.shape != w.shape:
        raise AssertionError(f"return a weight of the convolution's shape {tuple(w.shape)}, got "
                             f"{getattr(got_w, 'shape', type(got_w).__name__)}")
    got = F.conv2d(x, got_w.to(torch.float64), padding=1)
    if torch.allclose(got, want, rtol=1e-9, atol=1e-9):
        print("✓ fold: one convolution now does the map and the convolution")
        return
    wrong = F.conv2d(x, torch.einsum("ojkl,cj->ockl", w, m), padding=1)
    if torch.allclose(got, wrong, rtol=1e-9, atol=1e-9):
        raise AssertionError("transposed: the convolution sums W[o, j] * (m x)[j] = sum_j W[o, j] m[j, c] x[c], "
                             "so the new weight is W[:, :, k, l] @ m, not W @ m.T")
    raise AssertionError("the folded convolution does not give conv2d(m x, W): per kernel tap the new weight is "
                         "W[:, :, k, l] @ m (the map acts on the *input* channels, the second index of W)")


def check_imitation_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 2: ``fn(thin_out, wide_out)`` -> the chapter's imitation loss: the squared
    difference averaged over the batch *and* the features (``[N, C, H, W]`` inputs)."""
    g = torch.Generator().manual_seed(1)
    s, b = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    if not attempted(fn, s, b):
        return
    got = float(fn(s, b))
    d = s - b
    want = float((d.double() ** 2).mean())
    n, features = s.shape[0], s[0].numel()
    if abs(got - want) <= 1e-5 * want:
        print("✓ imitation loss: correct")
        return
    if abs(got - want * features) <= 1e-5 * want * features:
        raise AssertionError(f"that is the paper's E||B - S||^2 (summed over the {features} features of an example): "
                             "the chapter divides it by the number of features, so blocks of different sizes "
                             "train at comparable learning rates -- take the mean over features too")
    if abs(got - want * features * n) <= 1e-5 * want * features * n:
        raise AssertionError("summed over the batch as well: average over the N examples and over the features")
    if abs(got - float(d.double().abs().mean())) <= 1e-5:
        raise AssertionError("that is the mean absolute difference: square the differences")
    if abs(got - float(d.double().flatten(1).norm(dim=1).mean())) <= 1e-5:
        raise AssertionError("that is the mean norm ||B - S||: the loss uses the squared norm")
    raise AssertionError(f"expected {want:.6f} (mean of (thin_out - wide_out)**2), got {got:.6f}")


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
