"""Data sets as uint8 arrays, and a loader that keeps them on the device.

Every data set is a :class:`Dataset` of uint8 images ``[N, 3, H, W]`` and int64 labels.
Augmentation (random crop with zero padding, horizontal flip) and normalisation happen on
the device, per sample but batched: there is no per-image Python work and no worker process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import data_root, get_device

__all__ = ["DATASETS", "Dataset", "load_dataset", "make_shapes", "train_val_split", "DeviceLoader"]

DATASETS = ("cifar10", "cifar100", "shapes")

_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
SHAPE_CLASSES = (
    "disk", "ring", "square", "frame", "triangle",
    "plus", "cross", "h-stripes", "v-stripes", "checker",
)


@dataclass
class Dataset:
    """Images as uint8 tensors ``[N, 3, H, W]``, labels as int64 ``[N]``.

    ``x_val``/``y_val`` are empty unless :func:`train_val_split` carved a validation split
    out of the training set (use it, never the test set, for any choice made while training).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    x_val: torch.Tensor = field(default_factory=lambda: torch.empty(0, 3, 0, 0, dtype=torch.uint8))
    y_val: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError(f"classes must name at least 2 classes, got {self.classes!r}")
        for split in ("train", "test", "val"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.ndim != 4 or (len(x) and x.shape[1] != 3):
                raise ValueError(f"x_{split} must be uint8 [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (len(x),):
                raise ValueError(f"y_{split} must be int64 [{len(x)}], got {y.dtype} {tuple(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise ValueError(f"y_{split} must hold class indices in [0, {len(self.classes)}) for the "
                                 f"{len(self.classes)} classes named, got labels from {int(y.min())} to {int(y.max())}")

    def digest(self) -> str:
        """A short hash of the training images and labels: what a cached teacher is keyed by, so
        that another split of the same data never serves a teacher trained on other images.
        Computed once per data set (read-only afterwards: do not edit the tensors in place)."""
        cached = self.__dict__.get("_digest")
        if cached is None or cached[0] is not self.x_train or cached[1] is not self.y_train:
            h = hashlib.sha1()
            for t in (self.x_train, self.y_train):
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            cached = (self.x_train, self.y_train, h.hexdigest()[:12])
            self.__dict__["_digest"] = cached
        return cached[2]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``'train'``, ``'val'`` or ``'test'``."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        if len(x) == 0:
            raise ValueError(f"the {split!r} split of {self.name!r} is empty" +
                             (" (make one with train_val_split)" if split == "val" else ""))
        return x, y

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(getattr(self, 'x_' + s))}" for s in ("train", "val", "test"))
        return f"Dataset({self.name!r}, {sizes}, image={tuple(self.x_train.shape[1:])}, classes={self.num_classes})"


def make_shapes(n_train: int = 5000, n_test: int = 1000, size: int = 16, seed: int = 0) -> Dataset:
    """The smoke data set: 10 classes of small procedurally drawn shapes, made offline.

    Pairs of classes look alike (disk/ring, square/frame, plus/cross, h/v stripes), so a
    teacher's soft targets carry real "dark knowledge" even here. Colours, positions, sizes
    and noise are random; the same ``seed`` always gives the same images.
    """
    for name, value, least in (("n_train", n_train, 1), ("n_test", n_test, 0), ("size", size, 8), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    yy, xx = yy[None].astype(np.float32), xx[None].astype(np.float32)
    cy = rng.uniform(0.35, 0.65, (n, 1, 1)) * size
    cx = rng.uniform(0.35, 0.65, (n, 1, 1)) * size
    r = rng.uniform(0.2, 0.36, (n, 1, 1)) * size
    dy, dx = yy - cy, xx - cx
    dist = np.sqrt(dy**2 + dx**2)
    cheb = np.maximum(abs(dy), abs(dx))
    masks = np.stack([
        dist < r,                                                       # disk
        (dist < r) & (dist > 0.55 * r),                                 # ring
        cheb < r,                                                       # square
        (cheb < r) & (cheb > 0.6 * r),                                  # frame
        (dy < 0.8 * r) & (dy > -r) & (abs(dx) < (dy + r) * 0.6),        # triangle
        (cheb < r) & ((abs(dy) < 0.3 * r) | (abs(dx) < 0.3 * r)),       # plus
        (cheb < r) & ((abs(dy - dx) < 0.4 * r) | (abs(dy + dx) < 0.4 * r)),  # cross
        (cheb < r) & ((yy.astype(int) // 2) % 2 == 0),  # h-stripes
        (cheb < r) & ((xx.astype(int) // 2) % 2 == 0),  # v-stripes
        (cheb < r) & (((yy.astype(int) // 2) + (xx.astype(int) // 2)) % 2 == 0),  # checker
    ])
    mask = masks[labels, np.arange(n)].astype(np.float32)            # [n, H, W]
    fg = rng.uniform(0.3, 1.0, (n, 3, 1, 1))
    bg = rng.uniform(0.0, 0.6, (n, 3, 1, 1))
    img = bg + (fg - bg) * mask[:, None]
    img += rng.normal(0, 0.3, img.shape)
    x = torch.from_numpy(np.clip(img * 255, 0, 255).round().astype(np.uint8))
    y = torch.from_numpy(labels.astype(np.int64))
    xf = x[:n_train].float() / 255
    mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
    std = tuple(xf.std(dim=(0, 2, 3)).tolist())
    return Dataset("shapes", x[:n_train], y[:n_train], x[n_train:], y[n_train:], SHAPE_CLASSES, mean, std)


def _from_npz(path: Path, name: str) -> Dataset:
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive (np.savez writes one); remove it or replace it with "
                         "uint8 NHWC x_train, x_test and int64 y_train, y_test")
    with np.load(path, allow_pickle=False) as f:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks the key(s) {sorted(missing)}; expected x_train, y_train, x_test, y_test")
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        classes = tuple(str(c) for c in f["classes"]) if "classes" in f.files else None
    for k in ("x_train", "x_test"):
        a = arrays[k]
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"{path}: {k} must be uint8 NHWC with 3 channels, got {a.dtype} {a.shape}")
    xs = {k: torch.from_numpy(np.ascontiguousarray(arrays[k].transpose(0, 3, 1, 2))) for k in ("x_train", "x_test")}
    for k in ("y_train", "y_test"):
        if not np.issubdtype(arrays[k].dtype, np.integer) or arrays[k].ndim != 1:
            raise ValueError(f"{path}: {k} must be 1-D integer class labels, got {arrays[k].dtype} {arrays[k].shape}")
    ys = {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ("y_train", "y_test")}
    for split in ("train", "test"):  # a file sorted by class: every "first n images" would hold few classes
        y = ys[f"y_{split}"]
        if int(y.unique().numel()) not in (1, len(y)) and bool((y[1:] >= y[:-1]).all()):  # in blocks of a class
            order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
            xs[f"x_{split}"], ys[f"y_{split}"] = xs[f"x_{split}"][order], y[order]  # (always the same order)
    num_classes = {"cifar10": 10, "cifar100": 100}.get(name, int(ys["y_train"].max()) + 1)
    for k, y in ys.items():
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{path}: {k} must hold class indices in [0, {num_classes}) for {name}, got labels "
                             f"from {int(y.min())} to {int(y.max())}")
    classes = classes or tuple(str(i) for i in range(num_classes))
    mean, std = _CIFAR_STATS.get(name) or _stats(xs["x_train"])
    return Dataset(name, xs["x_train"], ys["y_train"], xs["x_test"], ys["y_test"], classes, mean, std)


def _stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float() / 255
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).tolist())


def _from_torchvision(name: str, root: Path) -> Dataset:
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    try:
        train = cls(root, train=True, download=True)
        test = cls(root, train=False, download=True)
    except Exception as e:  # offline, blocked, or a broken download
        raise RuntimeError(
            f"could not load {name!r}: torchvision's download into {root} failed ({type(e).__name__}: {e}).\n"
            f"Offline? Put {root / (name + '.npz')} there with uint8 NHWC x_train, x_test and "
            f"int64 y_train, y_test (set MINIDISTILL_DATA or pass root= to use another folder)."
        ) from e
    x_tr = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()
    x_te = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
    y_tr = torch.tensor(train.targets, dtype=torch.int64)
    y_te = torch.tensor(test.targets, dtype=torch.int64)
    mean, std = _CIFAR_STATS[name]
    return Dataset(name, x_tr, y_tr, x_te, y_te, tuple(train.classes), mean, std)


def load_dataset(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load ``'cifar10'``, ``'cifar100'`` or ``'shapes'`` (the offline smoke set).

    CIFAR comes from ``<root>/<name>.npz`` when that file exists (uint8 NHWC ``x_train``,
    ``x_test``; int64 ``y_train``, ``y_test``), else from torchvision's download into ``root``
    (default: :func:`minidistill.runtime.data_root`). A split whose images a file stores sorted
    by class (class 0 first, then class 1 ...) is shuffled once, always in the same order, so that
    its first ``n`` images hold every class, as torchvision's order does.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if name == "shapes":
        return make_shapes()
    root = data_root(root)
    npz = root / f"{name}.npz"
    if npz.exists():
        return _from_npz(npz, name)
    return _from_torchvision(name, root)


def train_val_split(data: Dataset, val_size: int | float = 0.1, seed: int = 0) -> Dataset:
    """Carve a validation split out of the training set (``val_size``: a count or a fraction).

    The test set is untouched; the same seed always carves the same split.
    """
    n = len(data.x_train)
    k = int(round(val_size * n)) if isinstance(val_size, float) else int(val_size)
    if not 0 < k < n:
        raise ValueError(f"val_size must leave both splits non-empty (train has {n}), got {val_size!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:k], perm[k:]
    return dataclasses.replace(
        data, x_train=data.x_train[train], y_train=data.y_train[train],
        x_val=data.x_train[val], y_val=data.y_train[val],
    )


class DeviceLoader:
    """Batches of normalised float images, made on the device from uint8 data kept there.

    With ``train=True`` each sample gets its own random crop (zero padding ``pad``) and a
    horizontal flip with probability 1/2, all in one batched gather. Shuffling and
    augmentation draw from a generator seeded by ``(seed, epoch)``: the same epoch gives the
    same batches, which is what makes a resumed run identical to an uninterrupted one.

    With ``world_size > 1`` (one process per GPU, see :mod:`minidistill.distributed`) a training
    loader yields this ``rank``'s slice of every global batch of ``batch_size`` images: every
    rank draws the same order and augmentation, so the union of the ranks' slices is the batch
    one process would see.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool = False,
        pad: int = 4,
        device: str | torch.device | None = None,
        channels_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be an int in [0, world_size) and world_size an int >= 1, got rank={rank!r}, "
                             f"world_size={world_size!r}")
        if world_size > 1 and (not train or batch_size % world_size):
            raise ValueError(f"a loader split over {world_size} ranks must be a training loader whose batch_size "
                             f"({batch_size}) the world size divides")
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if x.dtype != torch.uint8:
            raise ValueError(f"x must be uint8 images [N, C, H, W], got {x.dtype}")
        self.device = get_device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.batch_size = batch_size
        self.train, self.pad, self.seed, self.epoch = train, pad, seed, 0
        self.rank, self.world_size = rank, world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        c = x.shape[1]
        std_t = torch.tensor(std, device=self.device).view(1, c, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(mean, device=self.device).view(1, c, 1, 1) / std_t

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle and augmentation the next iteration draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.train and n >= self.batch_size else -(-n // self.batch_size)

    def _augment(self, xb: torch.Tensor, gen: torch.Generator, part: slice = slice(None)) -> torch.Tensor:
        """Crop and flip ``xb``, the ``part`` of a global batch; the draws are made for the whole
        global batch, so that every rank's slice gets what one process would give it."""
        b, c, h, w = xb.shape
        p, full = self.pad, b * self.world_size
        xp = F.pad(xb, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (full, 1), device=xb.device, generator=gen)[part]
        dx = torch.randint(0, 2 * p + 1, (full, 1), device=xb.device, generator=gen)[part]
        rows = dy + torch.arange(h, device=xb.device)
        cols = dx + torch.arange(w, device=xb.device)
        flip = torch.rand(full, 1, device=xb.device, generator=gen)[part] < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
        bi = torch.arange(b, device=xb.device).view(b, 1, 1, 1)
        ci = torch.arange(c, device=xb.device).view(1, c, 1, 1)
        return xp[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, device=self.device, generator=gen) if self.train else None
        local = self.batch_size // self.world_size
        part = slice(self.rank * local, (self.rank + 1) * local) if self.world_size > 1 else slice(None)
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl][part] if order is not None else sl
            xb, yb = self.x[idx], self.y[idx]
            if self.train and self.pad > 0:
                xb = self._augment(xb, gen, part)
            yield self.normalize(xb), yb

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images ``[N, C, H, W]`` (on this loader's device) as the model sees them: float,
        normalised with the data set's mean and std, in the loader's memory format."""
        return (x.float() * self._scale + self._shift).contiguous(memory_format=self.memory_format)

    @classmethod
    def from_dataset(cls, data: Dataset, split: str, batch_size: int, **kwargs) -> "DeviceLoader":
        """A loader over one split of ``data``; ``train=True`` by default for ``'train'``."""
        x, y = data.split(split)
        kwargs.setdefault("train", split == "train")
        return cls(x, y, batch_size, mean=data.mean, std=data.std, **kwargs)
