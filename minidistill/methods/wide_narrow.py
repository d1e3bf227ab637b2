r"""Chapter 9 -- Zhou, Ye, Chen, Meng, Tan, Song, Le, Liu & Schuurmans (ICML 2020), "Go Wide,
Then Narrow: Efficient Training of Deep Thin Networks".

The thin target network is a stack of blocks $S = S_J \circ \dots \circ S_1$ (the paper writes
$n$ blocks; $n$ indexes examples in the course); the wide network $B = B_J \circ \dots \circ B_1$
has the same depth, every block widened. Three stages:

1. *wide learning*: train $B$ (here: a :class:`~minidistill.models.CifarResNet` whose widths
   are the thin one's times a factor, :func:`wide_resnet`, cached by :func:`train_wide`);
2. *narrow learning*: between $S_i$ and $S_{i+1}$ insert a thin-to-wide linear map $M_{i,1}$
   and a wide-to-thin map $M_{i,2}$ (1x1 convolutions without bias, :func:`insert_linear_pairs`),
   so that $\bar S_i = M_{i,1} \circ S_i \circ M_{i-1,2}$ has the shapes of $B_i$; then, bottom
   to top, train $\bar S_i$ alone (lower blocks frozen) to minimise the imitation loss

   $$\mathcal L_i = \frac{1}{N D_i}\sum_{n=1}^N \big\|B_{(:i)}(x_n) - \bar S_{(:i)}(x_n)\big\|_2^2 ,$$

   the paper's $\mathbb E_x\|B_{(:i)}(x) - \bar S_{(:i)}(x)\|^2$ divided by the number $D_i$ of
   features after block $i$ (:func:`imitation_loss`, :class:`ImitationObjective`);
3. *merge and fine-tune*: fold each product $M_{i,2} M_{i,1}$ (a thin x thin matrix) into the
   first linear operation of $S_{i+1}$ (:func:`merge_linear_pairs`), which gives back exactly
   the thin architecture, then train it on the labels.

The merge is exact only where the next block starts with a map that sees the whole tensor and
is linear in it: a convolution or a fully connected layer, possibly after average pooling; a
residual block whose shortcut is a 1x1 projection (both the body's first convolution and the
projection absorb the product). An identity shortcut, a ReLU, a max-pool or a BatchNorm at
the boundary make it inexact, and :func:`insert_linear_pairs` refuses such a placement.

The self-checks of the chapter's exercises live in :mod:`minidistill.exercises.wide_narrow`
and the figures in :mod:`minidistill.methods.wide_narrow_plots`; both are re-exported here.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..data import Dataset
from ..exercises import wide_narrow as _checks
from ..exercises.wide_narrow import (MERGEABLE_QUESTIONS, check_fold, check_imitation_loss,  # noqa: F401
                                     check_mergeable)
from ..losses import TeacherObjective, upcast
from ..models import BasicBlock, CifarResNet, count_parameters, feature_names, feature_shapes
from ..runtime import data_root, get_device, seed_everything
from ..train import History, Recipe, Trained, evaluate, fit, load_or_train
from . import wide_narrow_plots as _plots
from .wide_narrow_plots import plot_costs, plot_imitation_errors, plot_stages  # noqa: F401 (re-exported)

__all__ = [
    "DEFAULT_BLOCKS",
    "wide_resnet",
    "train_wide",
    "merge_targets",
    "WideNarrowNet",
    "insert_linear_pairs",
    "imitation_loss",
    "ImitationObjective",
    "imitation_errors",
    "fold_into",
    "merge_linear_pairs",
    "count_macs",
    "network_costs",
    "WideNarrowRun",
    "train_wide_narrow",
    *_plots.__all__,
    *_checks.__all__,
]

#: the course's blocks for a CIFAR ResNet: every boundary is one where merging is exact
#: (``layer2`` and ``layer3`` open with a projection shortcut, the head with average pooling)
DEFAULT_BLOCKS: tuple[tuple[str, ...], ...] = (("stem", "layer1"), ("layer2",), ("layer3",), ("pool", "fc"))

# modules that commute with a map mixing channels (they act on each channel alike, linearly)
_PASS_THROUGH = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity)
_WHY_NOT = {
    nn.ReLU: "a ReLU is not linear: ReLU(Mx) is not a linear function of x that a layer after it can absorb",
    nn.MaxPool2d: "max-pooling does not commute with a map that mixes channels "
                  "(max of a sum is not the sum of maxes)",
    nn.BatchNorm2d: "a BatchNorm scales each channel of its input on its own: "
                    "it cannot absorb a map that mixes channels",
}


def wide_resnet(depth: int, factor: int, num_classes: int,
                thin_widths: Sequence[int] = (16, 16, 32, 64)) -> CifarResNet:
    """The wide network $B$: a :class:`CifarResNet` of the same ``depth`` as the thin one, every
    width multiplied by ``factor`` (``wide_resnet(20, 4, 10)`` is resnet20 at widths 64 ... 256)."""
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    return CifarResNet(depth, tuple(factor * w for w in thin_widths), num_classes)


def train_wide(depth: int, factor: int, data: Dataset, recipe: Recipe, *, seed: int = 0, profile_name: str = "",
               root: str | Path | None = None, device: str | torch.device | None = None,
               eval_every: int | None = None) -> Trained:
    """Stage 1: the wide network trained with ``recipe``, from the cache under the data root or
    trained now and cached (:func:`~minidistill.train.load_or_train`, the cache behind
    :func:`~minidistill.train.pretrained`, for a model not in ``models.MODELS``)."""
    name = f"resnet{depth}w{factor}"
    meta = {"model": name, "dataset": data.name, "n_train": len(data.x_train), "data_digest": data.digest(),
            "profile": profile_name, "seed": seed, "recipe": recipe.fields()}
    path = (data_root(root) / "checkpoints" /
            f"{name}-{data.name}{len(data.x_train)}-{data.digest()[:8]}-{profile_name}-s{seed}-{recipe.key()}.pt")
    seed_everything(seed)
    model = wide_resnet(depth, factor, data.num_classes)
    dev = get_device(device)
    return load_or_train(path, meta, model, lambda partial: fit(
        model, data, recipe=recipe, seed=seed, device=dev, checkpoint=partial, description=f"{name} (wide)",
        eval_every=eval_every), device=dev)


def _flat(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaves a tensor meets in order, opening ``nn.Sequential`` containers."""
    if isinstance(module, nn.Sequential):
        return [(f"{i}.{n}" if n else str(i), m) for i, child in enumerate(module) for n, m in _flat(child)]
    return [("", module)]


def merge_targets(model: nn.Module, block: Sequence[str]) -> list[str]:
    """The names (in ``model``) of the layers of ``block`` that absorb a merged map placed
    before it: the first convolution or fully connected layer that sees the whole input, and a
    residual block's projection shortcut. Raises ``ValueError`` saying why when a map placed
    there cannot be merged exactly (identity shortcut, ReLU, max-pool, BatchNorm, grouped
    convolution, a layer the rule does not know)."""
    for stage in block:
        for sub, m in _flat(getattr(model, stage)):
            where = f"{stage}.{sub}" if sub else stage
            if isinstance(m, _PASS_THROUGH):
                continue  # average pooling and flattening act on each channel alike: move on
            if isinstance(m, nn.Conv2d):
                if m.groups != 1:
                    raise ValueError(f"cannot merge a linear map into {where!r}: a grouped convolution "
                                     f"(groups={m.groups}) sees only part of the channels")
                return [where]
            if isinstance(m, nn.Linear):
                return [where]
            if isinstance(m, BasicBlock):
                if isinstance(m.shortcut, nn.Identity):
                    raise ValueError(
                        f"cannot merge a linear map into {where!r}: its identity shortcut adds the mapped input "
                        "unchanged to the block's output, so the map would survive outside any layer (place the "
                        "boundary before a stage whose first block has a projection shortcut)")
                return [f"{where}.body.0", f"{where}.shortcut.0"]
            why = next((w for t, w in _WHY_NOT.items() if isinstance(m, t)),
                       f"{type(m).__name__} is not a layer a linear map can be folded into")
            raise ValueError(f"cannot merge a linear map into {where!r}: {why}")
    raise ValueError(f"block {tuple(block)} has no layer to absorb a merged map")


def _check_blocks(model: nn.Module, blocks: Sequence[Sequence[str]], which: str) -> tuple[tuple[str, ...], ...]:
    blocks = tuple(tuple(b) for b in blocks)
    names = feature_names(model)
    listed = [n for b in blocks for n in b]
    if len(blocks) < 2 or any(not b for b in blocks) or listed != names:
        raise ValueError(f"blocks must split the {which} network's stages {names} in order into at least two "
                         f"non-empty groups, got {blocks}")
    return blocks


def _depth(model: nn.Module, stage: str) -> int:
    return len(_flat(getattr(model, stage)))


class WideNarrowNet(nn.Module):
    r"""The augmented thin network $\bar S$: the thin model's stages grouped into ``blocks``,
    with a thin-to-wide map ``expand[i]`` ($M_{i,1}$) after block ``i`` and a wide-to-thin map
    ``shrink[i]`` ($M_{i,2}$) before block ``i + 1`` (1x1 convolutions, no bias).
    ``forward(x)`` gives the logits; ``forward(x, upto=i)`` stops after block ``i`` (0-based)
    and returns $\bar S_{(:i)}(x)$, wide-shaped like $B_{(:i)}(x)$."""

    def __init__(self, thin: nn.Module, blocks: Sequence[Sequence[str]], thin_channels: Sequence[int],
                 wide_channels: Sequence[int]) -> None:
        super().__init__()
        self.thin, self.blocks = thin, tuple(tuple(b) for b in blocks)
        self.expand = nn.ModuleList(nn.Conv2d(t, w, 1, bias=False) for t, w in zip(thin_channels, wide_channels))
        self.shrink = nn.ModuleList(nn.Conv2d(w, t, 1, bias=False) for t, w in zip(thin_channels, wide_channels))
        for m in (*self.expand, *self.shrink):  # variance-preserving random start (the paper's start is not stated)
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")

    def block_parameters(self, i: int) -> list[nn.Parameter]:
        r"""The parameters of $\bar S_i$: block ``i`` of the thin model, $M_{i-1,2}$ and $M_{i,1}$."""
        params = [p for n in self.blocks[i] for p in getattr(self.thin, n).parameters()]
        if i > 0:
            params += list(self.shrink[i - 1].parameters())
        if i < len(self.expand):
            params += list(self.expand[i].parameters())
        return params

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        last = len(self.blocks) - 1 if upto is None else upto
        if not 0 <= last < len(self.blocks):
            raise ValueError(f"upto must be a block index in 0..{len(self.blocks) - 1}, got {upto!r}")
        for i, names in enumerate(self.blocks[:last + 1]):
            if i > 0:
                x = self.shrink[i - 1](x)
            for n in names:
                x = getattr(self.thin, n)(x)
            if i < len(self.expand):
                x = self.expand[i](x)
        return x


def insert_linear_pairs(thin_model: nn.Module, wide_model: nn.Module,
                        blocks: Sequence[Sequence[str]] = DEFAULT_BLOCKS,
                        image_shape: Sequence[int] = (3, 32, 32)) -> WideNarrowNet:
    """Stage 2's network: ``thin_model`` with a pair of linear maps at every boundary between
    ``blocks`` (:class:`WideNarrowNet`; the thin model's modules are shared, not copied).

    Raises ``ValueError`` when the two networks differ in depth (other stages, or another number
    of layers in a stage), when their outputs differ, or when a boundary sits where merging the
    pair afterwards would not be exact (:func:`merge_targets` says why)."""
    for which, m in (("thin_model", thin_model), ("wide_model", wide_model)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{which} must be an nn.Module, got {type(m).__name__}")
    blocks = _check_blocks(thin_model, blocks, "thin")
    if feature_names(wide_model) != feature_names(thin_model):
        raise ValueError(f"thin and wide networks must have the same stages: {feature_names(thin_model)} "
                         f"vs {feature_names(wide_model)}")
    for stage in feature_names(thin_model):
        d_thin, d_wide = _depth(thin_model, stage), _depth(wide_model, stage)
        if d_thin != d_wide:
            raise ValueError(f"thin and wide networks must have the same depth: stage {stage!r} has {d_thin} "
                             f"layers/blocks in the thin network and {d_wide} in the wide one")
    for block in blocks[1:]:
        merge_targets(thin_model, block)
    ends = [b[-1] for b in blocks]
    thin_shapes = feature_shapes(thin_model, ends, tuple(image_shape))
    wide_shapes = feature_shapes(wide_model, ends, tuple(image_shape))
    for name in ends:
        t, w = thin_shapes[name], wide_shapes[name]
        if t[1:] != w[1:] or (name == ends[-1] and t != w):
            raise ValueError(f"after {name!r} the thin network gives {t} and the wide one {w}: only the channels "
                             "may differ (and the outputs must match)")
    return WideNarrowNet(thin_model, blocks, [thin_shapes[n][0] for n in ends[:-1]],
                         [wide_shapes[n][0] for n in ends[:-1]])


def imitation_loss(thin_out: torch.Tensor, wide_out: torch.Tensor) -> torch.Tensor:
    r"""$\mathcal L_i = \frac{1}{N D_i}\sum_n \|B_{(:i)}(x_n) - \bar S_{(:i)}(x_n)\|_2^2$: the mean
    squared difference over the batch and the $D_i$ features (float32 under autocast; the wide
    network's output is a fixed target)."""
    if thin_out.shape != wide_out.shape:
        raise ValueError(f"thin_out {tuple(thin_out.shape)} and wide_out {tuple(wide_out.shape)} must have the same "
                         "shape: compare the augmented thin network after block i with the wide one after block i")
    return F.mse_loss(upcast(thin_out), upcast(wide_out).detach())


class _Prefix(nn.Module):
    """The wide network's stages up to the end of a block: $B_{(:i)}$ (modules shared)."""

    def __init__(self, model: nn.Module, stages: Sequence[str]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(getattr(model, n) for n in stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


class ImitationObjective(TeacherObjective):
    r"""Stage 2 for block ``block`` (0-based): :func:`imitation_loss` between
    ``model(x, upto=block)`` (a :class:`WideNarrowNet`) and the frozen wide network's $B_{(:i)}(x)$.
    Not a classifier: returns no logits; logs the term ``imitation``."""

    def __init__(self, wide_model: nn.Module, blocks: Sequence[Sequence[str]], block: int) -> None:
        if not 0 <= block < len(blocks):
            raise ValueError(f"block must be in 0..{len(blocks) - 1}, got {block!r}")
        super().__init__(_Prefix(wide_model, [n for b in blocks[:block + 1] for n in b]))
        self.block = block

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        target = self.teacher_forward(x)
        loss = imitation_loss(model(x, upto=self.block), target)
        return loss, None, {"imitation": loss.detach()}


@torch.no_grad()
def imitation_errors(augmented: WideNarrowNet, wide_model: nn.Module, x: torch.Tensor) -> list[float]:
    r"""For every block $i$, the relative imitation error on images ``x``:
    $\|B_{(:i)}(x) - \bar S_{(:i)}(x)\|^2 / \|B_{(:i)}(x)\|^2$ (both networks in eval mode,
    modes restored). 0 is perfect imitation; a random $\bar S$ is near 1 or above."""
    modes = augmented.training, wide_model.training
    augmented.eval(), wide_model.eval()
    try:
        out = []
        for i in range(len(augmented.blocks)):
            target = _Prefix(wide_model, [n for b in augmented.blocks[:i + 1] for n in b])(x).float()
            out.append(float(((augmented(x, upto=i).float() - target) ** 2).sum() / (target ** 2).sum()))
        return out
    finally:
        augmented.train(modes[0]), wide_model.train(modes[1])


def fold_into(layer: nn.Module, m: torch.Tensor) -> None:
    r"""Absorb a linear map ``m`` (``[C_in, C_in]``, applied to the layer's input channels) into
    ``layer`` in place: $W \leftarrow W M$ for a fully connected layer, and per kernel tap $(a, b)$
    $W_{:,:,a,b} \leftarrow W_{:,:,a,b} M$ for a convolution (exact with zero padding, since
    $M\,0 = 0$; the layer's bias is unchanged)."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"can fold only into nn.Linear or nn.Conv2d, got {type(layer).__name__}")
    with torch.no_grad():
        w = layer.weight
        if m.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"the map must be [{w.shape[1]}, {w.shape[1]}] for a layer with {w.shape[1]} input "
                             f"channels, got {tuple(m.shape)}")
        m = m.to(w.dtype)
        if isinstance(layer, nn.Linear):
            w.copy_(w @ m)
        else:
            w.copy_(torch.einsum("ojab,jc->ocab", w, m))


def merge_linear_pairs(model: WideNarrowNet) -> nn.Module:
    r"""Stage 3's merge: a copy of the thin network in which every pair's product
    $M_{i,2}M_{i,1}$ (computed in float64) is folded into the layers of block $i+1$ that see its
    output (:func:`merge_targets`). The result has exactly the thin architecture and computes
    what ``model`` computes, up to float rounding, in train and eval mode alike."""
    if not isinstance(model, WideNarrowNet):
        raise TypeError(f"model must be a WideNarrowNet (from insert_linear_pairs), got {type(model).__name__}")
    merged = copy.deepcopy(model.thin)
    layers = dict(merged.named_modules())
    for i, block in enumerate(model.blocks[1:]):
        m = (model.shrink[i].weight.double()[:, :, 0, 0] @ model.expand[i].weight.double()[:, :, 0, 0])
        for name in merge_targets(merged, block):
            fold_into(layers[name], m)
    return merged


def count_macs(model: nn.Module, image_shape: Sequence[int] = (3, 32, 32)) -> int:
    """Multiply-accumulates of one forward pass on one image (``torch.utils.flop_counter``
    counts 2 FLOPs per multiply-accumulate; BatchNorm, ReLU and pooling are not counted)."""
    param = next(model.parameters())
    was = model.training
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model.eval()(torch.zeros(1, *image_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was)
    return counter.get_total_flops() // 2


def network_costs(depth: int, factor: int, num_classes: int = 10,
                  image_shape: Sequence[int] = (3, 32, 32)) -> dict[str, tuple[int, int]]:
    """``{network: (parameters, multiply-accumulates per image)}`` for the thin CIFAR ResNet of
    ``depth``, its augmented form in stage 2 (with the linear pairs at :data:`DEFAULT_BLOCKS`),
    the merged result, and the wide network ``factor`` times wider."""
    thin, wide = wide_resnet(depth, 1, num_classes), wide_resnet(depth, factor, num_classes)
    aug = insert_linear_pairs(thin, wide, DEFAULT_BLOCKS, image_shape)
    nets = {"thin S": thin, "augmented (stage 2)": aug, "merged (stage 3)": merge_linear_pairs(aug),
            f"wide B (x{factor})": wide}
    return {k: (count_parameters(m), count_macs(m, image_shape)) for k, m in nets.items()}


@dataclasses.dataclass
class WideNarrowRun:
    """What :func:`train_wide_narrow` returns: the merged and fine-tuned thin ``model``, its
    fine-tuning ``history``, the stage-2 histories (one per block), the relative imitation
    errors per block before and after stage 2 (:func:`imitation_errors`), and the merged
    network's test scores before fine-tuning."""

    model: nn.Module
    history: History
    imitation_histories: list[History]
    errors_before: list[float]
    errors_after: list[float]
    merged_scores: dict[str, float]

    def __iter__(self):
        return iter((self.model, self.history))


def train_wide_narrow(make_thin: Callable[[], nn.Module], wide_model: nn.Module, data: Dataset, *,
                      imitation_recipe: Recipe, finetune_recipe: Recipe,
                      blocks: Sequence[Sequence[str]] = DEFAULT_BLOCKS, seed: int = 0,
                      device: str | torch.device | None = None, n_probe: int = 256) -> WideNarrowRun:
    """Stages 2 and 3 for a trained ``wide_model``: build the thin network from ``seed``, insert
    the linear pairs, train block after block (``imitation_recipe`` per block, lower blocks
    frozen, no labels), merge, and fine-tune the merged thin network on the labels
    (``finetune_recipe``). Total epochs: ``len(blocks) * imitation_recipe.epochs +
    finetune_recipe.epochs``. Imitation errors are measured on the first ``n_probe`` test images."""
    dev = get_device(device) if device is not None else next(wide_model.parameters()).device
    seed_everything(seed)
    thin = make_thin()
    image_shape = tuple(data.x_train.shape[1:])
    augmented = insert_linear_pairs(thin, wide_model, blocks, image_shape).to(dev)
    wide_model = wide_model.to(dev)
    from ..data import DeviceLoader  # the probe images, normalised as the trainer does

    probe = DeviceLoader.from_dataset(data, "test", n_probe, train=False, device=dev, channels_last=False)
    x_probe = next(iter(probe))[0]
    before = imitation_errors(augmented, wide_model, x_probe)
    histories = []
    try:
        for i in range(len(augmented.blocks)):
            augmented.requires_grad_(False)
            for p in augmented.block_parameters(i):
                p.requires_grad_(True)
            histories.append(fit(augmented, data, ImitationObjective(wide_model, augmented.blocks, i),
                                 imitation_recipe, seed=seed, device=dev, eval_splits=(),
                                 description=f"imitate block {i + 1} (seed {seed})"))
    finally:
        augmented.requires_grad_(True)
    after = imitation_errors(augmented, wide_model, x_probe)
    merged = merge_linear_pairs(augmented.float().to(memory_format=torch.contiguous_format))
    merged_scores = evaluate(merged, data, "test", device=dev)
    history = fit(merged, data, recipe=finetune_recipe, seed=seed, device=dev,
                  description=f"fine-tune merged (seed {seed})")
    return WideNarrowRun(merged, history, histories, before, after, merged_scores)

