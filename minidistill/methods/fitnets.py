r"""Chapter 3 -- Romero, Ballas, Kahou, Chassang, Gatta & Bengio (ICLR 2015), "FitNets: Hints
for Thin Deep Nets".

A *hint* is the output $f^t_h(x)$ of a hidden layer $h$ of the teacher (the paper's $u_h$);
the *guided layer* $g$ of a thinner, deeper student, with output $f^s_g(x)$ (the paper's
$v_g$), learns to predict it through a small regressor $r$:

$$\mathcal L_\mathrm{HT} = \tfrac12\,\big\|f^t_h(x) - r\big(f^s_g(x)\big)\big\|^2 .$$

(Symbols as in the course's notation page: $u$ and $v$ there are the uniform distribution and
the teacher's logits, so the paper's $u_h$, $v_g$ are renamed; $T$ is the paper's $\tau$.)
Training follows the paper's Algorithm 1: stage 1 trains the student up to the guided layer
(plus $r$) on the hint loss alone; stage 2 trains the whole student with the FitNets KD loss
(temperature $T = 3$, *no* $T^2$ factor, teacher weight $\lambda$ decaying linearly from
4 towards 1, as in the official code ``adri-romsor/FitNets``). Both stages are
:func:`minidistill.train.fit` with an objective (:class:`~minidistill.losses.TeacherObjective`):
:class:`HintObjective` owns the regressor and trains a truncated student
(:func:`student_trunk`), :class:`FitNetsKD` is stage 2. Features are read with
:func:`minidistill.models.feature_extractor` (forward hooks); no model class is edited.
The one-stage variant (hint + KD in one run, as RepDistiller runs FitNets) is
:class:`minidistill.losses.FeatureDistillation` (``train_student("one-stage", ...)``, with
Hinton's $\alpha$ from :func:`equivalent_alpha`).

The chapter's figures live in :mod:`minidistill.methods.fitnets_plots` and the exercises'
self-checks in :mod:`minidistill.exercises.fitnets`; both are re-exported here.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..exercises import fitnets as _checks
from ..exercises.fitnets import check_fitnets_kd_loss, check_hint_loss, check_kernel_size
from ..losses import (FeatureDistillation, TeacherObjective, check_logits_pair, check_temperature, soft_targets, upcast,
                      warn_if_probabilities)
from ..models import PlainCNN, feature_extractor, feature_shapes
from ..runtime import seed_everything
from ..train import History, Recipe, TrainingDiverged, fit, train_model
from . import fitnets_plots as _plots
from .fitnets_plots import (channel_maps, conv_layers, hint_r2, plot_budget, plot_hint_diagram, plot_hint_maps,
                            plot_kd_balance, plot_training, soft_term_balance)

__all__ = [
    "regressor_kernel_size",
    "regressor_parameters",
    "HintRegressor",
    "hint_loss",
    "fitnets_kd_loss",
    "kd_weight",
    "short_schedule",
    "equivalent_alpha",
    "feature_shape",
    "student_trunk",
    "HintObjective",
    "FitNetsKD",
    "FitNetRun",
    "train_fitnet",
    "train_student",
    "METHODS",
    "plain_cnn_multiplications",
    "count_multiplications",
    "width_for_budget",
    # re-exported: the figures (methods/fitnets_plots.py) and the self-checks (exercises/fitnets.py)
    *_plots.__all__,
    *_checks.__all__,
]

Size = int | Sequence[int]


def _pair(size: Size, name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in pair):
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of them, got {size!r}")
    return pair  # type: ignore[return-value]


# -- the regressor ---------------------------------------------------------------------------

def regressor_kernel_size(student_size: Size, teacher_size: Size) -> tuple[int, int]:
    r"""Kernel of the valid (no padding, stride 1) convolution that maps the student's guided
    map of $S_{g,1}\times S_{g,2}$ positions onto the teacher's hint map of $S_{h,1}\times S_{h,2}$:
    $k_i = S_{g,i} - S_{h,i} + 1$ (the paper writes the map sizes $N_{g,i}$, $N_{h,i}$; $N$ is
    the batch size in this course).

    Raises ``ValueError`` when the teacher's map is larger in either direction: a valid
    convolution can only shrink a map.
    """
    g, h = _pair(student_size, "student_size"), _pair(teacher_size, "teacher_size")
    if g[0] < h[0] or g[1] < h[1]:
        raise ValueError(
            f"the teacher's hint map {h[0]}x{h[1]} is larger than the student's guided map {g[0]}x{g[1]}: "
            "a valid convolution can only shrink a map. Guide an earlier (larger) student layer or hint "
            "with a later (smaller) teacher layer; RepDistiller upsamples with a transposed convolution "
            "instead, which the paper does not do")
    return g[0] - h[0] + 1, g[1] - h[1] + 1


def regressor_parameters(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> dict[str, int]:
    r"""Weights of a fully connected and of a convolutional regressor (biases left out, as in
    the paper's count) between a guided map ``(C_g, S_g1, S_g2)`` and a hint map
    ``(C_h, S_h1, S_h2)``, channels first:

    * fully connected: $S_{h,1} S_{h,2} C_h \times S_{g,1} S_{g,2} C_g$;
    * convolutional: $k_1 k_2 C_g C_h$ with $k_i = S_{g,i} - S_{h,i} + 1$.

    These are the weight counts of ``nn.Linear(S_g1 * S_g2 * C_g, S_h1 * S_h2 * C_h)`` and of
    :class:`HintRegressor`'s convolution (the chapter checks both against the real modules).
    """
    if len(student_shape) != 3 or len(teacher_shape) != 3:
        raise ValueError(f"shapes must be (channels, height, width), got {tuple(student_shape)} and {tuple(teacher_shape)}")
    og, g1, g2 = (int(v) for v in student_shape)
    oh, h1, h2 = (int(v) for v in teacher_shape)
    k1, k2 = regressor_kernel_size((g1, g2), (h1, h2))
    return {"fully_connected": g1 * g2 * og * h1 * h2 * oh, "convolutional": k1 * k2 * og * oh,
            "kernel": (k1, k2)}


class HintRegressor(nn.Module):
    r"""The FitNets regressor $r$: a valid convolution from the student's guided-layer
    features ``[N, student_channels, S_g1, S_g2]`` to the teacher's hint shape
    ``[N, teacher_channels, S_h1, S_h2]``, followed by the hint layer's non-linearity.

    Args:
        student_channels, teacher_channels: $C_g$ and $C_h$ (the paper's $O_g$, $O_h$).
        student_size, teacher_size: the maps' spatial sizes (an int or ``(h, w)``); the kernel
            is $S_g - S_h + 1$ (:func:`regressor_kernel_size`). Leave both out when the maps
            have the same size (a 1x1 convolution).
        activation: ``"relu"`` (default: the hint is a ReLU output, as are the stage outputs
            of every model in :mod:`minidistill.models`) or ``None`` for a linear regressor.

    Use :meth:`from_models` to read the shapes off two models.
    """

    def __init__(self, student_channels: int, teacher_channels: int, student_size: Size | None = None,
                 teacher_size: Size | None = None, *, activation: str | None = "relu") -> None:
        super().__init__()
        for name, c in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if not isinstance(c, int) or isinstance(c, bool) or c < 1:
                raise ValueError(f"{name} must be a positive int, got {c!r}")
        if (student_size is None) != (teacher_size is None):
            raise ValueError("give both student_size and teacher_size, or neither (same-size maps, 1x1 kernel)")
        if activation not in ("relu", None):
            raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
        if student_size is None:
            kernel, self.student_size = (1, 1), None
        else:
            kernel, self.student_size = regressor_kernel_size(student_size, teacher_size), _pair(student_size, "student_size")
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel, stride=1, padding=0)
        self.act = nn.ReLU() if activation == "relu" else nn.Identity()

    @classmethod
    def from_models(cls, student: nn.Module, guided: str, teacher: nn.Module, hint: str,
                    image_shape: Sequence[int], **kwargs) -> "HintRegressor":
        """A regressor sized by one forward pass of a dummy image of ``image_shape`` ``(C, H, W)``
        through both models; take the shape from the data, ``tuple(data.x_train.shape[1:])``."""
        s, t = feature_shape(student, guided, image_shape), feature_shape(teacher, hint, image_shape)
        if len(s) != 3 or len(t) != 3:
            raise ValueError(f"the guided ({guided!r}: {s}) and hint ({hint!r}: {t}) features must both be "
                             "convolutional maps (channels, height, width)")
        return cls(s[0], t[0], tuple(s[1:]), tuple(t[1:]), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.student_channels or (
                self.student_size is not None and tuple(x.shape[2:]) != self.student_size):
            want = f"[N, {self.student_channels}, " + (
                "H, W]" if self.student_size is None else f"{self.student_size[0]}, {self.student_size[1]}]")
            raise ValueError(f"HintRegressor expects guided features {want}, got {tuple(x.shape)}")
        return self.act(self.conv(x))

    def extra_repr(self) -> str:
        return f"guided {self.student_channels} ch -> hint {self.teacher_channels} ch, kernel {tuple(self.conv.kernel_size)}"


def hint_loss(regressed_student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    r"""The hint loss $\mathcal L_\mathrm{HT} = \frac12\,\|f^t_h(x) - r(f^s_g(x))\|^2$, the
    paper's equation: the squared error is **summed over every feature** (channels and
    positions) of an example and **averaged over the batch**,
    $\frac1N\sum_n \frac12 \sum_{c,i,j} (f_{n,c,i,j} - r_{n,c,i,j})^2$ with $f = f^t_h(x)$.

    The official ``HintCost`` does exactly this only for a fully connected regressor (a flat
    hint). For a convolutional regressor it sums over ``axis=1`` of the 4-D map and averages
    over the other three axes, the batch included. In the CIFAR configs' maxout layers, laid
    out ``('c', 0, 1, 'b')``, axis 1 is the map's rows, so its value is this loss divided by
    $C_h S_{h,2}$ (channels times columns); in a ``('b', 'c', 0, 1)`` layout axis 1 would be the
    channels and the divisor $S_{h,1} S_{h,2}$. A constant factor either way, and the official
    code trains with RMSProp, which ignores it. :class:`HintObjective` minimises this
    loss divided by the number of hint features, and logs it undivided. The teacher's features
    are a target (detached). Computed in float32 under mixed precision.
    """
    if regressed_student_features.shape != teacher_features.shape or regressed_student_features.ndim < 2:
        raise ValueError(
            "the regressed student features and the teacher's hint must have the same shape [N, ...], got "
            f"{tuple(regressed_student_features.shape)} and {tuple(teacher_features.shape)} "
            "(map the guided features with a HintRegressor first)")
    r = upcast(regressed_student_features)
    u = upcast(teacher_features.detach()).to(r.dtype)
    return 0.5 * (u - r).pow(2).flatten(1).sum(1).mean()


# -- the stage-2 KD loss ---------------------------------------------------------------------

def _fitnets_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                   temperature: float, check_inputs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of :func:`fitnets_kd_loss`: the label cross-entropy and the soft one."""
    check_logits_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    if targets.ndim != 1 or len(targets) != len(student_logits) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 class indices [{len(student_logits)}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if check_inputs:
        warn_if_probabilities(teacher_logits, "teacher_logits")
        warn_if_probabilities(student_logits, "student_logits")
    z = upcast(student_logits)
    p_teacher = soft_targets(teacher_logits.detach().to(z.dtype), temperature)
    soft = -(p_teacher * F.log_softmax(z / temperature, dim=-1)).sum(-1).mean()
    return F.cross_entropy(z, targets), soft


def fitnets_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 3.0, kd_weight: float = 4.0, *, check_inputs: bool = True) -> torch.Tensor:
    r"""FitNets' stage-2 loss, as in the official code (``KDCost``):

    $$\mathcal L_\mathrm{FitNets} = H\big(q, p^s\big) + \lambda\, H\big(p^t_T, p^s_T\big),
      \qquad p^s_T = \mathrm{softmax}(z/T),\ p^t_T = \mathrm{softmax}(v/T),$$

    batch means of cross-entropies, **without** Hinton's $T^2$ factor (the paper calls this
    whole loss $\mathcal L_\mathrm{KD}$ and writes $\tau$ for $T$). The soft term is a
    cross-entropy, so it is the KL plus the teacher's entropy: the same gradient, a larger value.
    ``check_inputs`` warns when the logits look like probabilities (a host sync:
    :class:`FitNetsKD` checks on its first step only).
    """
    if not (isinstance(kd_weight, (int, float)) and kd_weight >= 0):
        raise ValueError(f"kd_weight must be a number >= 0, got {kd_weight!r}")
    ce, soft = _fitnets_terms(student_logits, teacher_logits, targets, temperature, check_inputs)
    return ce + kd_weight * soft


def kd_weight(epoch: int, *, initial: float = 4.0, final: float = 1.0, start: int = 5, saturate: int = 400) -> float:
    r"""The teacher weight $\lambda$ used **during epoch** ``epoch``, counting epochs from 1, as
    the official ``TeacherDecayOverEpoch`` sets it: ``initial`` while ``epoch < start``, then
    down by $(\lambda_0 - \lambda_f)/(\text{saturate} - \text{start} + 1)$ per epoch, ``final``
    from ``saturate`` on (never below 0). Defaults: the CIFAR configs (4 -> 1, start 5,
    saturate 400).

    Why "during epoch ``epoch``": the extension counts its ``on_monitor`` calls, and pylearn2
    calls ``on_monitor`` once before the first epoch and once after each, so the count is 1
    while the first epoch trains. ``epoch=0`` gives the value set before that first call,
    which no step trains with. :class:`FitNetsKD` reads ``kd_weight(self.epoch + 1)``
    (``fit``'s epochs count from 0).
    """
    if not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    if not 0 <= start < saturate:
        raise ValueError(f"need 0 <= start < saturate, got start={start!r}, saturate={saturate!r}")
    if epoch < start:
        value = initial
    elif epoch < saturate:
        value = initial - (initial - final) / (saturate - start + 1) * (epoch - start + 1)
    else:
        value = final
    return max(float(value), 0.0)


# -- feature access and the two objectives ----------------------------------------------------

def feature_shape(model: nn.Module, name: str, image_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape (without the batch) of feature ``name`` of ``model`` for one image of
    ``image_shape`` ``(C, H, W)`` -- take it from the data, ``tuple(data.x_train.shape[1:])``
    (:func:`minidistill.models.feature_shapes`; the model's mode is left as it was)."""
    return feature_shapes(model, [name], image_shape)[name]


class _Trunk(nn.Module):
    """The student's forward up to ``guided``, holding only the top-level stages up to the one
    that contains it (so its parameters, optimiser and checkpoint are the trunk's alone)."""

    #: a guided layer inside a stage leaves the rest of that stage without gradients (for fit under torchrun)
    unused_parameters = True

    def __init__(self, student: nn.Module, guided: str) -> None:
        super().__init__()
        extractor = feature_extractor(student, [guided])  # validates the name
        names = [n for n, _ in student.named_children()]
        top = guided.split(".")[0]
        if top not in names:
            raise ValueError(f"guided must name a layer inside one of the student's stages {names}, got {guided!r}")
        self.stages = nn.ModuleDict({n: m for n, m in student.named_children() if names.index(n) <= names.index(top)})
        self._extract = [extractor]  # in a list: the student is not a submodule (its later stages are not ours)
        self.guided = guided

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._extract[0](x)[self.guided]


def student_trunk(student: nn.Module, guided: str) -> nn.Module:
    """The student up to and including its guided layer, as a module returning that layer's
    features. It shares the student's parameters (training it trains the student); it holds
    only the stages up to the guided layer, and its forward stops there (the feature
    extractor's hook ends the student's forward after the guided layer)."""
    return _Trunk(student, guided)


class HintObjective(TeacherObjective):
    r"""Stage 1 of Algorithm 1 as an objective for :func:`~minidistill.train.fit`: the model
    is the student's trunk (:func:`student_trunk`), the loss :func:`hint_loss` between
    ``regressor(model(x))`` and the frozen teacher's layer ``hint``. No labels are used, and
    there is no classifier yet: it returns ``logits=None`` (so ``fit`` records no training
    accuracy) and logs the term ``hint``, the paper's $\mathcal L_\mathrm{HT}$ (summed over an
    example's features). The objective owns ``regressor``, so ``fit`` trains it too.

    With ``normalize=True`` the loss minimised is $\mathcal L_\mathrm{HT}$ divided by the number
    of hint features per example ($C_h S_{h,1} S_{h,2}$): a per-feature squared error, halved,
    which is ``0.5 * F.mse_loss(regressed, hint)``. Same minimiser, gradient scaled by a
    constant. The official code used RMSProp, which does not care about the loss's scale; with
    SGD, the summed loss would need a learning rate thousands of times smaller than the course
    recipe's.
    """

    def __init__(self, teacher: nn.Module, hint: str, regressor: HintRegressor, normalize: bool = True) -> None:
        super().__init__(teacher)
        self.hint, self.regressor, self.normalize = hint, regressor, normalize
        self._hint = [feature_extractor(self.teacher, [hint])]  # a list: the teacher is registered once

    def setup(self, model: nn.Module, example: torch.Tensor, **kwargs) -> None:
        super().setup(model, example, **kwargs)
        self._hint = [feature_extractor(self._fast[0], [self.hint])]  # the copy cast once for autocast

    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's hint $u_h(x)$ (no gradients; its forward stops after the hint layer)."""
        with torch.no_grad():
            return self._hint[0](x)[self.hint]

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None):
        target = self.teacher_forward(x)
        hint = hint_loss(self.regressor(model(x)), target)
        loss = hint / target[0].numel() if self.normalize else hint
        return loss, None, {"hint": hint.detach()}


class FitNetsKD(TeacherObjective):
    r"""Stage 2 as an objective: :func:`fitnets_kd_loss` with the teacher weight $\lambda$ of
    the official schedule, ``kd_weight(self.epoch + 1)`` during ``fit``'s epoch ``self.epoch``
    (counted from 0, :func:`kd_weight` counts from 1). It reads the epoch that ``fit`` sets,
    so a resumed run continues the schedule where it stopped. ``start`` and ``saturate`` are
    epochs, as in :func:`kd_weight`; leave them ``None`` to compress the decay into the run
    (:func:`short_schedule` of the run's epochs): $\lambda$ = ``initial`` in the first epoch,
    ``final`` in the last.

    Terms logged: ``ce`` (label cross-entropy), ``kd`` (the soft cross-entropy
    $H(p^t_T, p^s_T)$, unweighted) and ``weight`` ($\lambda$ of the epoch).
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 3.0, initial: float = 4.0, final: float = 1.0,
                 start: int | None = None, saturate: int | None = None) -> None:
        super().__init__(teacher)
        check_temperature(temperature)
        if (start is None) != (saturate is None):
            raise ValueError("give both start and saturate, or neither (decay over the whole run)")
        if start is not None:
            kd_weight(0, initial=initial, final=final, start=start, saturate=saturate)  # validates the schedule
        self.temperature, self.initial, self.final, self.start, self.saturate = temperature, initial, final, start, saturate

    @property
    def weight(self) -> float:
        r"""The teacher weight $\lambda$ of the current epoch (``self.epoch``, set by ``fit``)."""
        if self.start is None:
            schedule = short_schedule(max(self.total_steps // max(self.steps_per_epoch, 1), 1))
        else:
            schedule = {"start": self.start, "saturate": self.saturate}
        return kd_weight(self.epoch + 1, initial=self.initial, final=self.final, **schedule)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        teacher_logits = self.teacher_forward(x)
        logits = model(x)
        weight = self.weight
        ce, kd = _fitnets_terms(logits, teacher_logits, y, self.temperature, check_inputs=self.step == 0)
        loss = ce + weight * kd
        return loss, logits, {"ce": ce.detach(), "kd": kd.detach(), "weight": torch.full((), weight, device=ce.device)}


# -- Algorithm 1 ------------------------------------------------------------------------------

@dataclasses.dataclass
class FitNetRun:
    """What :func:`train_fitnet` returns: the trained ``student``, the stage-1 ``regressor``
    (discarded by the method; kept for inspection), both stages' histories, and a CPU copy of
    the student's weights right after stage 1 (``after_hints``, to look at what the hints did).
    :func:`train_student` returns one for every method (``regressor``: the one-stage variant's
    :class:`~minidistill.losses.FeatureRegressor`, or ``None``)."""

    student: nn.Module
    regressor: nn.Module | None
    hint_history: History | None
    history: History
    after_hints: dict[str, torch.Tensor] | None = None


def short_schedule(epochs: int) -> dict[str, int]:
    """``start`` and ``saturate`` for :func:`kd_weight` that compress the official schedule
    into a run of ``epochs``: the weight is ``initial`` during epoch 1 and ``final`` during
    epoch ``epochs``, linear in between (for runs of 3 epochs or more; a 2-epoch run gets
    ``initial`` and the midpoint)."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    return {"start": 2, "saturate": max(epochs, 3)}


def equivalent_alpha(kd_weight: float, temperature: float) -> float:
    r"""Hinton's $\alpha$ whose loss has the same balance between the label term and the soft
    term as FitNets' loss with weight $\lambda$ = ``kd_weight`` at temperature $T$:

    $$\alpha = \frac{\lambda}{\lambda + T^2}, \qquad
      (1-\alpha)\,\nabla\mathcal L_\mathrm{FitNets} = \nabla\big[(1-\alpha)\,H(q, p^s)
      + \alpha\,T^2\,\mathrm{KL}(p^t_T \,\|\, p^s_T)\big],$$

    since $\nabla H(p^t_T, p^s_T) = \nabla \mathrm{KL}(p^t_T \| p^s_T)$ and
    $\alpha T^2 = (1-\alpha)\lambda$. The two losses then differ by the factor $1-\alpha$ (a
    learning-rate scale), not in direction. Used for the one-stage variant, which is built on
    Hinton's loss (:class:`~minidistill.losses.FeatureDistillation`).
    """
    if not (isinstance(kd_weight, (int, float)) and kd_weight >= 0 and math.isfinite(kd_weight)):
        raise ValueError(f"kd_weight must be a finite number >= 0, got {kd_weight!r}")
    check_temperature(temperature)
    return kd_weight / (kd_weight + temperature**2)


def train_fitnet(
    student: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    *,
    guided: str = "layer2",
    hint: str = "layer2",
    hint_recipe: Recipe,
    recipe: Recipe,
    seed: int = 0,
    temperature: float = 3.0,
    initial_weight: float = 4.0,
    final_weight: float = 1.0,
    normalize: bool = True,
    label: str = "FitNet",
    **fit_kwargs,
) -> FitNetRun:
    """Algorithm 1 of the paper, in place on ``student``: two calls of :func:`~minidistill.train.fit`.

    Stage 1 trains the student's layers up to ``guided`` and a :class:`HintRegressor` (sized
    for ``data``'s images) on the hint loss against the teacher's layer ``hint``
    (``hint_recipe``; training split only, no labels, nothing scored). Stage 2 trains the whole
    student with :class:`FitNetsKD` (``recipe``), the teacher weight decaying linearly from
    ``initial_weight`` at the first epoch to ``final_weight`` at the last. The teacher is never
    updated. Other keyword arguments go to both ``fit`` calls; a ``checkpoint`` path is used by
    stage 2, and stage 1 writes next to it (``<name>-hints<suffix>``), so both stages resume.
    """
    image_shape = tuple(data.x_train.shape[1:])
    with torch.random.fork_rng(devices=[]):  # the regressor's initial weights depend on the seed only
        torch.manual_seed(seed)
        regressor = HintRegressor.from_models(student, guided, teacher, hint, image_shape)
    hint_kwargs = {**fit_kwargs, "eval_splits": ()}
    if fit_kwargs.get("checkpoint") is not None:
        path = Path(fit_kwargs["checkpoint"])
        hint_kwargs["checkpoint"] = path.with_name(f"{path.stem}-hints{path.suffix}")
    hint_history = fit(student_trunk(student, guided), data, HintObjective(teacher, hint, regressor, normalize),
                       hint_recipe, seed=seed, description=f"{label}, stage 1 (hints)", **hint_kwargs)
    hint_history.meta["stage"] = "hints"
    after_hints = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    objective = FitNetsKD(teacher, temperature=temperature, initial=initial_weight, final=final_weight)
    history = fit(student, data, objective, recipe, seed=seed, description=f"{label}, stage 2 (KD)", **fit_kwargs)
    history.meta["stage"] = "kd"
    return FitNetRun(student, regressor.eval(), hint_history, history, after_hints)


#: the methods :func:`train_student` knows
METHODS = ("alone", "KD", "FitNet", "one-stage")


def train_student(
    method: str,
    make_student: Callable[[], nn.Module],
    teacher: nn.Module | None,
    data: Dataset,
    *,
    recipe: Recipe,
    hint_recipe: Recipe | None = None,
    seed: int = 0,
    guided: str = "layer2",
    hint: str = "layer2",
    temperature: float = 3.0,
    hint_weight: float = 100.0,
    alpha: float | None = None,
    catch_divergence: bool = True,
    **fit_kwargs,
) -> FitNetRun:
    r"""Train a fresh student (``make_student()`` right after seeding with ``seed``) by
    ``method``:

    * ``"alone"``: cross-entropy;
    * ``"KD"``: :class:`FitNetsKD`, the paper's KD baseline (same loss and schedule as stage 2,
      no hints); give it a longer ``recipe`` for a baseline of equal compute;
    * ``"FitNet"``: the paper's two stages (:func:`train_fitnet`, needs ``hint_recipe``);
    * ``"one-stage"``: hint and KD together in one run, as RepDistiller runs FitNets:
      :class:`~minidistill.losses.FeatureDistillation` between the student's ``guided`` and
      the teacher's ``hint`` layer, with hint weight ``hint_weight`` ($\beta$; default 100,
      RepDistiller's ``-b 100``), ``temperature`` and Hinton's ``alpha`` (default
      :func:`equivalent_alpha` of $\lambda = 2.5$, the mean weight of FitNets' schedule
      4 -> 1, so that the soft term weighs what it weighs in the KD baseline, on average).

    Same seed, same initial weights and data order for every method
    (:func:`~minidistill.train.train_model`). Other keyword arguments go to ``fit``
    (``eval_every=None`` for runs whose curves are not plotted, say).

    Returns a :class:`FitNetRun` (``regressor`` and ``hint_history`` are ``None`` unless
    ``"FitNet"``; for ``"one-stage"`` ``regressor`` is the objective's trained regressor).
    With ``catch_divergence`` a run whose loss blows up is reported
    (``history.meta['diverged']``, NaN accuracy) instead of stopping the notebook: failing to
    train is a result here.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if method != "alone" and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher")
    if method == "FitNet" and hint_recipe is None:
        raise ValueError("method 'FitNet' needs hint_recipe (the stage-1 schedule)")
    built: list[nn.Module] = []

    def build() -> nn.Module:
        built.append(make_student())
        return built[-1]

    label = f"{method}, seed {seed}"
    try:
        if method == "FitNet":
            seed_everything(seed)  # as train_model does: the same start as the other methods
            return train_fitnet(build(), teacher, data, guided=guided, hint=hint, hint_recipe=hint_recipe,
                                recipe=recipe, seed=seed, temperature=temperature, label=label, **fit_kwargs)
        if method == "one-stage":
            alpha = equivalent_alpha(2.5, temperature) if alpha is None else alpha
            objective = FeatureDistillation(teacher, layers=(guided, hint), weight=hint_weight,
                                            temperature=temperature, alpha=alpha)
        else:
            objective = FitNetsKD(teacher, temperature=temperature) if method == "KD" else None
        student, history = train_model(build, data, recipe, objective, seed=seed, description=label, **fit_kwargs)
        regressor = objective.regressor.eval() if method == "one-stage" else None
        return FitNetRun(student, regressor, None, history)
    except TrainingDiverged as e:
        if not catch_divergence:
            raise
        nan = float("nan")
        record = {"epoch": recipe.epochs, "lr": nan, "train_loss": nan, "train_acc": nan,
                  "test_loss": nan, "test_acc": nan, "seconds": nan}
        return FitNetRun(built[-1].eval(), None, None,
                         History([record], {"diverged": str(e), "method": method, "seed": seed}))


# -- multiplications and the budget experiment ------------------------------------------------

def plain_cnn_multiplications(depth: int, widths: Sequence[int], image_size: int = 32, num_classes: int = 10) -> int:
    r"""Multiply-accumulates of one forward pass of :class:`~minidistill.models.PlainCNN`,
    counted as the official ``computeNumberMult.py`` does: convolutions
    ($H W k^2 C_\mathrm{in} C_\mathrm{out}$) and the classifier, not biases, BatchNorm or pooling."""
    if not isinstance(depth, int) or depth < 4 or len(widths) != 3:
        raise ValueError(f"need depth >= 4 and three widths, got depth={depth!r}, widths={widths!r}")
    w1, w2, w3 = widths
    n1, n2, n3 = PlainCNN.convs_per_stage(depth)
    s1, s2, s3 = image_size, image_size // 2, image_size // 4
    total = s1 * s1 * 9 * 3 * w1 + n1 * s1 * s1 * 9 * w1 * w1
    total += s2 * s2 * 9 * (w1 * w2 + (n2 - 1) * w2 * w2)
    total += s3 * s3 * 9 * (w2 * w3 + (n3 - 1) * w3 * w3)
    return total + w3 * num_classes


def count_multiplications(model: nn.Module, image_shape: Sequence[int] = (3, 32, 32)) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on one image, measured with
    ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; it counts
    2 FLOPs per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    param = next(model.parameters())
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model.eval()(torch.zeros(1, *image_shape, device=param.device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def width_for_budget(depth: int, budget: int, image_size: int = 32, num_classes: int = 10,
                     multipliers: Sequence[int] = (1, 2, 4)) -> int:
    """The base width ``w`` of a :class:`~minidistill.models.PlainCNN` of ``depth`` conv layers
    and widths ``w * multipliers`` whose multiplication count comes closest to ``budget``."""
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int (multiply-accumulates), got {budget!r}")
    best, best_gap = 1, math.inf
    for w in range(1, 513):
        macs = plain_cnn_multiplications(depth, [w * m for m in multipliers], image_size, num_classes)
        if abs(macs - budget) < best_gap:
            best, best_gap = w, abs(macs - budget)
        if macs > budget:
            break
    return best
