r"""Chapter 2 -- Yuan, Tay, Li, Wang & Feng (CVPR 2020), "Revisiting Knowledge Distillation via
Label Smoothing Regularization" (Tf-KD).

The chapter's claim: knowledge distillation is label smoothing with a *learned* smoothing
distribution, and label smoothing is distillation from a *virtual* teacher. This room holds

* the targets: :func:`label_smoothing_targets` (LSR), :func:`virtual_teacher` (the hand-made
  teacher $p^d$) and :func:`tempered_virtual_teacher` (what the official code feeds the KL);
* the losses: :func:`tfkd_reg_loss` (Tf-KD$_\mathrm{reg}$ as the official code computes it,
  with a batch-mean KL) and its objective :class:`TfKDRegularization` (terms ``ce``, ``reg``);
* the analysis: :func:`kl_to_uniform`, :func:`official_kl_weight` and
  :func:`tfkd_reg_as_lsr`, which rewrites Tf-KD$_\mathrm{reg}$ as label smoothing;
* the training recipes: :func:`train_model` (any objective; it is
  :func:`minidistill.train.train_model`, re-exported) and :func:`tfkd_self` (train, freeze a
  copy, distil into a fresh network).

The figures (:func:`plot_distributions`, :func:`plot_tfkd_targets`) live in
:mod:`minidistill.methods.tfkd_plots` and the exercises' self-checks in
:mod:`minidistill.exercises.tfkd`; both are re-exported here. The chapter's "normal" teacher is
:func:`minidistill.fast_teacher.fast_teacher`, the same cached teacher as chapter 1's.

Notation as in the course (``book/notation.md``): $K$ classes, one-hot label $q$, uniform
$u_k = 1/K$, student logits $z$ with $p^s = \mathrm{softmax}(z)$ and $p^s_T = \mathrm{softmax}(z/T)$,
teacher soft outputs $p^t_T$, temperature $T$ (the paper's $\tau$), $H(a, b) = -\sum_k a_k \log b_k$.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..exercises.tfkd import check_tau_effect, check_virtual_teacher
from ..losses import Distillation, Objective, check_temperature, upcast
from ..train import History, Recipe, train_model
from .tfkd_plots import plot_distributions, plot_tfkd_targets

__all__ = [
    "OFFICIAL_CONFIGS",
    "OFFICIAL_KD_CONFIGS",
    "label_smoothing_targets",
    "virtual_teacher",
    "tempered_virtual_teacher",
    "kl_to_uniform",
    "official_kl_weight",
    "tfkd_reg_loss",
    "tfkd_reg_as_lsr",
    "TfKDRegularization",
    "train_model",
    "SelfTrained",
    "tfkd_self",
    # figures, from tfkd_plots
    "plot_distributions",
    "plot_tfkd_targets",
    # exercise self-checks, from exercises.tfkd
    "check_virtual_teacher",
    "check_tau_effect",
]

FORMS = ("code", "paper")

# Tf-KD_reg hyperparameters of the official CIFAR-100 runs, from the files
# experiments/base_experiments/base_<model>/params.json of yuanli2333/Teacher-free-Knowledge-Distillation
# (keys reg_alpha, reg_temperature, multiplier): alpha weighs the KL (the cross-entropy gets
# 1 - alpha), T divides the virtual teacher's probabilities, multiplier scales nn.KLDivLoss()'s
# mean over N*K. The virtual teacher puts a = 0.99 on the correct class in every run
# (my_loss_function.loss_kd_regularization).
OFFICIAL_CONFIGS: dict[str, dict[str, float]] = {
    "MobileNetV2": {"alpha": 0.95, "temperature": 40.0, "multiplier": 1.0},
    "ShuffleNetV2": {"alpha": 0.95, "temperature": 10.0, "multiplier": 1.0},
    "ResNet18": {"alpha": 0.1, "temperature": 20.0, "multiplier": 100.0},
    "GoogLeNet": {"alpha": 0.1, "temperature": 40.0, "multiplier": 50.0},
}

# The official CIFAR-100 KD runs with a real teacher, from
# experiments/kd_experiments/<student>_distill/<teacher>_teacher/params.json of the same repository:
# "normal" runs use my_loss_function.loss_kd, which has no multiplier (1); "self" runs use
# loss_kd_self, alpha * T^2 * multiplier * nn.KLDivLoss()(...). Both losses take the KL with
# nn.KLDivLoss()'s default reduction, a mean over N*K elements.
OFFICIAL_KD_CONFIGS: dict[str, dict[str, Any]] = {
    "MobileNetV2, normal KD (ResNet18)": {"kind": "normal", "alpha": 0.95, "temperature": 20.0, "multiplier": 1.0},
    "MobileNetV2, Tf-KD self": {"kind": "self", "alpha": 0.95, "temperature": 20.0, "multiplier": 1.0},
    "ShuffleNetV2, normal KD (ResNet18)": {"kind": "normal", "alpha": 0.95, "temperature": 20.0, "multiplier": 1.0},
    "ShuffleNetV2, Tf-KD self": {"kind": "self", "alpha": 0.95, "temperature": 20.0, "multiplier": 1.0},
    "ResNet18, normal KD (ResNet50)": {"kind": "normal", "alpha": 0.6, "temperature": 20.0, "multiplier": 1.0},
    "ResNet18, Tf-KD self": {"kind": "self", "alpha": 0.95, "temperature": 6.0, "multiplier": 50.0},
    "GoogLeNet, Tf-KD self": {"kind": "self", "alpha": 0.4, "temperature": 20.0, "multiplier": 50.0},
    "ResNeXt29, Tf-KD self": {"kind": "self", "alpha": 0.9, "temperature": 20.0, "multiplier": 100.0},
}


# -- input checks ----------------------------------------------------------------------------

def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")


def _check_targets(targets: torch.Tensor, num_classes: int, n: int | None = None, name: str = "targets") -> None:
    if not isinstance(targets, torch.Tensor) or targets.ndim != 1 or targets.dtype != torch.int64:
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{name} must be a 1-D int64 tensor of class indices, got {got}")
    if n is not None and len(targets) != n:
        raise ValueError(f"{name} has {len(targets)} entries but the logits have {n} rows")
    if len(targets):
        low, high = torch.aminmax(targets)
        low, high = low.item(), high.item()
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes - 1}] for {num_classes} classes, "
                             f"got values from {low} to {high}")


def _check_dtype(dtype: torch.dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def _check_prob(name: str, value: float, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 1.0 and (
        value > 0.0 if low_open else value >= 0.0)
    if not ok:
        raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


def _check_logits(logits: torch.Tensor, name: str = "student_logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a float tensor [N, K], got {got}")


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def _check_kl_weight(kl_weight: float) -> None:
    if not (isinstance(kl_weight, (int, float)) and not isinstance(kl_weight, bool) and 0 <= kl_weight < math.inf):
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")


def _check_hyper(correct_prob: float, temperature: float, alpha: float, kl_weight: float, form: str) -> None:
    _check_prob("correct_prob", correct_prob, low_open=True)
    check_temperature(temperature)
    _check_prob("alpha", alpha, low_open=False)
    _check_kl_weight(kl_weight)
    _check_form(form)


# -- targets ---------------------------------------------------------------------------------

def label_smoothing_targets(targets: torch.Tensor, num_classes: int, epsilon: float) -> torch.Tensor:
    r"""The label-smoothing target $q' = (1-\epsilon)\,q + \epsilon\,u$, one row per label.

    The correct class gets $1 - \epsilon + \epsilon/K$, every other class $\epsilon/K$ (the same
    target as ``F.cross_entropy(..., label_smoothing=epsilon)``). Returns float32 ``[N, K]``.
    """
    _check_num_classes(num_classes)
    _check_targets(targets, num_classes)
    _check_prob("epsilon", epsilon, low_open=False)
    q = F.one_hot(targets, num_classes).float()
    return (1.0 - epsilon) * q + epsilon / num_classes


def virtual_teacher(targets: torch.Tensor, num_classes: int, correct_prob: float, *,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""The hand-made teacher of Tf-KD$_\mathrm{reg}$ (Eq. 9 of the paper):

    $$p^d(k) = \begin{cases} a & k = c \\ (1 - a)/(K - 1) & k \ne c \end{cases}$$

    for true class $c$ and ``correct_prob`` $a \in (0, 1]$. A teacher with 100 % accuracy whose
    confidence is $a$. Returns ``[N, K]`` in ``dtype`` (float32 by default; float64 for checks
    that compare at float64 precision).
    """
    _check_num_classes(num_classes)
    _check_targets(targets, num_classes)
    _check_prob("correct_prob", correct_prob, low_open=True)
    _check_dtype(dtype)
    return _virtual_teacher(targets, num_classes, correct_prob, dtype)


def _virtual_teacher(targets: torch.Tensor, num_classes: int, correct_prob: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # unchecked: the training step calls this every batch, and checking the label values
    # would copy them to the host (a device sync) each time
    other = (1.0 - correct_prob) / (num_classes - 1)
    p = torch.full((len(targets), num_classes), other, dtype=dtype, device=targets.device)
    return p.scatter_(1, targets.unsqueeze(1), correct_prob)


def tempered_virtual_teacher(targets: torch.Tensor, num_classes: int, correct_prob: float = 0.99,
                             temperature: float = 20.0, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""What the official code distils from: $p^d_T = \mathrm{softmax}(p^d / T)$.

    The *probabilities* $p^d$ are divided by $T$ and pushed through a softmax as if they
    were logits. Probabilities differ by at most 1, so the result is within a factor
    $e^{1/T}$ of uniform at every $T$: for $K = 100$, $a = 0.99$, $T = 20$ the correct
    class gets 0.0105 and every other class 0.00999. Returns ``[N, K]`` in ``dtype``.
    """
    check_temperature(temperature)
    return torch.softmax(virtual_teacher(targets, num_classes, correct_prob, dtype=dtype) / temperature, dim=-1)


def _tfkd_reg(z: torch.Tensor, targets: torch.Tensor, correct_prob: float, temperature: float,
              form: str) -> tuple[torch.Tensor, torch.Tensor]:
    # the two terms, cross-entropy and batch-mean KL, without input checks (the training
    # step's hot path; tfkd_reg_loss checks, then weighs them)
    z = upcast(z)
    target = torch.softmax(_virtual_teacher(targets, z.shape[1], correct_prob, z.dtype) / temperature, dim=-1)
    log_p = F.log_softmax(z / temperature if form == "paper" else z, dim=-1)
    kl = F.kl_div(log_p, target, reduction="batchmean")
    return F.cross_entropy(z, targets), kl


# -- analysis --------------------------------------------------------------------------------

def kl_to_uniform(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""Per row, $\mathrm{KL}(\mathrm{softmax}(v/T)\,\|\,u) = \log K - H(\mathrm{softmax}(v/T))$.

    It falls to 0 as $T$ grows, like $\mathrm{Var}_k(v)/(2T^2)$: a tempered teacher tends to
    the uniform distribution. (What that does to KD depends on the student's side: with an
    untempered student KD tends to label smoothing, with a tempered student and the $T^2$
    factor it tends to logit matching -- chapter 2, step 4.)
    """
    check_temperature(temperature)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [N, K], got {getattr(logits, 'shape', type(logits))}")
    log_p = F.log_softmax(upcast(logits) / temperature, dim=-1)
    return math.log(logits.shape[-1]) + (log_p.exp() * log_p).sum(-1)


def official_kl_weight(alpha: float, multiplier: float, num_classes: int) -> float:
    r"""The official code's KL weight, converted to a *batch-mean* KL: $w = \alpha \cdot
    \mathrm{multiplier} / K$.

    The code computes ``alpha * multiplier * nn.KLDivLoss()(...)``, and ``nn.KLDivLoss()``'s
    default ``reduction='mean'`` divides the summed KL by $N \cdot K$, not by $N$. So its loss
    equals $w$ times the batch-mean KL. (ResNet18 on CIFAR-100: $0.1 \cdot 100 / 100 = 0.1$.)

    The same conversion holds for the official KD losses with a real teacher (see
    :data:`OFFICIAL_KD_CONFIGS`): ``loss_kd`` (multiplier 1) and ``loss_kd_self`` compute
    $(1-\alpha)\,H(q, p^s) + w\,T^2\,\frac1N\sum_n \mathrm{KL}(p^t_{T,n}\,\|\,p^s_{T,n})$ with the
    same $w = \alpha m / K$, i.e. ``(1 - alpha) * ce + w * losses.kd_loss(z, v, T)``.
    """
    _check_num_classes(num_classes)
    _check_prob("alpha", alpha, low_open=False)
    if not (isinstance(multiplier, (int, float)) and multiplier >= 0):
        raise ValueError(f"multiplier must be a number >= 0, got {multiplier!r}")
    return alpha * multiplier / num_classes


def tfkd_reg_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
    alpha: float = 0.1,
    kl_weight: float = 0.1,
    form: str = "code",
) -> torch.Tensor:
    r"""Tf-KD$_\mathrm{reg}$: cross-entropy plus a KL to the tempered virtual teacher.

    ``form="code"`` (the default) is what the official CIFAR code computes, with the KL
    reduced as a batch mean and the code's ``multiplier`` folded into ``kl_weight``
    (see :func:`official_kl_weight`):

    $$\mathcal L = (1-\alpha)\, H\big(q, p^s\big)
      + w \,\frac1N \sum_{n=1}^N \mathrm{KL}\big(\mathrm{softmax}(p^d_n/T)\,\big\|\,p^s_n\big),
      \qquad p^s = \mathrm{softmax}(z).$$

    The student's logits are **not** tempered and there is no $T^2$. ``form="paper"``
    tempers the student as the paper's Eq. 10 writes it, $\mathrm{KL}(p^d_T \,\|\, p^s_T)$
    with $p^s_T = \mathrm{softmax}(z/T)$, same weights. The defaults ($a = 0.99$,
    $T = 20$, $\alpha = 0.1$, $w = 0.1$) are the official ResNet18 / CIFAR-100 run.
    Half-precision logits are computed in float32.
    """
    _check_logits(student_logits)
    _check_targets(targets, student_logits.shape[1], len(student_logits))
    _check_hyper(correct_prob, temperature, alpha, kl_weight, form)
    ce, kl = _tfkd_reg(student_logits, targets, correct_prob, temperature, form)
    return (1.0 - alpha) * ce + kl_weight * kl


def tfkd_reg_as_lsr(num_classes: int, correct_prob: float = 0.99, temperature: float = 20.0,
                    alpha: float = 0.1, kl_weight: float = 0.1) -> dict[str, float]:
    r"""Tf-KD$_\mathrm{reg}$ (code form) rewritten as label smoothing.

    Since $\mathrm{KL}(t\,\|\,p) = H(t, p) - H(t)$ and both terms are cross-entropies to fixed
    targets, $(1-\alpha)H(q,p^s) + w\,\mathrm{KL}(p^d_T\|p^s) = s\,H(q_\mathrm{eff}, p^s) - w\,H(p^d_T)$ with

    $$s = 1 - \alpha + w, \qquad q_\mathrm{eff} = (1-\epsilon)\,q + \epsilon\,p^d_T,
      \qquad \epsilon = \frac{w}{1 - \alpha + w}.$$

    Returns ``scale`` ($s$), ``epsilon``, the tempered teacher's ``teacher_correct`` and
    ``teacher_other`` probabilities, and ``target_correct`` / ``target_other``, the entries of
    $q_\mathrm{eff}$ that the student is really trained towards.
    """
    _check_num_classes(num_classes)
    _check_hyper(correct_prob, temperature, alpha, kl_weight, "code")
    scale = 1.0 - alpha + kl_weight
    if scale <= 0:
        raise ValueError("alpha = 1 with kl_weight = 0 leaves no loss at all")
    pd = _virtual_teacher(torch.zeros(1, dtype=torch.int64), num_classes, correct_prob, torch.float64)
    t = torch.softmax(pd / temperature, dim=-1)[0]  # float64: these numbers are printed and compared
    eps = kl_weight / scale
    return {"scale": scale, "epsilon": eps, "teacher_correct": t[0].item(), "teacher_other": t[1].item(),
            "target_correct": 1.0 - eps + eps * t[0].item(), "target_other": eps * t[1].item()}


# -- objectives and training recipes ----------------------------------------------------------

class TfKDRegularization(Objective):
    """The Tf-KD$_\\mathrm{reg}$ objective for :func:`~minidistill.train.fit`: no teacher
    network, only :func:`tfkd_reg_loss` on the student's logits. Logs the unweighted terms
    ``ce`` (cross-entropy to the labels) and ``reg`` (the batch-mean KL to the tempered
    virtual teacher): the loss is ``(1 - alpha) * ce + kl_weight * reg``.

    The labels ``y`` are checked against the model's number of outputs (a ``ValueError`` that
    names ``y``, not an index error from deep inside): on every call when they live on the
    CPU, and on the first step only on an accelerator, where reading them would make the host
    wait for the device at every step."""

    def __init__(self, correct_prob: float = 0.99, temperature: float = 20.0, alpha: float = 0.1,
                 kl_weight: float = 0.1, form: str = "code") -> None:
        super().__init__()
        _check_hyper(correct_prob, temperature, alpha, kl_weight, form)
        self.correct_prob, self.temperature, self.alpha = correct_prob, temperature, alpha
        self.kl_weight, self.form = kl_weight, form

    def forward(self, model: nn.Module, x: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(x)
        if self.step == 0 or y.device.type == "cpu":
            _check_logits(logits, "the model's output")
            _check_targets(y, logits.shape[1], len(logits), name="y (the labels)")
        ce, kl = _tfkd_reg(logits, y, self.correct_prob, self.temperature, self.form)
        loss = (1.0 - self.alpha) * ce + self.kl_weight * kl
        return loss, logits, {"ce": ce.detach(), "reg": kl.detach()}

    def extra_repr(self) -> str:
        return (f"correct_prob={self.correct_prob}, temperature={self.temperature}, alpha={self.alpha}, "
                f"kl_weight={self.kl_weight}, form={self.form!r}")


@dataclass
class SelfTrained:
    """The result of :func:`tfkd_self`: the frozen teacher, the distilled student, and the
    student's history (``teacher_history`` is ``None`` when the teacher was given)."""

    teacher: nn.Module
    student: nn.Module
    history: History
    teacher_history: History | None


def tfkd_self(name: str, data: Dataset, recipe: Recipe, *, seed: int = 0, teacher: nn.Module | None = None,
              temperature: float = 4.0, alpha: float = 0.9, **fit_kwargs: Any) -> SelfTrained:
    r"""Tf-KD$_\mathrm{self}$: the network is its own teacher.

    1. Train ``name`` normally (skipped when a trained ``teacher`` of the same architecture is
       given, e.g. the "alone" run of the same seed);
    2. freeze a copy of it (eval mode, no gradients);
    3. distil it into a fresh ``name`` from ``seed`` with
       $(1-\alpha)\,H(q, p^s) + \alpha\,T^2\,\mathrm{KL}(p^t_T \,\|\, p^s_T)$
       (:class:`~minidistill.losses.Distillation`).

    Both runs are :func:`train_model`; other keyword arguments go to ``fit``.
    """
    teacher_history = None
    if teacher is None:
        teacher, teacher_history = train_model(name, data, recipe, seed=seed,
                                               description=f"{name} (self-teacher, seed {seed})", **fit_kwargs)
    frozen = copy.deepcopy(teacher).eval().requires_grad_(False)
    student, history = train_model(name, data, recipe, Distillation(frozen, temperature, alpha), seed=seed,
                                   description=f"{name} (Tf-KD self, seed {seed})", **fit_kwargs)
    return SelfTrained(frozen, student, history, teacher_history)
