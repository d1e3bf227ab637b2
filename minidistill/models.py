"""CIFAR ResNets, Wide ResNets and plain CNNs used across KD papers, and access to their features.

Every network is built from named top-level stages -- ``stem``, ``layer1``, ``layer2``,
``layer3``, ``pool``, ``fc`` -- so a feature is read by name (``"layer2"``) through
:func:`feature_extractor` (forward hooks), without editing the model class.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["MODELS", "create_model", "count_parameters", "feature_names", "feature_extractor",
           "FeatureExtractor", "feature_shapes", "CifarResNet", "WideResNet", "PlainCNN"]


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out, stride), nn.ReLU(), *_conv_bn(c_out, c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Wide ResNet block: BN-ReLU-conv-BN-ReLU-conv plus a (1x1 conv) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        return self.conv2(self.relu(self.bn2(self.conv1(o)))) + skip


def _stage(block: Callable[..., nn.Module], c_in: int, c_out: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[block(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)])


class _Staged(nn.Module):
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.children():
            x = stage(x)
        return x


def _check_num_classes(kind: str, num_classes: object) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"{kind} num_classes must be an int >= 2, got {num_classes!r}")


def _check_widths(kind: str, widths: object, n: int) -> tuple[int, ...]:
    if (isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__") or len(widths) != n
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
        raise ValueError(f"{kind} widths must be {n} positive ints, got {widths!r}")
    return tuple(widths)


class CifarResNet(_Staged):
    """The CIFAR ResNet of He et al. (2016) in RepDistiller's form: depth = 6n + 2,
    widths ``(stem, layer1, layer2, layer3)``; 32x32 inputs end as 8x8 maps."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth!r}")
        w0, w1, w2, w3 = _check_widths("CifarResNet", widths, 4)
        _check_num_classes("CifarResNet", num_classes)
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn(3, w0), nn.ReLU())
        self.layer1 = _stage(BasicBlock, w0, w1, n, 1)
        self.layer2 = _stage(BasicBlock, w1, w2, n, 2)
        self.layer3 = _stage(BasicBlock, w2, w3, n, 2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(w3, num_classes)
        self._init_weights()


class WideResNet(_Staged):
    """WRN-depth-k of Zagoruyko & Komodakis (2016): depth = 6n + 4, widths 16k, 32k, 64k,
    pre-activation blocks, no dropout. ``layer3`` ends with the final BN-ReLU."""

    def __init__(self, depth: int, widen: int, num_classes: int) -> None:
        super().__init__()
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, ...), got {depth!r}")
        if not isinstance(widen, int) or isinstance(widen, bool) or widen < 1:
            raise ValueError(f"Wide ResNet widen must be a positive int, got {widen!r}")
        _check_num_classes("WideResNet", num_classes)
        n, w = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.layer1 = _stage(PreActBlock, w[0], w[1], n, 1)
        self.layer2 = _stage(PreActBlock, w[1], w[2], n, 2)
        self.layer3 = nn.Sequential(*_stage(PreActBlock, w[2], w[3], n, 2), nn.BatchNorm2d(w[3]), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(w[3], num_classes)
        self._init_weights()


class PlainCNN(_Staged):
    """A plain (no shortcut) stack of 3x3 conv(-BN)-ReLU layers in three stages, the shape of
    the FitNets students (Romero et al., 2015): ``depth`` conv layers in all, widths
    ``(w1, w2, w3)``, a 2x2 max-pool at the start of ``layer2`` and ``layer3`` (32x32 inputs
    give 32, 16 and 8 pixel maps, as in :class:`CifarResNet`), global average pooling and a
    linear classifier.

    ``stem`` is the first conv; the other ``depth - 1`` convs are split evenly over the three
    stages, any remainder going to the later stages. ``batch_norm=False`` gives the 2015-style
    net without normalisation (biases instead), which is much harder to train when deep.
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 4:
            raise ValueError(f"PlainCNN depth (number of conv layers) must be an int >= 4, got {depth!r}")
        _check_widths("PlainCNN", widths, 3)
        _check_num_classes("PlainCNN", num_classes)
        per_stage = self.convs_per_stage(depth)

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            if batch_norm:
                return [*_conv_bn(c_in, c_out), nn.ReLU()]
            return [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.ReLU()]

        def stage(c_in: int, c_out: int, n: int, pool: bool) -> nn.Sequential:
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if pool else []
            for i in range(n):
                layers += conv(c_in if i == 0 else c_out, c_out)
            return nn.Sequential(*layers)

        w1, w2, w3 = widths
        self.depth, self.widths, self.batch_norm = depth, tuple(widths), batch_norm
        self.stem = nn.Sequential(*conv(3, w1))
        self.layer1 = stage(w1, w1, per_stage[0], pool=False)
        self.layer2 = stage(w1, w2, per_stage[1], pool=True)
        self.layer3 = stage(w2, w3, per_stage[2], pool=True)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(w3, num_classes)
        self._init_weights()
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @staticmethod
    def convs_per_stage(depth: int) -> tuple[int, int, int]:
        """How the ``depth - 1`` convs after the stem are split over ``layer1..layer3``."""
        q, r = divmod(depth - 1, 3)
        return tuple(q + (i >= 3 - r) for i in range(3))  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"depth={self.depth}, widths={self.widths}, batch_norm={self.batch_norm}"


_THIN, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)
MODELS: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{d}": (lambda k, d=d: CifarResNet(d, _THIN, k)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda k: CifarResNet(8, _X4, k),
    "resnet32x4": lambda k: CifarResNet(32, _X4, k),
    "wrn_16_2": lambda k: WideResNet(16, 2, k),
    "wrn_40_2": lambda k: WideResNet(40, 2, k),
    "wrn_28_10": lambda k: WideResNet(28, 10, k),
}


def create_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model by name (see ``MODELS``) with ``num_classes`` outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return MODELS[name](num_classes)


def _require_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} "
                        f"(build one with create_model(name, num_classes))")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    _require_module(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def feature_names(model: nn.Module) -> list[str]:
    """The names of the model's top-level stages, in forward order, e.g. ``['stem', 'layer1',
    ..., 'fc']``. Any module path (``'layer2.0.body'``) also works with :func:`feature_extractor`."""
    _require_module(model)
    return [name for name, _ in model.named_children()]


class _Stop(Exception):
    """Raised by a hook once every requested feature is read: the rest of the forward is skipped."""


class FeatureExtractor(nn.Module):
    """Runs ``model`` and returns ``{name: output of that submodule}`` for each name.

    Forward hooks on ``model`` itself (registered for the call and removed after it), so the
    features are exactly what the model computes, in whatever mode the model is in
    (``model.eval()`` is seen here too), and gradients reach the model's parameters. When the
    logits (``'fc'``, the last stage) are not requested the forward stops after the last
    feature. A submodule called twice in one forward reports its last output.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        if isinstance(names, str) or not names:
            raise ValueError(f"names must be a non-empty sequence of module names, got {names!r}")
        unknown = [n for n in names if n not in modules or not n]
        if unknown:
            raise ValueError(f"unknown feature name(s) {unknown}; top-level stages are {feature_names(model)}")
        self.model, self.names = model, tuple(names)
        order = [n for n, _ in model.named_modules() if n]
        self._stop_after = None if self.names[-1] == order[-1] or "fc" in self.names else max(
            self.names, key=order.index)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        self.model.train(mode)  # one flag: the model's own
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())

        def grab(name: str):
            def hook(_m: nn.Module, _inp: object, output: torch.Tensor) -> None:
                out[name] = output
                if name == self._stop_after and len(out) == len(self.names):
                    raise _Stop
            return hook

        handles = [modules[n].register_forward_hook(grab(n)) for n in self.names]
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return {n: out[n] for n in self.names}


def feature_extractor(model: nn.Module, names: Sequence[str]) -> FeatureExtractor:
    """A module that runs ``model`` once and returns ``{name: output}`` for each name
    (:class:`FeatureExtractor`). Ask for ``'fc'`` to get the logits in the same pass; any
    module path (``'layer2.0.body'``) works too. Training it trains the model."""
    return FeatureExtractor(model, names)


def feature_shapes(model: nn.Module, names: Sequence[str], image_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The shape (without the batch) of each named feature for one image of ``image_shape``
    ``(C, H, W)`` -- read it from the data, e.g. ``tuple(data.x_train.shape[1:])``. The model's
    mode is left as it was."""
    if len(image_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in image_shape):
        raise ValueError(f"image_shape must be (C, H, W) positive ints, got {tuple(image_shape)!r}")
    was = model.training
    param = next(model.parameters(), None)
    x = torch.zeros(1, *image_shape, device=param.device if param is not None else "cpu")
    try:
        with torch.no_grad():
            out = FeatureExtractor(model.eval(), names)(x)
    finally:
        model.train(was)
    return {n: tuple(v.shape[1:]) for n, v in out.items()}
