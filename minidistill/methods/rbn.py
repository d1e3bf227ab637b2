r"""Representative Batch Normalization (Gao, Han, Li, Cheng, Peng, CVPR 2021).

RBN is BatchNorm with two cheap *feature calibrations* that bring in instance statistics:

.. math::

    K_m &= \mathrm{GAP}(X) \quad\text{(per example and channel: the instance mean)}\\
    X_{cm} &= X + w_m \odot K_m \quad\text{(centering calibration)}\\
    X_s &= \frac{X_{cm} - \mathrm E[X_{cm}]}{\sqrt{\mathrm{Var}[X_{cm}] + \epsilon}}
          \quad\text{(BN: batch statistics in training, running ones in eval)}\\
    X_{cs} &= X_s \cdot \mathrm{sigmoid}(w_v \odot K_s + w_b),\quad K_s = \mathrm{GAP}(X_s)
          \quad\text{(scaling calibration)}\\
    Y &= \gamma X_{cs} + \beta

with three extra parameters per channel, initialised as in the official code: $w_m = 0$,
$w_v = 0$, $w_b = 1$. The gate therefore starts at $\mathrm{sigmoid}(1) \approx 0.731$: RBN is *not*
BatchNorm at initialisation. Unlike the official code, the input tensor is never modified in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minidistill import models
from minidistill.exercises.rbn import check_centering, check_eval_form, check_gate_variance  # noqa: F401

__all__ = [
    "RepresentativeBatchNorm2d", "swap_batchnorm", "create_rbn_model", "norm_layers",
    "channel_mean_spread", "initial_gate", "NORMS",
    "check_centering", "check_gate_variance", "check_eval_form",
]


class RepresentativeBatchNorm2d(nn.BatchNorm2d):
    r"""A drop-in replacement for :class:`torch.nn.BatchNorm2d` with RBN's calibrations.

    It keeps BatchNorm2d's parameters (``weight`` = $\gamma$, ``bias`` = $\beta$) and buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``), so a BatchNorm2d's state loads
    into it, and adds ``center_weight`` ($w_m$), ``scale_weight`` ($w_v$) and ``scale_bias``
    ($w_b$), each of shape ``[C]``. ``scaling=False`` removes the sigmoid gate (centering only).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, scaling: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        kw = dict(device=device, dtype=dtype)
        self.scaling = scaling
        self.center_weight = nn.Parameter(torch.zeros(num_features, **kw))   # w_m
        self.scale_weight = nn.Parameter(torch.zeros(num_features, **kw))    # w_v
        self.scale_bias = nn.Parameter(torch.ones(num_features, **kw))       # w_b

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"RepresentativeBatchNorm2d expects input [N, C, H, W], got {got}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"RepresentativeBatchNorm2d({self.num_features}) got an input with "
                             f"{x.shape[1]} channels (shape {tuple(x.shape)})")

    def _factor(self) -> float:
        """BatchNorm2d's running-average factor (momentum, or a cumulative mean when None)."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """BN's standardisation without the affine: batch statistics in training (updating the
        running ones), running statistics in eval."""
        use_batch = self.training or not self.track_running_stats
        # running_mean/var are None when track_running_stats=False: then batch statistics always
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, use_batch, self._factor(), self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = x + self.center_weight.view(1, -1, 1, 1) * x.mean((2, 3), keepdim=True)   # X_cm (not in place)
        x = self.standardise(x)                                                       # X_s (chapter: X-hat)
        if self.scaling:
            k_s = x.mean((2, 3), keepdim=True)                                        # K_s (chapter: mu-hat)
            x = x * torch.sigmoid(self.scale_weight.view(1, -1, 1, 1) * k_s + self.scale_bias.view(1, -1, 1, 1))
        if self.affine:
            x = x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return x

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scaling={self.scaling}"


def swap_batchnorm(model: nn.Module, *, scaling: bool = True) -> nn.Module:
    """Replace every :class:`torch.nn.BatchNorm2d` in ``model`` (in place) by a
    :class:`RepresentativeBatchNorm2d` with the same settings, parameters and running statistics;
    return ``model``. Layers that already are RBN are left alone."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.BatchNorm2d:
        raise TypeError("swap_batchnorm replaces the BatchNorm2d layers inside a model; wrap a lone layer first")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.BatchNorm2d:
                continue
            p = child.weight if child.affine else child.running_mean
            rbn = RepresentativeBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats, scaling=scaling,
                                            device=p.device if p is not None else None,
                                            dtype=p.dtype if p is not None else None)
            rbn.load_state_dict(child.state_dict(), strict=False)
            rbn.train(child.training)
            setattr(parent, name, rbn)
    return model


#: the normalisations a model can be built with
NORMS = ("bn", "rbn")


def create_rbn_model(name: str, num_classes: int, norm: str = "rbn") -> nn.Module:
    """``models.create_model(name, num_classes)`` with every BatchNorm2d swapped for RBN
    (``norm="rbn"``) or left alone (``norm="bn"``)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    model = models.create_model(name, num_classes)
    return swap_batchnorm(model) if norm == "rbn" else model


def norm_layers(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """The model's BatchNorm2d and RBN layers by name (RBN derives from BatchNorm2d)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@torch.no_grad()
def channel_mean_spread(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    r"""For each normalisation layer, the standard deviation over channels of the channel means of
    its output, averaged over the examples of ``x``: $\frac1N\sum_n \mathrm{std}_c\,\mathrm{GAP}(Y)_{n,c}$.

    The paper plots this spread to show that the scaling calibration evens out channel intensities.
    The model is run as it is (train or eval mode; in train mode running statistics change)."""
    spreads: dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in norm_layers(model).items():
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor, name: str = name) -> None:
            spreads[name] = out.float().mean((2, 3)).std(1).mean()
        hooks.append(layer.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return {k: float(v) for k, v in spreads.items()}


def initial_gate() -> float:
    r"""The scaling gate at initialisation, $\mathrm{sigmoid}(w_v K_s + w_b)$ with $w_v=0$, $w_b=1$."""
    return float(torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)))


