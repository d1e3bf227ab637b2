"""A strong CIFAR-10 teacher in seconds: a small VGG-like net and the recipe that trains it.

Ideas and hyper-parameters from airbench (Keller Jordan, 2024, "94% on CIFAR-10 in 3.29
Seconds on a Single GPU", arXiv:2404.00498, and its ``airbench94.py``), written anew here;
each piece names its source. :class:`FastNet` is the network (patch whitening, Dirac-started
convs, scale-free BatchNorm, flip test-time augmentation), :class:`AlternatingFlipLoader`
the augmentation (derandomised flips, small translations), :class:`Lookahead` the weight
averaging, :func:`train_fast_teacher` the recipe and :func:`fast_teacher` the cached teacher.

Departures from airbench94: test-time augmentation by the mirror image only (airbench also
averages one-pixel shifts); bf16 autocast instead of fp16 weights (fp16 with a GradScaler on
GPUs without bf16); the mean loss with the learning rate converted (the same steps); the
cached teacher (:func:`fast_teacher`) is trained without label smoothing, because it is a
teacher (see ``_PROFILE_SETTINGS``), while :func:`train_fast_teacher` keeps airbench's 0.2
as its default; runs
shorter than 5 steps keep their own weights (no lookahead pull has happened); no
``torch.compile``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from collections import OrderedDict
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, DeviceLoader, load_dataset
from .runtime import Profile, data_root, device_name, get_device, get_profile, seed_everything, show_progress
from .train import History, Trained, TrainingDiverged, autocast, autocast_dtype, load_or_train, score_loader

__all__ = ["FastNet", "AlternatingFlipLoader", "Lookahead", "train_fast_teacher", "fast_teacher"]

MIN_SIZE = 9  # a 2x2 valid conv then three 2x2 max-pools: 9 pixels is the least that leaves 1


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.fx.Proxy) and (x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < MIN_SIZE):
        raise ValueError(f"x must be images [N, 3, H, W] with H, W >= {MIN_SIZE}, got {tuple(x.shape)}")


class _ScaleFrozenBN(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1; only the shift (bias) is learned (airbench). The running
    statistics follow the last few batches (PyTorch momentum 0.4, airbench's 0.6)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3x3 conv whose first ``c_in`` filters start as the identity (airbench's partial
    Dirac initialisation), the others with PyTorch's default initialisation."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:c_in])
    return conv


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU (pooling before BN saves work)."""
    return nn.Sequential(_conv3x3(c_in, c_out), nn.MaxPool2d(2), _ScaleFrozenBN(c_out), nn.GELU(),
                         _conv3x3(c_out, c_out), _ScaleFrozenBN(c_out), nn.GELU())


class _ScaledLinear(nn.Linear):
    """A bias-free linear classifier whose logits are multiplied by a fixed ``scale`` (1/9 in
    airbench: small initial logits without changing the weights' learning rate)."""

    def __init__(self, c_in: int, c_out: int, scale: float) -> None:
        super().__init__(c_in, c_out, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) * self.scale


class FastNet(nn.Module):
    """airbench's 94% network, with the course's stage names ``stem, layer1, layer2, layer3,
    pool, fc`` (read features with :func:`~minidistill.models.feature_extractor`).

    ``stem`` is a 2x2 conv with 24 filters (12 whitening filters and their negatives, frozen
    once :meth:`init_whitening` has set them; its bias is learned) and a GELU; each layer is a
    conv-pool-BN-GELU-conv-BN-GELU block; ``pool`` is a global max-pool; ``fc`` a scaled
    linear head. Inputs are normalised images ``[N, 3, H, W]`` with ``H, W >= 9``.

    In eval mode with ``tta=True`` the logits are the mean over the image and its mirror
    image (flip test-time augmentation, airbench); in training mode they are plain logits.
    Forward hooks on the stages (and so :func:`~minidistill.models.feature_extractor`) see
    the unflipped image only: the mirrored pass calls each stage's ``forward`` directly.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (64, 256, 256), tta: bool = True) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if len(widths) != 3 or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"widths must be three positive ints (layer1, layer2, layer3), got {widths!r}")
        whiten = nn.Conv2d(3, 24, 2, bias=True)
        whiten.weight.requires_grad_(False)
        nn.init.zeros_(whiten.bias)
        self.stem = nn.Sequential(OrderedDict(whiten=whiten, act=nn.GELU()))
        self.layer1 = _block(24, widths[0])
        self.layer2 = _block(widths[0], widths[1])
        self.layer3 = _block(widths[1], widths[2])
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.fc = _ScaledLinear(widths[2], num_classes, scale=1 / 9)
        self.tta = tta

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        r"""Set the stem's filters from normalised training images ``x`` so that its outputs are
        white: with $C = \mathbb E[p p^\top]$ the second-moment matrix of the 2x2x3 patches
        $p$ and $C = V \Lambda V^\top$, the filters are the rows of $\pm(\Lambda+\epsilon)^{-1/2}
        V^\top$, so $\mathbb E[(W p)(W p)^\top] \approx I$ (patch whitening: airbench, after
        earlier CIFAR-10 speed runs). The filters stay frozen; ``eps`` damps tiny eigenvalues.
        """
        _check_images(x)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        conv = self.stem.whiten
        patches = F.unfold(x.float(), conv.kernel_size)  # [N, 12, L] in the conv weight's (c, dy, dx) order
        flat = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        moment = (flat.T @ flat / len(flat)).double().cpu()  # 12x12: solved on the host, once
        eigenvalues, eigenvectors = torch.linalg.eigh(moment)
        filters = (eigenvectors / (eigenvalues.clamp_min(0) + eps).sqrt()).T.flip(0)  # largest first
        filters = filters.reshape(-1, *conv.weight.shape[1:]).to(conv.weight)
        conv.weight.copy_(torch.cat([filters, -filters]))  # GELU passes both signs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        mirrored = x.flip(-1)
        for stage in self.children():
            x = stage(x)
        if self.training or not self.tta:
            return x
        for stage in self.children():
            mirrored = stage.forward(mirrored)  # not stage(...): hooks report the unflipped pass
        return 0.5 * (x + mirrored)


class AlternatingFlipLoader(DeviceLoader):
    """A training :class:`~minidistill.data.DeviceLoader` with airbench's augmentation:
    derandomised ("alternating") flips -- each image is mirrored in epoch 0 with probability
    1/2, then on alternate epochs, so every two epochs show it both ways -- and shifts of up
    to ``translate`` pixels each way with reflected borders, in one gather on the uint8 data.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, translate: int = 2, **kwargs) -> None:
        if not isinstance(translate, int) or not 0 <= translate < min(x.shape[-2:]):
            raise ValueError(f"translate must be an int in [0, image size), got {translate!r}")
        super().__init__(x, y, batch_size, train=True, pad=translate, **kwargs)
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + 999_999)
        self.first_flips = torch.rand(len(self.x), device=self.device, generator=gen) < 0.5

    def flips(self, epoch: int) -> torch.Tensor:
        """Which images are mirrored in ``epoch`` (bool ``[N]``): epoch 0's draw, inverted on odd epochs."""
        return self.first_flips ^ bool(epoch % 2)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised float images in the loader's memory format."""
        return (x.float() * self._scale + self._shift).contiguous(memory_format=self.memory_format)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, (h, w), t = len(self.x), self.x.shape[-2:], self.pad
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, device=self.device, generator=gen)
        flips = self.flips(self.epoch)

        def reflect(i: torch.Tensor, size: int) -> torch.Tensor:  # -1 -> 1, size -> size - 2
            return (size - 1) - ((size - 1) - i.abs()).abs()

        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            b, c = len(idx), self.x.shape[1]
            dy, dx = torch.randint(-t, t + 1, (2, b, 1), device=self.device, generator=gen)
            rows = reflect(dy + torch.arange(h, device=self.device), h)
            cols = reflect(dx + torch.arange(w, device=self.device), w)
            cols = torch.where(flips[idx, None], cols.flip(1), cols)
            bi, ci = idx.view(b, 1, 1, 1), torch.arange(c, device=self.device).view(1, c, 1, 1)
            yield self.normalise(self.x[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]), self.y[idx]


class Lookahead:
    """A slow copy of a model's float state (weights and BatchNorm statistics).
    ``update(model, decay)`` sets ``slow <- decay * slow + (1 - decay) * fast`` and copies it
    into the model (Lookahead, Zhang et al. 2019, in airbench's form: every 5 steps with
    ``decay = 0.95**5 * progress**3``, and ``decay = 1`` after the last step, so that the run
    ends on the slow weights)."""

    def __init__(self, model: nn.Module) -> None:
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        fast = model.state_dict()  # tensors that share the parameters' storage
        for k, slow in self.slow.items():
            slow.lerp_(fast[k], 1.0 - decay)
            fast[k].copy_(slow)


def _check_args(data: Dataset, epochs: float, batch_size: int, lr: float, momentum: float, weight_decay: float,
                bias_lr_scale: float, label_smoothing: float, target_acc: float | None, check_every: int) -> None:
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a minidistill Dataset, got {type(data).__name__}")
    n = len(data.x_train)
    positive, fraction = "a finite number > 0", "a number in [0, 1)"
    for name, value, expected, ok in [
        ("epochs", epochs, positive, isinstance(epochs, (int, float)) and 0 < epochs < math.inf),
        ("batch_size", batch_size, f"an int in [1, {n}] (the training set's size)",
         isinstance(batch_size, int) and 1 <= batch_size <= n),
        ("lr", lr, positive, 0 < lr < math.inf),
        ("bias_lr_scale", bias_lr_scale, positive, 0 < bias_lr_scale < math.inf),
        ("momentum", momentum, fraction, 0 <= momentum < 1),
        ("label_smoothing", label_smoothing, fraction, 0 <= label_smoothing < 1),
        ("weight_decay", weight_decay, "a finite number >= 0", 0 <= weight_decay < math.inf),
        ("target_acc", target_acc, "None or an accuracy in (0, 100] %", target_acc is None or 0 < target_acc <= 100),
        ("check_every", check_every, "an int >= 1", isinstance(check_every, int) and check_every >= 1)]:
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {value!r}")
    if target_acc is not None and len(data.x_test) == 0:
        raise ValueError(f"target_acc needs a test split, but the test split of {data.name!r} is empty")
    if min(data.x_train.shape[-2:]) < MIN_SIZE:
        raise ValueError(f"data's images must be at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(data.x_train.shape[1:])}")


def _optimizer(model: FastNet, lr: float, momentum: float, weight_decay: float, bias_lr_scale: float,
               batch_size: int, total: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """Nesterov SGD in two groups (BatchNorm biases at ``bias_lr_scale`` times the rate) and
    airbench's schedule: the rate climbs linearly from 0.2 to 1 (times its peak) over the
    first 23% of the steps, then falls linearly to 0.07.

    airbench's decoupled units become PyTorch's on the mean loss: ``step`` is the peak rate,
    ``decay`` the fraction by which every weight shrinks per step at the peak, in both groups.
    """
    step = lr * batch_size / (1024 * (1 + 1 / (1 - momentum)))
    decay = weight_decay * batch_size / (1024 * (1 + 1 / (1 - momentum)))
    model.stem.whiten.bias.requires_grad_(True)  # (a model trained before left it frozen)
    biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    others = [p for p in model.parameters() if p.requires_grad and not any(p is b for b in biases)]
    opt = torch.optim.SGD([dict(params=biases, lr=step * bias_lr_scale, weight_decay=decay / (step * bias_lr_scale)),
                           dict(params=others, lr=step, weight_decay=decay / step)], momentum=momentum, nesterov=True)
    warm = max(1, int(0.23 * total))

    def shape(i: int) -> float:
        return 0.2 + 0.8 * i / warm if i < warm else 1.0 - 0.93 * (i - warm) / max(1, total - warm)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, shape)


def train_fast_teacher(
    data: Dataset, *, epochs: float = 10, batch_size: int = 1024, lr: float = 11.5, momentum: float = 0.85,
    weight_decay: float = 0.0153, bias_lr_scale: float = 64.0, label_smoothing: float = 0.2,
    whiten_bias_epochs: int = 3, translate: int = 2, widths: Sequence[int] = (64, 256, 256),
    model: FastNet | None = None, seed: int = 0, device: str | torch.device | None = None,
    amp: bool | str = "auto", channels_last: bool | None = None, target_acc: float | None = None,
    progress: bool | None = None, check_every: int = 25,
) -> tuple[FastNet, History]:
    """Train a :class:`FastNet` on ``data`` with airbench's recipe; return it and its History.

    ``lr`` and ``weight_decay`` are in airbench's decoupled units (per 1024 images, with the
    Nesterov momentum gain ``1 + 1/(1 - momentum)`` divided out; defaults: airbench94's), and
    ``epochs`` may be fractional (airbench94 runs 9.9). ``model``: a FastNet to train in place
    (default: a fresh one, initialised from ``seed``). ``amp``, ``channels_last``,
    ``progress`` and ``check_every`` as in :func:`~minidistill.train.fit`. ``target_acc``: stop
    after the first epoch whose test accuracy (%) reaches it (``meta['reached_target']``).
    History columns are those of ``fit``; ``seconds`` counts training only (the whitening
    included, evaluation excluded).

    Sources: everything is airbench94's -- label smoothing 0.2 (Szegedy et al. 2016), Nesterov
    SGD at batch 1024 in decoupled units (after Page's "How to train your ResNet"), the
    0.2 -> 1 -> 0.07 triangular schedule, BatchNorm biases at 64x the rate, the whitening
    bias trained for 3 epochs, lookahead -- except bf16 autocast and channels_last, this
    package's GPU habits.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    _check_args(data, epochs, batch_size, lr, momentum, weight_decay, bias_lr_scale, label_smoothing,
                target_acc, check_every)
    if model is None:
        seed_everything(seed)
        model = FastNet(data.num_classes, widths)
    elif not isinstance(model, FastNet) or model.fc.out_features != data.num_classes:
        raise ValueError(f"model must be a FastNet with {data.num_classes} outputs, got {type(model).__name__}")
    device = get_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    loader = AlternatingFlipLoader(data.x_train, data.y_train, batch_size, translate=translate, mean=data.mean,
                                   std=data.std, device=device, channels_last=channels_last, seed=seed)
    evals = {s: DeviceLoader.from_dataset(data, s, 1024, device=device, channels_last=channels_last)
             for s in ("val", "test") if len(getattr(data, f"x_{s}"))}
    total = max(1, math.ceil(epochs * len(loader)))
    opt, sched = _optimizer(model, lr, momentum, weight_decay, bias_lr_scale, batch_size, total)
    dtype = autocast_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    recipe = dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                  bias_lr_scale=bias_lr_scale, label_smoothing=label_smoothing,
                  whiten_bias_epochs=whiten_bias_epochs, translate=translate, widths=list(widths))
    history = History(meta={"model": "FastNet", "data": data.name, "recipe": recipe, "seed": seed,
                            "device": device_name(device), "amp": str(dtype).replace("torch.", "") if dtype else "off",
                            "target_acc": target_acc, "reached_target": False})
    bar = None
    if show_progress() if progress is None else progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=math.ceil(total / len(loader)), desc="FastNet (teacher)", unit="epoch")

    # Its own loop rather than train.fit: the per-group learning rates, the whitening init, the
    # whitening bias frozen after a few epochs, lookahead and derandomised flips are the lesson.
    t0, done, elapsed = time.perf_counter(), 0, 0.0
    model.init_whitening(loader.normalise(loader.x[:5000]))  # from 5000 images, as airbench; timed
    lookahead = Lookahead(model)
    try:
        for epoch in range(math.ceil(total / len(loader))):
            model.train()
            model.stem.whiten.bias.requires_grad_(epoch < whiten_bias_epochs)  # no grad: SGD skips it
            loader.set_epoch(epoch)
            loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
            for x, y in loader:
                with autocast(device, dtype):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
                epoch_lr = opt.param_groups[1]["lr"]  # the rate of the epoch's last step is recorded
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                done, seen = done + 1, seen + len(y)
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                if done % 5 == 0:
                    lookahead.update(model, 0.95**5 * (done / total) ** 3)
                if done == total and done >= 5:  # the run ends on the slow weights, as airbench's does
                    lookahead.update(model, 1.0)
                if done % check_every == 0 or done == total or seen == len(loader) * batch_size:
                    if not torch.isfinite(loss_sum):  # the only host sync in the loop
                        raise TrainingDiverged(f"the loss became {loss_sum.item()} in epoch {epoch + 1} (step "
                                               f"{done}); lower lr or check the data")
                if done == total:
                    break
            elapsed += time.perf_counter() - t0
            record = {"epoch": round(done / len(loader), 3), "lr": epoch_lr,
                      "train_loss": (loss_sum / seen).item(), "train_acc": 100.0 * correct.item() / seen}
            for split, eval_loader in evals.items():
                for k, v in score_loader(model, eval_loader, dtype).items():
                    record[f"{split}_{k}"] = v
            history.records.append({**record, "seconds": elapsed})
            if bar is not None:
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("train_loss", "test_acc") if k in record})
                bar.update(1)
            if target_acc is not None and record["test_acc"] >= target_acc:
                history.meta["reached_target"] = True
                break
            t0 = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
    return model.eval(), history


# What a cached teacher is keyed by: the recipe's defaults, read once from the signature
_RECIPE = {k: p.default for k, p in inspect.signature(train_fast_teacher).parameters.items()
           if k in ("epochs", "batch_size", "lr", "momentum", "weight_decay", "bias_lr_scale", "label_smoothing",
                    "whiten_bias_epochs", "translate", "widths")}
# The cached teacher is trained without label smoothing in every profile: a teacher trained towards
# smoothed labels hands its students near-uniform soft targets (Mueller, Kornblith & Hinton, NeurIPS
# 2019); on this CPU its soft targets at T = 4 had 97.5 % of the uniform distribution's entropy, and
# KD from it cost the smoke students 7-13 points against the same teacher without smoothing.
# smoke: a narrower net, more epochs, for the small shapes sets; course/paper: airbench94 otherwise.
_PROFILE_SETTINGS = {"smoke": dict(epochs=10, batch_size=100, widths=(32, 64, 128), label_smoothing=0.0),
                     "course": dict(label_smoothing=0.0), "paper": dict(label_smoothing=0.0)}


def fast_teacher(dataset: str | Dataset = "cifar10", *, seed: int = 0, profile: Profile | str | None = None,
                 root: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 progress: bool | None = None) -> Trained:
    """A :class:`FastNet` teacher at the profile's size, from the cache or trained now and cached.

    The checkpoint lives in ``<root>/checkpoints/`` under a name made of the data set, its
    number of training images and a digest of them, the profile, the seed and a hash of the
    recipe; see
    :func:`~minidistill.train.load_or_train` for what makes a cached file valid.
    """
    prof = profile if isinstance(profile, Profile) else get_profile(profile, device)
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, root)
    recipe = {**_RECIPE, **_PROFILE_SETTINGS[prof.name]}
    recipe["widths"], recipe["batch_size"] = list(recipe["widths"]), min(recipe["batch_size"], len(data.x_train))
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    meta = {"model": "FastNet", "dataset": data.name, "n_train": len(data.x_train), "data_digest": data.digest(),
            "profile": prof.name, "seed": seed, "recipe": recipe}
    folder = data_root(root) / "checkpoints"
    path = folder / f"fastnet-{data.name}{len(data.x_train)}-{data.digest()[:8]}-{prof.name}-s{seed}-{key}.pt"
    dev = get_device(device) if device is not None else prof.device
    seed_everything(seed)
    model = FastNet(data.num_classes, recipe["widths"])

    def train_fn(_partial) -> History:  # a run of seconds: no resumable partial checkpoint
        return train_fast_teacher(data, **recipe, model=model, seed=seed, device=dev, progress=progress)[1]

    return load_or_train(path, meta, model, train_fn, device=dev)
