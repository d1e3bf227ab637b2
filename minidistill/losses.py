r"""Distillation primitives shared by every chapter.

Pure functions of tensors first (:func:`soft_targets`, :func:`kd_loss`,
:func:`distillation_loss`), then the *objectives* the trainer takes. An objective is a module
called as ``objective(model, x, y) -> (loss, logits or None, terms)`` (:class:`Objective`),
so teacher-student training is the same :func:`minidistill.train.fit` with another objective,
not another trainer; objectives with a frozen teacher derive from :class:`TeacherObjective`.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "check_temperature",
    "check_logits_pair",
    "soft_targets",
    "kd_loss",
    "distillation_loss",
    "upcast",
    "warn_if_probabilities",
    "Objective",
    "TeacherObjective",
    "CrossEntropy",
    "Distillation",
    "FeatureRegressor",
    "FeatureDistillation",
]


def check_temperature(temperature: float) -> None:
    """Raise a ``ValueError`` unless ``temperature`` is a finite number > 0."""
    if isinstance(temperature, torch.Tensor):
        ok = bool(torch.all(temperature > 0) & torch.all(torch.isfinite(temperature)))
    else:
        ok = isinstance(temperature, (int, float)) and temperature > 0 and temperature < float("inf")
    if not ok:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")


def check_logits_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless both are ``[N, K]`` logits of the same shape."""
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both be [N, K] with the same shape, got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )


def _check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.ndim != 1 or len(targets) != len(logits) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 class indices [{len(logits)}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")


def warn_if_probabilities(logits: torch.Tensor, name: str = "logits") -> bool:
    """Warn (and return True) when ``logits`` look like probabilities -- every entry in
    [0, 1] and every row summing to 1 -- the classic slip of passing ``softmax`` outputs (a
    model that ends in a softmax) where logits are expected: the loss is then computed on a
    softmax of probabilities, nearly uniform, and teaches almost nothing."""
    with torch.no_grad():
        z = logits.detach()
        if z.ndim != 2 or z.shape[-1] < 2 or len(z) == 0 or not z.is_floating_point():
            return False
        looks = bool(((z >= 0) & (z <= 1)).all() & ((z.float().sum(-1) - 1).abs() < 1e-3).all())
    if looks:
        warnings.warn(f"{name} look like probabilities (rows in [0, 1] summing to 1); these functions "
                      "expect logits (pre-softmax scores). Drop the final softmax, or pass log-probabilities.",
                      stacklevel=3)
    return looks


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Logits safe for a softmax: float16/bfloat16 -> float32 (softmax and KL in low precision lose the small
    probabilities that distillation is about); float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""The tempered softmax $p_k = e^{z_k/T} / \sum_j e^{z_j/T}$ over the last dimension."""
    check_temperature(temperature)
    return torch.softmax(upcast(logits) / temperature, dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0, *,
            check_inputs: bool = True) -> torch.Tensor:
    r"""Hinton's soft-target loss, scaled by $T^2$ so that, at high $T$, its gradient keeps
    the same scale as $T$ grows (the gradient of the KL alone shrinks like $1/T^2$ there; at
    low $T$ the scaled gradient still changes with $T$, see chapter 1):

    $$\mathcal L_\mathrm{KD} = T^2 \, \frac1N \sum_{n=1}^N
      \mathrm{KL}\big(\mathrm{softmax}(v_n/T) \,\|\, \mathrm{softmax}(z_n/T)\big)$$

    with student logits $z$ and teacher logits $v$ (the teacher is the target and gets no
    gradient). Half-precision logits are computed in float32 (float64 stays float64).

    ``check_inputs`` warns when either input looks like probabilities instead of logits
    (:func:`warn_if_probabilities`); the check reads the values on the host, so the
    objectives run it on their first step only.
    """
    check_logits_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    if len(student_logits) == 0:
        raise ValueError("kd_loss got an empty batch (0 rows): there is nothing to average")
    if check_inputs:
        warn_if_probabilities(teacher_logits, "teacher_logits")
        warn_if_probabilities(student_logits, "student_logits")
    log_p_s = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(upcast(teacher_logits.detach()).to(log_p_s.dtype) / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
    *,
    check_inputs: bool = True,
) -> torch.Tensor:
    r"""The usual mix $(1-\alpha)\,H(y, \mathrm{softmax}(z)) + \alpha\,\mathcal L_\mathrm{KD}$.

    ``alpha=0`` is plain cross-entropy, ``alpha=1`` pure distillation; $\mathcal L_\mathrm{KD}$
    keeps its $T^2$ factor at every ``alpha``.
    """
    _check_alpha(alpha)
    _check_targets(student_logits, targets)
    ce = F.cross_entropy(upcast(student_logits), targets)
    return (1 - alpha) * ce + alpha * kd_loss(student_logits, teacher_logits, temperature, check_inputs=check_inputs)


class Objective(nn.Module):
    """What :func:`minidistill.train.fit` minimises: the one way to plug a method in.

    Subclass it and write ``forward(model, x, y) -> (loss, logits, terms)``:

    * ``loss``: the scalar to minimise;
    * ``logits``: the model's class scores ``[N, K]`` on ``x`` (``fit`` counts training
      accuracy from them), or ``None`` when the model is not a classifier;
    * ``terms``: a dict of named scalars (``{"ce": ..., "kd": ...}``) that ``fit`` averages
      over each epoch into the :class:`~minidistill.train.History` as ``train_<name>``
      columns. Detach them; an empty dict is fine.

    Before every step ``fit`` sets ``epoch`` (0-based), ``step`` (0-based, counted over the
    whole run), ``steps_per_epoch`` and ``total_steps``, so a schedule (a warm-up, a decaying
    weight) reads :attr:`progress` instead of counting calls; a resumed run sees the same
    values. Learnable parts of an objective (a regressor, say) are trained with the model;
    state that must survive a resume goes in parameters or buffers (``register_buffer``), which
    checkpoints keep; an objective with other state sets ``resumable = False``.
    """

    #: whether a checkpoint holds all of this objective's state (its parameters and buffers); an
    #: objective with state outside them sets it False and ``fit`` refuses to resume it
    resumable: bool = True
    #: whether some trainable parameter may get no gradient in a step; under ``torchrun`` this makes
    #: ``DistributedDataParallel`` look for such parameters every step (a model may say it too)
    unused_parameters: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.epoch, self.step, self.steps_per_epoch, self.total_steps = 0, 0, 1, 1

    @property
    def progress(self) -> float:
        """How far training is, from 0 (first step) towards 1 (after the last step)."""
        return self.step / max(self.total_steps, 1)

    def setup(self, model: nn.Module, example: torch.Tensor, *, device: torch.device,
              dtype: torch.dtype | None = None, memory_format: torch.memory_format = torch.contiguous_format,
              compile: bool = False) -> None:
        """Called by ``fit`` once before training, after the objective was moved to ``device``
        and before the optimiser is built: ``example`` is a batch of two training images as the
        model sees them, ``dtype`` the autocast dtype (``None`` without mixed precision).
        Override it to prepare things once (build a regressor whose shape depends on the
        model's features, say) instead of at every step."""


class TeacherObjective(Objective):
    """An objective with a frozen ``teacher``: the base class of every distillation objective.

    The teacher is put in eval mode and gets no gradients, and it stays in eval mode when
    ``fit`` calls ``objective.train()`` (its BatchNorm statistics never move, and ``fit`` never
    optimises it). Call :meth:`teacher_forward` for its outputs: on a GPU with mixed precision
    it runs a copy of the teacher cast to the autocast dtype once per ``fit`` (instead of
    re-casting every weight at every step), under ``torch.no_grad()``.
    """

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        self.teacher = teacher.eval().requires_grad_(False)
        self._fast: list[nn.Module] = []  # [cast copy, compiled copy]: a list, so no submodule

    def train(self, mode: bool = True) -> "TeacherObjective":
        super().train(mode)
        self.teacher.eval()
        return self

    def setup(self, model: nn.Module, example: torch.Tensor, *, device: torch.device,
              dtype: torch.dtype | None = None, memory_format: torch.memory_format = torch.contiguous_format,
              compile: bool = False) -> None:
        frozen = self.teacher
        if dtype is not None and device.type == "cuda":
            frozen = copy.deepcopy(self.teacher).to(device=device, dtype=dtype, memory_format=memory_format).eval()
        self._fast = [frozen, torch.compile(frozen) if compile else frozen]

    def teacher_forward(self, x: torch.Tensor):
        """The frozen teacher's output on ``x`` (no gradients)."""
        with torch.no_grad():
            return (self._fast[1] if self._fast else self.teacher)(x)


class CrossEntropy(Objective):
    """The plain objective: cross-entropy of ``model(x)``, optional label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        return F.cross_entropy(upcast(logits), y, label_smoothing=self.label_smoothing), logits, {}


class Distillation(TeacherObjective):
    """The KD objective: :func:`distillation_loss` against a frozen teacher's logits.
    ``fit(student, data, objective=Distillation(teacher))``; logs the terms ``ce`` and ``kd``."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__(teacher)
        check_temperature(temperature)
        _check_alpha(alpha)
        self.temperature, self.alpha = temperature, alpha

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        teacher_logits = self.teacher_forward(x)
        logits = model(x)
        ce = F.cross_entropy(upcast(logits), y)
        kd = kd_loss(logits, teacher_logits, self.temperature, check_inputs=self.step == 0)
        loss = (1 - self.alpha) * ce + self.alpha * kd
        return loss, logits, {"ce": ce.detach(), "kd": kd.detach()}


class FeatureRegressor(nn.Module):
    """Maps a student feature map ``[N, C_s, H_s, W_s]`` to the teacher's shape ``[N, C_t, H_t,
    W_t]``: average-pooled (or bilinearly resized) to the teacher's size, then a 1x1 conv and
    BatchNorm to the teacher's channels, and a ReLU if ``relu`` (as RepDistiller's ``ConvReg``, for
    targets taken after a ReLU). A generic choice; FitNets' own regressor
    (:class:`minidistill.methods.fitnets.HintRegressor`) sizes a convolution instead."""

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int],
                 relu: bool = False) -> None:
        super().__init__()
        if not isinstance(relu, bool):
            raise ValueError(f"relu must be True or False, got {relu!r}")
        for name, shape in (("student_shape", student_shape), ("teacher_shape", teacher_shape)):
            if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
                raise ValueError(f"{name} must be (C, H, W) of a feature map, got {shape!r}")
        self.size = tuple(teacher_shape[1:])
        self.proj = nn.Sequential(nn.Conv2d(student_shape[0], teacher_shape[0], 1, bias=False),
                                  nn.BatchNorm2d(teacher_shape[0]), *([nn.ReLU()] if relu else []))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if tuple(f.shape[-2:]) != self.size:
            bigger = f.shape[-2] >= self.size[0] and f.shape[-1] >= self.size[1]
            f = F.adaptive_avg_pool2d(f, self.size) if bigger else F.interpolate(
                f, size=self.size, mode="bilinear", align_corners=False)
        return self.proj(f)


class FeatureDistillation(TeacherObjective):
    r"""One-stage feature distillation (hint + KD, the way RepDistiller runs FitNets):

    $$\mathcal L = (1-\alpha)\,H(y, \sigma(z)) + \alpha\,\mathcal L_\mathrm{KD}
      + \beta \,\frac{1}{|u|}\,\lVert r(f_s) - f_t \rVert^2$$

    with a student feature $f_s$ (``layers[0]``), the teacher's feature $f_t$ (``layers[1]``),
    a learned :class:`FeatureRegressor` $r$ (built by ``fit`` from the real shapes, trained
    with the student) and the mean squared error over all elements of $f_t$, weighted by
    ``weight`` ($\beta$). Terms logged: ``ce``, ``kd``, ``hint``. ``alpha=0`` and
    ``weight=0`` give back plain cross-entropy; ``weight=0`` alone is :class:`Distillation`.
    ``regressor_relu=True`` ends $r$ with a ReLU, as RepDistiller's regressor does.
    """

    def __init__(self, teacher: nn.Module, layers: tuple[str, str] = ("layer2", "layer2"), weight: float = 10.0,
                 temperature: float = 4.0, alpha: float = 0.9, regressor_relu: bool = False) -> None:
        super().__init__(teacher)
        if isinstance(layers, str) or len(layers) != 2 or not all(isinstance(n, str) for n in layers):
            raise ValueError(f"layers must be (student layer, teacher layer) names, got {layers!r}")
        if not (isinstance(weight, (int, float)) and weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        check_temperature(temperature)
        _check_alpha(alpha)
        if not isinstance(regressor_relu, bool):
            raise ValueError(f"regressor_relu must be True or False, got {regressor_relu!r}")
        self.layers, self.weight, self.temperature, self.alpha = tuple(layers), weight, temperature, alpha
        self.regressor_relu = regressor_relu
        self.regressor: nn.Module | None = None

    def setup(self, model: nn.Module, example: torch.Tensor, **kwargs) -> None:
        from .models import FeatureExtractor  # models imports nothing from here: no cycle

        super().setup(model, example, **kwargs)
        (s_name, t_name), frozen = self.layers, self._fast[0]
        self._extract = [FeatureExtractor(model, [s_name, _last_module(model)]),
                         FeatureExtractor(frozen, [t_name, _last_module(frozen)])]
        if self.regressor is None:
            was = model.training
            with torch.no_grad():
                f_s = self._extract[0].eval()(example[:1])[s_name]
                f_t = self.teacher_forward(example[:1])[0]
            model.train(was)
            self.regressor = FeatureRegressor(tuple(f_s.shape[1:]), tuple(f_t.shape[1:]),
                                              relu=self.regressor_relu).to(example.device)

    def teacher_forward(self, x: torch.Tensor):
        """The teacher's ``(feature, logits)`` on ``x`` in one pass (no gradients)."""
        with torch.no_grad():
            out = self._extract[1](x)
        return tuple(out.values())

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if self.regressor is None:
            raise RuntimeError("FeatureDistillation builds its regressor in setup(); train it with train.fit")
        f_t, teacher_logits = self.teacher_forward(x)
        f_s, logits = self._extract[0](x).values()
        ce = F.cross_entropy(upcast(logits), y)
        kd = kd_loss(logits, teacher_logits, self.temperature, check_inputs=self.step == 0)
        hint = F.mse_loss(upcast(self.regressor(f_s)), upcast(f_t).to(torch.float32))
        loss = (1 - self.alpha) * ce + self.alpha * kd + self.weight * hint
        return loss, logits, {"ce": ce.detach(), "kd": kd.detach(), "hint": hint.detach()}


def _last_module(model: nn.Module) -> str:
    """The name of the model's last top-level stage (its classifier in the course's models)."""
    names = [n for n, _ in model.named_children()]
    if not names:
        raise ValueError(f"{type(model).__name__} has no submodules to read features from")
    return names[-1]
