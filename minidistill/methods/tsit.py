r"""Chapter 13: TSIT (Jiang et al., ECCV 2020), a two-stream image-to-image translator, at course size.

A *content* stream and a *style* stream (residual blocks, instance norm, LeakyReLU 0.2, spectral
norm, halving the resolution at each scale) read the content image (here a Sobel edge map) and
the style image. A generator starts from noise at the coarsest scale and, coarse to fine, applies
feature AdaIN with the style features, $x \leftarrow \alpha\,\mathrm{AdaIN}(x, s_i) + (1 - \alpha)x$,
then a FADE residual block conditioned on the content features $f_i$,
$\mathrm{FADE}(x, f) = \mathrm{BN}(x) \odot (1 + \gamma(f)) + \beta(f)$, then upsamples.
Trained with a hinge GAN loss against a multi-scale PatchGAN, feature matching and a perceptual
loss (on a small trained classifier's features, where the paper uses VGG-19).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from ..data import Dataset, DeviceLoader
from ..exercises.tsit import check_fade_scale_map, check_nonsaturating_g_loss, check_receptive_field
from ..models import feature_extractor
from ..runtime import get_device, seed_everything, show_progress
from ..train import autocast, autocast_dtype

__all__ = ["adain", "fadain", "FADE", "FADEResBlock", "Stream", "TSITGenerator", "PatchDiscriminator",
           "MultiScaleDiscriminator", "hinge_d_loss", "hinge_g_loss", "feature_matching_loss", "PerceptualLoss",
           "sobel_edges", "TSITRun", "train_tsit", "generate", "check_fade_scale_map", "check_nonsaturating_g_loss",
           "check_receptive_field"]


def _check_map(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def _check_ints(**values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def _check_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _moments(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel spatial mean and std ($\\sqrt{\\mathrm{var} + \\epsilon}$, population variance)."""
    mean = x.mean((2, 3), keepdim=True)
    return mean, (x.var((2, 3), keepdim=True, unbiased=False) + eps).sqrt()


def adain(x: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r"""Adaptive instance normalisation: $\sigma(s)\,\frac{x - \mu(x)}{\sigma(x)} + \mu(s)$, with the
    spatial mean and std of each sample and channel ($\sigma = \sqrt{\mathrm{var} + \epsilon}$).
    With ``eps = 0`` the output has exactly the style's per-channel mean and std."""
    _check_map("x", x)
    _check_map("style", style)
    if x.shape[:2] != style.shape[:2]:
        raise ValueError(f"style must have x's batch size and channels {tuple(x.shape[:2])}, got {tuple(style.shape[:2])}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    mx, sx = _moments(x, eps)
    ms, ss = _moments(style, eps)
    return ss * (x - mx) / sx + ms


def fadain(x: torch.Tensor, style: torch.Tensor, alpha: float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    r"""Feature AdaIN blended by ``alpha``: $\alpha\,\mathrm{AdaIN}(x, s) + (1 - \alpha)\,x$
    (``alpha = 1``, the paper's default, is full stylisation; ``alpha = 0`` leaves ``x`` alone)."""
    alpha = _check_unit("alpha", alpha)
    return alpha * adain(x, style, eps) + (1 - alpha) * x


def _sn(module: nn.Module, on: bool) -> nn.Module:
    return spectral_norm(module) if on else module


class FADE(nn.Module):
    r"""Feature-adaptive denormalisation: $\mathrm{FADE}(x, f) = \mathrm{BN}(x) \odot (1 + \gamma(f)) + \beta(f)$,
    BN without its own affine, $\gamma, \beta$ = 3x3 convolutions of the feature map ``f`` (same size as ``x``).
    ``padding_mode='zeros'`` as in the official code; ``'replicate'`` makes a constant ``f`` give a
    constant $\gamma$ up to the border too."""

    def __init__(self, channels: int, feature_channels: int, padding_mode: str = "zeros") -> None:
        super().__init__()
        _check_ints(channels=channels, feature_channels=feature_channels)
        if padding_mode not in ("zeros", "replicate"):
            raise ValueError(f"padding_mode must be 'zeros' or 'replicate', got {padding_mode!r}")
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Conv2d(feature_channels, channels, 3, padding=1, padding_mode=padding_mode)
        self.beta = nn.Conv2d(feature_channels, channels, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        _check_map("x", x)
        _check_map("f", f)
        if f.shape[0] != x.shape[0] or f.shape[2:] != x.shape[2:] or f.shape[1] != self.gamma.in_channels:
            raise ValueError(f"f must be [{x.shape[0]}, {self.gamma.in_channels}, {x.shape[2]}, {x.shape[3]}] "
                             f"(x's batch and size), got {tuple(f.shape)}")
        return self.norm(x) * (1 + self.gamma(f)) + self.beta(f)


class FADEResBlock(nn.Module):
    r"""$x_s + \mathrm{conv}_1(\phi(\mathrm{FADE}_1(\mathrm{conv}_0(\phi(\mathrm{FADE}_0(x, f))), f)))$, $\phi$ =
    LeakyReLU 0.2, $x_s$ = ``x`` or a learned 1x1 conv of $\mathrm{FADE}_s(x, f)$ when the channels change.
    ``fade=False`` (the ablation) uses BatchNorm with its own affine instead and ignores ``f``. The middle
    width is ``min(c_in, c_out)``; the official block keeps ``c_in`` (a stated departure, cheaper)."""

    def __init__(self, c_in: int, c_out: int, feature_channels: int, fade: bool = True, spectral: bool = True) -> None:
        super().__init__()
        mid = min(c_in, c_out)
        self.fade = fade
        norm = (lambda c: FADE(c, feature_channels)) if fade else (lambda c: nn.BatchNorm2d(c))
        self.norm_0, self.norm_1 = norm(c_in), norm(mid)
        self.conv_0 = _sn(nn.Conv2d(c_in, mid, 3, padding=1), spectral)
        self.conv_1 = _sn(nn.Conv2d(mid, c_out, 3, padding=1), spectral)
        self.learned_shortcut = c_in != c_out
        if self.learned_shortcut:
            self.norm_s = norm(c_in)
            self.conv_s = _sn(nn.Conv2d(c_in, c_out, 1, bias=False), spectral)

    def _norm(self, layer: nn.Module, x: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        return layer(x, f) if self.fade else layer(x)

    def forward(self, x: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
        if self.fade and f is None:
            raise ValueError("f (the content feature map) is required when fade=True")
        act = lambda t: F.leaky_relu(t, 0.2)
        xs = self.conv_s(self._norm(self.norm_s, x, f)) if self.learned_shortcut else x
        dx = self.conv_0(act(self._norm(self.norm_0, x, f)))
        return xs + self.conv_1(act(self._norm(self.norm_1, dx, f)))


class _StreamBlock(nn.Module):
    """A stream's residual block: instance norm (no affine), LeakyReLU 0.2, spectral-norm 3x3 convs, in the
    pre-activation order (norm, activation, conv) with a plain 1x1 shortcut; the official block runs conv, norm,
    activation and normalises its shortcut too (a stated departure)."""

    def __init__(self, c_in: int, c_out: int, spectral: bool) -> None:
        super().__init__()
        self.conv_0 = _sn(nn.Conv2d(c_in, c_out, 3, padding=1), spectral)
        self.conv_1 = _sn(nn.Conv2d(c_out, c_out, 3, padding=1), spectral)
        self.conv_s = _sn(nn.Conv2d(c_in, c_out, 1, bias=False), spectral) if c_in != c_out else nn.Identity()
        self.norm_0, self.norm_1 = nn.InstanceNorm2d(c_in), nn.InstanceNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dx = self.conv_0(F.leaky_relu(self.norm_0(x), 0.2))
        return self.conv_s(x) + self.conv_1(F.leaky_relu(self.norm_1(dx), 0.2))


def _channels(ngf: int, i: int) -> int:
    return ngf * min(2 ** i, 16)


class Stream(nn.Module):
    """Content or style stream: ``n_scales`` residual blocks; block ``i`` works at 1/2^i of the input
    size (nearest 0.5x downsampling between blocks) with ``ngf * min(2^i, 16)`` channels. Returns the
    ``n_scales`` feature maps, finest first."""

    def __init__(self, in_channels: int, ngf: int = 16, n_scales: int = 4, spectral: bool = True) -> None:
        super().__init__()
        _check_ints(in_channels=in_channels, ngf=ngf, n_scales=n_scales)
        self.in_channels = in_channels
        self.blocks = nn.ModuleList(_StreamBlock(in_channels if i == 0 else _channels(ngf, i - 1), _channels(ngf, i),
                                                 spectral) for i in range(n_scales))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_map("x", x)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels, got {x.shape[1]}")
        if min(x.shape[2:]) < 2 ** (len(self.blocks) - 1):
            raise ValueError(f"x of size {tuple(x.shape[2:])} is too small for {len(self.blocks)} scales")
        feats = []
        for i, block in enumerate(self.blocks):
            if i:
                x = F.interpolate(x, scale_factor=0.5, mode="nearest")
            x = block(x)
            feats.append(x)
        return feats


class TSITGenerator(nn.Module):
    r"""The generator with its two streams. ``n_scales`` defaults to $\log_2(\text{image\_size}) - 1$
    (4 at 32x32, 3 at 16x16): the coarsest scale is 4x4. From 3-channel noise at that scale (a 3x3 conv),
    coarse to fine: FAdaIN with the style feature $s_i$ (when ``style``), a FADE residual block
    conditioned on the content feature $f_i$, x2 nearest upsampling; then LeakyReLU, 3x3 conv, tanh.
    Ablations: ``style=False`` drops the style stream; ``fade=False`` replaces FADE by BatchNorm and
    starts from the coarsest content feature instead of noise (an encoder-decoder without skips)."""

    def __init__(self, image_size: int = 32, ngf: int = 16, n_scales: int | None = None, content_channels: int = 1,
                 style: bool = True, fade: bool = True, spectral: bool = True) -> None:
        super().__init__()
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 4:
            raise ValueError(f"image_size must be an int >= 4, got {image_size!r}")
        n_scales = n_scales if n_scales is not None else int(math.log2(image_size)) - 1
        if not isinstance(n_scales, int) or not 1 <= n_scales or image_size % 2 ** (n_scales - 1):
            raise ValueError(f"n_scales must be an int >= 1 with image_size divisible by 2^(n_scales - 1), got {n_scales!r}")
        self.image_size, self.n_scales, self.use_style, self.use_fade = image_size, n_scales, style, fade
        self.content = Stream(content_channels, ngf, n_scales, spectral)
        self.style = Stream(3, ngf, n_scales, spectral) if style else None
        top = _channels(ngf, n_scales - 1)
        self.head = nn.Conv2d(3 if fade else top, top, 3, padding=1)
        self.blocks = nn.ModuleList(FADEResBlock(_channels(ngf, i), _channels(ngf, max(i - 1, 0)), _channels(ngf, i),
                                                 fade, spectral) for i in range(n_scales))
        self.out = nn.Conv2d(ngf, 3, 3, padding=1)

    def forward(self, content: torch.Tensor, style: torch.Tensor | None = None, alpha: float = 1.0,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """``content`` [N, C_c, S, S], ``style`` [N, 3, S, S] (images in [-1, 1]); returns [N, 3, S, S] in [-1, 1]."""
        _check_map("content", content)
        if content.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"content must be {self.image_size}x{self.image_size}, got {tuple(content.shape[2:])}")
        if self.use_style:
            _check_map("style", style)
            if style.shape[0] != content.shape[0] or style.shape[1:] != (3, *content.shape[2:]):
                raise ValueError(f"style must be [{content.shape[0]}, 3, {content.shape[2]}, {content.shape[3]}], "
                                 f"got {tuple(style.shape)}")
        alpha = _check_unit("alpha", alpha)
        f = self.content(content)
        s = self.style(style) if self.use_style else None
        low = self.image_size // 2 ** (self.n_scales - 1)
        if self.use_fade:
            if noise is None:
                noise = torch.randn(content.shape[0], 3, low, low, device=content.device, dtype=content.dtype)
            elif noise.shape != (content.shape[0], 3, low, low):
                raise ValueError(f"noise must be [{content.shape[0]}, 3, {low}, {low}], got {tuple(noise.shape)}")
            x = self.head(noise)
        else:
            x = self.head(f[-1])
        for i in reversed(range(self.n_scales)):
            if s is not None:
                x = fadain(x, s[i], alpha)
            x = self.blocks[i](x, f[i])
            if i:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return torch.tanh(self.out(F.leaky_relu(x, 0.2)))


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pixHD/SPADE style): 4x4 convs, padding 2, strides 2 except the last two, spectral +
    instance norm, LeakyReLU 0.2; ``n_layers`` hidden layers then a 1-channel logit map. ``forward``
    returns every layer's output, the logit map last."""

    def __init__(self, in_channels: int, ndf: int = 32, n_layers: int = 4, spectral: bool = True) -> None:
        super().__init__()
        _check_ints(in_channels=in_channels, ndf=ndf, n_layers=n_layers)
        self.in_channels = in_channels
        layers = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, 2, 2), nn.LeakyReLU(0.2))]
        c = ndf
        for n in range(1, n_layers):
            c_out = min(2 * c, 8 * ndf)
            layers.append(nn.Sequential(_sn(nn.Conv2d(c, c_out, 4, 1 if n == n_layers - 1 else 2, 2), spectral),
                                        nn.InstanceNorm2d(c_out), nn.LeakyReLU(0.2)))
            c = c_out
        layers.append(nn.Sequential(nn.Conv2d(c, 1, 4, 1, 2)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_map("x", x)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (content and image concatenated), got {x.shape[1]}")
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiScaleDiscriminator(nn.Module):
    """``n_scales`` PatchGANs, the ``d``-th on the input average-pooled ``d`` times (3x3, stride 2).
    Returns one feature list per scale. The input is the content map and the image concatenated
    (a conditional discriminator, as in the official semantic-synthesis setting)."""

    def __init__(self, in_channels: int, ndf: int = 32, n_layers: int = 4, n_scales: int = 2,
                 spectral: bool = True) -> None:
        super().__init__()
        _check_ints(n_scales=n_scales)
        self.nets = nn.ModuleList(PatchDiscriminator(in_channels, ndf, n_layers, spectral) for _ in range(n_scales))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for d, net in enumerate(self.nets):
            if d:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(net(x))
        return out


def _logit_maps(name: str, d_out: Any) -> list[torch.Tensor]:
    """Accepts a logit tensor, a list of logit tensors, or a discriminator's list of feature lists."""
    if isinstance(d_out, torch.Tensor):
        return [d_out]
    if isinstance(d_out, (list, tuple)) and d_out:
        maps = [o[-1] if isinstance(o, (list, tuple)) else o for o in d_out]
        if all(isinstance(m, torch.Tensor) for m in maps):
            return maps
    raise ValueError(f"{name} must be a tensor of logits, a list of them, or a discriminator's output "
                     f"(a list of feature lists), got {type(d_out).__name__}")


def hinge_d_loss(real: Any, fake: Any) -> torch.Tensor:
    r"""$\mathcal L_D = \mathbb E[\max(0, 1 - D(x))] + \mathbb E[\max(0, 1 + D(G(c, s)))]$, each mean
    averaged over the discriminator's scales (as the official code does)."""
    r, f = _logit_maps("real", real), _logit_maps("fake", fake)
    if len(r) != len(f):
        raise ValueError(f"real and fake must have the same number of scales, got {len(r)} and {len(f)}")
    return sum(F.relu(1 - a).mean() + F.relu(1 + b).mean() for a, b in zip(r, f)) / len(r)


def hinge_g_loss(fake: Any) -> torch.Tensor:
    r"""$\mathcal L_G^{adv} = -\mathbb E[D(G(c, s))]$, averaged over the scales."""
    f = _logit_maps("fake", fake)
    return -sum(b.mean() for b in f) / len(f)


def feature_matching_loss(real: Sequence[Sequence[torch.Tensor]], fake: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    r"""$\mathcal L_{FM} = \frac{1}{n_D}\sum_m \sum_j \| D_m^{(j)}(\text{real}) - D_m^{(j)}(\text{fake}) \|_1$ (mean
    absolute difference per layer), over every layer but the logit map; the real features are detached."""
    ok = lambda o: isinstance(o, (list, tuple)) and o and all(isinstance(l, (list, tuple)) and len(l) >= 2 for l in o)
    if not ok(real):
        raise ValueError("real must be a discriminator's output: a list (scales) of lists of >= 2 feature maps")
    if not ok(fake):
        raise ValueError("fake must be a discriminator's output: a list (scales) of lists of >= 2 feature maps")
    if [len(l) for l in real] != [len(l) for l in fake]:
        raise ValueError("real and fake must come from the same discriminator (same scales and layers)")
    total = 0.0
    for r_layers, f_layers in zip(real, fake):
        for a, b in zip(r_layers[:-1], f_layers[:-1]):
            if a.shape != b.shape:
                raise ValueError(f"real and fake feature maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
            total = total + F.l1_loss(b, a.detach())
    return total / len(real)


class PerceptualLoss(nn.Module):
    r"""$\mathcal L_P = \sum_i w_i \| \phi_i(\hat x) - \phi_i(x) \|_1$ (mean absolute difference) on the
    features ``layers`` of a frozen classifier (the paper: VGG-19 with $w = (1/32, 1/16, 1/8, 1/4, 1)$;
    here a small classifier trained on the course data). Images in [-1, 1] are mapped to the
    classifier's normalised input with ``mean``, ``std``."""

    def __init__(self, classifier: nn.Module, layers: Sequence[str], weights: Sequence[float],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
        if len(layers) == 0 or len(layers) != len(weights):
            raise ValueError(f"layers and weights must be non-empty and of equal length, got {len(layers)} and {len(weights)}")
        if any(not (isinstance(w, (int, float)) and w >= 0) for w in weights):
            raise ValueError(f"weights must be numbers >= 0, got {list(weights)}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must have 3 entries (std > 0), got {mean} and {std}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.extract = feature_extractor(self.classifier, list(layers))
        self.layers, self.weights = list(layers), [float(w) for w in weights]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.classifier.eval()
        return self.extract(((x + 1) / 2 - self.mean) / self.std)

    def forward(self, fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_map("fake", fake)
        _check_map("target", target)
        if fake.shape != target.shape:
            raise ValueError(f"fake and target must have the same shape, got {tuple(fake.shape)} and {tuple(target.shape)}")
        a = self.features(fake)
        with torch.no_grad():
            b = self.features(target)
        return sum(w * F.l1_loss(a[n].float(), b[n].float()) for n, w in zip(self.layers, self.weights))


def sobel_edges(images: torch.Tensor) -> torch.Tensor:
    r"""Sobel gradient magnitude $\sqrt{G_x^2 + G_y^2}$ of the luminance $0.299R + 0.587G + 0.114B$,
    replicate padding, ``[N, 3, H, W]`` -> ``[N, 1, H, W]``. For images in [0, 1] the values lie in
    $[0, 4\sqrt 2]$ (a unit step gives 4)."""
    _check_map("images", images)
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (RGB), got {images.shape[1]}")
    w = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    gray = F.pad((images * w).sum(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device, dtype=images.dtype)
    k = torch.stack([kx, kx.T]).unsqueeze(1)
    g = F.conv2d(gray, k)
    return g.pow(2).sum(1, keepdim=True).sqrt()


def _to_pm1(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1


def _content(x_pm1: torch.Tensor) -> torch.Tensor:
    return sobel_edges((x_pm1 + 1) / 2) / 2 - 1      # a unit step maps to 1; the range is [-1, 2 sqrt(2) - 1]


@dataclass
class TSITRun:
    """A trained translator: the generator, the discriminator, the loss curves (one value per
    logged step), and sample grids ``[(step, images in [-1, 1])]`` on a fixed batch."""

    generator: TSITGenerator
    discriminator: MultiScaleDiscriminator
    history: dict[str, list[float]] = field(default_factory=dict)
    samples: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    steps: int = 0


@torch.no_grad()
def generate(generator: TSITGenerator, images: torch.Tensor, style_images: torch.Tensor | None = None,
             alpha: float = 1.0, seed: int = 0, batch_size: int = 512) -> torch.Tensor:
    """Translate uint8 ``images`` [N, 3, S, S] via their edge maps, styled by ``style_images`` (uint8,
    default: the images themselves), with seeded noise; returns images in [-1, 1] on the CPU."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {getattr(images, 'dtype', type(images))}")
    style_images = images if style_images is None else style_images
    if not isinstance(style_images, torch.Tensor) or style_images.dtype != torch.uint8 or style_images.shape != images.shape:
        raise ValueError(f"style_images must be uint8 of images' shape {tuple(images.shape)}")
    dev = next(generator.parameters()).device
    generator.eval()
    gen, out = torch.Generator().manual_seed(seed), []
    low = generator.image_size // 2 ** (generator.n_scales - 1)
    for i in range(0, len(images), batch_size):
        x, s = _to_pm1(images[i:i + batch_size].to(dev)), _to_pm1(style_images[i:i + batch_size].to(dev))
        noise = torch.randn(len(x), 3, low, low, generator=gen).to(dev)
        out.append(generator(_content(x), s if generator.use_style else None, alpha, noise).float().cpu())
    return torch.cat(out)


def train_tsit(data: Dataset, perceptual: PerceptualLoss, *, epochs: int = 1, batch_size: int = 64,
               ngf: int = 16, ndf: int = 32, d_scales: int = 2, style: bool = True, fade: bool = True,
               lambda_fm: float = 10.0, lambda_p: float = 20.0, lr_g: float = 1e-4, lr_d: float = 4e-4,
               betas: tuple[float, float] = (0.0, 0.9), seed: int = 0, sample_every: int = 0,
               sample_images: torch.Tensor | None = None, max_steps: int | None = None,
               device: str | torch.device | None = None, progress: bool | None = None,
               description: str = "TSIT") -> TSITRun:
    r"""Train a TSIT generator on edges -> image (style = the target image), alternating one
    discriminator step on $\mathcal L_D$ and one generator step on
    $\mathcal L_G = \mathcal L_G^{adv} + \lambda_{FM}\mathcal L_{FM} + \lambda_P \mathcal L_P$, Adam with
    TTUR (the official defaults: G lr 1e-4, D lr 4e-4, betas (0, 0.9)). Data stay on the device as
    uint8; bf16 autocast on GPUs that have it (none on the CPU). ``sample_every`` steps (and at the
    end) the generator translates ``sample_images`` (uint8) with fixed noise."""
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a data.Dataset, got {type(data).__name__}")
    if not isinstance(perceptual, PerceptualLoss):
        raise TypeError(f"perceptual must be a tsit.PerceptualLoss, got {type(perceptual).__name__}")
    _check_ints(epochs=epochs, batch_size=batch_size)
    for name, v, low in (("lambda_fm", lambda_fm, 0), ("lambda_p", lambda_p, 0), ("lr_g", lr_g, 1e-30), ("lr_d", lr_d, 1e-30)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= low):
            raise ValueError(f"{name} must be a finite number {'>= 0' if low == 0 else '> 0'}, got {v!r}")
    if data.x_train.shape[2] != data.x_train.shape[3]:
        raise ValueError(f"data must hold square images, got {tuple(data.x_train.shape[2:])}")
    dev = get_device(device)
    seed_everything(seed)
    size = data.x_train.shape[2]
    G = TSITGenerator(size, ngf, style=style, fade=fade).to(dev)
    D = MultiScaleDiscriminator(1 + 3, ndf, n_scales=d_scales).to(dev)
    perceptual = perceptual.to(dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr_d, betas=betas)
    dtype = autocast_dtype(dev)
    if dtype == torch.float16:   # fp16 without a GradScaler would underflow in a GAN; stay in fp32 there
        dtype = None
    # mean = std = 0.5 maps uint8 to [-1, 1]; train=True shuffles (and drops the last partial batch), pad=0: no crops
    loader = DeviceLoader(data.x_train, data.y_train, min(batch_size, len(data.x_train)), mean=(0.5,) * 3,
                          std=(0.5,) * 3, train=True, pad=0, device=dev, seed=seed, channels_last=False)
    run = TSITRun(G, D, {k: [] for k in ("d_loss", "g_adv", "g_fm", "g_p")})
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))

    def sample(step: int) -> None:
        if sample_images is not None:
            run.samples.append((step, generate(G, sample_images, seed=seed)))
            G.train()

    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=description, disable=not (show_progress() if progress is None else progress),
               leave=False)
    step, logs = 0, []
    while step < total:
        loader.set_epoch(step // len(loader))
        for x, _ in loader:
            if step >= total:
                break
            c = _content(x)
            with autocast(dev, dtype):             # discriminator step: real vs generated, hinge loss
                with torch.no_grad():
                    fake = G(c, x if style else None)
                d_real, d_fake = D(torch.cat([c, x], 1)), D(torch.cat([c, fake.to(x.dtype)], 1))
                d_loss = hinge_d_loss(d_real, d_fake)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            with autocast(dev, dtype):             # generator step: adversarial + feature matching + perceptual
                fake = G(c, x if style else None)
                d_fake = D(torch.cat([c, fake], 1))
                with torch.no_grad():
                    d_real = D(torch.cat([c, x], 1))
                g_adv, g_fm, g_p = hinge_g_loss(d_fake), feature_matching_loss(d_real, d_fake), perceptual(fake, x)
                g_loss = g_adv + lambda_fm * g_fm + lambda_p * g_p
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            logs.append(torch.stack([d_loss.detach().float(), g_adv.detach().float(), g_fm.detach().float(),
                                     g_p.detach().float()]))
            step += 1
            bar.update(1)
            if sample_every and step % sample_every == 0 and step < total:
                sample(step)
    bar.close()
    values = torch.stack(logs).cpu()              # one host transfer at the end, none in the loop
    if not torch.isfinite(values).all():
        raise FloatingPointError("TSIT training produced a non-finite loss; lower the learning rates")
    for i, k in enumerate(run.history):
        run.history[k] = values[:, i].tolist()
    sample(step)
    run.steps = step
    G.eval(), D.eval()
    return run
