r"""Chapter 5 -- learning from ensembles: the method.

Nam, Yoon, Lee, Lee (NeurIPS 2021), "Diversity Matters When Learning From Ensembles", with
BatchEnsemble (Wen, Tran, Ba, ICLR 2020) and Output Diversified Sampling (ODS; Tashiro,
Song, Ermon, NeurIPS 2020). In the chapter's order: images in $[0, 1]$ (:func:`to_unit_range`;
the loader's images are normalised, ODS works in $[0, 1]$); the Deep Ensemble teacher
(:class:`DeepEnsemble`, $M$ networks run as one with ``torch.func``, trained with
:class:`EnsembleCrossEntropy` by :func:`pretrained_ensemble`); the perturbations
(:func:`ods_direction`, :func:`ods_perturb`, :func:`gaussian_perturb`); one-to-one distillation
into a BatchEnsemble student (:class:`OneToOneDistillation`, :func:`train_student`);
:func:`predict_members`; the opening picture's data (:func:`toy_ensemble_1d`).

Re-exported here, so that every name of the chapter is found in one place: the BatchEnsemble
layers (:mod:`.batchensemble`), the Jacobian view of KD on perturbed inputs
(:mod:`.ensembles_jacobian`), evaluation and reported numbers (:mod:`.ensembles_eval`), figures
(:mod:`.ensembles_plots`), self-checks (:mod:`minidistill.exercises.ensembles`). The measures
(diversity, DEE, temperature scaling) live in :mod:`minidistill.metrics`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .. import metrics
from ..data import Dataset, DeviceLoader
from ..exercises.ensembles import check_batch_ensemble_linear, check_ods_step, check_pairwise_kl
from ..losses import Objective, TeacherObjective, check_temperature, kd_loss, upcast
from ..models import CifarResNet
from ..runtime import Profile, data_root, get_device, get_profile, seed_everything
from ..train import History, Recipe, Trained, autocast, autocast_dtype, fit, load_or_train, train_model
from .batchensemble import (BatchEnsembleConv2d, BatchEnsembleLinear, BatchEnsembleResNet, GlobalAvgPool,
                            _check_depth, _check_size, ensemble_log_probs)
from .ensembles_eval import REPORTED, dee_score, ensemble_ladder, ensemble_scores, metrics_table
from .ensembles_jacobian import (frobenius_jacobian_penalty, jacobian_matching_penalty, kl_first_order, perturbed_kl,
                                 row_space_fraction, softmax_jacobian)
from .ensembles_plots import plot_diversity_by_confidence, plot_perturbation, plot_toy_ensemble

__all__ = [
    "METHODS", "to_unit_range", "from_unit_range", "subset",
    # the Deep Ensemble teacher
    "create_member", "DeepEnsemble", "EnsembleCrossEntropy", "new_deep_ensemble", "pretrained_ensemble",
    # perturbations, the objective, the student's training
    "ods_direction", "ods_perturb", "gaussian_perturb", "OneToOneDistillation", "train_student",
    "predict_members", "toy_ensemble_1d",
    # re-exported: batchensemble
    "GlobalAvgPool", "ensemble_log_probs", "BatchEnsembleLinear", "BatchEnsembleConv2d", "BatchEnsembleResNet",
    # re-exported: ensembles_jacobian, ensembles_eval, ensembles_plots, exercises.ensembles
    "perturbed_kl", "kl_first_order", "jacobian_matching_penalty", "softmax_jacobian", "row_space_fraction",
    "frobenius_jacobian_penalty",
    "ensemble_scores", "ensemble_ladder", "dee_score", "metrics_table", "REPORTED",
    "plot_toy_ensemble", "plot_diversity_by_confidence", "plot_perturbation",
    "check_batch_ensemble_linear", "check_ods_step", "check_pairwise_kl",
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


def create_member(depth: int, width: int, num_classes: int) -> CifarResNet:
    """One CIFAR ResNet of depth ``6n + 2`` with stage widths ``(width, width, 2 width, 4 width)``:
    ``create_member(20, 16, 10)`` has the weights and outputs of ``models.create_model('resnet20',
    10)`` (its ``pool`` stage is a :class:`GlobalAvgPool`, the same function)."""
    _check_depth(depth)
    _check_size("width", width)
    _check_size("num_classes", num_classes, 2, "a classifier needs at least two classes")
    model = CifarResNet(depth, (width, width, 2 * width, 4 * width), num_classes)
    model.pool = GlobalAvgPool()
    return model


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
        x = self._as_members(x, params)  # autocast may skip ops inside vmap: inputs take the members' dtype

        def one(p: dict, b: dict, xi: torch.Tensor) -> torch.Tensor:
            return functional_call(self._base, (p, b), (xi,))

        return vmap(one, in_dims=(0, 0, 0 if per_member else None))(params, buffers, x)

    def member_forward(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` of member ``j`` alone (one network's cost, not ``M``)."""
        if not isinstance(j, int) or not 0 <= j < self.ensemble_size:
            raise ValueError(f"member index j must be an int in [0, {self.ensemble_size}), got {j!r}")
        params, buffers = self.stacked_state()
        state = {k: v[j] for k, v in (*params.items(), *buffers.items())}
        return functional_call(self._base, state, (self._as_members(x, params),))

    @staticmethod
    def _as_members(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x`` in the members' floating dtype (bfloat16 for a teacher that fit cast once)."""
        return x.to(next(iter(params.values())).dtype) if x.is_floating_point() else x

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


class EnsembleCrossEntropy(Objective):
    r"""The objective that trains every member on its own labels at once:
    $\sum_{j=1}^M \mathrm{CE}(z_j, y_j)$ (a *sum*, so each member's gradient, momentum and weight
    decay are exactly those of training it alone). Its terms are ``ce``, the members' mean
    cross-entropy (one network's loss), and ``member_acc``, their mean training accuracy in %.

    Two ways to feed the members:

    * ``EnsembleCrossEntropy()``: every member sees ``fit``'s batch ``x, y``; the logits returned
      are the ensemble's $\log\bar p$ (``fit``'s ``train_acc`` is the ensemble's).
    * ``EnsembleCrossEntropy(data, seeds)``: member $j$ sees its *own* data order and
      augmentation, the very batches that ``fit(..., seed=seeds[j])`` would draw from ``data``'s
      training split (a :class:`~minidistill.data.DeviceLoader` per member, iterated in step with
      ``fit``; of ``fit``'s own batch only the size is used). So member $j$ is trained exactly as
      if it were trained alone with ``fit(seed=seeds[j])``, as independently trained Deep Ensemble
      members are. The members see different images, so no ensemble logits are returned
      (``member_acc`` reports the training accuracy). The loaders are rebuilt from ``fit``'s
      ``epoch`` and ``step``, so a resumed run draws the same batches.
    """

    def __init__(self, data: Dataset | None = None, seeds: Sequence[int] | None = None) -> None:
        super().__init__()
        if (data is None) != (seeds is None):
            raise ValueError("give both data and seeds (one data-order seed per member) for per-member data "
                             "orders, or neither (every member sees fit's batch)")
        if data is not None and not isinstance(data, Dataset):
            raise ValueError(f"data must be a minidistill Dataset, got {type(data).__name__}")
        if seeds is not None:
            seeds = tuple(seeds)
            if len(seeds) < 2:
                raise ValueError(f"seeds must give one seed per member, at least 2, got {seeds!r}")
            for j, v in enumerate(seeds):
                _check_size(f"seeds[{j}]", v, 0)
        self.data, self.seeds = data, seeds
        self._loaders: list[DeviceLoader] = []
        self._iters: list = []
        self._cursor: tuple[int, int] | None = None  # (epoch, index of the next batch) the iterators are at

    def extra_repr(self) -> str:
        return "every member sees fit's batch" if self.seeds is None else f"own data order per member, seeds={self.seeds}"

    def member_batches(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Member $j$'s batch ``x[j], y[j]`` (``[M, N, C, H, W]``, ``[M, N]``) at ``fit``'s current
        ``epoch`` and ``step``: batch ``step - epoch * steps_per_epoch`` of the epoch, drawn by a loader
        seeded ``seeds[j]``."""
        if self.seeds is None:
            raise ValueError("member_batches needs per-member data orders: EnsembleCrossEntropy(data, seeds)")
        if not self._loaders or self._loaders[0].batch_size != batch_size or self._loaders[0].device != device:
            first = DeviceLoader.from_dataset(self.data, "train", batch_size, device=device, channels_last=False,
                                              seed=self.seeds[0])
            self._loaders = [first] + [DeviceLoader(first.x, first.y, batch_size, mean=self.data.mean, std=self.data.std,
                                                    train=True, device=device, channels_last=False, seed=s)
                                       for s in self.seeds[1:]]   # one copy of the images on the device, shared
            self._cursor = None
        epoch, index = self.epoch, self.step - self.epoch * self.steps_per_epoch
        if not 0 <= index < len(self._loaders[0]):
            raise ValueError(f"step {self.step} is not in epoch {self.epoch} of {len(self._loaders[0])} batches "
                             f"(steps_per_epoch={self.steps_per_epoch}): is the batch size fit's?")
        if self._cursor != (epoch, index):  # a new epoch, a resumed run, or a first call: replay up to the step
            self._iters = []
            for loader in self._loaders:
                loader.set_epoch(epoch)
                it = iter(loader)
                for _ in range(index):
                    next(it)
                self._iters.append(it)
        xs, ys = zip(*(next(it) for it in self._iters))
        self._cursor = (epoch, index + 1)
        return torch.stack(xs), torch.stack(ys)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if not hasattr(model, "member_logits"):
            raise TypeError(f"EnsembleCrossEntropy trains an ensemble with member_logits(x) -> [M, N, K] "
                            f"(a DeepEnsemble), got {type(model).__name__}")
        if self.seeds is None:
            z = model.member_logits(x)  # [M, N, K]: every member on the same batch
            targets = y.expand(z.shape[0], -1)
        else:
            if getattr(model, "ensemble_size", None) != len(self.seeds):
                raise ValueError(f"seeds gives {len(self.seeds)} data orders, the ensemble has "
                                 f"{getattr(model, 'ensemble_size', None)} members")
            xs, targets = self.member_batches(x.shape[0], x.device)
            z = model.member_logits(xs.to(x.dtype), per_member=True)  # [M, N, K]: member j on its own batch
        m = z.shape[0]
        ce = F.cross_entropy(upcast(z).flatten(0, 1), targets.flatten())
        member_acc = 100.0 * (z.detach().argmax(-1) == targets).float().mean()
        logits = ensemble_log_probs(z) if self.seeds is None else None
        return ce * m, logits, {"ce": ce.detach(), "member_acc": member_acc}


def new_deep_ensemble(depth: int, width: int, num_classes: int, size: int = 4, seed: int = 0) -> DeepEnsemble:
    """A freshly initialised ensemble; member ``j`` is initialised from seed ``seed + j``, as
    ``create_member`` after ``seed_everything(seed + j)`` would be."""
    _check_size("size", size, 2, "a Deep Ensemble has at least two members")
    _check_size("seed", seed, 0)
    create_member(depth, width, num_classes)  # check the architecture once, before seeding anything
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
    eval_every: int | None = None,
) -> Trained:
    """A Deep Ensemble of ``size`` members trained together on ``data`` (vmapped, one
    :func:`~minidistill.train.fit`), from the cache or trained now and cached. Member ``j`` is
    initialised from seed ``seed + j`` and sees its own data order and augmentation, those of
    ``fit(seed=seed + j)`` (:class:`EnsembleCrossEntropy` with ``seeds``): it is trained exactly
    as if it were trained alone, as a Deep Ensemble's members are.

    The checkpoint lives in ``<root>/checkpoints/`` under a name made of the architecture, data,
    profile, seed and recipe. As with :func:`~minidistill.train.pretrained`, a cached file is
    used only if its metadata match (including a digest of the training data) and its weights
    hash to the stored digest; otherwise it is retrained with a warning. An interrupted
    training resumes where it stopped. ``eval_every`` goes to ``fit``: by default the val and test
    splits are scored after the last epoch only (nobody plots a cached teacher's curves, and each
    scoring is a forward pass of every member over both splits); pass 1 to score every epoch.
    """
    if not isinstance(data, Dataset):
        raise ValueError(f"data must be a minidistill Dataset, got {type(data).__name__}")
    model = new_deep_ensemble(depth, width, data.num_classes, size, seed)  # checks depth, width, size, seed
    prof = profile if isinstance(profile, Profile) else get_profile(profile, device)
    meta = {"kind": "deep-ensemble", "depth": depth, "width": width, "size": size, "dataset": data.name,
            "n_train": len(data.x_train), "data_digest": _data_digest(data), "profile": prof.name,
            "seed": seed, "data_order": "own per member", "recipe": recipe.fields()}
    folder = data_root(root) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"de{size}-resnet{depth}w{width}-{data.name}{len(data.x_train)}-{prof.name}"
                     f"-s{seed}-own-{recipe.key()}.pt")
    dev = get_device(device) if device is not None else prof.device
    objective = EnsembleCrossEntropy(data, seeds=[seed + j for j in range(size)])
    return load_or_train(
        path, meta, model,
        lambda partial: fit(model, data, objective, recipe, seed=seed, device=dev, checkpoint=partial,
                            progress=progress, eval_every=eval_every, description=f"DE-{size} resnet{depth} (teacher)"),
        device=dev)


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
    (``confidence=True``) $c(x) = \max_k \mathrm{softmax}(\mathrm{model}(x)/T)_k \in [1/K, 1]$, so a
    ConfODS step is never longer than the ODS step: nearly the full step where the model is
    confident, a shorter one where it is not. Pixels that would leave $[0, 1]$ stop at the bound.
    ``model`` takes images in $[0, 1]$ (normalise inside it).
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


class OneToOneDistillation(TeacherObjective):
    r"""The objective of Nam et al.: student member $j$ (logits $z_j$) learns from teacher member
    $j$ (logits $v_j$), in the course's notation (the paper's $\hat{\mathcal S}_j, \hat{\mathcal T}_j, \tau$),

    $$\mathcal L = (1-\alpha)\,H\big(q, \mathrm{softmax}(z_j(x))\big)
      + \alpha\,T^2\,\mathrm{KL}\Big(\mathrm{softmax}\tfrac{v_j(\tilde x)}{T}\,\Big\|\,
        \mathrm{softmax}\tfrac{z_j(\tilde x)}{T}\Big),$$

    averaged over all $M N$ rows; terms logged: ``ce`` and ``kd``. ``perturbation`` picks
    $\tilde x$: ``'kd'`` ($\tilde x = x$), ``'gaussian'``, ``'ods'`` or ``'confods'`` ($\eta$ =
    ``eta`` per pixel in $[0, 1]$; the ODS direction comes from one teacher member drawn per
    batch, at the KD temperature $T$). The cross-entropy always sees the clean $x$, so a
    perturbed method runs the student twice per step.

    The loader's images are normalised: they are mapped to $[0, 1]$ with ``mean``/``std``,
    perturbed, clipped, and normalised again.
    """

    def __init__(self, teacher: DeepEnsemble, temperature: float = 4.0, alpha: float = 0.9,
                 perturbation: str = "kd", eta: float = 1 / 255, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        if not isinstance(teacher, DeepEnsemble):
            raise ValueError(f"teacher must be a DeepEnsemble, got {type(teacher).__name__}")
        super().__init__(teacher)
        check_temperature(temperature)
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if perturbation not in METHODS:
            raise ValueError(f"perturbation must be one of {METHODS}, got {perturbation!r}")
        _check_eta(eta)
        if perturbation != "kd" and (mean is None or std is None):
            raise ValueError(f"perturbation {perturbation!r} needs the data's mean and std (to map the loader's "
                             "normalised images to [0, 1]); pass mean=data.mean, std=data.std")
        self.temperature, self.alpha, self.perturbation, self.eta = temperature, alpha, perturbation, eta
        self.mean, self.std = mean, std

    def _frozen(self) -> DeepEnsemble:  # the teacher as fit prepared it (cast once on a GPU), else as given
        return self._fast[0] if self._fast else self.teacher

    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher members' logits ``[M, N, K]`` on ``x``, every member on every row (no
        gradients; eager even under ``fit(compile=True)``, which compiles only the student)."""
        with torch.no_grad():
            return self._frozen().member_logits(x)

    def perturb_unit(self, u: torch.Tensor, *, member: int | None = None,
                     w: torch.Tensor | None = None) -> torch.Tensor:
        """$\\tilde u$ for a batch of images ``u`` in $[0, 1]$ (in $[0, 1]$ too): Gaussian noise,
        or an ODS/ConfODS step from teacher ``member`` (drawn for the whole batch when ``None``)
        with ODS weights ``w`` ``[N, K]`` (drawn per sample when ``None``)."""
        if self.perturbation == "kd":
            return u
        if self.perturbation == "gaussian":
            return (u + self.eta * torch.randn_like(u)).clamp(0, 1)
        teacher = self._frozen()
        j = int(torch.randint(teacher.ensemble_size, ())) if member is None else member  # CPU draw: no sync
        teacher_j = lambda v: teacher.member_forward(j, from_unit_range(v, self.mean, self.std))  # noqa: E731
        return _ods_step(teacher_j, u, self.eta, w, self.temperature, self.perturbation == "confods")

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """$\\tilde x$ for a batch of the loader's normalised images ``x``: un-normalise to
        $[0, 1]$, perturb (:meth:`perturb_unit`), normalise again."""
        if self.perturbation == "kd":
            return x
        return from_unit_range(self.perturb_unit(to_unit_range(x, self.mean, self.std)), self.mean, self.std)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        m = self.teacher.ensemble_size
        if getattr(model, "ensemble_size", None) != m:
            raise ValueError(f"one-to-one distillation pairs student and teacher members: the student has "
                             f"ensemble_size={getattr(model, 'ensemble_size', None)}, the teacher {m}")
        x_kd = self.perturb(x)
        t = self.teacher_forward(x_kd)                               # [M, N, K]: teacher j on x~
        s = model.member_logits(x)                                   # [M, N, K]: student j on x (block j)
        s_kd = s if x_kd is x else model.member_logits(x_kd)         # a second student pass on x~
        ce = F.cross_entropy(upcast(s).flatten(0, 1), y.repeat(m))
        kd = kd_loss(s_kd.flatten(0, 1), t.flatten(0, 1), self.temperature, check_inputs=self.step == 0)
        loss = (1 - self.alpha) * ce + self.alpha * kd               # member j against teacher j only
        return loss, ensemble_log_probs(s), {"ce": ce.detach(), "kd": kd.detach()}


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
    (``depth``, ``width``) with ``method`` (one of :data:`METHODS`), through
    :func:`~minidistill.train.train_model`. The same ``seed`` gives the same initial weights and
    data order for every method, so runs differ only in the perturbation. Other keyword
    arguments go to ``fit`` (``eval_every=None`` when nobody plots the curves). The validation
    split serves once, after training (temperature scaling), so only the test split is scored
    during training unless ``eval_splits`` says otherwise."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_depth(depth)
    _check_size("width", width)
    objective = OneToOneDistillation(teacher, temperature, alpha, method, eta, data.mean, data.std)
    fit_kwargs.setdefault("eval_splits", ("test",))
    student, history = train_model(lambda: BatchEnsembleResNet(depth, width, data.num_classes, teacher.ensemble_size),
                                   data, recipe, objective, seed=seed,
                                   description=f"BE-{teacher.ensemble_size} {_METHOD_NAMES[method]} (seed {seed})",
                                   **fit_kwargs)
    return student, history


# -- the members' predictions -------------------------------------------------------------------


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
    dtype = autocast_dtype(device, amp)
    model.eval()
    out = []
    for x, _ in loader:
        if perturbation is not None:
            x = from_unit_range(perturbation(to_unit_range(x, data.mean, data.std).clamp(0, 1)), data.mean, data.std)
        with autocast(device, dtype):
            out.append(model.member_logits(x).float())
    return torch.cat(out, dim=1)


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
    for _ in range(steps):  # a loop of its own: points on a line are not images, which fit's loader serves
        loss, _, _ = objective(ensemble, x_train, y_train)
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
