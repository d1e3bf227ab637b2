r"""Chapter 7, part 2 -- Huang, Shen, Xing, Liu, Tian, Li, Deng, Huang & Hua (CVPR 2021),
"Revisiting Knowledge Distillation: An Inheritance and Exploration Framework" (IE-KD).

The student's feature map $f^s$ (the last residual stage, before pooling) is split along its
channels into an *inheritance* half $f_\mathrm{inh}$ and an *exploration* half $f_\mathrm{exp}$.
Both are encoded to "factors" $F_\mathrm{inh} = E_\mathrm{inh}(f_\mathrm{inh})$, $F_\mathrm{exp}
= E_\mathrm{exp}(f_\mathrm{exp})$ and compared with the teacher's compact knowledge, the factor
$F^t = E^t(f^t)$ of a :class:`FactorAutoEncoder` trained beforehand on the frozen teacher's
feature $f^t$. With $\hat a = a / \lVert a \rVert_2$ per example and $D$ the size of a factor,

$$\mathcal L_\mathrm{inh} = \frac{1}{ND}\sum_n \lVert \hat F_{\mathrm{inh},n} - \hat F^t_n \rVert_1,
\qquad \mathcal L_\mathrm{exp} = -\frac{1}{ND}\sum_n \lVert \hat F_{\mathrm{exp},n} - \hat F^t_n \rVert_1,$$

$$\mathcal L = H(q, p^s) + \lambda_\mathrm{inh}\,\mathcal L_\mathrm{inh} + \lambda_\mathrm{exp}\,\mathcal L_\mathrm{exp}.$$

The exploration loss is the **negative** distance (the official code's ``NormLoss(negative=True)``):
minimising it pushes $F_\mathrm{exp}$ *away* from the teacher's factor. The code's other choice,
the cosine variant (``kind="cos"``), pulls with $1 - \cos$ and pushes towards orthogonality with
$|\cos|$. IE-DML (:class:`MutualInheritExplore`) applies the same split between two networks
trained from scratch with deep mutual learning (:mod:`minidistill.methods.dml`), each one's
factor coming from an auto-encoder trained alongside.

The chapter's analysis tools (CKA between student and teacher features, active channels) are
:func:`minidistill.metrics.linear_cka`, :func:`layer_features` and :func:`active_channels`;
figures live in :mod:`.iekd_plots`, exercise self-checks in :mod:`minidistill.exercises.iekd`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset, DeviceLoader
from ..exercises.iekd import check_dml_gradient, check_farthest_factor, check_linear_cka
from ..losses import Objective, TeacherObjective, upcast
from ..metrics import linear_cka
from ..models import FeatureExtractor, feature_names, feature_shapes
from ..train import Recipe, Run, train_model
from .dml import MutualRun, dml_losses, train_mutual
from .iekd_plots import plot_accuracies, plot_toy

__all__ = [
    "SPLIT_MODES", "LOSS_KINDS",
    "FactorAutoEncoder", "factor_encoder",
    "split_index", "split_channels",
    "normalized_l1", "inheritance_loss", "exploration_loss", "reconstruction_loss",
    "FactorTeacher", "FactorReconstruction", "train_factor_autoencoder",
    "InheritExplore", "train_iekd",
    "MutualInheritExplore", "train_iedml",
    "layer_features", "active_channels", "linear_cka",
    "toy_inherit_explore",
    # figures, from iekd_plots
    "plot_toy", "plot_accuracies",
    # exercise self-checks, from exercises.iekd
    "check_farthest_factor", "check_linear_cka", "check_dml_gradient",
]

SPLIT_MODES = ("natural", "random")
LOSS_KINDS = ("l1", "cos")


def factor_encoder(in_channels: int, out_channels: int) -> nn.Sequential:
    """The official code's three-convolution coder: LeakyReLU(0.1), then 3x3 convolutions
    ``in -> in -> out -> out``, each followed by BatchNorm and LeakyReLU(0.1). The spatial size
    is kept."""
    for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"{name} must be a positive int, got {c!r}")

    def conv(a: int, b: int) -> list[nn.Module]:
        return [nn.Conv2d(a, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.1)]

    return nn.Sequential(nn.LeakyReLU(0.1), *conv(in_channels, in_channels), *conv(in_channels, out_channels),
                         *conv(out_channels, out_channels))


class FactorAutoEncoder(nn.Module):
    r"""The teacher's compact knowledge: an encoder $E^t$ from a feature map with ``in_channels``
    channels to a *factor* with ``factor_channels`` (default half as many, the official 64 -> 32),
    and a mirrored decoder back. ``forward(f) -> (factor, reconstruction)``."""

    def __init__(self, in_channels: int, factor_channels: int | None = None) -> None:
        super().__init__()
        factor_channels = factor_channels if factor_channels is not None else max(in_channels // 2, 1)
        self.in_channels, self.factor_channels = in_channels, factor_channels
        self.encoder = factor_encoder(in_channels, factor_channels)
        self.decoder = factor_encoder(factor_channels, in_channels)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if f.ndim != 4 or f.shape[1] != self.in_channels:
            raise ValueError(f"expected a feature map [N, {self.in_channels}, H, W], got {tuple(f.shape)}")
        factor = self.encoder(f)
        return factor, self.decoder(factor)


def split_index(channels: int, mode: str = "natural", *, ratio: float = 0.5, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel indices of the inheritance and the exploration part: ``"natural"`` takes the
    first ``round(ratio * channels)`` channels for inheritance and the rest for exploration;
    ``"random"`` does the same on a permutation drawn once from ``seed`` (the same seed always
    gives the same split, so a network keeps one split for its whole training)."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"mode must be one of {SPLIT_MODES}, got {mode!r}")
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 2:
        raise ValueError(f"channels must be an int >= 2 (both parts need a channel), got {channels!r}")
    if not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
    k = min(max(round(ratio * channels), 1), channels - 1)
    order = (torch.arange(channels) if mode == "natural"
             else torch.randperm(channels, generator=torch.Generator().manual_seed(seed)))
    return order[:k].sort().values, order[k:].sort().values


def split_channels(features: torch.Tensor, mode: str = "natural", *, ratio: float = 0.5, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f_inh, f_exp)``: ``features`` ``[N, C, ...]`` split along the channels by
    :func:`split_index`."""
    if not isinstance(features, torch.Tensor) or features.ndim < 2:
        raise ValueError(f"features must be a tensor [N, C, ...], got {tuple(getattr(features, 'shape', ()))}")
    inh, exp = split_index(features.shape[1], mode, ratio=ratio, seed=seed)
    return features.index_select(1, inh.to(features.device)), features.index_select(1, exp.to(features.device))


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{names[0]} and {names[1]} must be tensors")
    if a.shape != b.shape or a.ndim < 2 or len(a) == 0:
        raise ValueError(f"{names[0]} and {names[1]} must be [N, ...] factors of one shape with N >= 1, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)} (encode both to the same factor size)")


def normalized_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""$\frac{1}{ND}\sum_n \lVert \hat a_n - \hat b_n \rVert_1$ with every example flattened and
    scaled to unit L2 norm ($\hat a_n = a_n / \lVert a_n \rVert_2$), $D$ elements per example.
    Bounded: $\lVert \hat a - \hat b \rVert_1 \le \sqrt D\,\lVert \hat a - \hat b\rVert_2 \le 2\sqrt D$."""
    _check_pair(a, b, ("a", "b"))
    a_hat = F.normalize(upcast(a).flatten(1), dim=1)   # half precision -> float32; float64 stays
    b_hat = F.normalize(upcast(b).flatten(1).to(a_hat.dtype), dim=1)
    return (a_hat - b_hat).abs().sum() / a_hat.numel()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = upcast(a).flatten(1)
    return F.cosine_similarity(a, upcast(b).flatten(1).to(a.dtype), dim=1)


def inheritance_loss(f_inh: torch.Tensor, f_teacher: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    r"""Pull the inheritance factor towards the teacher's: $\mathcal L_\mathrm{inh}$ =
    :func:`normalized_l1` (``kind="l1"``) or the batch mean of $1 - \cos$ (``"cos"``). The
    teacher's factor is detached."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
    _check_pair(f_inh, f_teacher, ("f_inh", "f_teacher"))
    if kind == "l1":
        return normalized_l1(f_inh, f_teacher.detach())
    return (1 - _cosine(f_inh, f_teacher.detach())).mean()


def exploration_loss(f_exp: torch.Tensor, f_teacher: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    r"""Push the exploration factor away from the teacher's: $\mathcal L_\mathrm{exp} =
    -$ :func:`normalized_l1` (``kind="l1"``, **negative**: minimising it increases the distance,
    which is bounded, so it cannot diverge) or the batch mean of $|\cos|$ (``"cos"``: towards
    orthogonality). The teacher's factor is detached."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
    _check_pair(f_exp, f_teacher, ("f_exp", "f_teacher"))
    if kind == "l1":
        return -normalized_l1(f_exp, f_teacher.detach())
    return _cosine(f_exp, f_teacher.detach()).abs().mean()


def reconstruction_loss(reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The auto-encoder's loss: the mean absolute error over all elements (the official
    ``RecLoss``; the paper writes a squared error). ``features`` are detached."""
    _check_pair(reconstruction, features, ("reconstruction", "features"))
    rec = upcast(reconstruction)
    return (rec - upcast(features.detach()).to(rec.dtype)).abs().mean()


class FactorTeacher(nn.Module):
    """A frozen teacher and the encoder of its :class:`FactorAutoEncoder` as one network:
    ``forward(x)`` is the factor $F^t = E^t(f^t)$ of the teacher's feature ``layer`` (the
    forward stops after that layer)."""

    def __init__(self, teacher: nn.Module, encoder: nn.Module, layer: str = "layer3") -> None:
        super().__init__()
        self.teacher, self.encoder, self.layer = teacher, encoder, layer
        self._extract = [FeatureExtractor(teacher, [layer])]  # a list: the teacher is registered once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._extract[0](x)[self.layer])


class FactorReconstruction(TeacherObjective):
    """Stage 1 of IE-KD: train a :class:`FactorAutoEncoder` (``fit``'s model) to reconstruct the
    frozen teacher's feature ``layer``. Not a classifier: ``fit(..., eval_splits=())``. Term: ``rec``."""

    def __init__(self, teacher: nn.Module, layer: str = "layer3") -> None:
        super().__init__(teacher)
        self.layer = layer
        FeatureExtractor(teacher, [layer])  # fails now on an unknown layer name

    def setup(self, model: nn.Module, example: torch.Tensor, **kwargs: Any) -> None:
        super().setup(model, example, **kwargs)
        self._extract = [FeatureExtractor(self._fast[0], [self.layer])]  # a list: not a submodule

    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's feature ``layer`` on ``x`` (no gradients)."""
        with torch.no_grad():
            return self._extract[0](x)[self.layer]

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        f = self.teacher_forward(x)
        _, rec = model(f)
        loss = reconstruction_loss(rec, f)
        return loss, None, {"rec": loss.detach()}


def train_factor_autoencoder(teacher: nn.Module, data: Dataset, recipe: Recipe | None = None, *,
                             layer: str = "layer3", factor_channels: int | None = None, seed: int = 0,
                             **fit_kwargs: Any) -> Run:
    """Train a :class:`FactorAutoEncoder` on the frozen ``teacher``'s feature ``layer``
    (:class:`FactorReconstruction` on :func:`~minidistill.train.train_model`)."""
    shape = feature_shapes(teacher, [layer], tuple(data.x_train.shape[1:]))[layer]
    fit_kwargs.setdefault("eval_splits", ())
    fit_kwargs.setdefault("description", f"factor auto-encoder on {type(teacher).__name__}.{layer}")
    return train_model(lambda: FactorAutoEncoder(shape[0], factor_channels), data, recipe,
                       FactorReconstruction(teacher, layer), seed=seed, **fit_kwargs)


def _check_weights(**weights: float) -> None:
    for name, w in weights.items():
        if not (isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")):
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")


def _match(factor: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """A student factor pooled to the teacher factor's spatial size (a no-op when they agree)."""
    return factor if factor.shape[-2:] == size else F.adaptive_avg_pool2d(factor, size)


class InheritExplore(TeacherObjective):
    r"""IE-KD (stage 2): $H(q, p^s) + \lambda_\mathrm{inh}\mathcal L_\mathrm{inh} +
    \lambda_\mathrm{exp}\mathcal L_\mathrm{exp}$ against a frozen teacher and the encoder of
    its trained :class:`FactorAutoEncoder`. The student's feature ``student_layer`` (default: the
    teacher's ``layer``) is split by :func:`split_index` (``split``, ``ratio``, ``seed``: fixed for
    the run, kept as buffers); the two encoders $E_\mathrm{inh}$, $E_\mathrm{exp}$ (same design,
    to the teacher's factor size) are built by ``fit`` from the real shapes and trained with the
    student. No KD term on the logits, as in the official code. Terms: ``ce``, ``inh``, ``exp``."""

    def __init__(self, teacher: nn.Module, autoencoder: FactorAutoEncoder, *, layer: str = "layer3",
                 student_layer: str | None = None, lambda_inh: float = 1.0, lambda_exp: float = 1.0,
                 split: str = "natural", ratio: float = 0.5, kind: str = "l1", seed: int = 0) -> None:
        if not isinstance(autoencoder, FactorAutoEncoder):
            raise TypeError(f"autoencoder must be a FactorAutoEncoder, got {type(autoencoder).__name__}")
        super().__init__(FactorTeacher(teacher, autoencoder.encoder, layer))
        _check_weights(lambda_inh=lambda_inh, lambda_exp=lambda_exp)
        if split not in SPLIT_MODES or kind not in LOSS_KINDS:
            raise ValueError(f"split must be one of {SPLIT_MODES} and kind one of {LOSS_KINDS}, got {split!r}, {kind!r}")
        self.layer, self.student_layer = layer, student_layer or layer
        self.lambda_inh, self.lambda_exp, self.kind = lambda_inh, lambda_exp, kind
        self.split, self.ratio, self.seed = split, ratio, seed
        self.inh_encoder: nn.Module | None = None
        self.exp_encoder: nn.Module | None = None

    def setup(self, model: nn.Module, example: torch.Tensor, **kwargs: Any) -> None:
        super().setup(model, example, **kwargs)
        self._extract = [FeatureExtractor(model, [self.student_layer, feature_names(model)[-1]])]  # not a submodule
        if self.inh_encoder is None:
            was = model.training
            with torch.no_grad():
                f_s = self._extract[0].eval()(example[:1])[self.student_layer]
                factor = self.teacher_forward(example[:1])
            model.train(was)
            inh, exp = split_index(f_s.shape[1], self.split, ratio=self.ratio, seed=self.seed)
            self.register_buffer("inh_index", inh.to(example.device))
            self.register_buffer("exp_index", exp.to(example.device))
            self.inh_encoder = factor_encoder(len(inh), factor.shape[1]).to(example.device)
            self.exp_encoder = factor_encoder(len(exp), factor.shape[1]).to(example.device)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if self.inh_encoder is None:
            raise RuntimeError("InheritExplore builds its encoders in setup(); train it with train.fit")
        factor_t = self.teacher_forward(x)
        f_s, logits = self._extract[0](x).values()
        f_inh, f_exp = f_s.index_select(1, self.inh_index), f_s.index_select(1, self.exp_index)
        size = factor_t.shape[-2:]
        inh = inheritance_loss(_match(self.inh_encoder(f_inh), size), factor_t, self.kind)
        exp = exploration_loss(_match(self.exp_encoder(f_exp), size), factor_t, self.kind)
        ce = F.cross_entropy(upcast(logits), y)
        loss = ce + self.lambda_inh * inh + self.lambda_exp * exp
        return loss, logits, {"ce": ce.detach(), "inh": inh.detach(), "exp": exp.detach()}


def train_iekd(student: str | Callable[[], nn.Module], data: Dataset, recipe: Recipe | None, teacher: nn.Module,
               autoencoder: FactorAutoEncoder, *, seed: int = 0, **options: Any) -> Run:
    """Train a fresh ``student`` with :class:`InheritExplore` (``options``: its keyword arguments,
    e.g. ``lambda_inh``, ``lambda_exp``, ``split``, ``kind``, ``layer``; the rest go to ``fit``)."""
    keys = ("layer", "student_layer", "lambda_inh", "lambda_exp", "split", "ratio", "kind")
    objective = InheritExplore(teacher, autoencoder, seed=seed, **{k: options.pop(k) for k in keys if k in options})
    options.setdefault("description", f"{student if isinstance(student, str) else 'student'} (IE-KD, seed {seed})")
    return train_model(student, data, recipe, objective, seed=seed, **options)


class MutualInheritExplore(Objective):
    r"""IE-DML: deep mutual learning (:func:`~minidistill.methods.dml.dml_losses`, simultaneous
    update) where each network also inherits from and explores away from its peers' factors.

    For network $m$: $\mathcal L_m = H(q, p^{(m)}) + \mathrm{mimicry}_m + \lambda_\mathrm{inh}\,
    \overline{\mathcal L}_\mathrm{inh} + \lambda_\mathrm{exp}\,\overline{\mathcal L}_\mathrm{exp} +
    \lambda_\mathrm{rec}\,\mathcal L_\mathrm{rec}$, the bars averaging over the peers $l$, whose
    factor $F^{(l)} = E^{(l)}(f^{(l)})$ (detached) plays the teacher's. Each network has its own
    :class:`FactorAutoEncoder`, trained at the same time on its own (detached) feature by the
    reconstruction loss, instead of beforehand. Terms (means over networks): ``ce``, ``kl``,
    ``inh``, ``exp``, ``rec``."""

    def __init__(self, peers: Sequence[nn.Module], *, layer: str = "layer3", factor_channels: int | None = None,
                 lambda_inh: float = 1.0, lambda_exp: float = 1.0, lambda_rec: float = 1.0, split: str = "natural",
                 ratio: float = 0.5, kind: str = "l1", reduction: str = "mean", temperature: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__()
        if isinstance(peers, nn.Module) and not isinstance(peers, nn.ModuleList):
            peers = [peers]
        if len(peers) < 1 or not all(isinstance(p, nn.Module) for p in peers):
            raise TypeError("peers must be a non-empty list of nn.Modules (the networks besides fit's model)")
        _check_weights(lambda_inh=lambda_inh, lambda_exp=lambda_exp, lambda_rec=lambda_rec)
        if split not in SPLIT_MODES or kind not in LOSS_KINDS:
            raise ValueError(f"split must be one of {SPLIT_MODES} and kind one of {LOSS_KINDS}, got {split!r}, {kind!r}")
        self.peers = nn.ModuleList(peers)
        self.layer, self.factor_channels = layer, factor_channels
        self.lambda_inh, self.lambda_exp, self.lambda_rec = lambda_inh, lambda_exp, lambda_rec
        self.split, self.ratio, self.kind, self.seed = split, ratio, kind, seed
        self.reduction, self.temperature = reduction, temperature
        self.autoencoders: nn.ModuleList | None = None

    def setup(self, model: nn.Module, example: torch.Tensor, **kwargs: Any) -> None:
        nets = [model, *self.peers]
        self._extract = [FeatureExtractor(n, [self.layer, feature_names(n)[-1]]) for n in nets]
        if self.autoencoders is not None:
            return
        aes, inh_enc, exp_enc = [], [], []
        for k, (net, ex) in enumerate(zip(nets, self._extract)):
            was = net.training
            with torch.no_grad():
                c = ex.eval()(example[:1])[self.layer].shape[1]
            net.train(was)
            ae = FactorAutoEncoder(c, self.factor_channels)
            inh, exp = split_index(c, self.split, ratio=self.ratio, seed=self.seed + k)
            self.register_buffer(f"inh_index{k}", inh.to(example.device))
            self.register_buffer(f"exp_index{k}", exp.to(example.device))
            aes.append(ae)
            inh_enc.append(factor_encoder(len(inh), ae.factor_channels))
            exp_enc.append(factor_encoder(len(exp), ae.factor_channels))
        if len({ae.factor_channels for ae in aes}) != 1:
            raise ValueError("the networks' factors differ in channels; pass factor_channels to give them one size")
        self.autoencoders = nn.ModuleList(aes).to(example.device)
        self.inh_encoders = nn.ModuleList(inh_enc).to(example.device)
        self.exp_encoders = nn.ModuleList(exp_enc).to(example.device)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if self.autoencoders is None:
            raise RuntimeError("MutualInheritExplore builds its auto-encoders in setup(); train it with train.fit")
        feats, logits = zip(*(tuple(ex(x).values()) for ex in self._extract))
        losses, ce, kl = dml_losses(list(logits), y, reduction=self.reduction, temperature=self.temperature,
                                    check_inputs=self.step == 0)
        factors, recs = [], []
        for ae, f in zip(self.autoencoders, feats):
            factor, rec = ae(f.detach())
            factors.append(factor.detach())
            recs.append(reconstruction_loss(rec, f))
        m, total = len(feats), torch.stack(losses).sum()
        inhs, exps = [], []
        for k, f in enumerate(feats):
            f_inh = f.index_select(1, getattr(self, f"inh_index{k}"))
            f_exp = f.index_select(1, getattr(self, f"exp_index{k}"))
            e_inh, e_exp = self.inh_encoders[k](f_inh), self.exp_encoders[k](f_exp)
            peers = [factors[l] for l in range(m) if l != k]
            inhs.append(torch.stack([inheritance_loss(_match(e_inh, p.shape[-2:]), p, self.kind) for p in peers]).mean())
            exps.append(torch.stack([exploration_loss(_match(e_exp, p.shape[-2:]), p, self.kind) for p in peers]).mean())
        total = total + self.lambda_inh * sum(inhs) + self.lambda_exp * sum(exps) + self.lambda_rec * sum(recs)
        mean = lambda v: (sum(v) / m).detach()  # noqa: E731
        return total, logits[0], {"ce": mean(ce), "kl": mean(kl), "inh": mean(inhs), "exp": mean(exps),
                                  "rec": mean(recs)}


def train_iedml(networks: Sequence[str | Callable[[], nn.Module]], data: Dataset, recipe: Recipe | None = None, *,
                seed: int = 0, **options: Any) -> MutualRun:
    """Train ``networks`` together with :class:`MutualInheritExplore` (its keyword arguments in
    ``options``; the rest go to ``fit``) through :func:`~minidistill.methods.dml.train_mutual`."""
    keys = ("layer", "factor_channels", "lambda_inh", "lambda_exp", "lambda_rec", "split", "ratio", "kind",
            "reduction", "temperature")
    chosen = {k: options.pop(k) for k in keys if k in options}
    return train_mutual(networks, data, recipe, seed=seed,
                        objective=lambda peers: MutualInheritExplore(peers, seed=seed, **chosen), **options)


@torch.no_grad()
def layer_features(model: nn.Module, data: Dataset, layer: str = "layer3", *, n: int = 1000,
                   split: str = "test", batch_size: int = 500) -> torch.Tensor:
    """The feature map ``layer`` of ``model`` (eval mode) on the first ``n`` images of ``split``,
    float32 on the CPU, ``[n, C, H, W]``."""
    x, _ = data.split(split)
    if not isinstance(n, int) or n < 2 or n > len(x):
        raise ValueError(f"n must be an int from 2 to {len(x)} (the size of the {split} split), got {n!r}")
    device = next(model.parameters()).device
    loader = DeviceLoader(x[:n], data.split(split)[1][:n], batch_size, mean=data.mean, std=data.std, train=False,
                          device=device)
    extract = FeatureExtractor(model.eval(), [layer])
    return torch.cat([extract(xb)[layer].float().cpu() for xb, _ in loader])


def active_channels(features: torch.Tensor, threshold: float = 0.1) -> float:
    r"""How many channels of ``features`` ``[n, C, H, W]`` (or ``[n, C]``) are *active* per image,
    averaged over the images: channel $c$ is active on an image when its activation (averaged
    over the positions) exceeds ``threshold`` times that image's largest channel. A dead channel
    is never active; a network that spreads an image over many channels has more active ones.
    One simple reading of the paper's "active neurons"; the threshold is ours."""
    if not isinstance(features, torch.Tensor) or features.ndim not in (2, 4) or len(features) == 0:
        raise ValueError(f"features must be [n, C, H, W] or [n, C] with n >= 1, got {tuple(getattr(features, 'shape', ()))}")
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    per_image = features.double().flatten(2).mean(-1) if features.ndim == 4 else features.double()
    top = per_image.max(1, keepdim=True).values
    active = (per_image > threshold * top) & (top > 0)
    return active.sum(1).double().mean().item()


def toy_inherit_explore(lambda_inh: float = 1.0, lambda_exp: float = 1.0, *, steps: int = 150, seed: int = 0,
                        kind: str = "l1") -> dict[str, list[float]]:
    r"""A toy IE-KD in a second: 512 random inputs $x \in \mathbb R^{8}$ in 4 classes, a fixed
    "teacher factor" $F^t = \sigma(xA)$ (6-D) and a student of two halves
    $F_\mathrm{inh} = \sigma(xW_\mathrm{inh})$, $F_\mathrm{exp} = \sigma(xW_\mathrm{exp})$ (6-D
    each), $\sigma$ the LeakyReLU(0.1) that ends the real factor encoders, with a linear
    classifier on both, trained by Adam on $H + \lambda_\mathrm{inh}\mathcal L_\mathrm{inh}
    + \lambda_\mathrm{exp}\mathcal L_\mathrm{exp}$. Returns per step: ``inh`` and ``exp`` (the
    two normalised distances to $F^t$), ``cka_inh``, ``cka_exp`` (linear CKA of each half with
    $F^t$) and ``acc`` (training accuracy, %)."""
    _check_weights(lambda_inh=lambda_inh, lambda_exp=lambda_exp)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=g)
    y = (x @ torch.randn(8, 4, generator=g)).argmax(1)
    f_t = F.leaky_relu(x @ torch.randn(8, 6, generator=g), 0.1)
    w_inh = (0.3 * torch.randn(8, 6, generator=g)).requires_grad_()
    w_exp = (0.3 * torch.randn(8, 6, generator=g)).requires_grad_()
    head = (0.3 * torch.randn(12, 4, generator=g)).requires_grad_()
    opt = torch.optim.Adam([w_inh, w_exp, head], lr=0.05)
    out: dict[str, list[float]] = {k: [] for k in ("inh", "exp", "cka_inh", "cka_exp", "acc")}
    for _ in range(steps):
        f_inh, f_exp = F.leaky_relu(x @ w_inh, 0.1), F.leaky_relu(x @ w_exp, 0.1)
        logits = torch.cat([f_inh, f_exp], 1) @ head
        inh, exp = inheritance_loss(f_inh, f_t, kind), exploration_loss(f_exp, f_t, kind)
        loss = F.cross_entropy(logits, y) + lambda_inh * inh + lambda_exp * exp
        opt.zero_grad()
        loss.backward()
        opt.step()
        out["inh"].append(normalized_l1(f_inh.detach(), f_t).item())
        out["exp"].append(normalized_l1(f_exp.detach(), f_t).item())
        out["cka_inh"].append(linear_cka(f_inh.detach(), f_t))
        out["cka_exp"].append(linear_cka(f_exp.detach(), f_t))
        out["acc"].append(100.0 * (logits.argmax(1) == y).float().mean().item())
    return out
