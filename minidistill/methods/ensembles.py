r"""Chapter 5 -- learning from ensembles.

Nam, Yoon, Lee, Lee (NeurIPS 2021), "Diversity Matters When Learning From Ensembles", with
BatchEnsemble (Wen, Tran, Ba, ICLR 2020) and Output Diversified Sampling (ODS; Tashiro,
Song, Ermon, NeurIPS 2020).

The pieces, in the chapter's order:

* images in $[0, 1]$: :class:`~minidistill.data.DeviceLoader` yields *normalised* images, ODS
  perturbs images in $[0, 1]$; :func:`to_unit_range` / :func:`from_unit_range` convert;
* the Deep Ensemble teacher: :class:`DeepEnsemble` runs $M$ networks as one with
  ``torch.func`` (``stack_module_state``, ``functional_call``, ``vmap``), trained by
  :func:`pretrained_ensemble` (cached on disk);
* BatchEnsemble: :class:`BatchEnsembleLinear`, :class:`BatchEnsembleConv2d`,
  :class:`BatchEnsembleResNet`;
* perturbations: :func:`ods_direction`, :func:`ods_perturb` (ODS and ConfODS),
  :func:`gaussian_perturb`;
* one-to-one distillation (member $j$ learns from teacher $j$): :class:`OneToOneDistillation`,
  :func:`train_student`;
* the Jacobian view of KD on perturbed inputs: :func:`perturbed_kl`, :func:`kl_first_order`,
  :func:`jacobian_matching_penalty` (``torch.func.jvp``);
* evaluation: :func:`predict_members`, :func:`ensemble_scores`, :func:`ensemble_ladder`,
  :func:`metrics_table`; the shared measures (pairwise-KL diversity, DEE, temperature
  scaling) live in :mod:`minidistill.metrics`;
* figures and the exercises' self-checks.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import math
import warnings
from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, stack_module_state, vmap

from .. import metrics
from ..data import Dataset, DeviceLoader
from ..losses import check_temperature, distillation_loss, kd_loss
from ..models import CifarResNet
from ..report import format_mean_std
from ..runtime import Profile, attempted, data_root, get_device, get_profile, seed_everything
from ..train import History, Recipe, Trained, _autocast, _autocast_dtype, fit, load_or_train

__all__ = [
    "METHODS",
    "REPORTED",
    "to_unit_range",
    "from_unit_range",
    "subset",
    "GlobalAvgPool",
    "create_member",
    "ensemble_log_probs",
    "DeepEnsemble",
    "EnsembleCrossEntropy",
    "new_deep_ensemble",
    "pretrained_ensemble",
    "BatchEnsembleLinear",
    "BatchEnsembleConv2d",
    "BatchEnsembleResNet",
    "ods_direction",
    "ods_perturb",
    "gaussian_perturb",
    "OneToOneDistillation",
    "train_student",
    "perturbed_kl",
    "kl_first_order",
    "jacobian_matching_penalty",
    "predict_members",
    "ensemble_scores",
    "ensemble_ladder",
    "metrics_table",
    "toy_ensemble_1d",
    "plot_toy_ensemble",
    "plot_diversity_by_confidence",
    "plot_perturbation",
    "check_batch_ensemble_linear",
    "check_ods_step",
    "check_pairwise_kl",
]

#: The four ways a BatchEnsemble student learns from the Deep Ensemble in the chapter.
METHODS = ("kd", "gaussian", "ods", "confods")
_METHOD_NAMES = {"kd": "KD", "gaussian": "KD + Gaussian", "ods": "KD + ODS", "confods": "KD + ConfODS"}

# -- images in [0, 1] --------------------------------------------------------------------------


def _stats(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 4 or len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"expected images [N, C, H, W] with one mean and std per channel, got shape "
                         f"{tuple(x.shape)}, {len(mean)} means and {len(std)} stds")
    shape = (1, x.shape[1], 1, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return m, s


def to_unit_range(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    r"""Undo the loader's normalisation: $u = x \cdot \sigma + \mu$, images back in $[0, 1]$."""
    m, s = _stats(x, mean, std)
    return x * s + m


def from_unit_range(u: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    r"""Normalise images in $[0, 1]$ as the loader does: $x = (u - \mu) / \sigma$."""
    m, s = _stats(u, mean, std)
    return (u - m) / s


def _check_unit_range(x: torch.Tensor) -> None:
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"x must be images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; the loader's images "
                         "are normalised: convert them with to_unit_range(x, data.mean, data.std) first")


def subset(data: Dataset, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
    """A copy of ``data`` with ``n_train`` training and ``n_test`` test images drawn at random
    (``None`` keeps a split whole; the same ``seed`` draws the same images). The validation
    split is unchanged."""
    changes = {}
    for split, n in (("train", n_train), ("test", n_test)):
        if n is None:
            continue
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= len(x):
            raise ValueError(f"n_{split} must be an int in [1, {len(x)}] (the {split} split's size), got {n!r}")
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        changes.update({f"x_{split}": x[keep], f"y_{split}": y[keep]})
    return dataclasses.replace(data, **changes)


# -- the Deep Ensemble teacher, with torch.func --------------------------------------------------


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions, ``[N, C, H, W] -> [N, C]``: the same as
    ``AdaptiveAvgPool2d(1)`` + ``Flatten``, but written as a ``mean``, which ``vmap`` batches
    natively (``adaptive_avg_pool2d`` on channels_last inputs falls back to a slow per-member
    loop under ``vmap``, with a warning)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def create_member(depth: int, width: int, num_classes: int) -> CifarResNet:
    """One CIFAR ResNet of depth ``6n + 2`` with stage widths ``(width, width, 2 width, 4 width)``:
    ``create_member(20, 16, 10)`` has the weights and outputs of ``models.create_model('resnet20',
    10)`` (its ``pool`` stage is a :class:`GlobalAvgPool`, the same function)."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    model = CifarResNet(depth, (width, width, 2 * width, 4 * width), num_classes)
    model.pool = GlobalAvgPool()
    return model


def ensemble_log_probs(member_logits: torch.Tensor) -> torch.Tensor:
    r"""$\log \bar p$ with $\bar p = \frac1M \sum_j \mathrm{softmax}(z_j)$ (the ensemble averages
    *probabilities*): ``[M, N, K]`` member logits in, ``[N, K]`` float32 out. A softmax of the
    result gives $\bar p$ back, so it serves as the ensemble's logits."""
    if member_logits.ndim != 3:
        raise ValueError(f"member_logits must be [M, N, K], got shape {tuple(member_logits.shape)}")
    log_p = torch.log_softmax(member_logits.float(), dim=-1)
    return torch.logsumexp(log_p, dim=0) - math.log(member_logits.shape[0])


class DeepEnsemble(nn.Module):
    """``M`` networks of one architecture, run as one with ``torch.func``.

    ``stack_module_state`` stacks the members' parameters and buffers; one forward is
    ``vmap(functional_call)`` over the stacked state, so the ``M`` forwards (and backwards)
    become batched kernels instead of a Python loop. Training mode works too: each member's
    BatchNorm statistics are updated in its own slice.

    Storage detail: a stacked tensor ``[M, d0, ...]`` is kept as ``[M * d0, ...]`` and viewed
    back on use, so that ``Module.to(memory_format=torch.channels_last)`` (which ``fit`` calls)
    sees 4-D conv weights rather than 5-D ones it cannot convert.

    ``member_logits(x) -> [M, N, K]``; ``forward(x)`` returns the ensemble's $\\log \\bar p$
    ``[N, K]`` (:func:`ensemble_log_probs`), what :func:`~minidistill.train.fit` evaluates.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"a Deep Ensemble needs at least 2 members, got {len(members)}")
        shapes0 = {k: tuple(v.shape) for k, v in members[0].state_dict().items()}
        for j, m in enumerate(members[1:], 1):
            if {k: tuple(v.shape) for k, v in m.state_dict().items()} != shapes0:
                raise ValueError(f"member {j} has another architecture than member 0 (state_dict keys or shapes differ)")
        params, buffers = stack_module_state(members)
        self.ensemble_size = len(members)
        self._entries: list[tuple[str, str, tuple[int, ...], bool]] = []  # (name, attribute, member shape, is parameter)
        for is_param, state in ((True, params), (False, buffers)):
            for name, t in state.items():
                attr = name.replace(".", "__")
                data = t.detach().clone()
                data = data.flatten(0, 1) if data.ndim >= 2 else data
                if is_param:
                    self.register_parameter(attr, nn.Parameter(data))
                else:
                    self.register_buffer(attr, data)
                self._entries.append((name, attr, tuple(t.shape[1:]), is_param))
        # the architecture, with meta placeholders for its tensors; not a submodule, so that
        # parameters(), state_dict() and .to() see only the stacked state above
        object.__setattr__(self, "_base", copy.deepcopy(members[0]).to("meta").train(self.training))

    def train(self, mode: bool = True) -> "DeepEnsemble":
        super().train(mode)
        self._base.train(mode)
        return self

    def stacked_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(params, buffers)`` as ``stack_module_state`` gives them: ``{name: [M, ...]}``."""
        params, buffers = {}, {}
        for name, attr, shape, is_param in self._entries:
            (params if is_param else buffers)[name] = getattr(self, attr).view(self.ensemble_size, *shape)
        return params, buffers

    def member_logits(self, x: torch.Tensor, per_member: bool = False) -> torch.Tensor:
        """Logits ``[M, N, K]`` of every member: all members see ``x`` ``[N, ...]``, or with
        ``per_member=True`` member ``j`` sees ``x[j]`` of ``x`` ``[M, N, ...]``."""
        if per_member and x.shape[0] != self.ensemble_size:
            raise ValueError(f"per_member=True needs x of shape [M={self.ensemble_size}, N, ...], got {tuple(x.shape)}")
        params, buffers = self.stacked_state()

        def one(p: dict, b: dict, xi: torch.Tensor) -> torch.Tensor:
            return functional_call(self._base, (p, b), (xi,))

        return vmap(one, in_dims=(0, 0, 0 if per_member else None))(params, buffers, x)

    def member_forward(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` of member ``j`` alone (one network's cost, not ``M``)."""
        if not isinstance(j, int) or not 0 <= j < self.ensemble_size:
            raise ValueError(f"member index j must be an int in [0, {self.ensemble_size}), got {j!r}")
        params, buffers = self.stacked_state()
        state = {k: v[j] for k, v in (*params.items(), *buffers.items())}
        return functional_call(self._base, state, (x,))

    def member(self, j: int) -> nn.Module:
        """A standalone copy of member ``j`` (an ordinary module, in this ensemble's mode)."""
        if not isinstance(j, int) or not 0 <= j < self.ensemble_size:
            raise ValueError(f"member index j must be an int in [0, {self.ensemble_size}), got {j!r}")
        params, buffers = self.stacked_state()
        device = next(iter(params.values())).device
        model = copy.deepcopy(self._base).to_empty(device=device)
        model.load_state_dict({k: v[j].detach().clone() for k, v in (*params.items(), *buffers.items())})
        return model.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_log_probs(self.member_logits(x))


class EnsembleCrossEntropy(nn.Module):
    r"""The objective that trains every member on its own labels at once:
    $\sum_{j=1}^M \mathrm{CE}(z_j, y)$ (a *sum*, so each member's gradient, momentum and weight
    decay are exactly those of training it alone on the same batches). Returns the ensemble's
    $\log\bar p$ as the logits ``fit`` scores."""

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = model.member_logits(x)
        m = z.shape[0]
        return F.cross_entropy(z.flatten(0, 1).float(), y.repeat(m)) * m, ensemble_log_probs(z)


def new_deep_ensemble(depth: int, width: int, num_classes: int, size: int = 4, seed: int = 0) -> DeepEnsemble:
    """A freshly initialised ensemble; member ``j`` is initialised from seed ``seed + j``, as
    ``create_member`` after ``seed_everything(seed + j)`` would be."""
    members = []
    for j in range(size):
        seed_everything(seed + j)
        members.append(create_member(depth, width, num_classes))
    return DeepEnsemble(members)


def _data_digest(data: Dataset) -> str:
    h = hashlib.sha1(data.y_train.numpy().tobytes())
    h.update(data.x_train[:: max(1, len(data.x_train) // 64)].numpy().tobytes())
    return h.hexdigest()[:12]


def pretrained_ensemble(
    data: Dataset,
    depth: int = 20,
    width: int = 16,
    size: int = 4,
    *,
    recipe: Recipe,
    seed: int = 0,
    profile: Profile | str | None = None,
    root=None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> Trained:
    """A Deep Ensemble of ``size`` members trained together on ``data`` (vmapped, one
    :func:`~minidistill.train.fit`), from the cache or trained now and cached.

    The checkpoint lives in ``<root>/checkpoints/`` under a name made of the architecture, data,
    profile, seed and recipe. As with :func:`~minidistill.train.pretrained`, a cached file is
    used only if its metadata match (including a digest of the training data) and its weights
    hash to the stored digest; otherwise it is retrained with a warning. An interrupted
    training resumes where it stopped.
    """
    prof = profile if isinstance(profile, Profile) else get_profile(profile, device)
    meta = {"kind": "deep-ensemble", "depth": depth, "width": width, "size": size, "dataset": data.name,
            "n_train": len(data.x_train), "data_digest": _data_digest(data), "profile": prof.name,
            "seed": seed, "recipe": dataclasses.asdict(recipe)}
    folder = data_root(root) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"de{size}-resnet{depth}w{width}-{data.name}{len(data.x_train)}-{prof.name}"
                     f"-s{seed}-{recipe.key()}.pt")
    dev = get_device(device) if device is not None else prof.device
    model = new_deep_ensemble(depth, width, data.num_classes, size, seed)
    return load_or_train(
        path, meta, model,
        lambda partial: fit(model, data, EnsembleCrossEntropy(), recipe, seed=seed, device=dev, checkpoint=partial,
                            progress=progress, description=f"DE-{size} resnet{depth} (teacher)"),
        device=dev)


# -- BatchEnsemble -------------------------------------------------------------------------------


def _blocks(x: torch.Tensor, m: int, layer: str) -> torch.Tensor:
    """``[M*B, ...]`` viewed as ``[M, B, ...]``: row ``i`` belongs to member ``i // B`` (M
    consecutive blocks). Broadcasting a per-member ``[M, C]`` vector over a block is then one
    elementwise kernel, with no per-row copy of the vector."""
    n = x.shape[0]
    if n % m:
        raise ValueError(f"{layer}: the input has {n} rows, not a multiple of ensemble_size={m}; a BatchEnsemble "
                         "batch holds M consecutive blocks of rows, block j for member j (tile a batch "
                         "with x.repeat(M, 1, ...))")
    return x.view(m, n // m, *x.shape[1:])


def _per_member(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-member vector ``[M, C]`` shaped to broadcast over ``[M, B, C, ...]`` blocks (in the
    blocks' dtype, so that bf16 activations stay bf16 under autocast)."""
    return t.to(like.dtype).view(t.shape[0], 1, t.shape[1], *[1] * (like.ndim - 3))


def _init_fast_weights(*tensors: torch.Tensor) -> None:
    for t in tensors:
        nn.init.normal_(t, mean=1.0, std=0.5)  # Nam et al.'s configs: r, s ~ N(1, 0.5^2)


class BatchEnsembleLinear(nn.Module):
    r"""A BatchEnsemble linear layer (Wen et al. 2020): a shared ``weight`` $W$ ``[out, in]``,
    per-member fast weights ``r`` ``[M, in]`` and ``s`` ``[M, out]`` and a per-member ``bias``
    ``[M, out]``. Member $j$ computes

    $$y = \big((x \circ r_j)\, W^\top\big) \circ s_j + b_j,$$

    which is the linear layer with weight $W_j = W \circ (s_j r_j^\top)$, never formed. The input
    ``[M B, in]`` holds $M$ consecutive blocks of $B$ rows, block $j$ for member $j$.
    """

    def __init__(self, in_features: int, out_features: int, ensemble_size: int, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("ensemble_size", ensemble_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features, self.ensemble_size = in_features, out_features, ensemble_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.r = nn.Parameter(torch.empty(ensemble_size, in_features))
        self.s = nn.Parameter(torch.empty(ensemble_size, out_features))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        _init_fast_weights(self.r, self.s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"BatchEnsembleLinear expects [M*B, {self.in_features}] inputs, got {tuple(x.shape)}")
        xb = _blocks(x, self.ensemble_size, "BatchEnsembleLinear")  # [M, B, in]
        yb = F.linear(xb * _per_member(self.r, xb), self.weight)     # (x o r_j) W^T
        yb = yb * _per_member(self.s, yb)                            # ... o s_j
        if self.bias is not None:
            yb = yb + _per_member(self.bias, yb)                     # ... + b_j
        return yb.flatten(0, 1)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, ensemble_size={self.ensemble_size}, bias={self.bias is not None}"


class BatchEnsembleConv2d(nn.Module):
    r"""A BatchEnsemble convolution: shared ``weight`` ``[out, in, k, k]``, fast weights ``r``
    ``[M, in]`` (input channels) and ``s`` ``[M, out]`` (output channels), per-member ``bias``
    ``[M, out]`` (if ``bias``). Member $j$ scales input channel $c$ by $r_{j,c}$, convolves with
    $W$, scales output channel $c'$ by $s_{j,c'}$ and adds $b_{j,c'}$: the convolution with
    kernel $W_j = W \circ (s_j r_j^\top)$ (broadcast over the kernel's positions). Batch layout
    as in :class:`BatchEnsembleLinear`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, ensemble_size: int,
                 stride: int = 1, padding: int = 0, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("kernel_size", kernel_size), ("ensemble_size", ensemble_size), ("stride", stride)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_channels, self.out_channels, self.ensemble_size = in_channels, out_channels, ensemble_size
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.r = nn.Parameter(torch.empty(ensemble_size, in_channels))
        self.s = nn.Parameter(torch.empty(ensemble_size, out_channels))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, out_channels)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")  # as models.CifarResNet
        _init_fast_weights(self.r, self.s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"BatchEnsembleConv2d expects [M*B, {self.in_channels}, H, W] inputs, got {tuple(x.shape)}")
        m = self.ensemble_size
        xb = _blocks(x, m, "BatchEnsembleConv2d")                      # [M, B, C, H, W]
        y = F.conv2d((xb * _per_member(self.r, xb)).flatten(0, 1),    # scale input channels by r_j,
                     self.weight, None, self.stride, self.padding)     # one shared convolution,
        yb = y.view(m, -1, *y.shape[1:])
        yb = yb * _per_member(self.s, yb)                              # scale output channels by s_j
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
    """The BatchEnsemble version of :func:`create_member`'s CIFAR ResNet: every convolution and
    the classifier are BatchEnsemble layers, BatchNorm is shared (statistics over all $M B$
    rows, as in Nam et al.'s configs). Stages ``stem, layer1, layer2, layer3, pool, fc``.

    ``member_logits(x)`` tiles a batch ``[B, ...]`` $M$ times (block $j$ for member $j$) and
    returns ``[M, B, K]``; ``forward(x)`` returns the ensemble's $\\log\\bar p$ ``[B, K]``.
    """

    def __init__(self, depth: int, width: int, num_classes: int, ensemble_size: int = 4) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 >= 8, got {depth}")
        if not isinstance(ensemble_size, int) or ensemble_size < 1:
            raise ValueError(f"ensemble_size must be a positive int, got {ensemble_size!r}")
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


# -- ODS, ConfODS and Gaussian perturbations ---------------------------------------------------


def _ods_gradient(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, w: torch.Tensor | None,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """$\\nabla_x\\, w^\\top \\mathrm{softmax}(f(x)/T)$ summed over the batch (samples are
    independent for a model in eval mode), and the probabilities."""
    check_temperature(temperature)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"model(x) must return [N={x.shape[0]}, K] logits, got shape {tuple(logits.shape)}")
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # (autocast) the direction is computed in float32
        probs = torch.softmax(logits / temperature, dim=-1)
        if w is None:
            w = torch.rand_like(probs) * 2 - 1  # w ~ U(-1, 1)^K, one per sample
        elif w.shape != probs.shape:
            raise ValueError(f"w must have the outputs' shape {tuple(probs.shape)} (one weight vector per sample), "
                             f"got {tuple(w.shape)}")
        (g,) = torch.autograd.grad((w.to(probs.dtype) * probs).sum(), x)
    return g, probs.detach()


def _unit_rows(g: torch.Tensor) -> torch.Tensor:
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norm.view(-1, *[1] * (g.ndim - 1))


def ods_direction(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, w: torch.Tensor | None = None,
                  temperature: float = 1.0) -> torch.Tensor:
    r"""The ODS direction (Tashiro et al. 2020) of each sample, with unit L2 norm:

    $$\varepsilon_\mathrm{ODS}(x, f, w) = \frac{\nabla_x\, w^\top f(x)}{\|\nabla_x\, w^\top f(x)\|_2},
      \qquad f(x) = \mathrm{softmax}(\mathrm{model}(x) / T),\quad w \sim \mathcal U(-1, 1)^K.$$

    ``w`` is ``[N, K]`` (drawn per sample when ``None``). Use the model in eval mode (BatchNorm
    in train mode mixes the samples of a batch). A sample whose gradient is zero gets a zero
    direction. For the step the official code takes, see :func:`ods_perturb`.
    """
    g, _ = _ods_gradient(model, x, w, temperature)
    return _unit_rows(g)


def _check_eta(eta: float) -> None:
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite number >= 0 (the step per pixel, e.g. 1/255), got {eta!r}")


def _ods_step(model, x, eta, w, temperature, confidence):
    g, probs = _ods_gradient(model, x, w, temperature)
    d = x[0].numel()
    step = (eta * math.sqrt(d)) * _unit_rows(g)
    if confidence:
        step = step * probs.max(-1).values.view(-1, *[1] * (x.ndim - 1))
    return (x.detach() + step).clamp(0, 1)


def ods_perturb(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eta: float = 1 / 255, *,
                w: torch.Tensor | None = None, temperature: float = 1.0, confidence: bool = False) -> torch.Tensor:
    r"""Images in $[0, 1]$ moved along the ODS direction as Nam et al.'s code does:

    $$\tilde x = \mathrm{clip}_{[0,1]}\big(x + \eta\, c(x)\, \sqrt D\; \varepsilon_\mathrm{ODS}(x)\big),$$

    $D$ the number of values per image, so each pixel moves by $\eta$ in RMS (a unit step would
    move it by $\eta/\sqrt D$, 55 times less on CIFAR). $c(x) = 1$ for ODS; for ConfODS
    (``confidence=True``) $c(x) = \max_k \mathrm{softmax}(\mathrm{model}(x)/T)_k$, so confident
    points are pushed further. ``model`` takes images in $[0, 1]$ (normalise inside it).
    """
    _check_eta(eta)
    _check_unit_range(x)
    return _ods_step(model, x, eta, w, temperature, confidence)


def gaussian_perturb(x: torch.Tensor, eta: float = 1 / 255, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""The baseline: $\tilde x = \mathrm{clip}_{[0,1]}(x + \eta\,\xi)$, $\xi \sim \mathcal N(0, I)$
    per pixel (the same RMS step per pixel as :func:`ods_perturb`, in a random direction)."""
    _check_eta(eta)
    _check_unit_range(x)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + eta * noise).clamp(0, 1)


# -- one-to-one distillation -------------------------------------------------------------------


class OneToOneDistillation(nn.Module):
    r"""The objective of Nam et al.: student member $j$ learns from teacher member $j$,

    $$\mathcal L = (1-\alpha)\,\mathrm{CE}\big(\hat{\mathcal S}_j(x), y\big)
      + \alpha\,\tau^2\,\mathrm{KL}\Big(\mathrm{softmax}\tfrac{\hat{\mathcal T}_j(\tilde x)}{\tau}\,\Big\|\,
        \mathrm{softmax}\tfrac{\hat{\mathcal S}_j(\tilde x)}{\tau}\Big),$$

    averaged over all $M B$ rows. ``perturbation`` picks $\tilde x$: ``'kd'`` ($\tilde x = x$),
    ``'gaussian'``, ``'ods'`` or ``'confods'`` ($\eta$ = ``eta`` per pixel in $[0, 1]$; the ODS
    direction comes from one teacher member drawn per batch, at temperature $\tau$). The cross-
    entropy always sees the clean $x$, so a perturbed method runs the student twice per step.

    The loader's images are normalised: they are mapped to $[0, 1]$ with ``mean``/``std``,
    perturbed, clipped, and normalised again.
    """

    def __init__(self, teacher: DeepEnsemble, temperature: float = 4.0, alpha: float = 0.9,
                 perturbation: str = "kd", eta: float = 1 / 255, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        check_temperature(temperature)
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if perturbation not in METHODS:
            raise ValueError(f"perturbation must be one of {METHODS}, got {perturbation!r}")
        if not isinstance(teacher, DeepEnsemble):
            raise ValueError(f"teacher must be a DeepEnsemble, got {type(teacher).__name__}")
        _check_eta(eta)
        if perturbation != "kd" and (mean is None or std is None):
            raise ValueError(f"perturbation {perturbation!r} needs the data's mean and std (to map the loader's "
                             "normalised images to [0, 1]); pass mean=data.mean, std=data.std")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha, self.perturbation, self.eta = temperature, alpha, perturbation, eta
        self.mean, self.std = mean, std

    def train(self, mode: bool = True) -> "OneToOneDistillation":
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm statistics never move
        return self

    def perturb_unit(self, u: torch.Tensor) -> torch.Tensor:
        """$\\tilde u$ for a batch of images ``u`` in $[0, 1]$ (in $[0, 1]$ too): Gaussian noise,
        or an ODS/ConfODS step from one teacher member drawn for the whole batch."""
        if self.perturbation == "kd":
            return u
        if self.perturbation == "gaussian":
            return (u + self.eta * torch.randn_like(u)).clamp(0, 1)
        j = int(torch.randint(self.teacher.ensemble_size, ()))  # one teacher per batch (CPU draw: no sync)
        teacher_j = lambda v: self.teacher.member_forward(j, from_unit_range(v, self.mean, self.std))  # noqa: E731
        return _ods_step(teacher_j, u, self.eta, None, self.temperature, self.perturbation == "confods")

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """$\\tilde x$ for a batch of the loader's normalised images ``x``: un-normalise to
        $[0, 1]$, perturb (:meth:`perturb_unit`), normalise again."""
        if self.perturbation == "kd":
            return x
        return from_unit_range(self.perturb_unit(to_unit_range(x, self.mean, self.std)), self.mean, self.std)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.teacher.ensemble_size
        if getattr(model, "ensemble_size", None) != m:
            raise ValueError(f"one-to-one distillation pairs student and teacher members: the student has "
                             f"ensemble_size={getattr(model, 'ensemble_size', None)}, the teacher {m}")
        x_kd = self.perturb(x)
        with torch.no_grad():
            t = self.teacher.member_logits(x_kd)  # [M, B, K]: teacher j on block j
        s = model.member_logits(x)
        yy = y.repeat(m)
        if x_kd is x:
            loss = distillation_loss(s.flatten(0, 1), t.flatten(0, 1), yy, self.temperature, self.alpha)
        else:
            s_kd = model.member_logits(x_kd)
            loss = ((1 - self.alpha) * F.cross_entropy(s.flatten(0, 1).float(), yy)
                    + self.alpha * kd_loss(s_kd.flatten(0, 1), t.flatten(0, 1), self.temperature))
        return loss, ensemble_log_probs(s)


def train_student(
    teacher: DeepEnsemble,
    data: Dataset,
    recipe: Recipe,
    method: str = "kd",
    *,
    depth: int,
    width: int,
    seed: int = 0,
    temperature: float = 4.0,
    alpha: float = 0.9,
    eta: float = 1 / 255,
    **fit_kwargs,
) -> tuple[BatchEnsembleResNet, History]:
    """Distil ``teacher`` into a fresh :class:`BatchEnsembleResNet` of the members' architecture
    (``depth``, ``width``) with ``method`` (one of :data:`METHODS`). The same ``seed`` gives the
    same initial weights and data order for every method, so runs differ only in the
    perturbation. The history's per-epoch scores are the test split's (no validation split)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    seed_everything(seed)
    student = BatchEnsembleResNet(depth, width, data.num_classes, teacher.ensemble_size)
    objective = OneToOneDistillation(teacher, temperature, alpha, method, eta, data.mean, data.std)
    label = f"BE-{teacher.ensemble_size} {_METHOD_NAMES[method]} (seed {seed})"
    # the validation split serves once, after training (temperature scaling), so fit's
    # per-epoch evaluation skips it
    history = fit(student, data, objective, recipe, seed=seed, eval_splits=("test",), description=label,
                  **fit_kwargs)
    return student, history


# -- the Jacobian view (torch.func.jvp) --------------------------------------------------------


def _tempered_jvp(fn, x, delta, temperature):
    check_temperature(temperature)
    if delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    with warnings.catch_warnings():  # torch's first jvp builds its decompositions with the deprecated jit.script
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        return jvp(lambda v: fn(v) / temperature, (x,), (delta,))


def perturbed_kl(teacher_fn: Callable, student_fn: Callable, x: torch.Tensor, delta: torch.Tensor, eta: float,
                 temperature: float = 1.0) -> torch.Tensor:
    r"""$\ell(x + \eta\delta)$ per sample, $\ell = \mathrm{KL}(\mathrm{softmax}(t/\tau)\,\|\,\mathrm{softmax}(s/\tau))$."""
    check_temperature(temperature)
    xt = x + eta * delta
    log_pt = torch.log_softmax(teacher_fn(xt) / temperature, -1)
    log_ps = torch.log_softmax(student_fn(xt) / temperature, -1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def kl_first_order(teacher_fn: Callable, student_fn: Callable, x: torch.Tensor, delta: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    r"""The first-order coefficient of $\ell(x + \eta\delta) = \ell(x) + \eta\,c_1 + O(\eta^2)$,

    $$c_1 = (p_s - p_t)^\top J_s\delta + (\log p_t - \log p_s)^\top F_t J_t \delta,\qquad
      F_t = \mathrm{diag}(p_t) - p_t p_t^\top,$$

    with $J_t\delta, J_s\delta$ the directional derivatives of the tempered logits (``torch.func.jvp``)."""
    t, jt = _tempered_jvp(teacher_fn, x, delta, temperature)
    s, js = _tempered_jvp(student_fn, x, delta, temperature)
    pt, ps = t.softmax(-1), s.softmax(-1)
    ft_jt = pt * jt - pt * (pt * jt).sum(-1, keepdim=True)  # F_t (J_t delta)
    return ((ps - pt) * js).sum(-1) + ((pt.log() - ps.log()) * ft_jt).sum(-1)


def jacobian_matching_penalty(teacher_fn: Callable, student_fn: Callable, x: torch.Tensor, delta: torch.Tensor,
                              temperature: float = 1.0) -> torch.Tensor:
    r"""$\frac12 \Delta^\top F_t \Delta$ with $\Delta = (J_t - J_s)\delta$: where the student matches the
    teacher at $x$, $\ell(x + \eta\delta) = \eta^2 \cdot$ this $+\, O(\eta^3)$ -- KD on perturbed
    inputs is a Fisher-weighted Jacobian-matching penalty along $\delta$."""
    t, jt = _tempered_jvp(teacher_fn, x, delta, temperature)
    _, js = _tempered_jvp(student_fn, x, delta, temperature)
    pt = t.softmax(-1)
    d = jt - js
    return 0.5 * ((pt * d * d).sum(-1) - (pt * d).sum(-1) ** 2)


# -- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def predict_members(
    model: nn.Module,
    data: Dataset,
    split: str = "test",
    *,
    perturbation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 1024,
    amp: bool | str = "auto",
) -> torch.Tensor:
    """Float32 member logits ``[M, N, K]`` of a :class:`DeepEnsemble` or
    :class:`BatchEnsembleResNet` on one split, in order (no augmentation), on the model's device.

    ``perturbation`` (optional) maps a batch of images in $[0, 1]$ to perturbed images in
    $[0, 1]$, e.g. ``lambda u: gaussian_perturb(u)``; the loader's normalisation is undone
    before it and redone after it. The model is put in eval mode and left there.
    """
    device = next(model.parameters()).device
    loader = DeviceLoader.from_dataset(data, split, batch_size, train=False, device=device,
                                       channels_last=device.type == "cuda")
    dtype = _autocast_dtype(device, amp)
    model.eval()
    out = []
    for x, _ in loader:
        if perturbation is not None:
            x = from_unit_range(perturbation(to_unit_range(x, data.mean, data.std).clamp(0, 1)), data.mean, data.std)
        with _autocast(device, dtype):
            out.append(model.member_logits(x).float())
    return torch.cat(out, dim=1)


def ensemble_scores(member_logits: torch.Tensor, targets: torch.Tensor, val_member_logits: torch.Tensor | None = None,
                    val_targets: torch.Tensor | None = None) -> dict[str, float]:
    """The ensemble's ``acc`` (%), ``nll``, ``ece`` (fraction), ``brier`` and, given a
    validation split, ``cnll``: the NLL after temperature scaling fitted on that split, and
    ``temperature``; plus ``diversity``, the mean pairwise KL between members (0 for one)."""
    targets = targets.to(member_logits.device)
    log_p = ensemble_log_probs(member_logits)
    p = log_p.exp()
    out = {"acc": metrics.accuracy(log_p, targets), "nll": metrics.nll(p, targets),
           "ece": metrics.expected_calibration_error(p, targets), "brier": metrics.brier_score(p, targets),
           "diversity": metrics.pairwise_kl(member_logits.softmax(-1)).mean().item() if len(member_logits) > 1 else 0.0}
    if val_member_logits is not None:
        if val_targets is None:
            raise ValueError("val_member_logits given without val_targets")
        temp = metrics.fit_temperature(ensemble_log_probs(val_member_logits), val_targets.to(val_member_logits.device))
        out["temperature"] = temp
        out["cnll"] = metrics.nll((log_p / temp).softmax(-1), targets)
    return out


def ensemble_ladder(member_logits: torch.Tensor, targets: torch.Tensor, val_member_logits: torch.Tensor,
                    val_targets: torch.Tensor) -> dict[str, list[float]]:
    """Deep Ensembles of every size ``l = 1..M`` drawn from the ``M`` members: for each ``l``
    the scores of :func:`ensemble_scores` averaged over all ``C(M, l)`` subsets. Its ``cnll``
    list is the ladder :func:`~minidistill.metrics.deep_ensemble_equivalent` interpolates."""
    m = member_logits.shape[0]
    ladder: dict[str, list[float]] = {"size": []}
    for size in range(1, m + 1):
        runs = [ensemble_scores(member_logits[list(c)], targets, val_member_logits[list(c)], val_targets)
                for c in itertools.combinations(range(m), size)]
        ladder["size"].append(size)
        for k in runs[0]:
            ladder.setdefault(k, []).append(sum(r[k] for r in runs) / len(runs))
    return ladder


def _cell(values: Sequence[float], digits: int, cap: int | None) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) == len(values):
        return format_mean_std(values, digits)
    if not finite:
        return f"> {cap} (n={len(values)})"
    return f"{format_mean_std(finite, digits)}; {len(values) - len(finite)} more runs > {cap}"


_COLUMNS = {"acc": ("ACC (%)", 1.0, 2), "nll": ("NLL", 1.0, 3), "cnll": ("cNLL", 1.0, 3),
            "ece": ("ECE (%)", 100.0, 2), "brier": ("BS", 1.0, 3), "dee": ("DEE", 1.0, 2),
            "diversity": ("diversity", 1.0, 4)}


def metrics_table(rows: Mapping[str, Sequence[Mapping[str, float]]],
                  columns: Sequence[str] = ("acc", "nll", "cnll", "ece", "brier", "dee"),
                  dee_cap: int | None = None) -> str:
    """A Markdown table, one row per method and one column per metric, each cell mean ± std
    over the method's runs (``rows[method]`` is a list of score dicts, one per seed). ECE is
    shown in %. A DEE beyond the largest ensemble measured (``inf``) shows as ``> dee_cap``."""
    unknown = [c for c in columns if c not in _COLUMNS]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; expected some of {sorted(_COLUMNS)}")
    lines = ["| method | " + " | ".join(_COLUMNS[c][0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, runs in rows.items():
        cells = []
        for c in columns:
            vals = [r[c] * _COLUMNS[c][1] for r in runs if c in r]
            cells.append(_cell(vals, _COLUMNS[c][2], dee_cap) if vals else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Reported numbers (quoted, not ours): CIFAR-100, WRN-28x10, DE-4 teacher -> BE-4 student, from
#: the official README of cs-giung/giung2 (projects/Diversity-Matters): the current version
#: (commit bc54f4e) and, for the students, an earlier one (2758d54) -- two runs of the same code.
#: ACC in %, ECE as a fraction. The paper's own CIFAR-10 table and its DEE values were not in the
#: text available to us.
REPORTED = {
    "source": "official README of cs-giung/giung2, CIFAR-100, WRN-28×10 (current version; earlier version in brackets)",
    "rows": {
        "DE-1": {"acc": "80.22", "nll": "0.789", "cnll": "0.789", "ece": "4.2", "brier": "0.282"},
        "DE-4": {"acc": "82.54", "nll": "0.670", "cnll": "0.655", "ece": "3.3", "brier": "0.249"},
        "KD": {"acc": "80.40 [80.35]", "nll": "0.804 [0.818]", "cnll": "0.750 [0.787]", "ece": "7.2 [7.0]",
               "brier": "0.286 [0.286]"},
        "KD + Gaussian": {"acc": "80.04 [80.36]", "nll": "0.816 [0.837]", "cnll": "0.760 [0.802]",
                          "ece": "7.5 [7.2]", "brier": "0.288 [0.290]"},
        "KD + ODS": {"acc": "81.92 [81.84]", "nll": "0.685 [0.690]", "cnll": "0.682 [0.687]", "ece": "2.6 [2.8]",
                     "brier": "0.258 [0.258]"},
        "KD + ConfODS": {"acc": "82.25 [81.89]", "nll": "0.670 [0.690]", "cnll": "0.665 [0.688]",
                         "ece": "2.3 [3.2]", "brier": "0.253 [0.259]"},
    },
}


# -- the idea, in one dimension -----------------------------------------------------------------


def toy_ensemble_1d(size: int = 4, steps: int = 200, seed: int = 0) -> dict[str, torch.Tensor]:
    """The chapter's opening picture: ``size`` small MLPs (float64, CPU) fitted to eight labelled
    points on a line, trained together as a :class:`DeepEnsemble` (full-batch Adam).

    Returns ``x_train``, ``y_train``, a ``grid`` of 401 points on [-4, 4], the members'
    class-1 probabilities there (``probs`` ``[M, 401, 2]``) and their diversity
    :func:`~minidistill.metrics.pairwise_kl` on the grid (``diversity``) and at the training
    points (``diversity_train``).
    """
    x_train = torch.tensor([-3.0, -2.6, -1.0, -0.6, 0.6, 1.0, 2.6, 3.0], dtype=torch.float64).unsqueeze(1)
    y_train = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    members = []
    for j in range(size):
        seed_everything(seed + j)
        members.append(nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2)).double())
    ensemble = DeepEnsemble(members).train()
    opt = torch.optim.Adam(ensemble.parameters(), lr=0.02)
    objective = EnsembleCrossEntropy()
    for _ in range(steps):
        loss, _ = objective(ensemble, x_train, y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        probs = ensemble.member_logits(grid).softmax(-1)
        probs_train = ensemble.member_logits(x_train).softmax(-1)
    return {"x_train": x_train.squeeze(1), "y_train": y_train, "grid": grid.squeeze(1), "probs": probs,
            "diversity": metrics.pairwise_kl(probs), "diversity_train": metrics.pairwise_kl(probs_train),
            "train_acc": (probs_train.argmax(-1) == y_train).double().mean(-1)}


def plot_toy_ensemble(toy: Mapping[str, torch.Tensor], title: str = "Members agree on the training points, not between them"):
    """Top: each member's probability of class 1 along the line, with the training points.
    Bottom: the members' pairwise KL (log scale), with the training inputs marked."""
    fig, (ax, ax_d) = plt.subplots(2, 1, figsize=(5.2, 3.4), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for j in range(toy["probs"].shape[0]):
        ax.plot(toy["grid"].numpy(), toy["probs"][j, :, 1].numpy(), lw=1.2, label=f"member {j + 1}")
    for c, marker in ((0, "o"), (1, "s")):
        sel = toy["y_train"] == c
        ax.scatter(toy["x_train"][sel].numpy(), torch.full((int(sel.sum()),), float(c)).numpy(), marker=marker,
                   color="k", zorder=3, label=f"training points, class {c}")
    ax.set_ylabel("p(class 1 | x)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax_d.semilogy(toy["grid"].numpy(), toy["diversity"].clamp_min(1e-12).numpy(), color="C4", label="pairwise KL d(x)")
    for x in toy["x_train"].tolist():
        ax_d.axvline(x, color="k", lw=0.6, ls=":")
    ax_d.set_xlabel("input x")
    ax_d.set_ylabel("members' diversity")
    ax_d.legend(fontsize=7)
    for a in (ax, ax_d):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# -- figures -----------------------------------------------------------------------------------


def plot_diversity_by_confidence(member_probs: Mapping[str, torch.Tensor], n_bins: int = 10,
                                 title: str = "Members' diversity by the ensemble's confidence",
                                 show_counts: bool = True):
    """The paper's Figure 3 idea: for each ``{label: member_probs [M, N, K]}``, the mean pairwise
    KL between members per confidence bin (log scale) and, with ``show_counts``, the inputs per
    bin in a second panel. Labels get the count-weighted mean diversity appended."""
    if not member_probs:
        raise ValueError("member_probs must map at least one label to [M, N, K] probabilities")
    if show_counts:
        fig, (ax, ax_n) = plt.subplots(1, 2, figsize=(7.6, 2.9))
    else:
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
    for i, (label, probs) in enumerate(member_probs.items()):
        c = metrics.diversity_by_confidence(probs, n_bins)
        ok = c["count"] > 0
        centres = ((c["edges"][:-1] + c["edges"][1:]) / 2)
        ax.plot(centres[ok].numpy(), c["diversity"][ok].clamp_min(1e-8).numpy(), "o-", ms=3, color=f"C{i}",
                label=f"{label} (mean {c['mean'].item():.3g})")
        if show_counts:
            ax_n.plot(centres[ok].numpy(), c["count"][ok].numpy(), "o-", ms=3, color=f"C{i}", label=label)
    axes = [ax]
    ax.set_yscale("log")
    ax.set_ylabel("mean pairwise KL")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6)
    if show_counts:
        ax_n.set_yscale("log")
        ax_n.set_ylabel("inputs per bin")
        ax_n.set_title("Inputs in each bin", fontsize=10)
        axes.append(ax_n)
    for a in axes:
        a.set_xlabel("ensemble confidence (max mean prob.)")
        a.set_xlim(0, 1)
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_perturbation(image: torch.Tensor, perturbed: Mapping[str, torch.Tensor],
                      member_probs: Mapping[str, torch.Tensor], class_names: Sequence[str],
                      title: str | None = None):
    """One image in $[0, 1]$ ``[C, H, W]``, its perturbed versions ``{label: [C, H, W]}`` and, for
    each label (``'clean'`` included), the members' probabilities ``[M, K]``: a row of images, a
    row of the perturbations (amplified to the full grey range), and a row of bars (the clean
    image's top 4 classes, one bar per member) titled with the members' mean pairwise KL."""
    labels = ["clean", *perturbed]
    missing = [lb for lb in labels if lb not in member_probs]
    if missing:
        raise ValueError(f"member_probs lacks {missing}; give [M, K] probabilities for 'clean' and every perturbed image")
    images = {"clean": image, **perturbed}
    top = member_probs["clean"].mean(0).topk(min(4, len(class_names))).indices
    fig, axes = plt.subplots(3, len(labels), figsize=(1.9 * len(labels), 4.8), squeeze=False)
    for col, lb in enumerate(labels):
        img = images[lb].detach().cpu().float()
        axes[0, col].imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[0, col].set_title(lb, fontsize=9)
        diff = (img - image.detach().cpu().float()).mean(0)
        scale = diff.abs().max().item()
        axes[1, col].imshow(diff.numpy(), cmap="coolwarm", vmin=-max(scale, 1e-12), vmax=max(scale, 1e-12),
                           interpolation="nearest")
        rms = (img - image.detach().cpu().float()).pow(2).mean().sqrt().item()
        axes[1, col].set_title(f"change (RMS {rms * 255:.2f}/255)", fontsize=8)
        for a in axes[:2, col]:
            a.set_xticks([])
            a.set_yticks([])
        probs = member_probs[lb].detach().cpu().float()
        m = probs.shape[0]
        width = 0.8 / m
        for j in range(m):
            axes[2, col].bar(torch.arange(len(top)).numpy() + (j - (m - 1) / 2) * width, probs[j, top].numpy(), width,
                             label=f"member {j + 1}", color=f"C{j}")
        div = metrics.pairwise_kl(probs.unsqueeze(1).double()).item() if m > 1 else 0.0
        axes[2, col].set_xticks(range(len(top)), [class_names[k] for k in top.tolist()], rotation=30, ha="right", fontsize=8)
        axes[2, col].set_ylim(0, 1)
        axes[2, col].set_title(f"members' probabilities\n(pairwise KL {div:.2g})", fontsize=8)
        if col == 0:
            axes[2, col].set_ylabel("probability")
            axes[2, col].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- self-checks for the exercises -------------------------------------------------------------
# Each prints a line starting with a tick when the answer is right, says "not attempted yet"
# while the exercise still raises NotImplementedError, and raises an AssertionError with a
# hint naming the classic mistake when it is wrong.



def _be_linear_reference(x, weight, r, s, bias):
    m = r.shape[0]
    xb = x.view(m, -1, x.shape[-1])
    return ((xb * r[:, None]) @ weight.T * s[:, None] + bias[:, None]).flatten(0, 1)


def check_batch_ensemble_linear(fn: Callable) -> None:
    """Exercise 1: ``fn(x, weight, r, s, bias)`` with ``x`` ``[M*B, in]`` (M consecutive blocks),
    ``weight`` ``[out, in]``, ``r`` ``[M, in]``, ``s`` ``[M, out]``, ``bias`` ``[M, out]`` must
    return the BatchEnsemble layer's output ``[M*B, out]``."""
    g = torch.Generator().manual_seed(5)
    m, b, n_in, n_out = 3, 4, 5, 6
    args = [torch.randn(m * b, n_in, generator=g, dtype=torch.float64), torch.randn(n_out, n_in, generator=g, dtype=torch.float64),
            1 + 0.5 * torch.randn(m, n_in, generator=g, dtype=torch.float64),
            1 + 0.5 * torch.randn(m, n_out, generator=g, dtype=torch.float64), torch.randn(m, n_out, generator=g, dtype=torch.float64)]
    x, weight, r, s, bias = args
    want = _be_linear_reference(x, weight, r, s, bias)
    try:
        if not attempted(fn, *[a.clone() for a in args]):
            return
        got = fn(*[a.clone() for a in args])
    except RuntimeError as e:
        raise AssertionError(f"your function failed ({e}); r scales the *inputs* ([M, in]) and s the *outputs* "
                             "([M, out]): y = ((x * r_j) W^T) * s_j + b_j") from e
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise AssertionError(f"expected a tensor of shape {tuple(want.shape)} (one row per input row), got "
                             f"{tuple(getattr(got, 'shape', ()))}")
    inter = x.view(b, m, n_in).transpose(0, 1).reshape(m * b, n_in)  # rows as if interleaved
    interleaved = _be_linear_reference(inter, weight, r, s, bias).view(m, b, n_out).transpose(0, 1).reshape(m * b, n_out)
    if torch.allclose(got.double(), interleaved, atol=1e-8):
        raise AssertionError("the batch holds M consecutive blocks of B rows (row i belongs to member i // B), "
                             "not interleaved rows (member i % M)")
    if torch.allclose(got.double(), _be_linear_reference(x, weight, r, s, bias[:1].expand_as(bias)), atol=1e-8) or \
            torch.allclose(got.double(), _be_linear_reference(x, weight, r, s, torch.zeros_like(bias)), atol=1e-8):
        raise AssertionError("each member has its own bias b_j: add bias[j] to block j")
    if not torch.allclose(got.double(), want, atol=1e-8):
        raise AssertionError("values differ: member j's weight is W * (s_j r_j^T), i.e. scale the inputs by r_j, "
                             "multiply by W^T, then scale the outputs by s_j")
    print("✓ BatchEnsemble linear layer: correct")


def check_ods_step(fn: Callable) -> None:
    """Exercise 2: ``fn(x, grad, eta)`` with images ``x`` in [0, 1] ``[N, C, H, W]`` and the
    ODS gradient ``grad`` (not yet normalised) must return the perturbed images the official
    code trains on."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)
    grad = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(4, 1, 1, 1)
    eta = 8 / 255
    if not attempted(fn, x.clone(), grad.clone(), eta):
        return
    d = x[0].numel()
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    want = (x + eta * math.sqrt(d) * unit).clamp(0, 1)
    got = fn(x.clone(), grad.clone(), eta)
    if not isinstance(got, torch.Tensor) or got.shape != x.shape:
        raise AssertionError(f"expected a tensor of the images' shape {tuple(x.shape)}")
    if torch.allclose(got, (x + eta * unit).clamp(0, 1), atol=1e-9):
        raise AssertionError(f"a unit step moves each pixel by eta/sqrt(D), {math.sqrt(d):.0f} times less than intended "
                             "here: scale the unit direction by sqrt(D), D = values per image")
    batch_unit = grad / grad.norm()
    if torch.allclose(got, (x + eta * math.sqrt(d) * batch_unit).clamp(0, 1), atol=1e-9) or \
            torch.allclose(got, (x + eta * math.sqrt(x.numel()) * batch_unit).clamp(0, 1), atol=1e-9):
        raise AssertionError("normalise each sample's gradient on its own (norm over dims 1..3), not the whole batch")
    if torch.allclose(got, x + eta * math.sqrt(d) * unit, atol=1e-9):
        raise AssertionError("clip the result to [0, 1]: the perturbed images must stay valid images")
    if not torch.allclose(got, want, atol=1e-9):
        raise AssertionError("values differ: x_tilde = clip(x + eta * sqrt(D) * grad / ||grad||_2, 0, 1), per sample")
    print("✓ ODS step: correct")


def check_pairwise_kl(fn: Callable) -> None:
    """Exercise 3: ``fn(member_probs)`` with ``[M, N, K]`` probabilities must return each input's
    mean KL over ordered pairs of distinct members, ``[N]``."""
    g = torch.Generator().manual_seed(7)
    probs = (2 * torch.randn(4, 6, 5, generator=g, dtype=torch.float64)).softmax(-1)
    if not attempted(fn, probs.clone()):
        return
    got = fn(probs.clone())
    want = metrics.pairwise_kl(probs)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise AssertionError(f"expected one value per input, shape {tuple(want.shape)}, got {tuple(getattr(got, 'shape', ()))}")
    got = got.double()
    m = probs.shape[0]
    if torch.allclose(got, want * (m - 1) / m, rtol=1e-6):
        raise AssertionError("you averaged over all M^2 pairs; the i = j pairs are zero and do not count: "
                             "divide by M(M-1)")
    mean = probs.mean(0)
    to_mean = (probs * (probs.log() - mean.log())).sum(-1).mean(0)
    if torch.allclose(got, to_mean, rtol=1e-6):
        raise AssertionError("that is the members' mean KL to the ensemble mean, another measure; "
                             "compare every member with every other member")
    if not torch.allclose(got, want, rtol=1e-6, atol=1e-12):
        raise AssertionError("values differ: d(x) = 1/(M(M-1)) * sum over i != j of KL(p_j || p_i)")
    print("✓ pairwise KL diversity: correct")
