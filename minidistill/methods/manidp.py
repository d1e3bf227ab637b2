"""Chapter 10: ManiDP, dynamic channel pruning regularised by the data manifold.

Tang, Wang, Xu, Deng, Xu, Tao and Xu, *Manifold Regularized Dynamic Network Pruning*, CVPR 2021
(official code: huawei-noah/Pruning, folder ``ManiDP``).

Every gated convolution :math:`l` has a small **saliency module** :math:`G^l` that reads the
layer's input and scores its output channels for this one image,

.. math:: \\pi^l(x) = \\min\\big(\\mathrm{ReLU}(W_2\\,\\mathrm{ReLU}(W_1\\,\\mathrm{GAP}(F^{l-1}(x))) + b_2),\\ 1000\\big),

and the conv output is multiplied channel-wise by :math:`\\pi^l \\odot \\mathbb 1[\\pi^l \\ge \\theta^l]`.
Training minimises

.. math:: \\frac1N\\sum_i\\Big[\\mathcal L_{CE}(x_i) + \\lambda(x_i)\\sum_l \\tfrac{1}{c_l}\\|\\pi^l(x_i)\\|_1\\Big]
          + \\gamma_\\mathrm{sim}\\sum_l \\tfrac{1}{N^2}\\|M^l - R^l\\|_F^2,

with :math:`\\lambda(x_i)` large for easy images and zero for hard ones, and :math:`M^l`, :math:`R^l`
the cosine Gram matrices of saliencies and features (the paper's :math:`T^l` is :math:`M^l` here:
the course keeps :math:`T` for the temperature).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Dataset, DeviceLoader
from ..exercises.manidp import check_block_macs, check_cosine_gram, check_instance_weight
from ..losses import CrossEntropy, Objective, upcast
from ..models import CifarResNet
from ..train import Recipe, Run, train_model

__all__ = [
    "SaliencyModule", "ChannelGate", "GatedBlock", "GatedResNet", "instance_weight", "cosine_gram",
    "similarity_loss", "sparsity", "keep_ratio", "layer_thresholds", "instance_macs", "magnitude_masks",
    "ManiDPObjective", "METHODS", "train_pruned", "evaluate_pruned", "saliency_means", "evaluate_at_ratio",
    "check_instance_weight", "check_cosine_gram", "check_block_macs",
]

SALIENCY_CAP = 1000.0  # the official code clips saliencies at 1000


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _ratio(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


class SaliencyModule(nn.Module):
    """:math:`G^l`: GAP -> FC (no bias) -> ReLU -> FC -> ReLU -> clip at 1000, one score per
    output channel. The second layer's bias starts at 1 and its weights near zero, so every
    channel starts on with a saliency close to 1: the gated network starts as the dense one.

    ``reduction`` divides the hidden width (the official code: 2, or 1 when ``c_out < 80``).
    """

    def __init__(self, c_in: int, c_out: int, reduction: int | None = None) -> None:
        super().__init__()
        _positive_int("c_in", c_in), _positive_int("c_out", c_out)
        reduction = (1 if c_out < 80 else 2) if reduction is None else _positive_int("reduction", reduction)
        hidden = max(c_out // reduction, 1)
        self.fc1 = nn.Linear(c_in, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, c_out)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
        # small weights (not Kaiming, a departure): with bias 1 the start is then "all on, pi ~ 1",
        # so fine-tuning starts from the pretrained network's function
        nn.init.normal_(self.fc2.weight, std=1e-3)
        nn.init.ones_(self.fc2.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features [N, c_in, H, W]`` (or already pooled ``[N, c_in]``) -> ``pi [N, c_out]``."""
        if features.dim() == 4:
            features = features.mean(dim=(2, 3))
        if features.dim() != 2 or features.shape[1] != self.fc1.in_features:
            raise ValueError(f"expected features [N, {self.fc1.in_features}, H, W], got {tuple(features.shape)}")
        return F.relu(self.fc2(F.relu(self.fc1(features)))).clamp(max=SALIENCY_CAP)


class ChannelGate(nn.Module):
    """Multiplies a conv output by its masked saliency :math:`\\pi \\odot \\mathbb 1[\\pi \\ge \\theta]`
    (dynamic), or by a fixed 0/1 channel mask (``dynamic=False``: static pruning).

    After each forward, ``saliency`` (pre-threshold :math:`\\pi`, ``[N, c]``), ``feature`` (GAP of
    the conv output before masking, ``[N, c]``), ``mask`` (``[N, c]`` booleans) and ``size``
    (the output's ``(H, W)``) describe the last batch.
    """

    def __init__(self, c_in: int, c_out: int, reduction: int | None = None) -> None:
        super().__init__()
        self.saliency_module = SaliencyModule(c_in, c_out, reduction)
        self.register_buffer("threshold", torch.zeros(()))      # theta = 0: every channel on
        self.register_buffer("static_mask", torch.ones(c_out))
        self.dynamic = True
        self.saliency = self.feature = self.mask = None
        self.size: tuple[int, int] = (0, 0)

    def forward(self, source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self.size = tuple(out.shape[-2:])
        self.feature = out.mean(dim=(2, 3))
        if not self.dynamic:
            self.saliency = None
            self.mask = self.static_mask.bool().expand(out.shape[0], -1)
            return out * self.static_mask.to(out.dtype)[None, :, None, None]
        pi = self.saliency_module(source)
        self.saliency, self.mask = pi, pi >= self.threshold
        return out * (pi * self.mask).to(out.dtype)[:, :, None, None]


class GatedBlock(nn.Module):
    """A CIFAR ResNet basic block with both convolutions gated. ``body`` has the same layout
    as :class:`minidistill.models.BasicBlock`'s, so a trained ResNet's weights load into it.
    The first gate reads the block's input, the second the (gated) first conv output."""

    def __init__(self, c_in: int, c_out: int, stride: int, reduction: int | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                                  nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()
        self.gate1 = ChannelGate(c_in, c_out, reduction)
        self.gate2 = ChannelGate(c_out, c_out, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate1(x, self.body[2](self.body[1](self.body[0](x))))   # pi >= 0, so gating after the ReLU
        o = self.gate2(h, self.body[4](self.body[3](h)))
        return self.relu(o + self.shortcut(x))


class GatedResNet(CifarResNet):
    """:class:`~minidistill.models.CifarResNet` with every block's two convolutions gated (the stem,
    the shortcuts and the classifier stay dense). Build it fresh, or from a trained ResNet with
    :meth:`from_resnet`."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int, reduction: int | None = None) -> None:
        super().__init__(depth, widths, num_classes)
        for stage in (self.layer1, self.layer2, self.layer3):
            for i, old in enumerate(stage):
                c_in, c_out = old.body[0].in_channels, old.body[0].out_channels
                stage[i] = GatedBlock(c_in, c_out, old.body[0].stride[0], reduction)
        self._init_weights()   # CifarResNet's init for the new convolutions (the gates keep theirs)

    @classmethod
    def from_resnet(cls, resnet: CifarResNet, reduction: int | None = None) -> "GatedResNet":
        """A gated copy of a trained ``resnet``: its weights, fresh saliency modules (all on)."""
        if not isinstance(resnet, CifarResNet) or isinstance(resnet, GatedResNet):
            raise TypeError(f"resnet must be a models.CifarResNet, got {type(resnet).__name__}")
        blocks = [b for s in (resnet.layer1, resnet.layer2, resnet.layer3) for b in s]
        widths = (resnet.stem[0].out_channels, *(s[0].body[0].out_channels for s in (resnet.layer1, resnet.layer2,
                                                                                       resnet.layer3)))
        gated = cls(6 * (len(blocks) // 3) + 2, widths, resnet.fc.out_features, reduction)
        missing, unexpected = gated.load_state_dict(resnet.state_dict(), strict=False)
        assert not unexpected and all(".gate" in k for k in missing), (missing, unexpected)
        return gated.to(next(resnet.parameters()).device)

    def gates(self) -> list[ChannelGate]:
        """The gates in forward order (two per block)."""
        return [m for m in self.modules() if isinstance(m, ChannelGate)]

    def set_dynamic(self, dynamic: bool) -> "GatedResNet":
        for gate in self.gates():
            gate.dynamic = dynamic
        return self


def instance_weight(ce: torch.Tensor, c_prime: torch.Tensor | float, lam: float, power: float = 1.0,
                    detach: bool = True) -> torch.Tensor:
    """The adaptive sparsity weight
    :math:`\\lambda(x_i) = \\lambda'\\,\\mathbb 1[\\mathcal L_{CE}(x_i) < C']\\,((C' - \\mathcal L_{CE}(x_i))/C')^{p}`.

    ``ce [N]`` per-instance cross-entropies, ``c_prime > 0`` the complexity threshold. With
    ``detach=True`` (read as a per-image weight; our default) the weight is a constant for the optimiser; with
    ``detach=False`` (the official code) gradients also flow through it into the CE.
    """
    if not isinstance(ce, torch.Tensor) or ce.dim() != 1:
        raise ValueError(f"ce must be a 1-D tensor of per-instance losses, got "
                         f"{tuple(ce.shape) if isinstance(ce, torch.Tensor) else type(ce).__name__}")
    if not isinstance(c_prime, torch.Tensor) and not (isinstance(c_prime, (int, float)) and c_prime > 0):
        raise ValueError(f"c_prime must be > 0, got {c_prime!r}")
    if not (isinstance(lam, (int, float)) and lam >= 0) or not (isinstance(power, (int, float)) and power > 0):
        raise ValueError(f"lam must be >= 0 and power > 0, got lam={lam!r}, power={power!r}")
    if detach:
        ce = ce.detach()
    slack = ((c_prime - ce) / c_prime).clamp(min=0)
    return lam * slack ** power


def cosine_gram(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``[N, d] -> [N, N]``: the cosine similarity of every pair of rows (a zero row gets zeros)."""
    if v.dim() != 2:
        raise ValueError(f"expected a [N, d] matrix of per-instance vectors, got shape {tuple(v.shape)}")
    # rsqrt(|v|^2 + eps): a finite gradient even for an all-zero row (v / |v| has none there)
    u = v * torch.rsqrt((v * v).sum(dim=1, keepdim=True) + eps)
    return u @ u.T


def similarity_loss(features: Sequence[torch.Tensor], saliencies: Sequence[torch.Tensor]) -> torch.Tensor:
    """:math:`\\sum_l \\frac{1}{N^2}\\|M^l - R^l\\|_F^2`, with :math:`R^l` the cosine Gram matrix of
    layer ``l``'s pooled features ``[N, c_l]`` and :math:`M^l` (the paper's :math:`T^l`) that of its saliencies."""
    if len(features) != len(saliencies) or not features:
        raise ValueError(f"need one saliency per feature layer, got {len(features)} and {len(saliencies)}")
    total = features[0].new_zeros(())
    for f, s in zip(features, saliencies):
        if f.shape[0] != s.shape[0]:
            raise ValueError(f"features and saliencies disagree on the batch: {f.shape[0]} vs {s.shape[0]}")
        n = f.shape[0]
        total = total + ((cosine_gram(upcast(s)) - cosine_gram(upcast(f))) ** 2).sum() / n ** 2
    return total


def sparsity(saliencies: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per instance :math:`\\sum_l \\frac{1}{c_l}\\|\\pi^l(x_i)\\|_1` (``[N]``)."""
    return torch.stack([upcast(s).abs().mean(dim=1) for s in saliencies]).sum(0)


def keep_ratio(epoch: int, epochs: int, target: float) -> float:
    """The cosine schedule :math:`\\rho_e = \\frac{1-\\rho^*}{2}\\cos\\frac{\\pi(e+1)}{E} + \\frac{1+\\rho^*}{2}`:
    from near 1 down to ``target`` at the last epoch ``e = E - 1``."""
    _positive_int("epochs", epochs)
    target = _ratio("target", target)
    if not isinstance(epoch, int) or not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be an int in [0, {epochs}), got {epoch!r}")
    return (1 - target) / 2 * math.cos(math.pi * (epoch + 1) / epochs) + (1 + target) / 2


def layer_thresholds(mean_saliencies: Sequence[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Per layer, :math:`\\theta^l` = the :math:`k`-th largest data-average saliency,
    :math:`k = \\lceil \\rho\\, c_l\\rceil`: about a fraction ``ratio`` of the channels pass on average."""
    ratio = _ratio("ratio", ratio)
    out = []
    for m in mean_saliencies:
        if m.dim() != 1:
            raise ValueError(f"each mean saliency must be a [c_l] vector, got {tuple(m.shape)}")
        k = max(1, math.ceil(ratio * m.numel() - 1e-9))
        out.append(m.topk(k).values[-1])
    return out


def instance_macs(model: GatedResNet) -> torch.Tensor:
    """Multiply-accumulates per image ``[N]`` of the last forward through ``model``, counting
    only the channels that were on: a gated conv costs ``k*k * (active inputs) * (active
    outputs) * H * W``. Stem, shortcuts and classifier count in full; the saliency modules'
    own small cost is left out (as in a FLOPs table of the pruned network)."""
    if not isinstance(model, GatedResNet):
        raise TypeError(f"model must be a GatedResNet, got {type(model).__name__}")
    gate = model.layer1[0].gate1
    if gate.mask is None:
        raise RuntimeError("run a forward pass through the model first: the counter reads its last masks")
    stem = model.stem[0]
    n = gate.mask.shape[0]
    h, w = gate.size if model.layer1[0].body[0].stride[0] == 1 else (2 * gate.size[0], 2 * gate.size[1])
    total = torch.full((n,), float(9 * stem.in_channels * stem.out_channels * h * w), device=gate.mask.device)
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            m1, m2 = block.gate1.mask.float().sum(1), block.gate2.mask.float().sum(1)
            (h, w), c_in = block.gate1.size, block.body[0].in_channels
            total = total + 9 * c_in * m1 * h * w + 9 * m1 * m2 * h * w
            if not isinstance(block.shortcut, nn.Identity):
                total = total + c_in * block.body[0].out_channels * h * w
    return total + model.fc.in_features * model.fc.out_features


@torch.no_grad()
def magnitude_masks(model: GatedResNet, keep: float) -> GatedResNet:
    """Static pruning: in every gated conv keep the :math:`\\lceil \\rho c\\rceil` filters of largest
    L1 norm (Li et al., 2017) for every image, and switch the gates to these fixed masks."""
    keep = _ratio("keep", keep)
    for block in (b for s in (model.layer1, model.layer2, model.layer3) for b in s):
        for gate, conv in ((block.gate1, block.body[0]), (block.gate2, block.body[3])):
            norms = conv.weight.abs().sum(dim=(1, 2, 3))
            k = max(1, math.ceil(keep * norms.numel() - 1e-9))
            gate.static_mask.zero_()
            gate.static_mask[norms.topk(k).indices] = 1.0
    return model.set_dynamic(False)


class ManiDPObjective(Objective):
    """ManiDP's training loss for a :class:`GatedResNet` (terms ``ce``, ``sparsity``, ``sim``,
    ``lam``, ``keep``).

    ``lam`` = :math:`\\lambda'`, ``gamma_sim`` the weight of the similarity loss, ``target`` =
    :math:`\\rho^*`, ``complexity`` the factor in :math:`C' = 0.5\\,\\bar{\\mathcal L}_{CE}`
    (previous epoch; in the first epoch, the current batch's). ``adaptive=False`` uses
    :math:`\\lambda(x_i) = \\lambda'` for every image (plain dynamic pruning); ``detach=False``
    lets gradients flow through :math:`\\lambda(x_i)` as the official code does. At the first
    step of every epoch :math:`e \\ge 1` the thresholds :math:`\\theta^l` are set from the
    saliencies averaged over epoch :math:`e-1`'s training batches, at keep ratio :math:`\\rho_e`.
    """

    def __init__(self, lam: float = 5e-3, gamma_sim: float = 1.0, target: float = 0.6,
                 complexity: float = 0.5, power: float = 1.0, adaptive: bool = True, detach: bool = True) -> None:
        super().__init__()
        for name, value in (("lam", lam), ("gamma_sim", gamma_sim), ("complexity", complexity)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.lam, self.gamma_sim, self.target = float(lam), float(gamma_sim), _ratio("target", target)
        self.complexity, self.power, self.adaptive, self.detach = float(complexity), power, adaptive, detach
        self.widths: list[int] = []

    def setup(self, model: nn.Module, example: torch.Tensor, *, device: torch.device, **_) -> None:
        """Size the running sums (registered buffers, so a resumed run keeps them) to the model's gates."""
        if not isinstance(model, GatedResNet):
            raise TypeError(f"model must be a GatedResNet, got {type(model).__name__}")
        self.widths = [g.static_mask.numel() for g in model.gates()]
        self.register_buffer("saliency_sum", torch.zeros(sum(self.widths), device=device))
        for name in ("ce_sum", "count", "c_prime"):
            self.register_buffer(name, torch.zeros((), device=device))

    def _new_epoch(self, model: GatedResNet) -> None:
        """Close the previous epoch: :math:`C'` from its mean CE, thresholds from its mean saliencies."""
        count = self.count.clamp(min=1)
        self.c_prime.copy_(self.complexity * self.ce_sum / count)
        epochs = max(round(self.total_steps / max(self.steps_per_epoch, 1)), self.epoch + 1)
        ratio = keep_ratio(self.epoch, epochs, self.target)
        means = (self.saliency_sum / count).split(self.widths)
        for gate, theta in zip(model.gates(), layer_thresholds(means, ratio)):
            gate.threshold.copy_(theta)
        for buf in (self.saliency_sum, self.ce_sum, self.count):
            buf.zero_()

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if not self.widths:
            raise RuntimeError("call setup(model, example, device=...) first (fit does)")
        if self.epoch >= 1 and self.step == self.epoch * self.steps_per_epoch:
            self._new_epoch(model)
        logits = model(x)
        gates = model.gates()
        pis = [g.saliency for g in gates]
        if any(p is None for p in pis):
            raise RuntimeError("ManiDPObjective needs dynamic gates (the model was switched to static masks)")
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        # first epoch: no previous epoch yet, so the current batch's mean CE stands in for it
        c_prime = torch.where(self.c_prime > 0, self.c_prime, self.complexity * ce.detach().mean())
        if self.adaptive:
            lam = instance_weight(ce, c_prime.clamp(min=1e-12), self.lam, self.power, self.detach)
        else:
            lam = torch.full_like(ce, self.lam)
        spars = sparsity(pis)
        sim = similarity_loss([g.feature for g in gates], pis) if self.gamma_sim > 0 else ce.new_zeros(())
        loss = (ce + lam * spars).mean() + self.gamma_sim * sim
        with torch.no_grad():
            self.saliency_sum += torch.cat([p.float().sum(0) for p in pis])
            self.ce_sum += ce.sum()
            self.count += ce.shape[0]
            keep = torch.cat([g.mask for g in gates], dim=1).float().mean()
        terms = {"ce": ce.detach().mean(), "sparsity": spars.detach().mean(), "sim": sim.detach(),
                 "lam": lam.detach().mean(), "keep": keep}
        return loss, logits, terms


#: the chapter's three pruned networks: static masks, plain dynamic pruning, ManiDP
METHODS = ("static", "dynamic", "manidp")


def train_pruned(method: str, base: CifarResNet, data: Dataset, recipe: Recipe | None = None, *, target: float = 0.6,
                 lam: float = 5e-3, gamma_sim: float = 1.0, detach: bool = True, seed: int = 0, **fit_kwargs) -> Run:
    """Fine-tune a gated copy of the trained ``base`` with :func:`~minidistill.train.train_model`.

    ``"static"``: the L1-largest :math:`\\lceil\\rho^* c\\rceil` filters of every gated conv, fixed,
    trained with cross-entropy; ``"dynamic"``: saliency gates with the same sparsity weight
    :math:`\\lambda'` for every image and no similarity term; ``"manidp"``: :math:`\\lambda(x_i)`
    and the similarity loss (``detach=False``: the official code's undetached weight). Both
    dynamic methods anneal the keep ratio to ``target``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def build() -> GatedResNet:
        model = GatedResNet.from_resnet(base)
        return magnitude_masks(model, target) if method == "static" else model

    objective = CrossEntropy() if method == "static" else ManiDPObjective(
        lam=lam, gamma_sim=gamma_sim if method == "manidp" else 0.0, target=target, adaptive=method == "manidp",
        detach=detach)
    return train_model(build, data, recipe, objective, seed=seed, description=f"{method} pruning (seed {seed})",
                       **fit_kwargs)


@torch.no_grad()
def evaluate_pruned(model: GatedResNet, data: Dataset, split: str = "test", batch_size: int = 1000) -> dict:
    """Per image of ``split``: ``ce``, ``correct``, ``macs`` (its sub-network's cost) and ``keep``
    (fraction of gated channels on), as tensors on the CPU, plus ``dense_macs``."""
    if not isinstance(model, GatedResNet):
        raise TypeError(f"model must be a GatedResNet, got {type(model).__name__}")
    device = next(model.parameters()).device
    loader = DeviceLoader.from_dataset(data, split, batch_size, train=False, device=device)
    model.eval()
    out: dict[str, list] = {"ce": [], "correct": [], "macs": [], "keep": []}
    for x, y in loader:
        logits = model(x).float()
        out["ce"].append(F.cross_entropy(logits, y, reduction="none").cpu())
        out["correct"].append((logits.argmax(1) == y).cpu())
        out["macs"].append(instance_macs(model).cpu())
        out["keep"].append(torch.cat([g.mask for g in model.gates()], 1).float().mean(1).cpu())
    res = {k: torch.cat(v) for k, v in out.items()}
    saved = [(g.dynamic, g.threshold.clone(), g.static_mask.clone()) for g in model.gates()]
    for g in model.gates():
        g.dynamic, g.static_mask[:] = False, 1.0
    model(x[:1])
    res["dense_macs"] = instance_macs(model).item()
    for g, (dyn, th, sm) in zip(model.gates(), saved):
        g.dynamic, g.static_mask[:] = dyn, sm
        g.threshold.copy_(th)
    return res



@torch.no_grad()
def saliency_means(model: GatedResNet, data: Dataset, split: str = "train", batch_size: int = 1000,
                   max_images: int | None = None) -> list[torch.Tensor]:
    """Per gate, the data-average saliency :math:`\\bar\\pi^l` ``[c_l]`` over ``split`` (the first
    ``max_images`` images), in eval mode: what :func:`layer_thresholds` turns into thresholds."""
    if not isinstance(model, GatedResNet):
        raise TypeError(f"model must be a GatedResNet, got {type(model).__name__}")
    if any(not g.dynamic for g in model.gates()):
        raise ValueError("saliency_means needs dynamic gates (the model has static masks)")
    if max_images is not None:
        _positive_int("max_images", max_images)
    device = next(model.parameters()).device
    loader = DeviceLoader.from_dataset(data, split, batch_size, train=False, device=device)
    was_training = model.training
    model.eval()
    sums, seen = None, 0
    for x, _ in loader:
        if max_images is not None:
            x = x[: max_images - seen]
        if len(x) == 0:
            break
        model(x)
        batch = [g.saliency.double().sum(0) for g in model.gates()]
        sums = batch if sums is None else [a + b for a, b in zip(sums, batch)]
        seen += len(x)
    model.train(was_training)
    return [(s / seen).float().cpu() for s in sums]


@torch.no_grad()
def evaluate_at_ratio(model: GatedResNet, data: Dataset, means: Sequence[torch.Tensor], ratio: float,
                      split: str = "test") -> dict:
    """:func:`evaluate_pruned` with every threshold reset, for this call only, to keep the
    :math:`\\lceil \\rho c_l\\rceil` channels of largest data-average saliency ``means`` (from
    :func:`saliency_means`): the trained family of sub-networks at another budget, no retraining."""
    if not isinstance(model, GatedResNet):
        raise TypeError(f"model must be a GatedResNet, got {type(model).__name__}")
    gates = model.gates()
    if len(means) != len(gates):
        raise ValueError(f"need one mean saliency per gate: {len(gates)} gates, got {len(means)}")
    saved = [g.threshold.clone() for g in gates]
    try:
        for g, theta in zip(gates, layer_thresholds(list(means), ratio)):
            g.threshold.copy_(theta)
        return evaluate_pruned(model, data, split)
    finally:
        for g, th in zip(gates, saved):
            g.threshold.copy_(th)
