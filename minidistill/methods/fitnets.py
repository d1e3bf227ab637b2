r"""Chapter 3 -- Romero, Ballas, Kahou, Chassang, Gatta & Bengio (ICLR 2015), "FitNets: Hints
for Thin Deep Nets".

A *hint* is the output $u_h(x)$ of a hidden layer $h$ of the teacher; the *guided layer* $g$
of a thinner, deeper student learns to predict it through a small regressor $r$:

$$\mathcal L_\mathrm{HT} = \tfrac12\,\big\|u_h(x) - r\big(v_g(x)\big)\big\|^2 .$$

Training follows the paper's Algorithm 1: stage 1 trains the student up to the guided layer
(plus $r$) on the hint loss alone; stage 2 trains the whole student with the FitNets KD loss
(temperature $\tau = 3$, *no* $\tau^2$ factor, teacher weight $\lambda$ decaying linearly from
4 towards 1, as in the official code ``adri-romsor/FitNets``). Both stages are
:func:`minidistill.train.fit` with an objective: :class:`HintObjective` owns the regressor
and trains a truncated student (:func:`student_trunk`), :class:`FitNetsKD` is stage 2.
Features are read with :func:`minidistill.models.feature_extractor`; no model class is edited.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..losses import _upcast, check_logits_pair, check_temperature, soft_targets
from ..models import PlainCNN, feature_extractor
from ..runtime import attempted, seed_everything
from ..train import History, Recipe, TrainingDiverged, fit

__all__ = [
    "regressor_kernel_size",
    "regressor_parameters",
    "HintRegressor",
    "hint_loss",
    "fitnets_kd_loss",
    "kd_weight",
    "short_schedule",
    "feature_shape",
    "student_trunk",
    "HintObjective",
    "FitNetsKD",
    "FitNetRun",
    "train_fitnet",
    "train_student",
    "plain_cnn_multiplications",
    "count_multiplications",
    "width_for_budget",
    "plot_budget",
    "conv_layers",
    "plot_hint_diagram",
    "soft_term_balance",
    "plot_kd_balance",
    "channel_maps",
    "hint_r2",
    "plot_hint_maps",
    "check_kernel_size",
    "check_hint_loss",
    "check_fitnets_kd_loss",
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
    map $N_{g,1}\times N_{g,2}$ onto the teacher's hint map $N_{h,1}\times N_{h,2}$:
    $k_i = N_{g,i} - N_{h,i} + 1$.

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
    the paper's count) between a guided map ``(O_g, N_g1, N_g2)`` and a hint map
    ``(O_h, N_h1, N_h2)``, channels first:

    * fully connected: $N_{h,1} N_{h,2} O_h \times N_{g,1} N_{g,2} O_g$;
    * convolutional: $k_1 k_2 O_g O_h$ with $k_i = N_{g,i} - N_{h,i} + 1$.
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
    features ``[N, student_channels, N_g1, N_g2]`` to the teacher's hint shape
    ``[N, teacher_channels, N_h1, N_h2]``, followed by the hint layer's non-linearity.

    Args:
        student_channels, teacher_channels: $O_g$ and $O_h$.
        student_size, teacher_size: the maps' spatial sizes (an int or ``(h, w)``); the kernel
            is $N_g - N_h + 1$ (:func:`regressor_kernel_size`). Leave both out when the maps
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
                    image_shape: Sequence[int] = (3, 32, 32), **kwargs) -> "HintRegressor":
        """A regressor sized by one forward pass of a dummy image through both models."""
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
    r"""The hint loss $\mathcal L_\mathrm{HT} = \frac12\,\|u_h(x) - r(v_g(x))\|^2$.

    Averaged as in the official code: the squared error is **summed over every feature**
    (channels and positions) of an example and **averaged over the batch**,
    $\frac1N\sum_n \frac12 \sum_{c,i,j} (u_{n,c,i,j} - r_{n,c,i,j})^2$. The teacher's features
    are a target (detached). Computed in float32 under mixed precision.
    """
    if regressed_student_features.shape != teacher_features.shape or regressed_student_features.ndim < 2:
        raise ValueError(
            "the regressed student features and the teacher's hint must have the same shape [N, ...], got "
            f"{tuple(regressed_student_features.shape)} and {tuple(teacher_features.shape)} "
            "(map the guided features with a HintRegressor first)")
    r = _upcast(regressed_student_features)
    u = _upcast(teacher_features.detach()).to(r.dtype)
    return 0.5 * (u - r).pow(2).flatten(1).sum(1).mean()


# -- the stage-2 KD loss ---------------------------------------------------------------------

def fitnets_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 3.0, kd_weight: float = 4.0) -> torch.Tensor:
    r"""FitNets' stage-2 loss, as in the official code (``KDCost``):

    $$\mathcal L_\mathrm{KD} = H\big(y, \mathrm{softmax}(z)\big)
      + \lambda\, H\big(\mathrm{softmax}(v/\tau), \mathrm{softmax}(z/\tau)\big),$$

    batch means of cross-entropies, **without** Hinton's $\tau^2$ factor. (The soft term is a
    cross-entropy, so it is the KL plus the teacher's entropy: the same gradient, a larger value.)
    """
    check_logits_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    if not (isinstance(kd_weight, (int, float)) and kd_weight >= 0):
        raise ValueError(f"kd_weight must be a number >= 0, got {kd_weight!r}")
    if targets.ndim != 1 or len(targets) != len(student_logits) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 class indices [{len(student_logits)}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    z = _upcast(student_logits)
    p_teacher = soft_targets(teacher_logits.detach().to(z.dtype), temperature)
    soft = -(p_teacher * F.log_softmax(z / temperature, dim=-1)).sum(-1).mean()
    return F.cross_entropy(z, targets) + kd_weight * soft


def kd_weight(epoch: int, *, initial: float = 4.0, final: float = 1.0, start: int = 5, saturate: int = 400) -> float:
    r"""The teacher weight $\lambda$ after ``epoch`` finished epochs, as the official
    ``TeacherDecayOverEpoch`` sets it: ``initial`` until ``start``, then down by
    $(\lambda_0 - \lambda_f)/(\text{saturate} - \text{start} + 1)$ per epoch, ``final`` from
    ``saturate`` on (never below 0). Defaults: the CIFAR configs (4 -> 1, epochs 5 to 400).
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

@torch.no_grad()
def feature_shape(model: nn.Module, name: str, image_shape: Sequence[int] = (3, 32, 32)) -> tuple[int, ...]:
    """Shape (without the batch) of feature ``name`` of ``model`` for one image of ``image_shape``,
    from a forward pass on the CPU-or-wherever ``model`` lives; the model's mode is restored."""
    was_training = model.training
    param = next(model.parameters(), None)
    x = torch.zeros(2, *image_shape, device=param.device if param is not None else "cpu")
    try:
        out = feature_extractor(model, [name]).eval()(x)[name]
    finally:
        model.train(was_training)
    return tuple(out.shape[1:])


class _Trunk(nn.Module):
    def __init__(self, extractor: nn.Module, name: str) -> None:
        super().__init__()
        self.extractor, self.name = extractor, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)[self.name]


def student_trunk(student: nn.Module, guided: str) -> nn.Module:
    """The student up to and including its guided layer, as a module returning that layer's
    features. It shares the student's parameters (training it trains the student) and holds
    nothing after the guided layer: torchvision's FX extractor drops the unused rest."""
    return _Trunk(feature_extractor(student, [guided]), guided)


class _FrozenTeacher(nn.Module):
    def train(self, mode: bool = True) -> "_FrozenTeacher":
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm statistics never move
        return self


class HintObjective(_FrozenTeacher):
    r"""Stage 1 of Algorithm 1 as an objective for :func:`~minidistill.train.fit`: the model
    is the student's trunk (:func:`student_trunk`), the loss :func:`hint_loss` between
    ``regressor(model(x))`` and the frozen teacher's layer ``hint`` (eval mode, no grad).
    No labels are used. The objective owns ``regressor``, so ``fit`` trains it too.

    With ``normalize=True`` the loss is divided by the number of hint features per example
    ($O_h N_{h,1} N_{h,2}$): a per-feature mean squared error (halved). The official code used
    RMSProp, which does not care about the loss's scale; with SGD, the summed loss would need a
    learning rate thousands of times smaller than the course recipe's.

    The second return value has no meaning here (there is no classifier yet): it is a
    ``[N, 1]`` tensor of zeros, so ``fit``'s training accuracy is meaningless for stage 1
    and :func:`train_fitnet` drops it.
    """

    def __init__(self, teacher: nn.Module, hint: str, regressor: HintRegressor, normalize: bool = True) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_features = feature_extractor(self.teacher, [hint])
        self.hint, self.regressor, self.normalize = hint, regressor, normalize

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            target = self.teacher_features(x)[self.hint]
        loss = hint_loss(self.regressor(model(x)), target)
        if self.normalize:
            loss = loss / target[0].numel()
        return loss, torch.zeros(len(x), 1, device=x.device)


class FitNetsKD(_FrozenTeacher):
    r"""Stage 2 as an objective: :func:`fitnets_kd_loss` with the teacher weight of
    :func:`kd_weight`, which moves once per epoch. The objective counts its own training
    calls, so it must see every step of one run in order (one ``fit`` call, not resumed).

    ``steps_per_epoch`` is the number of optimiser steps per epoch (``len(train) //
    batch_size``); ``start`` and ``saturate`` are epochs, as in :func:`kd_weight`.
    """

    def __init__(self, teacher: nn.Module, steps_per_epoch: int, *, temperature: float = 3.0,
                 initial: float = 4.0, final: float = 1.0, start: int = 0, saturate: int = 1) -> None:
        super().__init__()
        check_temperature(temperature)
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
        kd_weight(0, initial=initial, final=final, start=start, saturate=saturate)  # validates the schedule
        self.teacher = teacher.eval().requires_grad_(False)
        self.steps_per_epoch, self.temperature = steps_per_epoch, temperature
        self.schedule = dict(initial=initial, final=final, start=start, saturate=saturate)
        self.steps = 0

    @property
    def weight(self) -> float:
        """The teacher weight $\\lambda$ of the current step's epoch."""
        return kd_weight(self.steps // self.steps_per_epoch, **self.schedule)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        logits = model(x)
        loss = fitnets_kd_loss(logits, teacher_logits, y, self.temperature, self.weight)
        if self.training:
            self.steps += 1
        return loss, logits


# -- Algorithm 1 ------------------------------------------------------------------------------

@dataclasses.dataclass
class FitNetRun:
    """What :func:`train_fitnet` returns: the trained ``student``, the stage-1 ``regressor``
    (discarded by the method; kept for inspection), both stages' histories, and a CPU copy of
    the student's weights right after stage 1 (``after_hints``, to look at what the hints did)."""

    student: nn.Module
    regressor: HintRegressor | None
    hint_history: History | None
    history: History
    after_hints: dict[str, torch.Tensor] | None = None


def short_schedule(epochs: int) -> dict[str, int]:
    """``start`` and ``saturate`` for :func:`kd_weight` that compress the official schedule
    into a run of ``epochs``: the weight is ``initial`` in the first epoch and ``final`` in the
    last, linear in between (for runs of 3 epochs or more)."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    return {"start": 1, "saturate": max(epochs - 1, 2)}


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
    """Algorithm 1 of the paper, in place on ``student``.

    Stage 1 trains the student's layers up to ``guided`` and a :class:`HintRegressor` on the
    hint loss against the teacher's layer ``hint`` (``hint_recipe``; training split only, no
    labels). Stage 2 trains the whole student with :class:`FitNetsKD` (``recipe``), the
    teacher weight decaying linearly from ``initial_weight`` at the first epoch to
    ``final_weight`` at the last. The teacher is never updated.
    """
    with torch.random.fork_rng(devices=[]):  # the regressor's initial weights depend on the seed only
        torch.manual_seed(seed)
        regressor = HintRegressor.from_models(student, guided, teacher, hint, tuple(data.x_train.shape[1:]))
    trunk = student_trunk(student, guided)
    hint_history = fit(trunk, data, HintObjective(teacher, hint, regressor, normalize), hint_recipe, seed=seed,
                       eval_splits=(), description=f"{label}, stage 1 (hints)", **fit_kwargs)
    for record in hint_history.records:
        record.pop("train_acc", None)
    hint_history.meta["stage"] = "hints"
    after_hints = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    objective = FitNetsKD(teacher, len(data.x_train) // recipe.batch_size, temperature=temperature,
                          initial=initial_weight, final=final_weight, **short_schedule(recipe.epochs))
    history = fit(student, data, objective, recipe, seed=seed, description=f"{label}, stage 2 (KD)", **fit_kwargs)
    history.meta["stage"] = "kd"
    return FitNetRun(student, regressor.eval(), hint_history, history, after_hints)


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
    catch_divergence: bool = True,
    **fit_kwargs,
) -> FitNetRun:
    """Train a fresh student (``make_student()`` right after seeding with ``seed``) by
    ``method``: ``"alone"`` (cross-entropy), ``"KD"`` (:class:`FitNetsKD`, the paper's KD
    baseline: same loss and schedule as stage 2, no hints) or ``"FitNet"``
    (:func:`train_fitnet`). Same seed, same initial weights and data order for every method.

    Returns a :class:`FitNetRun` (``regressor`` and ``hint_history`` are ``None`` unless
    ``"FitNet"``). With ``catch_divergence`` a run whose loss blows up is reported
    (``history.meta['diverged']``, NaN accuracy) instead of stopping the notebook: failing to
    train is a result here.
    """
    if method not in ("alone", "KD", "FitNet"):
        raise ValueError(f"method must be 'alone', 'KD' or 'FitNet', got {method!r}")
    if method != "alone" and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher")
    if method == "FitNet" and hint_recipe is None:
        raise ValueError("method 'FitNet' needs hint_recipe (the stage-1 schedule)")
    seed_everything(seed)
    student = make_student()
    label = f"{method}, seed {seed}"
    try:
        if method == "FitNet":
            return train_fitnet(student, teacher, data, guided=guided, hint=hint, hint_recipe=hint_recipe,
                                recipe=recipe, seed=seed, temperature=temperature, label=label, **fit_kwargs)
        objective = None
        if method == "KD":
            objective = FitNetsKD(teacher, len(data.x_train) // recipe.batch_size, temperature=temperature,
                                  **short_schedule(recipe.epochs))
        history = fit(student, data, objective, recipe, seed=seed, description=label, **fit_kwargs)
        return FitNetRun(student, None, None, history)
    except TrainingDiverged as e:
        if not catch_divergence:
            raise
        nan = float("nan")
        record = {"epoch": recipe.epochs, "lr": nan, "train_loss": nan, "train_acc": nan,
                  "test_loss": nan, "test_acc": nan, "seconds": nan}
        return FitNetRun(student.eval(), None, None, History([record], {"diverged": str(e), "method": method, "seed": seed}))


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


def plot_budget(depths: Sequence[int], accuracies: dict[str, Sequence[float]], budget: int,
                title: str | None = None, ax=None):
    """Test accuracy against depth for students of (about) the same multiplication count,
    one line per training method (``{method: [accuracy per depth]}``); NaN marks a run that
    diverged. Returns the figure."""
    import matplotlib.pyplot as plt

    if any(len(v) != len(depths) for v in accuracies.values()):
        raise ValueError(f"every method needs one accuracy per depth ({len(depths)})")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3.4))
    for i, (method, acc) in enumerate(accuracies.items()):
        ax.plot(list(depths), list(acc), "o-", color=f"C{i}", label=method)
    ax.set_xticks(list(depths))
    ax.set_xlabel("conv layers (width shrinks to keep the budget)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or f"Students of about {budget / 1e6:.0f}M multiplications")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def conv_layers(model: nn.Module) -> list[tuple[str, int]]:
    """``(name, output channels)`` of every 2-D convolution of ``model`` in registration
    (forward) order, shortcut projections left out: the layers a diagram shows."""
    return [(name, m.out_channels) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and "shortcut" not in name]


def plot_hint_diagram(teacher_widths: Sequence[int], student_widths: Sequence[int], hint: int, guided: int,
                      title: str = "Hint training: the guided layer learns to predict the hint"):
    """The FitNets picture: one bar per conv layer (height ~ channels), the wide shallow
    teacher above the thin deep student; the student's layers up to ``guided`` (0-based
    index), which stage 1 trains, are shaded, and an arrow runs from the teacher's layer
    ``hint`` through the regressor to the guided layer. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    if not (0 <= hint < len(teacher_widths) and 0 <= guided < len(student_widths)):
        raise ValueError(f"hint must index a teacher layer (0..{len(teacher_widths) - 1}) and guided a student "
                         f"layer (0..{len(student_widths) - 1}), got hint={hint}, guided={guided}")
    top = max(max(teacher_widths), max(student_widths))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    n = max(len(teacher_widths), len(student_widths))
    xs_t, xs_s = {}, {}
    for row, widths, y0, xs in (("teacher", teacher_widths, 2.2, xs_t), ("student", student_widths, 0.0, xs_s)):
        step = n / len(widths)
        for i, w in enumerate(widths):
            h = 0.25 + 1.3 * w / top
            x = i * step + 0.1
            if row == "teacher":
                color = "C1" if i == hint else "0.75"
            else:
                color = "C0" if i == guided else ("#9ecae1" if i < guided else "0.85")
            ax.add_patch(Rectangle((x, y0 + (1.6 - h) / 2), 0.8 * step, h, color=color, ec="k", lw=0.5))
            xs[i] = (x + 0.4 * step, y0 + (1.6 + h) / 2, y0 + (1.6 - h) / 2)
        ax.text(-0.3, y0 + 0.8, f"{row}\n{len(widths)} conv\n{min(widths)}-{max(widths)} ch", ha="right",
                va="center", fontsize=8)
    (xt, _, yt_bottom), (xg, yg_top, _) = xs_t[hint], xs_s[guided]
    ax.add_patch(FancyArrowPatch((xg, yg_top), (xt, yt_bottom), arrowstyle="<|-|>", mutation_scale=12, color="C3", lw=1.5))
    ax.text((xt + xg) / 2 + 0.2, (yg_top + yt_bottom) / 2, r"$\frac{1}{2}\|u_h(x) - r(v_g(x))\|^2$", color="C3",
            fontsize=10, va="center")
    ax.set_xlim(-2.2, n + 0.3)
    ax.set_ylim(-0.2, 4.0)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    handles = [Rectangle((0, 0), 1, 1, color=c, ec="k", lw=0.5) for c in ("C1", "C0", "#9ecae1")]
    ax.legend(handles, ["hint layer h", "guided layer g", "also trained in stage 1"], fontsize=8,
              loc="upper right", ncol=3, frameon=False, bbox_to_anchor=(1.0, 1.02))
    fig.tight_layout()
    return fig


# -- the balance of the two stage-2 terms -----------------------------------------------------

def soft_term_balance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperatures: Sequence[float]) -> dict[str, list[float]]:
    r"""For each $\tau$: the norm of the gradient (w.r.t. the student logits) of the soft term
    $H(p^\tau_T, p^\tau_S)$ divided by that of the label term $H(y, p_S)$, without the
    $\tau^2$ factor (``'fitnets'``) and with it (``'hinton'``). Multiply by a weight
    $\lambda$ to read the soft term's share of the update. Computed in float64."""
    check_logits_pair(student_logits, teacher_logits)
    z0 = student_logits.detach().double()
    z = z0.clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z, targets), z)
    out: dict[str, list[float]] = {"temperature": [], "fitnets": [], "hinton": []}
    for t in temperatures:
        z = z0.clone().requires_grad_(True)
        soft = fitnets_kd_loss(z, teacher_logits.double(), targets, t, 1.0) - F.cross_entropy(z, targets)
        (g,) = torch.autograd.grad(soft, z)
        ratio = (g.norm() / g_ce.norm()).item()
        out["temperature"].append(float(t))
        out["fitnets"].append(ratio)
        out["hinton"].append(ratio * t**2)
    return out


def plot_kd_balance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                    weight: float = 4.0, temperature: float = 3.0,
                    temperatures: Sequence[float] = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 20), ax=None):
    r"""How strongly the soft term pulls, relative to the label term, as $\tau$ grows: the
    gradient-norm ratio of :func:`soft_term_balance` times ``weight``, for FitNets' term (no
    $\tau^2$) and Hinton's ($\tau^2$), with ``temperature`` marked. Returns the figure."""
    import matplotlib.pyplot as plt

    b = soft_term_balance(student_logits, teacher_logits, targets, temperatures)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.2, 3.4))
    ax.loglog(b["temperature"], [weight * r for r in b["fitnets"]], "o-", label=rf"FitNets: $\lambda\,H$ (no $\tau^2$)")
    ax.loglog(b["temperature"], [weight * r for r in b["hinton"]], "s-", label=rf"Hinton: $\lambda\,\tau^2\,$KL")
    ax.axvline(temperature, color="k", ls=":", lw=1, label=rf"$\tau$ = {temperature:g}")
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="as strong as the label term")
    ax.set_xlabel(r"temperature $\tau$")
    ax.set_ylabel("soft / label gradient norm")
    ax.set_title(rf"Pull of the soft term at weight $\lambda$ = {weight:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# -- what the hint does to the guided layer ----------------------------------------------------

def channel_maps(features: torch.Tensor) -> torch.Tensor:
    """Channel-averaged maps ``[N, H, W]`` of features ``[N, C, H, W]``, each scaled to [0, 1]
    (a constant map becomes 0), so that maps of different layers can be shown side by side."""
    if features.ndim != 4:
        raise ValueError(f"features must be [N, C, H, W], got {tuple(features.shape)}")
    m = features.detach().float().mean(1)
    lo = m.flatten(1).min(1).values.view(-1, 1, 1)
    hi = m.flatten(1).max(1).values.view(-1, 1, 1)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def hint_r2(student_features: torch.Tensor, teacher_features: torch.Tensor, holdout: float = 0.5,
            ridge: float = 1e-6) -> float:
    r"""How well the hint can be predicted from the guided features by the best linear 1x1
    map (least squares with a bias, fitted on the first ``1 - holdout`` of the examples):
    the coefficient of determination $R^2 = 1 - \mathrm{SSE}/\mathrm{SST}$ on the held-out
    examples. 1 is perfect, 0 is no better than the mean hint. Needs maps of the same spatial
    size; computed in float64 on the CPU."""
    if student_features.ndim != 4 or teacher_features.ndim != 4 or \
            student_features.shape[0] != teacher_features.shape[0] or \
            student_features.shape[2:] != teacher_features.shape[2:]:
        raise ValueError("need features [N, C_s, H, W] and [N, C_t, H, W] (same N, H, W), got "
                         f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}")
    n = student_features.shape[0]
    n_fit = int(round(n * (1 - holdout)))
    if not (0 < holdout < 1 and 0 < n_fit < n):
        raise ValueError(f"holdout must leave examples on both sides (N={n}), got {holdout!r}")

    def rows(f: torch.Tensor) -> torch.Tensor:
        return f.detach().cpu().double().permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1])

    v, u = rows(student_features), rows(teacher_features)
    x = torch.cat([v, torch.ones(*v.shape[:2], 1, dtype=v.dtype)], -1)
    x_fit, u_fit = x[:n_fit].flatten(0, 1), u[:n_fit].flatten(0, 1)
    x_test, u_test = x[n_fit:].flatten(0, 1), u[n_fit:].flatten(0, 1)
    gram = x_fit.T @ x_fit
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram, x_fit.T @ u_fit)
    sse = (u_test - x_test @ w).pow(2).sum()
    sst = (u_test - u_test.mean(0)).pow(2).sum()
    return float(1 - sse / sst) if sst > 0 else float("nan")


def plot_hint_maps(images: torch.Tensor, rows: dict[str, torch.Tensor], title: str = "What the hint does"):
    """A grid: the input images on top, then one row of channel-averaged maps
    (:func:`channel_maps`) per entry of ``rows`` (``{label: features [N, C, H, W]}``)."""
    import matplotlib.pyplot as plt

    n = len(images)
    if any(len(f) != n for f in rows.values()):
        raise ValueError(f"every row needs {n} feature maps, one per image")
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.25 * n + 1.6, 1.3 * (1 + len(rows))), squeeze=False)
    imgs = images.detach().float().cpu()
    imgs = (imgs - imgs.amin((1, 2, 3), keepdim=True)) / (imgs.amax((1, 2, 3), keepdim=True) - imgs.amin((1, 2, 3), keepdim=True)).clamp_min(1e-12)
    for j in range(n):
        axes[0, j].imshow(imgs[j].permute(1, 2, 0).numpy())
    for i, (label, feats) in enumerate(rows.items(), start=1):
        maps = channel_maps(feats).cpu()
        for j in range(n):
            axes[i, j].imshow(maps[j].numpy(), cmap="viridis", vmin=0, vmax=1)
    for i, label in enumerate(["input", *rows]):
        axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# -- self-checks for the exercises ----------------------------------------------------------
# Each check prints a line starting with a tick when the answer is right, says "not attempted
# yet" while the exercise still raises NotImplementedError, and raises an AssertionError with a
# hint that names the classic mistake when the answer is wrong.


def check_kernel_size(fn: Callable[[int, int], int]) -> None:
    """Exercise 1: ``fn(student_size, teacher_size)`` -> the kernel of the valid convolution
    that maps the guided map onto the hint map; it must raise ``ValueError`` when the teacher's
    map is larger."""
    if not attempted(fn, 32, 16):
        return
    for g, h in ((32, 16), (16, 16), (16, 8), (8, 1), (10, 4)):
        got = fn(g, h)
        if isinstance(got, (tuple, list)) and len(got) == 2 and got[0] == got[1]:
            got = got[0]  # a square kernel given as (k, k) is fine
        want = g - h + 1
        if got == h - g + 1 and g != h:
            raise AssertionError("sign: the kernel shrinks the *student's* map, k = N_g - N_h + 1, not N_h - N_g + 1")
        if got == g - h:
            raise AssertionError(f"off by one for {g} -> {h}: a valid convolution with kernel k maps N to N - k + 1")
        if got != want:
            raise AssertionError(f"for a {g}x{g} guided map and a {h}x{h} hint the kernel is {want}, got {got!r}")
    try:
        fn(8, 16)
    except ValueError:
        pass
    else:
        raise AssertionError("a teacher map larger than the student's cannot be reached by a valid convolution: "
                             "raise ValueError instead of returning a kernel")
    print("✓ kernel size: correct")


def check_hint_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 2: ``fn(regressed, teacher)`` -> the hint loss, squared error halved, summed
    over features and averaged over the batch."""
    g = torch.Generator().manual_seed(0)
    r, u = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    if not attempted(fn, r, u):
        return
    got, want = fn(r, u), hint_loss(r, u)
    if not isinstance(got, torch.Tensor) or got.ndim != 0:
        raise AssertionError("expected a scalar tensor")
    n_feat = r[0].numel()
    if torch.allclose(got * n_feat, want * 2, rtol=1e-4) or torch.allclose(got * n_feat, want, rtol=1e-4):
        raise AssertionError("you averaged over the features too (F.mse_loss does): the paper sums over "
                             "features and averages over the batch only")
    if torch.allclose(got, 2 * want, rtol=1e-4):
        raise AssertionError("missing the factor 1/2")
    if torch.allclose(got, len(r) * want, rtol=1e-4):
        raise AssertionError("summed over the batch: average over the examples instead")
    if not torch.allclose(got, want, rtol=1e-4):
        raise AssertionError(f"value {got.item():.5g} != {want.item():.5g}: compute 0.5 * (u - r)**2")
    print("✓ hint loss: correct")


def check_fitnets_kd_loss(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], torch.Tensor]) -> None:
    """Exercise 3: ``fn(student_logits, teacher_logits, targets, tau, lam)`` -> FitNets' stage-2
    loss: label cross-entropy plus lam times the soft cross-entropy at temperature tau, no tau²."""
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(8, 10, generator=g, dtype=torch.float64) * 3, torch.randn(8, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    if not attempted(fn, z, v, y, 3.0, 4.0):
        return
    tau, lam = 3.0, 4.0
    got, want = fn(z, v, y, tau, lam), fitnets_kd_loss(z, v, y, tau, lam)
    if not isinstance(got, torch.Tensor) or got.ndim != 0:
        raise AssertionError("expected a scalar tensor (mean over the batch)")
    ce = F.cross_entropy(z, y)
    soft = (want - ce) / lam
    p = soft_targets(v, tau)
    entropy = -(p * p.log()).sum(-1).mean()
    if torch.allclose(got, ce + lam * tau**2 * soft, rtol=1e-5):
        raise AssertionError("that is Hinton's tau² scaling: FitNets' code has no tau² factor")
    if torch.allclose(got, ce + lam * (soft - entropy), rtol=1e-5):
        raise AssertionError("that is the KL divergence: FitNets uses the cross-entropy H(p_teacher, p_student) "
                             "(same gradient, but the value differs by the teacher's entropy)")
    untempered = -(p * F.log_softmax(z, -1)).sum(-1).mean()
    if torch.allclose(got, ce + lam * untempered, rtol=1e-5):
        raise AssertionError("soften the student too: log_softmax(student_logits / tau)")
    if not torch.allclose(got, want, rtol=1e-5):
        raise AssertionError(f"value {got.item():.5g} != {want.item():.5g}: label CE + lam * H(softmax(v/tau), "
                             "softmax(z/tau)), both batch means")
    print("✓ FitNets KD loss: correct")
