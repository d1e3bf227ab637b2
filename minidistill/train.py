"""One trainer for every chapter: :func:`fit`, :func:`evaluate`, :func:`predict`, and
:func:`pretrained` teachers cached on disk.

A :class:`Recipe` says *what* is learned (epochs, batch size, learning rate, ...) and is what
a cached checkpoint is keyed by; ``fit``'s keyword arguments say *how* it runs (device, mixed
precision, channels_last, torch.compile, checkpoints, progress) and never change the result
beyond floating-point noise.

A training step is one call of the *objective* -- ``objective(model, x, y) -> (loss, logits,
terms)`` (see :class:`minidistill.losses.Objective`) -- under autocast, then backward and an
optimiser step. :func:`train_model` builds a seeded model and fits it: the helper every
chapter's training functions are written on.
Nothing is copied to the host inside an epoch except a finiteness check every few steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import Dataset, DeviceLoader, load_dataset
from .losses import CrossEntropy, Objective
from .models import create_model
from .runtime import Profile, data_root, device_name, get_device, get_profile, seed_everything, show_progress

__all__ = [
    "Recipe",
    "SCHEDULES",
    "PAPER_RECIPE",
    "FAST_RECIPE",
    "default_recipe",
    "History",
    "TrainingDiverged",
    "autocast_dtype",
    "autocast",
    "fit",
    "Run",
    "build_model",
    "train_model",
    "predict",
    "evaluate",
    "score_loader",
    "Trained",
    "pretrained",
    "load_or_train",
]


@dataclass(frozen=True)
class Recipe:
    """What is learned: SGD with momentum and a one-cycle (or cosine, step, or constant) schedule.

    ``schedule="step"`` multiplies the rate by ``gamma`` at each epoch in ``milestones`` (the
    benchmark schedule of RepDistiller: x0.1 at epochs 150, 180 and 210 of 240); the two fields
    are ignored, and left out of the recipe's key and repr, for the other schedules.
    ``optimizer="adam"`` uses Adam instead (betas 0.9, 0.999; ``weight_decay`` as its L2
    term; ``momentum`` and ``nesterov`` are then unused), for methods whose papers train
    with it (JEM, say).
    """

    epochs: int = 30
    batch_size: int = 512
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "onecycle"
    optimizer: str = "sgd"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        def number(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (number(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (number(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must be a number in [0, 1), got {self.momentum!r}")
        if not (number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (number(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {self.label_smoothing!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {self.nesterov!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.milestones, list):  # (a list, as JSON gives it back, is taken as a tuple)
            object.__setattr__(self, "milestones", tuple(self.milestones))
        stones = self.milestones
        if not (isinstance(stones, tuple) and all(isinstance(m, int) and not isinstance(m, bool) for m in stones)
                and list(stones) == sorted(set(stones)) and all(0 < m < self.epochs for m in stones)):
            raise ValueError(f"milestones must be a tuple of increasing int epochs in (0, epochs={self.epochs}), "
                             f"got {stones!r}")
        if not (number(self.gamma) and 0 < self.gamma <= 1):
            raise ValueError(f"gamma must be a number in (0, 1], got {self.gamma!r}")
        if self.schedule == "step" and not stones:
            raise ValueError("schedule='step' needs milestones, the epochs at which the rate is multiplied by gamma")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some fields changed: ``recipe.replace(epochs=10)``."""
        return dataclasses.replace(self, **changes)

    def fields(self) -> dict[str, Any]:
        """The fields that matter (``milestones`` and ``gamma`` only for the step schedule), as JSON
        holds them (``milestones`` a list), so that a recipe compares equal to one read back."""
        d = dataclasses.asdict(self)
        if self.schedule != "step":
            del d["milestones"], d["gamma"]
        else:
            d["milestones"] = list(self.milestones)
        return d

    def key(self) -> str:
        """A short hash of every field that matters: two recipes with the same key train the same way."""
        return hashlib.sha1(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:10]

    def __repr__(self) -> str:
        shown = {k: getattr(self, k) for k in self.fields()}
        return "Recipe(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


#: the learning-rate schedules a :class:`Recipe` can name
SCHEDULES = ("onecycle", "cosine", "step", "constant")

#: RepDistiller's CIFAR-100 benchmark recipe (``train_student.py``, ``train_teacher.py``): 240 epochs,
#: SGD (momentum 0.9, no Nesterov) at lr 0.05, x0.1 at epochs 150, 180, 210, weight decay 5e-4,
#: batch 64. RepDistiller lowers lr to 0.01 for its MobileNetV2 and ShuffleNet students, which
#: this package does not build.
PAPER_RECIPE = Recipe(epochs=240, batch_size=64, lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4,
                      schedule="step", milestones=(150, 180, 210), gamma=0.1)

#: the package's fast alternative for the same table: large batch, one-cycle, bf16 on a GPU (``fit``'s
#: default precision); 60 epochs at batch 512 take about a quarter of PAPER_RECIPE's images
FAST_RECIPE = Recipe(epochs=60, batch_size=512, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)


def default_recipe(profile: Profile | str | None = None) -> Recipe:
    """The course's training recipe at a profile's size (smoke: 8 short epochs on CPU; paper:
    :data:`PAPER_RECIPE`, RepDistiller's benchmark schedule)."""
    name = profile.name if isinstance(profile, Profile) else get_profile(profile).name
    if name == "smoke":
        return Recipe(epochs=8, batch_size=128, lr=0.1)
    if name == "paper":
        return PAPER_RECIPE
    return Recipe()


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped before saving anything broken."""


@dataclass
class History:
    """Per-epoch records (``epoch, lr, train_loss, train_acc, val_*, test_*, seconds``) and
    facts about the run (``meta``). ``history["test_acc"]`` is that column as a list."""

    records: list[dict[str, float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> list[float]:
        if not self.records or key not in self.records[0]:
            have = sorted(self.records[0]) if self.records else []
            raise KeyError(f"no column {key!r} in this history (columns: {have})")
        return [r[key] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def final(self, key: str = "test_acc") -> float:
        """The last epoch's value: what the course reports."""
        return self[key][-1]

    def to_dict(self) -> dict[str, Any]:
        return {"records": self.records, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        return cls(list(d["records"]), dict(d["meta"]))

    def plot(self, *args: Any, **kwargs: Any):
        """Training curves; see :func:`minidistill.plots.plot_history`."""
        from .plots import plot_history

        return plot_history(self, *args, **kwargs)


def autocast_dtype(device: torch.device, amp: bool | str = "auto") -> torch.dtype | None:
    """The mixed-precision dtype ``fit`` uses on ``device``: with ``amp='auto'``, bfloat16 on GPUs
    that compute in it natively (Ampere and newer), float16 (with a GradScaler) on older ones
    such as Colab's T4 -- where bfloat16 would only be emulated, and slowly -- and ``None``
    (full precision) on the CPU. ``amp=True`` forces mixed precision, ``False`` turns it off."""
    if not (amp is True or amp is False or (isinstance(amp, str) and amp == "auto")):
        raise ValueError(f"amp must be True, False or 'auto', got {amp!r}")
    if amp == "auto":
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.5 has no such argument (and reports native support only)
            native = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` in ``dtype``, or a context that does nothing for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)




@torch.no_grad()
def _logits(model: nn.Module, loader: DeviceLoader, dtype: torch.dtype | None) -> torch.Tensor:
    model.eval()
    out = []
    for x, _ in loader:
        with autocast(loader.device, dtype):
            out.append(model(x).float())
    return torch.cat(out)


def _scores(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {"loss": F.cross_entropy(logits, y).item(), "acc": 100.0 * (logits.argmax(1) == y).float().mean().item()}


def score_loader(model: nn.Module, loader: DeviceLoader, dtype: torch.dtype | None = None) -> dict[str, float]:
    """``{'loss', 'acc'}`` of ``model`` (put in eval mode) over an evaluation
    :class:`~minidistill.data.DeviceLoader`, under autocast in ``dtype``: what :func:`fit` records
    after an epoch, for training loops of their own."""
    return _scores(_logits(model, loader, dtype), loader.y)


def _score_ranks(model: nn.Module, loader: DeviceLoader, dtype: torch.dtype | None) -> dict[str, float]:
    """:func:`score_loader` over every rank's part of a split: the sums are added over ranks."""
    if not distributed.is_distributed():
        return score_loader(model, loader, dtype)
    sums = torch.zeros(3, dtype=torch.float64, device=loader.device)
    if len(loader.y):
        logits = _logits(model, loader, dtype)
        sums += torch.stack([F.cross_entropy(logits, loader.y, reduction="sum").double(),
                             (logits.argmax(1) == loader.y).sum().double(), torch.tensor(float(len(loader.y)),
                                                                                          device=loader.device)])
    loss, correct, n = distributed.all_reduce_sum(sums).tolist()
    return {"loss": loss / n, "acc": 100.0 * correct / n}


#: DDP leaves buffers alone during training (an objective's replay buffer is each rank's own; fit copies
#: rank 0's BatchNorm statistics after each epoch); newer torch renamed the argument
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


class _Step(nn.Module):
    """The student and the objective as one module, so that ``DistributedDataParallel`` averages the
    gradients of both (a regressor's too); the frozen teacher has none to average."""

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return self.objective(self.model, x, y)


def predict(
    model: nn.Module,
    data: Dataset,
    split: str = "test",
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    amp: bool | str = "auto",
) -> torch.Tensor:
    """Float32 logits ``[N, K]`` of ``model`` on one split, in order, on ``model``'s device.

    The model is put in eval mode and left there.
    """
    device = get_device(device) if device is not None else next(model.parameters()).device
    loader = DeviceLoader.from_dataset(data, split, batch_size, train=False, device=device,
                                       channels_last=device.type == "cuda")
    return _logits(model, loader, autocast_dtype(device, amp))


def evaluate(
    model: nn.Module,
    data: Dataset,
    split: str = "test",
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    amp: bool | str = "auto",
) -> dict[str, float]:
    """``{'loss': mean cross-entropy, 'acc': top-1 accuracy in %}`` on one split."""
    logits = predict(model, data, split, batch_size=batch_size, device=device, amp=amp)
    return _scores(logits, data.split(split)[1].to(logits.device))


def _objective_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the objective: its own parameters and buffers and those of its
    submodules (a regressor, a replay buffer), leaving out frozen networks -- a
    :class:`~minidistill.losses.TeacherObjective`'s teacher, or any submodule whose parameters
    are all frozen -- which the caller supplies again on resume."""
    from .losses import TeacherObjective

    skip = []
    for name, module in objective.named_children():
        params = list(module.parameters())
        frozen = params and not any(p.requires_grad for p in params)
        if frozen or (isinstance(objective, TeacherObjective) and name == "teacher"):
            skip.append(name + ".")
    return {k: v for k, v in objective.state_dict().items() if not k.startswith(tuple(skip))}


def _make_schedule(opt: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == "onecycle" and total >= 4:  # (under 4 steps there is no cycle: constant)
        # at least ~2 steps in the warm-up phase, so that short runs keep a real cycle
        pct = min(max(0.25, 2.5 / total), 0.5)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total, pct_start=pct)
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if recipe.schedule == "step":  # stepped per batch, like the others: milestones counted in steps
        return torch.optim.lr_scheduler.MultiStepLR(opt, [m * steps_per_epoch for m in recipe.milestones],
                                                    gamma=recipe.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def _make_optimizer(params: list[nn.Parameter], recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimiser; fused into one kernel per step on CUDA where torch has it."""
    fused = {"fused": True} if device.type == "cuda" else {}
    if recipe.optimizer == "adam":
        make = lambda **kw: torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **kw)  # noqa: E731
    else:
        make = lambda **kw: torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,  # noqa: E731
                                            nesterov=recipe.nesterov, weight_decay=recipe.weight_decay, **kw)
    try:
        return make(**fused)
    except (TypeError, RuntimeError):  # a torch without the fused kernel for this optimiser
        return make()


def _unpack(out: Any, objective: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    if isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], dict):
        return out
    got = f"a {len(out)}-tuple" if isinstance(out, tuple) else type(out).__name__
    raise TypeError(
        f"{type(objective).__name__}.forward must return (loss, logits or None, terms dict), got {got}. "
        "Return `loss, logits, {}` when there is nothing more to log (see losses.Objective)."
    )


def _differences(saved: Any, now: dict[str, Any]) -> str:
    if not isinstance(saved, dict):
        return "the file holds no run description"
    keys = sorted(set(saved) | set(now), key=str)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if any(k in ("recipe", "parameters") for k in keys if saved.get(k) != now.get(k)):
        diffs = [d for d in diffs if not d.startswith(("recipe", "parameters"))]
        for k in ("recipe", "parameters"):
            a, b = saved.get(k) or {}, now.get(k) or {}
            if a != b and isinstance(a, dict) and isinstance(b, dict):
                diffs += [f"{k}.{f}: checkpoint {a.get(f)!r} vs now {b.get(f)!r}"
                          for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)][:5]
    return "; ".join(diffs)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what a checkpoint stores (JSON-like, loadable with weights_only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _load_checkpoint(path: Path, device: torch.device) -> dict | None:
    """A checkpoint's contents (tensors and plain data only: ``weights_only=True``), or None with a
    warning when the file is damaged -- it is then moved aside to ``<name>.damaged`` and training
    starts from scratch."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or "fingerprint" not in state:
            raise ValueError("not a minidistill training checkpoint")
        return state
    except Exception as e:  # truncated, corrupt, or not ours
        damaged = path.with_name(path.name + ".damaged")
        warnings.warn(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); moved it to "
                      f"{damaged.name} and training from the start", stacklevel=3)
        os.replace(path, damaged)
        return None


def _check_outputs(model: nn.Module, example: torch.Tensor, data: Dataset) -> None:
    """Fail before training when a classifier has fewer outputs than the data has classes."""
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception:  # a model whose forward needs more than images: let the objective decide
        return
    finally:
        model.train(was)
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] < data.num_classes:
        raise ValueError(f"the model gives {out.shape[1]} outputs but {data.name!r} has {data.num_classes} classes "
                         f"(labels up to {int(data.y_train.max())}): build it with num_classes={data.num_classes}")


def _check_finite_parameters(model: nn.Module, objective: nn.Module, epoch: int, path: Path | None) -> None:
    """One reduction over every trainable tensor at the end of an epoch: a NaN or inf from the
    epoch's last steps is caught before anything is written (the loss check alone misses a
    non-finite gradient whose step made the weights non-finite)."""
    tensors = [p.detach() for p in (*model.parameters(), *objective.parameters()) if p.requires_grad]
    tensors += [b.detach() for b in model.buffers() if b.is_floating_point()]
    if tensors and not bool(torch.isfinite(torch.stack([t.float().sum() for t in tensors])).all()):
        raise TrainingDiverged(
            f"the weights became NaN or infinite in epoch {epoch + 1} (a non-finite gradient); nothing was saved"
            + (f"; {path} still holds the last good epoch." if path and path.exists() else ".")
            + " Lower the learning rate or check the objective.")


def fit(
    model: nn.Module,
    data: Dataset,
    objective: nn.Module | None = None,
    recipe: Recipe | None = None,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: bool | str = "auto",
    channels_last: bool | None = None,
    compile: bool = False,
    checkpoint: str | os.PathLike | None = None,
    progress: bool | None = None,
    check_every: int = 25,
    description: str | None = None,
    eval_splits: Sequence[str] = ("val", "test"),
    eval_every: int | None = 1,
) -> History:
    """Train ``model`` in place on ``data``'s training split and return its :class:`History`.

    Args:
        objective: an :class:`~minidistill.losses.Objective`, called as
            ``objective(model, x, y) -> (loss, logits or None, terms)``; default
            :class:`~minidistill.losses.CrossEntropy` with the recipe's label smoothing.
            Its own learnable parameters (a regressor, say) are trained too; its ``terms``
            are averaged per epoch into ``train_<name>`` columns.
        recipe: epochs, batch size, optimiser and schedule (default :class:`Recipe`).
        seed: seeds the shuffle and augmentation (seed the model's initialisation yourself,
            with :func:`~minidistill.runtime.seed_everything`, before creating it, or use
            :func:`train_model`, which does both).
        amp: ``'auto'`` (bf16 autocast on GPUs that have it natively, fp16 with a
            GradScaler on those that do not, off on the CPU), ``True`` or ``False``.
        channels_last: default on CUDA.
        compile: ``torch.compile`` the model and the objective's submodules (in place). The
            first steps then pay the compilation (tens of seconds): worth it for long runs
            or several runs of one architecture in one process, not for a short one.
        checkpoint: a file written after every epoch; if it exists, training resumes from
            it -- same weights, optimiser, schedule and data order as if never stopped.
        progress: a progress bar over epochs (default: on unless ``MINIDISTILL_PROGRESS=0``).
        check_every: steps between finiteness checks of the loss (each one syncs the host).
        description: the progress bar's label (default: the model's class name).
        eval_splits: the splits scored (an empty split is skipped). Leave out a split used
            only once after training, and pass ``()`` when the model is not a classifier (a
            trunk trained on hints, say).
        eval_every: score ``eval_splits`` every this many epochs and always after the last
            one; ``None`` scores only after the last epoch (for runs whose curves nobody
            plots: each evaluation costs a pass over the split). Epochs not scored hold NaN
            in the ``val_*``/``test_*`` columns.

    Report ``history.final('test_acc')``; choose things with ``val_acc``.

    Under ``torchrun`` (which ``fit`` notices and joins, :func:`minidistill.distributed.init`) the same
    call trains on every process's GPU with ``DistributedDataParallel``: ``recipe.batch_size`` is the global batch,
    split evenly over the ranks, and only rank 0 writes the checkpoint (see
    :mod:`minidistill.distributed`; ``device`` defaults to the rank's own GPU).

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    if isinstance(eval_splits, str) or not set(eval_splits) <= {"val", "test"}:
        raise ValueError(f"eval_splits must be a sequence of 'val' and 'test', got {eval_splits!r}")
    if eval_every is not None and not (isinstance(eval_every, int) and eval_every >= 1):
        raise ValueError(f"eval_every must be an int >= 1 or None, got {eval_every!r}")
    if not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a minidistill Dataset, got {type(data).__name__}")
    recipe = recipe or Recipe()
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a train.Recipe, got {type(recipe).__name__}")
    if recipe.batch_size > len(data.x_train):
        raise ValueError(f"recipe.batch_size {recipe.batch_size} is larger than the training set of {data.name!r} "
                         f"({len(data.x_train)} images): every epoch would be one short batch")
    objective = objective if objective is not None else CrossEntropy(recipe.label_smoothing)
    if not isinstance(objective, nn.Module):
        raise TypeError(f"objective must be an nn.Module (subclass losses.Objective), got {type(objective).__name__}; "
                        "wrap a function in an Objective whose forward(model, x, y) returns (loss, logits, terms)")
    distributed.init()  # under torchrun: join the process group (once); otherwise nothing
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1 and recipe.batch_size % world:
        raise ValueError(f"recipe.batch_size {recipe.batch_size} is the global batch and must split evenly over the "
                         f"{world} processes: choose a multiple of {world}")
    device = get_device(device) if device is not None or world == 1 else distributed.local_device()
    if world > 1 and device.type == "cuda" and device.index is None:  # "cuda": this process's own GPU
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if world > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if device.type == "cuda":  # normalise over the global batch, as one GPU does (in place: model stays model)
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            warnings.warn("SyncBatchNorm needs GPUs: on the CPU each process's BatchNorm layers use only its part of "
                          "the batch, so the run is not the one-process run", stacklevel=2)
    model.to(device, memory_format=memory_format)
    objective.to(device, memory_format=memory_format)
    dtype = autocast_dtype(device, amp)
    loader = DeviceLoader.from_dataset(data, "train", recipe.batch_size, device=device,
                                       channels_last=channels_last, seed=seed, rank=rank, world_size=world)
    example = loader.normalize(loader.x[:2])
    _check_outputs(model, example, data)
    if isinstance(objective, Objective):
        objective.setup(model, example, device=device, dtype=dtype, memory_format=memory_format, compile=compile)
    if world > 1 and device.type == "cuda":  # what setup() built and trains (a regressor's BatchNorm) syncs too
        for name, child in list(objective.named_children()):
            if any(p.requires_grad for p in child.parameters()):
                setattr(objective, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    if compile:
        model.compile()
        for m in objective.children():
            if any(p.requires_grad for p in m.parameters()):  # frozen teachers are compiled by setup()
                m.compile()
    # built once: the evaluation splits (each rank's part of them) stay on the device for the whole run
    eval_loaders = {split: DeviceLoader(*(t.tensor_split(world)[rank] for t in data.split(split)), 1024,
                                        mean=data.mean, std=data.std, device=device, channels_last=channels_last)
                    for split in eval_splits if len(getattr(data, f"x_{split}"))}
    params = [p for p in (*model.parameters(), *objective.parameters()) if p.requires_grad]
    opt = _make_optimizer(params, recipe, device)
    sched = _make_schedule(opt, recipe, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    history = History(meta={
        "model": type(model).__name__, "objective": type(objective).__name__, "data": data.name,
        "recipe": recipe.fields(), "seed": seed, "device": device_name(device),
        "amp": str(dtype).replace("torch.", "") if dtype else "off", "compile": compile,
    })
    if world > 1:
        history.meta["world_size"] = world
    fingerprint = {k: history.meta[k] for k in ("model", "objective", "data", "recipe", "seed")}
    fingerprint["n_train"] = len(data.x_train)
    fingerprint["parameters"] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    start = 0

    path = Path(checkpoint) if checkpoint is not None else None
    main = distributed.is_main()

    def read() -> dict | None:
        return _load_checkpoint(path, device) if path is not None and path.exists() else None

    state = read() if main else None   # rank 0 first: it moves a damaged file aside
    distributed.barrier()
    state = state if main else read()
    if state is not None:
        if state.get("fingerprint") != _plain(fingerprint):
            raise ValueError(
                f"checkpoint {path} belongs to another run ({_differences(state.get('fingerprint'), _plain(fingerprint))}). "
                f"Delete it or choose another checkpoint path."
            )
        if isinstance(objective, Objective) and not objective.resumable:
            raise ValueError(f"{type(objective).__name__} keeps state a checkpoint cannot hold, so {path} cannot be "
                             "resumed exactly; delete it to train from the start")
        expected, saved = set(_objective_state(objective)), set(state["objective"])
        if expected != saved:
            raise ValueError(f"checkpoint {path} holds another objective state (missing {sorted(expected - saved)}, "
                             f"unexpected {sorted(saved - expected)}); delete it or choose another checkpoint path")
        model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"], strict=False)  # (the frozen teacher is not in it)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history = History.from_dict(state["history"])
        start = state["epoch"]
    step_fn: Callable[[torch.Tensor, torch.Tensor], Any] = lambda x, y: objective(model, x, y)  # noqa: E731
    if world > 1:  # (built after loading: the ranks start from rank 0's weights either way)
        ddp = nn.parallel.DistributedDataParallel(
            _Step(model, objective), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=any(getattr(m, "unused_parameters", False) for m in (model, objective)),
            **_NO_BUFFER_SYNC)
        step_fn = ddp

    show = (show_progress() if progress is None else progress) and main
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=recipe.epochs, initial=start, desc=description or history.meta["model"], unit="epoch")
    elapsed = history.records[-1]["seconds"] if history.records else 0.0
    steps = len(loader)
    positioned = isinstance(objective, Objective)
    if positioned:
        objective.steps_per_epoch, objective.total_steps = steps, steps * recipe.epochs
    try:  # the bar is closed however the loop ends (divergence, an objective's own error, ^C)
        for epoch in range(start, recipe.epochs):
            t0 = time.perf_counter()
            model.train()
            objective.train()
            loader.set_epoch(epoch)
            sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=device)}
            correct = torch.zeros((), device=device, dtype=torch.int64)
            seen, scored = 0, 0
            for step, (x, y) in enumerate(loader):
                epoch_lr = opt.param_groups[0]["lr"]  # the rate of the epoch's last step is recorded
                if positioned:
                    objective.epoch, objective.step = epoch, epoch * steps + step
                with autocast(device, dtype):
                    loss, logits, terms = _unpack(step_fn(x, y), objective)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                n = len(y)
                sums["loss"] += loss.detach().float() * n
                for name, value in terms.items():
                    if name not in sums or name == "loss":
                        if name in ("loss", "acc"):
                            raise ValueError(f"{type(objective).__name__} returned a term named {name!r}, "
                                             "which would overwrite train_loss/train_acc; rename it")
                        sums[name] = torch.zeros((), device=device)
                    sums[name] += torch.as_tensor(value, device=device).detach().float() * n
                if logits is not None:
                    correct += (logits.detach().argmax(1) == y).sum()
                    scored += n
                seen += n
                if (step + 1) % check_every == 0 or step + 1 == steps:
                    bad = ~torch.isfinite(sums["loss"])
                    if world > 1:  # every rank stops together, or the others would wait forever
                        bad = distributed.all_reduce_sum(bad.float()) > 0
                    if bad:
                        raise TrainingDiverged(
                            f"the loss became {sums['loss'].item()} in epoch {epoch + 1}, by step {step + 1} "
                            f"(lr {sched.get_last_lr()[0]:.3g}). Lower the learning rate or check the "
                            f"objective for log(0) or division by zero"
                            + (f"; {path} still holds the last good epoch." if path and path.exists() else ".")
                        )
            elapsed += time.perf_counter() - t0
            if world > 1:  # the epoch's sums over every rank's part of the batches
                names = sorted(sums)
                packed = distributed.all_reduce_sum(torch.stack(
                    [*(sums[k].double() for k in names), correct.double(),
                     torch.tensor(float(seen), device=device, dtype=torch.float64),
                     torch.tensor(float(scored), device=device, dtype=torch.float64)]))
                sums = dict(zip(names, packed[:len(names)]))
                correct, seen, scored = packed[-3], int(packed[-2]), int(packed[-1])
                distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics: one network everywhere
            record = {"epoch": epoch + 1, "lr": epoch_lr}
            record.update({f"train_{k}": (v / seen).item() for k, v in sums.items()})
            if scored:
                record["train_acc"] = 100.0 * correct.item() / scored
            last = epoch + 1 == recipe.epochs
            due = last or (eval_every is not None and (epoch + 1) % eval_every == 0)
            for split, eval_loader in eval_loaders.items():
                scores = _score_ranks(model, eval_loader, dtype) if due else {}
                for k in ("loss", "acc"):
                    record[f"{split}_{k}"] = scores.get(k, math.nan)
            record["seconds"] = elapsed
            history.records.append(record)
            _check_finite_parameters(model, objective, epoch, path)
            if path is not None and main:
                path.parent.mkdir(parents=True, exist_ok=True)
                _save_atomic({
                    "fingerprint": _plain(fingerprint), "epoch": epoch + 1, "model": model.state_dict(),
                    "objective": _objective_state(objective), "optimizer": opt.state_dict(),
                    "schedule": sched.state_dict(), "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(), "history": history.to_dict(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                }, path)
            if bar is not None:
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("train_loss", "test_acc")
                                 if k in record and not math.isnan(record[k])})
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return history


@dataclass
class Run:
    """What :func:`train_model` returns: the trained model and its history."""

    model: nn.Module
    history: History

    def __iter__(self):  # ``model, history = train_model(...)`` keeps working
        return iter((self.model, self.history))


def build_model(model: str | Callable[[], nn.Module], num_classes: int) -> nn.Module:
    """A fresh network from a name in :data:`~minidistill.models.MODELS` (with ``num_classes``
    outputs) or from a function of no arguments that builds one. The caller seeds."""
    if isinstance(model, str):
        return create_model(model, num_classes)
    if not callable(model):
        raise TypeError(f"model must be a model name or a function that builds one, got {type(model).__name__}")
    net = model()
    if not isinstance(net, nn.Module):
        raise TypeError(f"model() must build an nn.Module, got {type(net).__name__}")
    return net


def train_model(
    model: str | Callable[[], nn.Module],
    data: Dataset,
    recipe: Recipe | None = None,
    objective: nn.Module | None = None,
    *,
    seed: int = 0,
    description: str | None = None,
    **fit_kwargs: Any,
) -> Run:
    """The one training helper: build a fresh model from ``seed``, :func:`fit` it with
    ``objective`` (default: cross-entropy) and return a :class:`Run`.

    ``model`` is a name from :data:`~minidistill.models.MODELS` (built with ``data``'s number
    of classes) or a function of no arguments that builds one. Same seed, same initial
    weights and data order, whatever the objective, so runs that share a seed differ only in
    their loss. Other keyword arguments go to :func:`fit` (``eval_every``, ``checkpoint`` ...).
    """
    seed_everything(seed)
    net = build_model(model, data.num_classes)
    name = model if isinstance(model, str) else type(net).__name__
    history = fit(net, data, objective, recipe, seed=seed, description=description or f"{name} (seed {seed})",
                  **fit_kwargs)
    return Run(net, history)


@dataclass
class Trained:
    """A trained model, its history, the checkpoint file, and whether it came from the cache."""

    model: nn.Module
    history: History
    path: Path
    cached: bool


def _state_digest(state: dict[str, torch.Tensor], extra: Any = None) -> str:
    """SHA-256 of every tensor (names, dtypes, shapes, bytes) and of ``extra`` (JSON-able: the
    metadata and the history), so that no stored byte can change unnoticed."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but not been reaped (Linux: state Z in /proc); False elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


class _CacheLock:
    """A lock file per cache entry (created with O_CREAT | O_EXCL, holding the owner's pid), so that
    two processes asking for one uncached teacher train it once: the second waits, then loads it.
    A lock whose process has died is taken over."""

    def __init__(self, path: Path, poll: float = 0.5) -> None:
        self.path, self.poll = path.with_name(path.name + ".lock"), poll

    #: an empty lock file older than this is left by a process that died between creating it and
    #: writing its pid (a younger one is being written right now)
    EMPTY_GRACE_S = 30.0

    def _stale(self) -> bool:
        try:
            text = self.path.read_text().strip()
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False  # gone or being replaced right now: try again
        if not text:
            return age > self.EMPTY_GRACE_S
        try:
            pid = int(text)
        except ValueError:
            return True
        if pid <= 0:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return _is_zombie(pid)  # a killed process nobody has reaped still answers os.kill

    def __enter__(self) -> "_CacheLock":
        waited = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                if not waited:
                    warnings.warn(f"{self.path.name}: another process is training this model; waiting for it",
                                  stacklevel=3)
                    waited = True
                time.sleep(self.poll)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _writable_folder(folder: Path) -> None:
    """Fail before training when the cache folder cannot be written, naming it and the way out."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise _unwritable(f"the checkpoint folder {folder}", e) from e


def _unwritable(what: str, error: OSError) -> PermissionError:
    """The error for a data root or cache folder that cannot be written: which, why, and the way out."""
    return PermissionError(f"cannot write to {what} ({type(error).__name__}: {error}); choose a writable data "
                           f"root with MINIDISTILL_DATA=/some/folder (or root=...)")


def pretrained(
    name: str,
    dataset: str | Dataset,
    *,
    recipe: Recipe | None = None,
    seed: int = 0,
    profile: Profile | str | None = None,
    root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    compile: bool = False,
    progress: bool | None = None,
    eval_every: int | None = 1,
    amp: bool | str = "auto",
) -> Trained:
    """A model trained with the course recipe, from the cache or trained now and cached.

    The checkpoint lives in ``<root>/checkpoints/`` under a name made of the model, the data set
    (its name, size and a digest of its training images and labels, so another split never
    shares a teacher), the profile, seed and recipe hash. A cached file is used only if it
    loads, its metadata match and everything stored hashes to its digest; otherwise it is
    retrained (with a warning), never silently loaded. An interrupted training resumes where it
    stopped; two processes asking at once train it once (the second waits for the first).
    ``eval_every`` is passed to :func:`fit` (``None``: score the test split only at the end, for a
    teacher whose curves are not plotted), and so is ``amp`` (``False``: float32); neither changes the
    weights beyond floating-point noise, so neither is part of the cache key.
    """
    prof = profile if isinstance(profile, Profile) else get_profile(profile, device)
    recipe = recipe or default_recipe(prof)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a train.Recipe, got {type(recipe).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, root)
    meta = {"model": name, "dataset": data.name, "n_train": len(data.x_train), "data_digest": data.digest(),
            "profile": prof.name, "seed": seed, "recipe": recipe.fields()}
    try:
        folder = data_root(root) / "checkpoints"
    except OSError as e:   # the root itself cannot be made (a file in the way, no permission)
        where = root or os.environ.get("MINIDISTILL_DATA") or "~/.cache/minidistill"
        raise _unwritable(f"the data root {where}", e) from e
    path = folder / f"{name}-{data.name}{len(data.x_train)}-{data.digest()[:8]}-{prof.name}-s{seed}-{recipe.key()}.pt"
    dev = get_device(device) if device is not None else prof.device
    seed_everything(seed)
    model = create_model(name, data.num_classes)
    return load_or_train(
        path, meta, model,
        lambda partial: fit(model, data, recipe=recipe, seed=seed, device=dev, compile=compile,
                            checkpoint=partial, progress=progress, description=f"{name} (teacher)",
                            eval_every=eval_every, amp=amp),
        device=dev)


def load_or_train(path: Path, meta: dict[str, Any], model: nn.Module, train_fn,
                  device: str | torch.device | None = None) -> Trained:
    """The cache behind :func:`pretrained`, for models it cannot build (an ensemble, say).

    If ``path`` holds a checkpoint whose ``meta`` equals ``meta`` and whose contents (weights,
    metadata, history) hash to the stored digest, its weights are loaded into ``model`` (moved
    to ``device``, eval mode). Otherwise -- missing, corrupt, truncated, tampered or mismatched,
    the last four with a warning -- ``train_fn(partial)`` trains ``model`` in place and returns
    its :class:`History` (``partial`` is the path to pass to :func:`fit` as ``checkpoint``, so an
    interrupted run resumes), and the result is saved atomically with its digest, unless its
    weights are not finite. Files are read with ``weights_only=True`` (no code runs on load);
    a lock file makes concurrent callers train once; the folder must be writable.

    Under ``torchrun`` rank 0 checks the cache and tells the others; a model not yet cached is
    trained by all ranks together (``train_fn`` calls :func:`fit`) and saved by rank 0.
    """
    path, meta = Path(path), _plain(meta)
    distributed.init()
    main = distributed.is_main()
    if main:
        _writable_folder(path.parent)
    with _CacheLock(path) if main else contextlib.nullcontext():
        state = None
        if main and path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if state["meta"] != meta:
                    raise ValueError(f"metadata {state['meta']} differ from {meta}")
                if _state_digest(state["model"], [state["meta"], state["history"]]) != state["digest"]:
                    raise ValueError("contents do not match their stored digest")
            except Exception as e:  # corrupt, truncated, tampered or mismatched: retrain
                warnings.warn(f"ignoring cached checkpoint {path} ({type(e).__name__}: {str(e)[:300]}); retraining",
                              stacklevel=3)
                path.unlink()
                state = None
        if distributed.broadcast_object(state is not None):  # (one process: just whether it loaded)
            if not main:
                state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            model = model.to(get_device(device)) if device is not None else model
            return Trained(model.eval(), History.from_dict(state["history"]), path, True)
        partial = path.with_name(path.stem + ".partial.pt")
        history = train_fn(partial)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
            raise TrainingDiverged(f"the trained weights are not finite; nothing was cached at {path}")
        if main:
            record = _plain(history.to_dict())
            _save_atomic({"meta": meta, "model": state, "history": record,
                          "digest": _state_digest(state, [meta, record])}, path)
            partial.unlink(missing_ok=True)
        distributed.barrier()
        return Trained(model.eval(), history, path, False)
