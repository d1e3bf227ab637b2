r"""Do adversarially robust models transfer better? (Salman, Ilyas, Engstrom, Kapoor, Madry,
NeurIPS 2020.)

A *robust* source model is trained on the min-max objective of Madry et al. (2018),

.. math::

    \min_\theta\ \mathbb E_{(x, y)}\Big[\max_{\|\delta\| \le \epsilon,\ x + \delta \in [0, 1]^D}
    H\big(q, \mathrm{softmax}(f_\theta(x + \delta))\big)\Big],

whose inner maximum is approximated by projected gradient ascent (PGD): a step along the
steepest-ascent direction of the norm (the sign of the gradient for $\ell_\infty$, the
gradient over its $\ell_2$ norm for $\ell_2$), then a projection back onto the ball and the
image box. Its features are then transferred to another task in two ways: a *fixed-feature*
transfer (a new linear head on frozen features: a linear probe) and *full-network* fine-tuning.

Attacks work on images in $[0, 1]$; the course's models see normalised images, so every
function takes a ``normalize`` map (or the data's ``mean``/``std``) from $[0, 1]$ to the model's
input.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minidistill import losses, train
from minidistill.data import Dataset
from minidistill.exercises.robust import check_l1_step, check_l2_budget, check_l1_projection  # noqa: F401

__all__ = [
    "ATTACK_NORMS", "ascent_direction", "project", "pgd_attack", "Normalizer", "AdversarialTraining",
    "robust_accuracy", "class_split", "few_shot", "TransferModel", "transfer", "TRANSFER_MODES",
    "linf_corner_l2", "check_l1_step", "check_l1_projection", "check_l2_budget",
]

#: the norms an attack can use
ATTACK_NORMS = ("l2", "linf")
#: fixed-feature transfer (linear probe on frozen features) and full-network fine-tuning
TRANSFER_MODES = ("probe", "finetune")


def _check_norm(norm: str) -> None:
    if norm not in ATTACK_NORMS:
        raise ValueError(f"norm must be one of {ATTACK_NORMS}, got {norm!r}")


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_images(x: torch.Tensor, tol: float = 1e-5) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be float images [N, ...] in [0, 1], got {got}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -tol or hi > 1 + tol:
        raise ValueError(f"x must hold images in [0, 1] (un-normalised), got values from {lo:.3g} to {hi:.3g}; "
                         "pass normalize= (or mean/std) to map them to the model's input")


def _flat_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-example l2 norm, shaped to broadcast against ``v``."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    r"""The unit steepest-ascent step $\arg\max_{\|s\| \le 1}\langle g, s\rangle$ per example:
    $\mathrm{sign}(g)$ for $\ell_\infty$ (its dual norm is $\ell_1$), $g/\|g\|_2$ for $\ell_2$
    (zero where the gradient is zero)."""
    _check_norm(norm)
    if norm == "linf":
        return grad.sign()
    n = _flat_norm(grad)
    return torch.where(n > 0, grad / n.clamp_min(1e-30), torch.zeros_like(grad))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    r"""The closest point of the ball $\{\|\delta\| \le \epsilon\}$ per example: a clamp of each
    value for $\ell_\infty$, a rescaling of rows longer than $\epsilon$ for $\ell_2$."""
    _check_norm(norm)
    eps = _check_eps(eps)
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _flat_norm(delta)
    return delta * torch.clamp(eps / n.clamp_min(1e-30), max=1.0)


class Normalizer(nn.Module):
    """Maps images in [0, 1] to the model's input ``(x - mean) / std`` (and back with ``inverse``)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have one value per channel and std > 0, got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images back to [0, 1] (clamped: a float round trip may step outside)."""
        return (x * self.std + self.mean).clamp(0, 1)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "l2",
               steps: int = 10, step_size: float | None = None, *, random_start: bool = False,
               seed: int | None = None, normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
               ) -> torch.Tensor:
    r"""Projected gradient ascent on the cross-entropy of ``model`` within the ``norm`` ball of
    radius ``eps`` around the images ``x`` (in [0, 1]); returns the adversarial images
    (detached, in [0, 1], $\|x_\text{adv} - x\| \le \epsilon$ per example).

    Each step: $\delta \leftarrow \Pi\big(\delta + \eta\, s(\nabla_\delta H)\big)$, with $s$ from
    :func:`ascent_direction`, $\Pi$ the projection onto the ball (:func:`project`) and then onto
    the image box. ``step_size`` $\eta$ defaults to $2.5\,\epsilon/\text{steps}$ (over all steps the
    attack can travel 2.5 times the radius).
    ``random_start`` starts from a uniform point of the $\ell_\infty$ ball (a random direction of
    random length in the $\ell_2$ ball), drawn from ``seed``. The model is run in the mode it is in
    (in train mode its BatchNorm statistics see the attack's batches); its parameters get no
    gradients. ``eps = 0`` or ``steps = 0`` returns a copy of ``x``.
    """
    _check_norm(norm)
    eps = _check_eps(eps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0 \
            or not math.isfinite(step_size):
        if eps > 0:
            raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
    _check_images(x)
    if y.shape != (len(x),):
        raise ValueError(f"y must hold one label per image, shape ({len(x)},), got {tuple(y.shape)}")
    normalize = normalize or (lambda u: u)
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    delta = torch.zeros_like(x)
    if random_start:
        g = torch.Generator(device=x.device)
        g.manual_seed(0 if seed is None else seed)
        r = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1
        if norm == "l2":
            r = ascent_direction(r, "l2") * torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=g,
                                                       device=x.device, dtype=x.dtype)
        delta = ((x + eps * r).clamp(0, 1) - x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(normalize(x + delta)).float(), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = project(delta + step_size * ascent_direction(grad, norm), eps, norm)
            delta = (x + delta).clamp(0, 1) - x     # the box only shrinks |delta_i|: still in the ball
    return (x + delta).detach()


class AdversarialTraining(losses.Objective):
    r"""Madry et al.'s adversarial training as an objective on ``fit``: each batch is replaced by
    its PGD attack (``steps`` steps within the ``norm`` ball of radius ``eps``, random start) and
    the model is trained with cross-entropy on it. ``eps = 0`` is plain training (no attack).

    ``fit`` hands over normalised images; ``mean``/``std`` (the data's) map them back to [0, 1].
    The attack's random start is seeded by fit's step counter, so a run is reproducible and a
    resumed one identical. Terms: ``clean_ce`` is not computed (it would cost a pass); ``adv_ce``
    is the loss, ``delta`` the mean norm of the perturbations.
    """

    def __init__(self, eps: float, norm: str = "l2", steps: int = 3, step_size: float | None = None, *,
                 mean: Sequence[float], std: Sequence[float], random_start: bool = True, seed: int = 0) -> None:
        super().__init__()
        _check_norm(norm)
        self.eps, self.norm = _check_eps(eps), norm
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps, self.step_size, self.random_start, self.seed = steps, step_size, random_start, seed
        self.normalizer = Normalizer(mean, std)

    @classmethod
    def for_data(cls, data: Dataset, eps: float, norm: str = "l2", steps: int = 3, **kwargs) -> "AdversarialTraining":
        """The objective with ``data``'s mean and std."""
        return cls(eps, norm, steps, mean=data.mean, std=data.std, **kwargs)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if self.eps > 0:
            x01 = self.normalizer.inverse(x.float())
            adv = pgd_attack(model, x01, y, self.eps, self.norm, self.steps, self.step_size,
                             random_start=self.random_start, seed=self.seed * 1_000_003 + self.step,
                             normalize=self.normalizer)
            delta = (adv - x01).flatten(1)
            size = (delta.norm(dim=1) if self.norm == "l2" else delta.abs().amax(1)).mean()
            fmt = torch.channels_last if x.dim() == 4 and x.stride(1) == 1 else torch.contiguous_format
            x = self.normalizer(adv).contiguous(memory_format=fmt)   # the loader's memory format
        else:
            size = torch.zeros((), device=x.device)
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, logits, {"adv_ce": loss.detach(), "delta": size.detach()}

    def extra_repr(self) -> str:
        return f"eps={self.eps}, norm={self.norm!r}, steps={self.steps}, step_size={self.step_size}"


def robust_accuracy(model: nn.Module, data: Dataset, eps: float, norm: str = "l2", steps: int = 10,
                    step_size: float | None = None, *, n: int | None = None, batch_size: int = 256,
                    split: str = "test", seed: int = 0) -> float:
    """Accuracy of ``model`` (in eval mode) on the first ``n`` images of ``split`` attacked by
    :func:`pgd_attack` (random start, ``seed``), in percent like ``History``'s ``test_acc``;
    ``eps = 0`` gives the clean accuracy."""
    x_all, y_all = data.split(split)
    if n is not None:
        x_all, y_all = x_all[:n], y_all[:n]
    p = next(model.parameters())
    normalizer = Normalizer(data.mean, data.std).to(p.device)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(x_all), batch_size):
            xb = x_all[i:i + batch_size].to(p.device).float() / 255
            yb = y_all[i:i + batch_size].to(p.device)
            adv = pgd_attack(model, xb, yb, eps, norm, steps, step_size, random_start=eps > 0,
                             seed=seed + i, normalize=normalizer)
            with torch.no_grad():
                correct += int((model(normalizer(adv)).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / max(len(x_all), 1)


def class_split(data: Dataset, classes: Sequence[int], *, name: str | None = None) -> Dataset:
    """The images of ``data`` whose class is in ``classes``, relabelled ``0 .. len(classes) - 1``
    in that order (train, val and test splits alike)."""
    classes = list(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(
            isinstance(c, int) and 0 <= c < data.num_classes for c in classes):
        raise ValueError(f"classes must be at least 2 distinct class indices of {data.name!r} "
                         f"(0 .. {data.num_classes - 1}), got {classes!r}")
    lut = torch.full((data.num_classes,), -1, dtype=torch.int64)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    parts = {}
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        keep = lut[y] >= 0 if len(y) else torch.zeros(0, dtype=torch.bool)
        parts[f"x_{split}"], parts[f"y_{split}"] = x[keep], lut[y[keep]] if len(y) else y
    return Dataset(name or f"{data.name}{classes}", classes=tuple(data.classes[c] for c in classes),
                   mean=data.mean, std=data.std, **parts)


def few_shot(data: Dataset, per_class: int, *, seed: int = 0) -> Dataset:
    """``data`` with only ``per_class`` training images of each class (drawn with ``seed``);
    validation and test splits are kept whole."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for k in range(data.num_classes):
        idx = torch.nonzero(data.y_train == k).flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {k} of {data.name!r} has {len(idx)} training images, fewer than {per_class}")
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    keep = torch.cat(keep).sort().values
    return Dataset(f"{data.name}, {per_class} labels per class", data.x_train[keep], data.y_train[keep], data.x_test,
                   data.y_test, data.classes, data.mean, data.std, data.x_val, data.y_val)


class TransferModel(nn.Module):
    """A copy of a source network with its classifier ``fc`` replaced by a fresh linear ``head``
    for ``num_classes`` target classes. ``frozen=True`` (fixed-feature transfer): the body gets no
    gradients and stays in eval mode (its BatchNorm statistics never move), so only the head
    learns; ``frozen=False``: the whole network is fine-tuned."""

    def __init__(self, source: nn.Module, num_classes: int, *, frozen: bool) -> None:
        super().__init__()
        if not isinstance(getattr(source, "fc", None), nn.Linear):
            raise TypeError(f"the source model must end with a linear layer named 'fc', got {type(source).__name__}")
        body = copy.deepcopy(source)
        in_features = body.fc.in_features
        body.fc = nn.Identity()
        self.body, self.head, self.frozen = body, nn.Linear(in_features, num_classes), frozen
        if frozen:
            self.body.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if self.frozen:
            self.body.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def transfer(source: nn.Module, target: Dataset, mode: str = "probe", recipe: train.Recipe | None = None, *,
             seed: int = 0, **fit_kwargs) -> train.Run:
    """Transfer ``source`` to ``target``: ``mode="probe"`` trains a linear head on frozen features,
    ``mode="finetune"`` trains the whole network from the source weights (the head from ``seed``)."""
    if mode not in TRANSFER_MODES:
        raise ValueError(f"mode must be one of {TRANSFER_MODES}, got {mode!r}")
    source_cpu = copy.deepcopy(source).cpu()
    return train.train_model(lambda: TransferModel(source_cpu, target.num_classes, frozen=mode == "probe"),
                             target, recipe, seed=seed, description=f"{mode} (seed {seed})", **fit_kwargs)


def linf_corner_l2(eps: float, shape: Sequence[int]) -> float:
    r"""The $\ell_2$ norm of a perturbation that moves every value of an image of ``shape`` by
    ``eps`` (a corner of the $\ell_\infty$ ball): $\epsilon\sqrt D$."""
    return _check_eps(eps) * math.sqrt(math.prod(shape))
