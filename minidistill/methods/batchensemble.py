r"""Chapter 5's student architecture: BatchEnsemble (Wen, Tran, Ba, ICLR 2020).

A BatchEnsemble layer packs $M$ members into one: a shared weight $W$ and, per member $j$, fast
weights $r_j$ (input side) and $\gamma_j$ (output side; Wen et al.'s $s_j$, renamed in this course
because $s$ names the student), so that member $j$'s weight is $W \circ (\gamma_j r_j^\top)$, never
formed. A batch holds $M$ consecutive blocks of rows, block $j$ for member $j$.

* :class:`BatchEnsembleLinear`, :class:`BatchEnsembleConv2d`: the layers;
* :class:`BatchEnsembleResNet`: the CIFAR ResNet built of them (the chapter's BE-$M$ student);
* :func:`ensemble_log_probs` and :class:`GlobalAvgPool`, shared with the Deep Ensemble teacher
  of :mod:`minidistill.methods.ensembles`, which re-exports every name here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GlobalAvgPool",
    "ensemble_log_probs",
    "BatchEnsembleLinear",
    "BatchEnsembleConv2d",
    "BatchEnsembleResNet",
]


def _check_size(name: str, value: object, minimum: int = 1, what: str = "") -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else a ``ValueError`` naming ``name``
    (and ``what`` it is, when given): the check every constructor of the chapter runs on its sizes."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' (' + what + ')' if what else ''}, got {value!r}")
    return value


def _check_depth(depth: object) -> int:
    """A CIFAR ResNet depth ``6n + 2 >= 8``, else a ``ValueError`` naming ``depth``."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be a CIFAR ResNet depth 6n+2 >= 8 (8, 14, 20, 32, ...), got {depth!r}")
    return depth


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions, ``[N, C, H, W] -> [N, C]``: the same as
    ``AdaptiveAvgPool2d(1)`` + ``Flatten``, but written as a ``mean``, which ``vmap`` batches
    natively (``adaptive_avg_pool2d`` on channels_last inputs falls back to a slow per-member
    loop under ``vmap``, with a warning)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def ensemble_log_probs(member_logits: torch.Tensor) -> torch.Tensor:
    r"""$\log \bar p$ with $\bar p = \frac1M \sum_j \mathrm{softmax}(z_j)$ (the ensemble averages
    *probabilities*): ``[M, N, K]`` member logits in, ``[N, K]`` float32 out. A softmax of the
    result gives $\bar p$ back, so it serves as the ensemble's logits."""
    if member_logits.ndim != 3:
        raise ValueError(f"member_logits must be [M, N, K], got shape {tuple(member_logits.shape)}")
    log_p = torch.log_softmax(member_logits.float(), dim=-1)
    return torch.logsumexp(log_p, dim=0) - math.log(member_logits.shape[0])


def _blocks(x: torch.Tensor, m: int, layer: str) -> torch.Tensor:
    """``[M*N, ...]`` viewed as ``[M, N, ...]``: row ``i`` belongs to member ``i // N`` (M
    consecutive blocks). Broadcasting a per-member ``[M, C]`` vector over a block is then one
    elementwise kernel, with no per-row copy of the vector."""
    n = x.shape[0]
    if n % m:
        raise ValueError(f"{layer}: the input has {n} rows, not a multiple of ensemble_size={m}; a BatchEnsemble "
                         "batch holds M consecutive blocks of rows, block j for member j (tile a batch "
                         "with x.repeat(M, 1, ...))")
    return x.view(m, n // m, *x.shape[1:])


def _per_member(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-member vector ``[M, C]`` shaped to broadcast over ``[M, N, C, ...]`` blocks (in the
    blocks' dtype, so that bf16 activations stay bf16 under autocast)."""
    return t.to(like.dtype).view(t.shape[0], 1, t.shape[1], *[1] * (like.ndim - 3))


def _init_fast_weights(*tensors: torch.Tensor) -> None:
    for t in tensors:
        nn.init.normal_(t, mean=1.0, std=0.5)  # Nam et al.'s configs: r, gamma ~ N(1, 0.5^2)


class BatchEnsembleLinear(nn.Module):
    r"""A BatchEnsemble linear layer (Wen et al. 2020): a shared ``weight`` $W$ ``[out, in]``,
    per-member fast weights ``r`` ``[M, in]`` and ``gamma`` ``[M, out]`` (Wen et al.'s $s$) and a
    per-member ``bias`` ``[M, out]``. Member $j$ computes

    $$y = \big((x \circ r_j)\, W^\top\big) \circ \gamma_j + b_j,$$

    which is the linear layer with weight $W_j = W \circ (\gamma_j r_j^\top)$, never formed. The input
    ``[M N, in]`` holds $M$ consecutive blocks of $N$ rows, block $j$ for member $j$.
    """

    def __init__(self, in_features: int, out_features: int, ensemble_size: int, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("ensemble_size", ensemble_size)):
            _check_size(name, v)
        self.in_features, self.out_features, self.ensemble_size = in_features, out_features, ensemble_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.r = nn.Parameter(torch.empty(ensemble_size, in_features))
        self.gamma = nn.Parameter(torch.empty(ensemble_size, out_features))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        _init_fast_weights(self.r, self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"BatchEnsembleLinear expects [M*N, {self.in_features}] inputs, got {tuple(x.shape)}")
        xb = _blocks(x, self.ensemble_size, "BatchEnsembleLinear")  # [M, N, in]
        yb = F.linear(xb * _per_member(self.r, xb), self.weight)     # (x o r_j) W^T
        yb = yb * _per_member(self.gamma, yb)                        # ... o gamma_j
        if self.bias is not None:
            yb = yb + _per_member(self.bias, yb)                     # ... + b_j
        return yb.flatten(0, 1)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, ensemble_size={self.ensemble_size}, bias={self.bias is not None}"


class BatchEnsembleConv2d(nn.Module):
    r"""A BatchEnsemble convolution: shared ``weight`` ``[out, in, k, k]``, fast weights ``r``
    ``[M, in]`` (input channels) and ``gamma`` ``[M, out]`` (output channels), per-member ``bias``
    ``[M, out]`` (if ``bias``). Member $j$ scales input channel $c$ by $r_{j,c}$, convolves with
    $W$, scales output channel $c'$ by $\gamma_{j,c'}$ and adds $b_{j,c'}$: the convolution with
    kernel $W_j = W \circ (\gamma_j r_j^\top)$ (broadcast over the kernel's positions). Batch layout
    as in :class:`BatchEnsembleLinear`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, ensemble_size: int,
                 stride: int = 1, padding: int = 0, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("kernel_size", kernel_size), ("ensemble_size", ensemble_size), ("stride", stride)):
            _check_size(name, v)
        _check_size("padding", padding, 0)
        self.in_channels, self.out_channels, self.ensemble_size = in_channels, out_channels, ensemble_size
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.r = nn.Parameter(torch.empty(ensemble_size, in_channels))
        self.gamma = nn.Parameter(torch.empty(ensemble_size, out_channels))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, out_channels)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")  # as models.CifarResNet
        _init_fast_weights(self.r, self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"BatchEnsembleConv2d expects [M*N, {self.in_channels}, H, W] inputs, got {tuple(x.shape)}")
        m = self.ensemble_size
        xb = _blocks(x, m, "BatchEnsembleConv2d")                      # [M, N, C, H, W]
        y = F.conv2d((xb * _per_member(self.r, xb)).flatten(0, 1),    # scale input channels by r_j,
                     self.weight, None, self.stride, self.padding)     # one shared convolution,
        yb = y.view(m, -1, *y.shape[1:])
        yb = yb * _per_member(self.gamma, yb)                          # scale output channels by gamma_j
        if self.bias is not None:
            yb = yb + _per_member(self.bias, yb)                       # and add b_j
        return yb.flatten(0, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"ensemble_size={self.ensemble_size}, stride={self.stride}, padding={self.padding}, "
                f"bias={self.bias is not None}")


class _BEBlock(nn.Module):
    """models.BasicBlock with BatchEnsemble convolutions (BatchNorm shared by the members)."""

    def __init__(self, c_in: int, c_out: int, stride: int, m: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            BatchEnsembleConv2d(c_in, c_out, 3, m, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            BatchEnsembleConv2d(c_out, c_out, 3, m, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            BatchEnsembleConv2d(c_in, c_out, 1, m, stride, 0, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class BatchEnsembleResNet(nn.Module):
    """The BatchEnsemble version of the Deep Ensemble's member network
    (:func:`~minidistill.methods.ensembles.create_member`): every convolution and the classifier
    are BatchEnsemble layers, BatchNorm is shared (statistics over all $M N$ rows, as in Nam et
    al.'s configs). Stages ``stem, layer1, layer2, layer3, pool, fc``.

    ``member_logits(x)`` tiles a batch ``[N, ...]`` $M$ times (block $j$ for member $j$) and
    returns ``[M, N, K]``; ``forward(x)`` returns the ensemble's $\\log\\bar p$ ``[N, K]``.
    """

    def __init__(self, depth: int, width: int, num_classes: int, ensemble_size: int = 4) -> None:
        super().__init__()
        _check_depth(depth)
        _check_size("width", width)
        _check_size("num_classes", num_classes, 2, "a classifier needs at least two classes")
        _check_size("ensemble_size", ensemble_size)
        n, m = (depth - 2) // 6, ensemble_size
        w = (width, width, 2 * width, 4 * width)
        self.ensemble_size = m
        self.stem = nn.Sequential(BatchEnsembleConv2d(3, w[0], 3, m, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
        for i, (c_in, c_out, stride) in enumerate(((w[0], w[1], 1), (w[1], w[2], 2), (w[2], w[3], 2)), 1):
            setattr(self, f"layer{i}", nn.Sequential(*[_BEBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1, m)
                                                      for b in range(n)]))
        self.pool = GlobalAvgPool()
        self.fc = BatchEnsembleLinear(w[3], num_classes, m)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = x.repeat(self.ensemble_size, *[1] * (x.ndim - 1))
        if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            h = h.contiguous(memory_format=torch.channels_last)
        for stage in (self.stem, self.layer1, self.layer2, self.layer3, self.pool, self.fc):
            h = stage(h)
        return h.view(self.ensemble_size, b, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_log_probs(self.member_logits(x))
