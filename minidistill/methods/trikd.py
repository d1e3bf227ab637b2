r"""Chapter 8 -- Wang, Liu, Kan, Han, Wu & Shan (2023), "Triplet Knowledge Distillation" (TriKD),
arXiv 2305.15975.

Three networks: a small **student** (logits $z$), a large **teacher** (logits $v$) trained *online*
with the student from random weights, and a frozen, pretrained **anchor** of the student's size
(logits $a$). The anchor marks out a region of solutions the student can reach; teacher and
student learn from each other and are both pulled towards the anchor, so the teacher stays
accurate yet close to what the student can imitate. After a generation the trained student
becomes the anchor of the next one; generation 0 has no anchor (plain online distillation).

The loss below is *this course's formulation* of that description (cross-entropy, a mutual term
as in deep mutual learning, an anchor term; targets detached), with weights $\lambda_m$ (mutual)
and $\lambda_a$ (anchor) and $p^\cdot_T = \mathrm{softmax}(\cdot/T)$:

$$\mathcal L_t = H(q, p^t) + \lambda_m T^2\,\mathrm{KL}(p^s_T \,\|\, p^t_T) + \lambda_a T^2\,\mathrm{KL}(p^a_T \,\|\, p^t_T),$$
$$\mathcal L_s = H(q, p^s) + \lambda_m T^2\,\mathrm{KL}(p^t_T \,\|\, p^s_T) + \lambda_a T^2\,\mathrm{KL}(p^a_T \,\|\, p^s_T).$$

The objective divides each loss by $1 + \lambda_m + \lambda_a$ by default (``normalize=True``): the same
minimisers, and at $T = 1$ a cross-entropy to the mixture $(q + \lambda_m p^\text{peer} + \lambda_a p^a) /
(1 + \lambda_m + \lambda_a)$, so that the weights do not also scale SGD's step (the price: where the
networks agree, the step on the labels is $1/(1 + \lambda_m + \lambda_a)$ of training alone's).

Pieces: :func:`trikd_losses` (both losses from the three networks' logits), the objective
:class:`TripletDistillation` (built on :class:`~minidistill.methods.dml.MutualLearning`: the
student is ``fit``'s model, the online teacher its peer), :func:`train_trikd` (the generations,
through :func:`~minidistill.methods.dml.train_mutual`), and :func:`toy_triplet`, the chapter's
two-dimensional toy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ..data import Dataset
from ..exercises.trikd import (check_anchor_gradient, check_anchor_term, check_flip_weight,
                               check_student_gradient)
from ..losses import TeacherObjective, kd_loss
from ..train import History, Recipe
from .dml import MutualLearning, dml_losses, train_mutual

__all__ = [
    "TriKDLosses", "trikd_losses", "TripletDistillation", "Generation", "train_trikd", "GENERATION_SEED_STEP",
    "toy_data", "toy_triplet", "check_anchor_term", "check_anchor_gradient", "check_flip_weight",
    "check_student_gradient",
]

#: generation ``g`` builds its networks from ``seed + GENERATION_SEED_STEP * g``: fresh random weights each time
GENERATION_SEED_STEP = 10_000


def _check_weight(name: str, value: object) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class TriKDLosses(NamedTuple):
    """What :func:`trikd_losses` returns: the teacher's and the student's losses and their six parts,
    each a scalar (the KL parts *unweighted*: multiply by the weights to get the loss's terms)."""

    teacher: torch.Tensor
    student: torch.Tensor
    parts: dict[str, torch.Tensor]


def trikd_losses(teacher_logits: torch.Tensor, student_logits: torch.Tensor, anchor_logits: torch.Tensor | None,
                 targets: torch.Tensor, mutual_weight: float, anchor_weight: float, temperature: float = 1.0, *,
                 normalize: bool = False, check_inputs: bool = True) -> TriKDLosses:
    r"""The teacher's and the student's losses (the course's formulation of TriKD):

    $\mathcal L_t = H(q, p^t) + \lambda_m T^2 \mathrm{KL}(p^s_T\|p^t_T) + \lambda_a T^2 \mathrm{KL}(p^a_T\|p^t_T)$ and
    $\mathcal L_s = H(q, p^s) + \lambda_m T^2 \mathrm{KL}(p^t_T\|p^s_T) + \lambda_a T^2 \mathrm{KL}(p^a_T\|p^s_T)$,

    each KL a batch mean with its target (first argument) detached: the anchor never receives a
    gradient, and ``(teacher + student).backward()`` gives each network the gradient of its own
    loss. ``anchor_logits=None`` (generation 0) drops the anchor terms: deep mutual learning with
    weight $\lambda_m$. ``normalize=True`` divides both losses by $1 + \lambda_m + \lambda_a$ (by
    $1 + \lambda_m$ without an anchor): the same minimisers, and at $T = 1$ exactly the cross-entropy
    to the mixture $(q + \lambda_m p^\text{peer} + \lambda_a p^a) / (1 + \lambda_m + \lambda_a)$ plus a
    constant, so the gradient stays bounded like a plain cross-entropy's at any weights (the price: where
    the networks agree it is $(p - q) / (1 + \lambda_m + \lambda_a)$ per example, a smaller step on the labels). ``parts``: ``teacher_ce, teacher_mutual, teacher_anchor, student_ce,
    student_mutual, student_anchor`` (the KLs times $T^2$, before the weights)."""
    _check_weight("mutual_weight", mutual_weight)
    _check_weight("anchor_weight", anchor_weight)
    if not isinstance(teacher_logits, torch.Tensor) or not isinstance(student_logits, torch.Tensor):
        raise TypeError("teacher_logits and student_logits must be [N, K] tensors of logits")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher and student logits must have one shape [N, K], got teacher "
                         f"{tuple(teacher_logits.shape)} and student {tuple(student_logits.shape)}")
    _, (ce_s, ce_t), (mut_s, mut_t) = dml_losses([student_logits, teacher_logits], targets,
                                                 temperature=temperature, check_inputs=check_inputs)
    if anchor_logits is None:
        anc_t = anc_s = student_logits.new_zeros((), dtype=ce_s.dtype)
    else:
        if not isinstance(anchor_logits, torch.Tensor) or anchor_logits.shape != student_logits.shape:
            raise ValueError(f"anchor_logits must be [N, K] like the student's {tuple(student_logits.shape)}, got "
                             f"{tuple(getattr(anchor_logits, 'shape', ()))}")
        anc_t = kd_loss(teacher_logits, anchor_logits, temperature, check_inputs=check_inputs)   # anchor detached
        anc_s = kd_loss(student_logits, anchor_logits, temperature, check_inputs=False)
    teacher = ce_t + mutual_weight * mut_t + anchor_weight * anc_t
    student = ce_s + mutual_weight * mut_s + anchor_weight * anc_s
    if normalize:
        scale = 1 + mutual_weight + (anchor_weight if anchor_logits is not None else 0)
        teacher, student = teacher / scale, student / scale
    parts = {"teacher_ce": ce_t, "teacher_mutual": mut_t, "teacher_anchor": anc_t,
             "student_ce": ce_s, "student_mutual": mut_s, "student_anchor": anc_s}
    return TriKDLosses(teacher, student, parts)


class _FrozenAnchor(TeacherObjective):
    """Holds the anchor: :class:`~minidistill.losses.TeacherObjective`'s handling of a frozen network
    (eval mode kept when ``fit`` calls ``train()``, no gradients, a copy cast once to the autocast
    dtype on a GPU). Only its :meth:`teacher_forward` is used; it is not an objective of its own."""


class TripletDistillation(MutualLearning):
    r"""TriKD as one objective for :func:`~minidistill.train.fit`: ``fit(student, data,
    TripletDistillation(teacher, anchor))`` trains the student (``fit``'s model) and the online
    ``teacher`` together (simultaneous update: one forward of each per step, one backward of
    $\mathcal L_t + \mathcal L_s$, :func:`trikd_losses`), both pulled towards the frozen ``anchor``.
    ``anchor=None``: generation 0, plain online distillation.

    ``normalize=True`` (the default) divides both losses by $1 + \lambda_m + \lambda_a$
    (:func:`trikd_losses`): SGD's step is proportional to the loss's scale, and without it a large
    weight would also mean a larger learning rate; with it the loss is, at $T = 1$, a
    cross-entropy to a mixture target, bounded like training alone's. The price: where the networks
    agree the step on the labels is $1/(1 + \lambda_m + \lambda_a)$ of training alone's.

    Terms logged: ``ce``, ``mutual``, ``anchor`` (the student's, unweighted) and ``teacher_ce``,
    ``teacher_mutual``, ``teacher_anchor`` (the teacher's; ``teacher_anchor`` is
    $T^2\,\mathrm{KL}(p^a_T\|p^t_T)$, the teacher's distance to the anchor). The logits returned are
    the student's, so ``fit``'s accuracies are the student's.
    """

    def __init__(self, teacher: nn.Module, anchor: nn.Module | None = None, *, mutual_weight: float = 1.0,
                 anchor_weight: float = 1.0, temperature: float = 1.0, normalize: bool = True) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module (the online teacher), got {type(teacher).__name__}")
        super().__init__([teacher], update="simultaneous", temperature=temperature)
        _check_weight("mutual_weight", mutual_weight)
        _check_weight("anchor_weight", anchor_weight)
        if anchor is not None and not isinstance(anchor, nn.Module):
            raise TypeError(f"anchor must be an nn.Module or None, got {type(anchor).__name__}")
        if anchor is not None and anchor is teacher:
            raise ValueError("the anchor must be another network than the online teacher")
        self.frozen = None if anchor is None else _FrozenAnchor(anchor)
        self.mutual_weight, self.anchor_weight, self.normalize = mutual_weight, anchor_weight, bool(normalize)

    @property
    def teacher(self) -> nn.Module:
        """The online teacher (trained with the student)."""
        return self.peers[0]

    @property
    def anchor(self) -> nn.Module | None:
        """The frozen anchor, or None in generation 0."""
        return None if self.frozen is None else self.frozen.teacher

    def setup(self, model: nn.Module, example: torch.Tensor, **kwargs: Any) -> None:
        if model is self.teacher or model is self.anchor:
            raise ValueError("fit's model must be the student, not the teacher or the anchor")
        if self.frozen is not None:
            self.frozen.setup(model, example, **kwargs)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        anchor_logits = None if self.frozen is None else self.frozen.teacher_forward(x)
        z, v = model(x), self.teacher(x)
        out = trikd_losses(v, z, anchor_logits, y, self.mutual_weight, self.anchor_weight, self.temperature,
                           normalize=self.normalize, check_inputs=self.step == 0)
        p = out.parts
        terms = {"ce": p["student_ce"], "mutual": p["student_mutual"], "anchor": p["student_anchor"],
                 "teacher_ce": p["teacher_ce"], "teacher_mutual": p["teacher_mutual"],
                 "teacher_anchor": p["teacher_anchor"]}
        return out.teacher + out.student, z, {k: t.detach() for k, t in terms.items()}


@dataclass
class Generation:
    """One TriKD generation: its index, the trained student and teacher, the anchor they were
    pulled towards (read from the objective that trained them: ``None`` in generation 0; otherwise
    the student of the generation before, the same object), the student's history (with every term), and both networks' test accuracy (%)."""

    index: int
    student: nn.Module
    teacher: nn.Module
    anchor: nn.Module | None
    history: History
    student_acc: float
    teacher_acc: float


def train_trikd(student: str | Callable[[], nn.Module], teacher: str | Callable[[], nn.Module], data: Dataset,
                recipe: Recipe | None = None, *, generations: int = 3, anchor: nn.Module | None = None,
                start: int = 0, mutual_weight: float = 1.0, anchor_weight: float = 1.0, temperature: float = 1.0,
                normalize: bool = True, seed: int = 0, **fit_kwargs: Any) -> list[Generation]:
    """Train ``generations`` TriKD generations, numbered ``start, start + 1, ...``, and return them.

    Generation ``start`` is pulled towards ``anchor`` (``None``: plain online distillation, the
    usual generation 0); each later one towards the student of the one before. Every generation
    builds a fresh student and teacher (model names or builders) from seed
    ``seed + GENERATION_SEED_STEP * index`` (:func:`~minidistill.methods.dml.train_mutual`: the
    student first, like :func:`~minidistill.train.train_model`'s model of that seed), so nothing
    but the anchor carries over. Other keyword arguments go to ``fit``.
    """
    if not (isinstance(generations, int) and not isinstance(generations, bool) and generations >= 1):
        raise ValueError(f"generations must be an int >= 1, got {generations!r}")
    if not (isinstance(start, int) and not isinstance(start, bool) and start >= 0):
        raise ValueError(f"start must be an int >= 0 (the first generation's index), got {start!r}")
    if anchor is not None and not isinstance(anchor, nn.Module):
        raise TypeError(f"anchor must be a trained nn.Module or None, got {type(anchor).__name__}")
    _check_weight("mutual_weight", mutual_weight)
    _check_weight("anchor_weight", anchor_weight)
    out: list[Generation] = []
    for index in range(start, start + generations):
        used: list[TripletDistillation] = []     # the objective that trained this generation

        def objective(peers: list[nn.Module], anchor: nn.Module | None = anchor) -> TripletDistillation:
            used.append(TripletDistillation(peers[0], anchor, mutual_weight=mutual_weight,
                                            anchor_weight=anchor_weight, temperature=temperature,
                                            normalize=normalize))
            return used[-1]

        kwargs = dict(fit_kwargs)
        kwargs.setdefault("description", f"TriKD generation {index} (seed {seed})")
        run = train_mutual([student, teacher], data, recipe, seed=seed + GENERATION_SEED_STEP * index,
                           objective=objective, **kwargs)
        # record the anchor the training objective actually held (not the loop variable), so that a
        # check of the bookkeeping tests what was trained
        out.append(Generation(index, run.models[0], run.models[1], used[-1].anchor, run.history, *run.test_acc))
        anchor = run.models[0]            # this student anchors the next generation
    return out


# ---------------------------------------------------------------------------------------------
# The toy: three classes in the plane, a small student, a large teacher, full-batch training
# ---------------------------------------------------------------------------------------------

def toy_data(n: int = 600, *, twist: float = 2.0, noise: float = 0.08, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points in [-1, 1]^2 in 3 classes: angular sectors twisted into a spiral (by ``twist``
    radians per unit of radius), with ``noise`` of the labels flipped at random (so that a large
    network can overfit)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    r, angle = x.norm(dim=1), torch.atan2(x[:, 1], x[:, 0])
    y = (((angle + twist * r) % (2 * math.pi)) / (2 * math.pi / 3)).long().clamp_(0, 2)
    flip = torch.rand(n, generator=g) < noise
    y[flip] = (y[flip] + torch.randint(1, 3, (int(flip.sum()),), generator=g)) % 3
    return x, y


def _mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 2
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 3))


def toy_triplet(anchor_weight: float, *, mutual_weight: float = 1.0, anchor: nn.Module | None = None,
                steps: int = 300, seed: int = 0, student_width: int = 8, teacher_width: int = 128,
                temperature: float = 1.0, normalize: bool = True) -> dict[str, Any]:
    """One TriKD generation on :func:`toy_data`: a small student (one hidden layer of
    ``student_width``) and a large teacher (two of ``teacher_width``) trained together, full batch
    with Adam, towards ``anchor`` (``None``: generation 0, and ``anchor_weight`` is unused).

    Returns the trained ``student``, ``teacher``, ``anchor`` and, on 2,000 fresh test points:
    ``teacher_acc``, ``student_acc``, ``anchor_acc`` (%), ``teacher_to_anchor``
    $= \\mathrm{KL}(p^a\\|p^t)$ and ``student_to_teacher`` $= \\mathrm{KL}(p^t\\|p^s)$ (batch means at $T=1$)."""
    _check_weight("anchor_weight", anchor_weight)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    x, y = toy_data(seed=seed)
    x_test, y_test = toy_data(2000, seed=seed + 1)
    torch.manual_seed(seed)
    student, teacher = _mlp(student_width, 1), _mlp(teacher_width, 2)
    opt = torch.optim.Adam([*student.parameters(), *teacher.parameters()], lr=0.01)
    a_train = None
    if anchor is not None:
        anchor = anchor.eval().requires_grad_(False)
        with torch.no_grad():
            a_train = anchor(x)
    for _ in range(steps):
        out = trikd_losses(teacher(x), student(x), a_train, y, mutual_weight, anchor_weight, temperature,
                           normalize=normalize, check_inputs=False)
        opt.zero_grad()
        (out.teacher + out.student).backward()
        opt.step()
    student.eval(), teacher.eval()
    with torch.no_grad():
        z, v = student(x_test), teacher(x_test)
        res: dict[str, Any] = {"student": student, "teacher": teacher, "anchor": anchor,
                               "teacher_acc": (v.argmax(1) == y_test).float().mean().item() * 100,
                               "student_acc": (z.argmax(1) == y_test).float().mean().item() * 100,
                               "student_to_teacher": kd_loss(z, v, 1.0, check_inputs=False).item()}
        if anchor is not None:
            a = anchor(x_test)
            res["anchor_acc"] = (a.argmax(1) == y_test).float().mean().item() * 100
            res["teacher_to_anchor"] = kd_loss(v, a, 1.0, check_inputs=False).item()
    return res
