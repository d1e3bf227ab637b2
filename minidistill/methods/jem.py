r"""Chapter 6 -- Grathwohl, Wang, Jacobsen, Duvenaud, Norouzi, Swersky (ICLR 2020), "Your
Classifier is Secretly an Energy Based Model and You Should Treat it Like One" (JEM).

A classifier's logits $f(x)$ also define an energy-based model of its inputs:

$$p(x, y) = \frac{e^{f(x)[y]}}{Z}, \qquad p(x) = \frac{\sum_y e^{f(x)[y]}}{Z}, \qquad
  E(x) = -\mathrm{LSE}_y\, f(x)[y] .$$

JEM trains $\log p(y|x) + \log p(x)$; the gradient of $\log p(x)$ needs samples from the
model, drawn with stochastic gradient Langevin dynamics (SGLD) from a persistent replay buffer.

**Input space.** :class:`~minidistill.data.DeviceLoader` feeds networks *normalised* images
$(x/255 - \mu_c)/\sigma_c$. JEM's sampler settings -- step size $\alpha = 1$, noise
$\sigma = 0.01$, data noise $0.03$, restarts from $\mathcal U(-1, 1)$ -- are defined on pixels
scaled to $[-1, 1]$, the input space of the official code. Here SGLD chains and the replay
buffer live in that $[-1, 1]$ pixel space, and :class:`PixelSpace` maps a chain's state to the
network's normalised input before each evaluation (gradients flow through the affine map), so
the paper's numbers keep their meaning while the network sees the inputs ``fit`` gives it.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, NamedTuple, Sequence

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset, make_shapes
from ..losses import _upcast
from ..metrics import auroc
from ..models import BasicBlock, PreActBlock, create_model
from ..runtime import attempted, seed_everything
from ..train import History, Recipe, TrainingDiverged, fit

__all__ = [
    # the model's densities
    "energy",
    "joint_energy",
    "px_loss",
    "jem_loss",
    # the sampler
    "langevin_noise",
    "sampler_temperature",
    "sgld",
    "ReplayBuffer",
    "PixelSpace",
    # training
    "JEMDiverged",
    "JEMObjective",
    "without_batchnorm",
    "energy_model",
    "JEMResult",
    "train_jem",
    # evaluation
    "make_gratings",
    "ood_sets",
    "ood_scores",
    "ood_aurocs",
    # the 2-D toy
    "toy_mixture",
    "ToyClassifier",
    "train_toy_jem",
    "grid_log_density",
    "histogram_tv",
    # figures
    "plot_energy_landscape",
    "plot_toy_sgld",
    "plot_ood_histograms",
    "plot_samples",
    "plot_energy_trace",
    # exercises
    "check_energy",
    "check_sgld_step",
    "check_px_loss",
    "check_sampler_temperature",
]

# The official code's sampler and training defaults (train_wrn_ebm.py, README of wgrathwohl/JEM).
PAPER = {"step_size": 1.0, "noise": 0.01, "n_steps": 20, "buffer_size": 10_000, "reinit_prob": 0.05,
         "data_noise": 0.03}


def _check_logits(logits: torch.Tensor, name: str = "logits", ndim: int | None = None) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {type(logits).__name__} "
                         f"{getattr(logits, 'dtype', '')}")
    if logits.ndim < 1 or logits.shape[-1] < 1 or (ndim is not None and logits.ndim != ndim):
        want = f"{ndim}-D [N, K]" if ndim is not None else "[..., K] with K >= 1 classes"
        raise ValueError(f"{name} must be {want}, got shape {tuple(logits.shape)}")


def _check_targets(logits: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (len(logits),):
        raise ValueError(f"y must be int64 class indices of shape [{len(logits)}], got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")


def _check_nonneg(name: str, value: float, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


# -- the model's densities -------------------------------------------------------------------

def energy(logits: torch.Tensor) -> torch.Tensor:
    r"""The marginal energy $E(x) = -\mathrm{LSE}_y f(x)[y] = -\log\sum_y e^{f(x)[y]}$.

    ``logits`` ``[..., K]`` -> energies ``[...]``; $p(x) \propto e^{-E(x)}$. Half-precision
    logits are computed in float32 (float64 stays float64).
    """
    _check_logits(logits)
    return -torch.logsumexp(_upcast(logits), dim=-1)


def joint_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The joint energy $E(x, y) = -f(x)[y]$, so that $p(x, y) \propto e^{-E(x, y)}$.

    ``logits`` ``[N, K]``, ``y`` int64 ``[N]`` -> ``[N]``.
    """
    _check_logits(logits, ndim=2)
    _check_targets(logits, y)
    return -_upcast(logits).gather(1, y.view(-1, 1)).squeeze(1)


def px_loss(logits_data: torch.Tensor, logits_samples: torch.Tensor) -> torch.Tensor:
    r"""The contrastive surrogate for $-\log p(x)$:
    $\;\overline{E(x_\mathrm{data})} - \overline{E(x')}$, batch means, $x' \sim p_\theta$ (SGLD).

    Its gradient is the estimate of $-\partial\log p_\theta(x)/\partial\theta =
    \partial E(x)/\partial\theta - \mathbb E_{p_\theta(x')}[\partial E(x')/\partial\theta]$:
    it pulls the data's energy down and the samples' energy up. The samples must come in
    without a graph to the sampler (they are constants). Its value, the *energy gap*, is
    what :class:`JEMObjective` watches for divergence.
    """
    _check_logits(logits_data, "logits_data", ndim=2)
    _check_logits(logits_samples, "logits_samples", ndim=2)
    if logits_data.shape[1] != logits_samples.shape[1]:
        raise ValueError(f"logits_data and logits_samples must have the same number of classes, got "
                         f"{logits_data.shape[1]} and {logits_samples.shape[1]}")
    return energy(logits_data).mean() - energy(logits_samples).mean()


def jem_loss(logits_data: torch.Tensor, y: torch.Tensor, logits_samples: torch.Tensor | None = None,
             px_weight: float = 1.0, pyx_weight: float = 1.0) -> torch.Tensor:
    r"""JEM's loss, the negative of $\log p(y|x) + \log p(x)$ with the contrastive estimate:

    $$\mathcal L = w_{y|x}\,\mathrm{CE}\big(f(x), y\big) + w_x\,\Big(\overline{E(x)} - \overline{E(x')}\Big)$$

    (the paper's CIFAR runs use $w_{y|x} = w_x = 1$). ``logits_samples=None`` requires
    ``px_weight=0``: the plain classifier.
    """
    _check_logits(logits_data, "logits_data", ndim=2)
    _check_targets(logits_data, y)
    _check_nonneg("px_weight", px_weight)
    _check_nonneg("pyx_weight", pyx_weight)
    loss = pyx_weight * F.cross_entropy(_upcast(logits_data), y)
    if px_weight:
        if logits_samples is None:
            raise ValueError("px_weight > 0 needs logits_samples (the model's logits on SGLD samples)")
        loss = loss + px_weight * px_loss(logits_data, logits_samples)
    return loss


# -- the sampler -----------------------------------------------------------------------------

def langevin_noise(step_size: float) -> float:
    r"""The noise std that makes SGLD a Langevin sampler of $p \propto e^{-E}$: $\sigma = \sqrt{2\alpha}$."""
    _check_nonneg("step_size", step_size, positive=True)
    return math.sqrt(2.0 * step_size)


def sampler_temperature(step_size: float, noise: float) -> float:
    r"""The temperature $T = \sigma^2 / (2\alpha)$ at which SGLD with step $\alpha$ and noise
    $\sigma$ samples (for small steps): its stationary density is $\propto e^{-E/T} = p^{1/T}$.
    Langevin is $T = 1$; the paper's $\alpha = 1$, $\sigma = 0.01$ is $T = 5\cdot 10^{-5}$."""
    _check_nonneg("step_size", step_size, positive=True)
    _check_nonneg("noise", noise)
    return noise**2 / (2.0 * step_size)


def sgld(
    energy_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    n_steps: int = PAPER["n_steps"],
    step_size: float = PAPER["step_size"],
    noise: float = PAPER["noise"],
    generator: torch.Generator | None = None,
    bounds: tuple[float, float] | None = None,
) -> torch.Tensor:
    r"""Run ``n_steps`` of stochastic gradient Langevin dynamics on all chains at once:

    $$x_{k+1} = x_k - \alpha\,\nabla_x E(x_k) + \sigma\,\epsilon_k, \qquad \epsilon_k \sim \mathcal N(0, I),$$

    with ``energy_fn(x) -> [N]`` energies of the ``N`` chains ``x`` ``[N, ...]``. The paper's
    defaults are $\alpha = 1$, $\sigma = 0.01$, 20 steps (gradient *ascent* on
    $\mathrm{LSE} f$ in the official code). True Langevin dynamics, which samples
    $p \propto e^{-E}$, needs $\sigma = \sqrt{2\alpha}$ (:func:`langevin_noise`).

    ``bounds=(low, high)`` clamps the chains after every step (the official code does not).
    Returns the final states, detached. Only gradients with respect to ``x`` are taken; no
    host synchronisation happens inside the loop.
    """
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
    _check_nonneg("step_size", step_size)
    _check_nonneg("noise", noise)
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.ndim < 1:
        raise ValueError(f"x must be a floating-point tensor [N, ...] of chain states, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    x = x.detach()
    with torch.enable_grad():
        for k in range(n_steps):
            x.requires_grad_(True)
            e = energy_fn(x)
            if k == 0 and (not isinstance(e, torch.Tensor) or e.shape != (len(x),)):
                raise ValueError(f"energy_fn must return one energy per chain, shape [{len(x)}], got "
                                 f"{tuple(getattr(e, 'shape', ()))}")
            (grad,) = torch.autograd.grad(e.sum(), x)
            x = x.detach() - step_size * grad
            if noise:
                x = x + noise * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if bounds is not None:
                x = x.clamp(*bounds)
    return x.detach()


class ReplayBuffer(nn.Module):
    r"""JEM's persistent chains: ``size`` states, initialised from $\mathcal U(\mathrm{low}, \mathrm{high})$.

    :meth:`sample` draws ``n`` states at random and replaces each by fresh uniform noise with
    probability ``reinit_prob`` (0.05 in the paper); after SGLD, :meth:`update` writes the
    chains back. A module buffer, so ``.to(device)`` moves it with its objective.
    """

    def __init__(self, size: int, shape: Sequence[int], low: float = -1.0, high: float = 1.0,
                 reinit_prob: float = PAPER["reinit_prob"], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if not (isinstance(reinit_prob, (int, float)) and 0.0 <= reinit_prob <= 1.0):
            raise ValueError(f"reinit_prob must be a probability in [0, 1], got {reinit_prob!r}")
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
            raise ValueError(f"need low < high for the uniform restarts, got low={low!r}, high={high!r}")
        self.shape = tuple(int(s) for s in shape)
        self.low, self.high, self.reinit_prob = float(low), float(high), float(reinit_prob)
        self.register_buffer("samples", torch.empty(0, dtype=dtype))
        self.samples = self.uniform(size)

    def __len__(self) -> int:
        return len(self.samples)

    def uniform(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` fresh states drawn uniformly from ``[low, high]``."""
        u = torch.rand((n, *self.shape), generator=generator, device=self.samples.device, dtype=self.samples.dtype)
        return self.low + (self.high - self.low) * u

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, idx)``: ``n`` start states (rows ``idx`` of the buffer, each restarted from
        uniform noise with probability ``reinit_prob``) and their buffer indices."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        dev = self.samples.device
        idx = torch.randint(0, len(self.samples), (n,), generator=generator, device=dev)
        fresh = torch.rand(n, generator=generator, device=dev) < self.reinit_prob
        x0 = torch.where(fresh.view(n, *([1] * len(self.shape))), self.uniform(n, generator), self.samples[idx])
        return x0, idx

    @torch.no_grad()
    def update(self, idx: torch.Tensor, x: torch.Tensor) -> None:
        """Write the chains' new states ``x`` back into rows ``idx``."""
        if x.shape[1:] != self.samples.shape[1:] or len(x) != len(idx):
            raise ValueError(f"x must be [{len(idx)}, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        self.samples[idx] = x.detach().to(self.samples.dtype)


class PixelSpace(nn.Module):
    r"""The affine map between SGLD's pixel space $u \in [-1, 1]$ and a network's normalised
    input $x = ((u + 1)/2 - \mu_c)/\sigma_c$ (per-channel mean and std of the data set).

    ``PixelSpace.from_dataset(data)`` uses the statistics :class:`~minidistill.data.DeviceLoader`
    normalises with, so ``to_model`` gives exactly what ``fit`` feeds the network.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean and std must be per-channel sequences of one length with std > 0, "
                             f"got {tuple(mean)} and {tuple(std)}")
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    @classmethod
    def from_dataset(cls, data: Dataset) -> "PixelSpace":
        return cls(data.mean, data.std)

    def to_model(self, u: torch.Tensor) -> torch.Tensor:
        """Pixels in ``[-1, 1]`` -> normalised network input."""
        return ((u + 1) / 2 - self.mean) / self.std

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised network input -> pixels in ``[-1, 1]``."""
        return (x * self.std + self.mean) * 2 - 1

    @staticmethod
    def from_uint8(images: torch.Tensor) -> torch.Tensor:
        """uint8 images ``[0, 255]`` -> float pixels in ``[-1, 1]``."""
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        return images.float() / 127.5 - 1

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.to_model(u)


# -- training --------------------------------------------------------------------------------

class JEMDiverged(TrainingDiverged):
    """JEM's energy gap blew up (or became NaN) before the loss did; training was stopped."""


class JEMObjective(nn.Module):
    r"""JEM as an objective for :func:`~minidistill.train.fit`: ``objective(model, x, y) -> (loss, logits)``.

    Per training step: noise $\sigma_\mathrm{data}$ is added to the batch (in pixel space);
    ``n_samples`` chains are drawn from the :class:`ReplayBuffer`, moved by :func:`sgld` on
    $E(x) = -\mathrm{LSE} f(x)$ with the model in eval mode, and written back; the data and
    the samples go through the model in one forward pass; the loss is :func:`jem_loss`
    (written out, so that the two mean energies also feed the guard and :meth:`energy_trace`).
    With ``px_weight=0`` no sampling happens: the plain classifier, with the same data noise.
    ``n_samples`` chains per step (default: the batch size); ``space`` maps the chains' pixel
    space to the network's input (``None``: the identity, as on the 2-D toy).

    Divergence guard: the running maximum of the energy gap $|\overline{E(x)} - \overline{E(x')}|$
    is kept on the device and read every ``check_every`` steps (one host sync, never per SGLD
    step); if it exceeds ``max_energy_gap`` or is not finite, :class:`JEMDiverged` is raised with
    a report. ``fit`` itself only catches a loss that is already NaN.
    """

    def __init__(
        self,
        buffer: ReplayBuffer,
        space: PixelSpace | None = None,
        *,
        n_steps: int = PAPER["n_steps"],
        step_size: float = PAPER["step_size"],
        noise: float = PAPER["noise"],
        data_noise: float = PAPER["data_noise"],
        px_weight: float = 1.0,
        pyx_weight: float = 1.0,
        n_samples: int | None = None,
        max_energy_gap: float = 1e3,
        check_every: int = 5,
    ) -> None:
        super().__init__()
        if not isinstance(buffer, ReplayBuffer):
            raise ValueError(f"buffer must be a ReplayBuffer, got {type(buffer).__name__}")
        if not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
        for name, value in (("step_size", step_size), ("noise", noise), ("data_noise", data_noise),
                            ("px_weight", px_weight), ("pyx_weight", pyx_weight)):
            _check_nonneg(name, value)
        _check_nonneg("max_energy_gap", max_energy_gap, positive=True)
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
        if n_samples is not None and (not isinstance(n_samples, int) or n_samples < 1):
            raise ValueError(f"n_samples must be None (the batch size) or an int >= 1, got {n_samples!r}")
        self.buffer, self.space = buffer, space
        self.n_steps, self.step_size, self.noise, self.data_noise = n_steps, step_size, noise, data_noise
        self.px_weight, self.pyx_weight, self.n_samples = px_weight, pyx_weight, n_samples
        self.max_energy_gap, self.check_every = max_energy_gap, check_every
        self.steps = 0
        self._trace: list[torch.Tensor] = []
        self._worst: torch.Tensor | None = None

    def to_model(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.space is None else self.space.to_model(u)

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.space is None else self.space.from_model(x)

    def sample(self, model: nn.Module, n: int, n_steps: int | None = None) -> torch.Tensor:
        """Draw ``n`` chains from the buffer, run SGLD (model in eval mode), write them back and
        return them (in the sampler's space)."""
        x0, idx = self.buffer.sample(n)
        was_training = model.training
        model.eval()
        try:
            xq = sgld(lambda u: energy(model(self.to_model(u))), x0,
                      self.n_steps if n_steps is None else n_steps, self.step_size, self.noise)
        finally:
            model.train(was_training)
        self.buffer.update(idx, xq)
        return xq

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data_noise:
            x = self.to_model(self.from_model(x) + self.data_noise * torch.randn_like(x))
        if not self.px_weight:
            logits = model(x)
            return jem_loss(logits, y, None, 0.0, self.pyx_weight), logits
        xq = self.sample(model, self.n_samples or len(x))
        logits_all = model(torch.cat([x, self.to_model(xq).to(x.dtype)]))
        logits, logits_q = logits_all[: len(x)], logits_all[len(x):]
        e_data, e_q = energy(logits).mean(), energy(logits_q).mean()
        gap = e_data - e_q
        loss = self.pyx_weight * F.cross_entropy(_upcast(logits), y) + self.px_weight * gap
        self._watch(e_data.detach(), e_q.detach())
        return loss, logits

    def _watch(self, e_data: torch.Tensor, e_q: torch.Tensor) -> None:
        self.steps += 1
        self._trace.append(torch.stack([e_data, e_q]))
        gap = (e_data - e_q).abs()
        self._worst = gap if self._worst is None else torch.maximum(self._worst, gap)  # NaN propagates
        if self.steps % self.check_every == 0:
            worst = self._worst.item()
            self._worst = None
            if not worst <= self.max_energy_gap:
                raise JEMDiverged(
                    f"JEM diverged by training step {self.steps}: the energy gap |mean E(data) - mean E(samples)| "
                    f"reached {worst:.4g} (limit {self.max_energy_gap:.4g}). The SGLD samples no longer track the "
                    f"model, so the p(x) term would blow the logits up. Remedies (from the official code's README): "
                    f"more data noise (data_noise=0.1 is more stable than 0.03), a lower learning rate or a longer "
                    f"warm-up, more SGLD steps per update (n_steps), a smaller SGLD step_size.")

    def energy_trace(self) -> torch.Tensor:
        """``[steps, 2]`` (CPU): mean energy of the data batch and of the SGLD samples, per step."""
        if not self._trace:
            return torch.zeros(0, 2)
        return torch.stack(self._trace).float().cpu()


def without_batchnorm(model: nn.Module, zero_init_residual: bool = True) -> nn.Module:
    """Replace every batch-norm layer of ``model`` by the identity, in place; returns ``model``.

    JEM's network has no normalisation layers (``norm=None`` in the official code): batch
    statistics would mix real images with SGLD samples, and make one image's energy depend on
    the rest of its batch. Without normalisation a residual network trains only if its blocks
    start close to the identity, so with ``zero_init_residual`` the last convolution of every
    residual branch of the course's ResNets and WRNs starts at zero (SkipInit, De & Smith 2020).
    """
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            without_batchnorm(child, zero_init_residual=False)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, BasicBlock):
                last = [c for c in m.body if isinstance(c, nn.Conv2d)][-1]
            elif isinstance(m, PreActBlock):
                last = m.conv2
            else:
                continue
            nn.init.zeros_(last.weight)
    return model


def energy_model(name: str, num_classes: int) -> nn.Module:
    """``models.create_model(name, num_classes)`` without its batch-norm layers (see :func:`without_batchnorm`)."""
    return without_batchnorm(create_model(name, num_classes))


class JEMResult(NamedTuple):
    """What :func:`train_jem` returns: the trained model, its history and the objective (which
    holds the replay buffer and the energy trace)."""

    model: nn.Module
    history: History
    objective: JEMObjective


def train_jem(
    model: str | nn.Module,
    data: Dataset,
    recipe: Recipe,
    *,
    seed: int = 0,
    n_steps: int = PAPER["n_steps"],
    step_size: float = PAPER["step_size"],
    noise: float = PAPER["noise"],
    buffer_size: int = PAPER["buffer_size"],
    reinit_prob: float = PAPER["reinit_prob"],
    data_noise: float = PAPER["data_noise"],
    px_weight: float = 1.0,
    pyx_weight: float = 1.0,
    n_samples: int | None = None,
    max_energy_gap: float = 1e3,
    **fit_kwargs,
) -> JEMResult:
    r"""Train a JEM: :func:`~minidistill.train.fit` with a :class:`JEMObjective`.

    ``model`` is a model name (built from ``seed`` by :func:`energy_model`, i.e. without batch
    norm) or a module. ``px_weight=0`` trains the same network as a plain classifier (same
    initial weights, data order and data noise; no SGLD). SGLD runs in pixel space $[-1, 1]$
    (:class:`PixelSpace`) with the paper's defaults. Raises :class:`JEMDiverged` with a report
    if the energy gap exceeds ``max_energy_gap``; extra keyword arguments go to ``fit``.
    """
    if not isinstance(data, Dataset):
        raise ValueError(f"data must be a minidistill Dataset, got {type(data).__name__}")
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a train.Recipe, got {type(recipe).__name__}")
    seed_everything(seed)
    if isinstance(model, str):
        model = energy_model(model, data.num_classes)
    elif not isinstance(model, nn.Module):
        raise ValueError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
    elif px_weight and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warnings.warn("the model has batch-norm layers: real images and SGLD samples will share batch "
                      "statistics; JEM uses none (see without_batchnorm)", stacklevel=2)
    buffer = ReplayBuffer(buffer_size, data.x_train.shape[1:], reinit_prob=reinit_prob)
    objective = JEMObjective(buffer, PixelSpace.from_dataset(data), n_steps=n_steps, step_size=step_size,
                             noise=noise, data_noise=data_noise, px_weight=px_weight, pyx_weight=pyx_weight,
                             n_samples=n_samples, max_energy_gap=max_energy_gap)
    fit_kwargs.setdefault("description", f"{'JEM' if px_weight else 'plain'} {type(model).__name__} (seed {seed})")
    history = fit(model, data, objective, recipe, seed=seed, **fit_kwargs)
    history.meta["jem"] = {"n_steps": n_steps, "step_size": step_size, "noise": noise, "buffer_size": buffer_size,
                           "reinit_prob": reinit_prob, "data_noise": data_noise, "px_weight": px_weight,
                           "pyx_weight": pyx_weight}
    return JEMResult(model, history, objective)


# -- evaluation: out-of-distribution detection -----------------------------------------------

def make_gratings(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 images ``[n, 3, size, size]`` of sinusoidal gratings: random orientation,
    frequency, phase and two random colours. Drawn offline; an out-of-distribution set."""
    if not isinstance(n, int) or n < 1 or not isinstance(size, int) or size < 2:
        raise ValueError(f"need n >= 1 and size >= 2, got n={n!r}, size={size!r}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(n, 1, 1, generator=g) * math.pi
    freq = 1.0 + torch.rand(n, 1, 1, generator=g) * (size / 4 - 1)       # cycles per image
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    yy, xx = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    wave = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    c1, c2 = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    img = c1 + (c2 - c1) * wave[:, None]
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


def ood_sets(data: Dataset, n: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Out-of-distribution image sets the profile can make offline, as uint8 ``[n, 3, H, W]``
    of ``data``'s image size:

    - ``uniform noise``: every pixel uniform in 0..255;
    - ``constant colour``: one random colour per image;
    - ``interpolated test images``: the pixel mean of two random test images (the paper's
      "interpolated CIFAR-10");
    - ``gratings``: :func:`make_gratings`;
    - ``shapes``: the smoke data set drawn at this size (unless ``data`` is shapes).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    _, c, h, w = data.x_test.shape
    g = torch.Generator().manual_seed(seed)
    sets = {
        "uniform noise": torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8),
        "constant colour": torch.randint(0, 256, (n, c, 1, 1), generator=g, dtype=torch.uint8).expand(n, c, h, w).contiguous(),
    }
    i = torch.randint(0, len(data.x_test), (2, n), generator=g)
    mix = (data.x_test[i[0]].float() + data.x_test[i[1]].float()) / 2
    sets["interpolated test images"] = mix.round().to(torch.uint8)
    sets["gratings"] = make_gratings(n, h, seed=seed + 1)
    if data.name != "shapes":
        sets["shapes"] = make_shapes(n_train=n, n_test=0, size=h, seed=seed + 2).x_train
    return sets


def ood_scores(model: nn.Module, images: torch.Tensor, space: PixelSpace, batch_size: int = 500,
               device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    r"""The paper's three out-of-distribution scores of uint8 ``images`` (higher = more
    in-distribution), as CPU float tensors ``[N]``:

    - ``log p(x)``: $\mathrm{LSE}_y f(x)[y] = -E(x)$, the log density up to $\log Z$;
    - ``max p(y|x)``: the classifier's confidence;
    - ``approx. mass``: $-\|\partial \log p(x)/\partial x\|_2$ (gradient in $[-1, 1]$ pixel space).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    mean, std = space.mean.to(device), space.std.to(device)     # (the caller's space stays where it is)
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"log p(x)": [], "max p(y|x)": [], "approx. mass": []}
    try:
        for i in range(0, len(images), batch_size):
            u = PixelSpace.from_uint8(images[i:i + batch_size].to(device)).requires_grad_(True)
            with torch.enable_grad():
                logits = model(((u + 1) / 2 - mean) / std).float()
                log_px = -energy(logits)
                (grad,) = torch.autograd.grad(log_px.sum(), u)
            out["log p(x)"].append(log_px.detach().cpu())
            out["max p(y|x)"].append(logits.detach().softmax(-1).max(-1).values.cpu())
            out["approx. mass"].append(-grad.flatten(1).norm(dim=1).cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def ood_aurocs(scores_in: Mapping[str, torch.Tensor],
               scores_out: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """``{ood set: {score: AUROC}}``: in-distribution images are the positives.

    ``scores_in`` is :func:`ood_scores` of the in-distribution test images, ``scores_out``
    maps each OOD set's name to its :func:`ood_scores`.
    """
    result = {}
    for name, s_out in scores_out.items():
        result[name] = {}
        for score, s_in in scores_in.items():
            both = torch.cat([s_in, s_out[score]])
            labels = torch.cat([torch.ones(len(s_in), dtype=torch.int64), torch.zeros(len(s_out[score]), dtype=torch.int64)])
            result[name][score] = auroc(both, labels)
    return result


# -- the 2-D toy -----------------------------------------------------------------------------

def toy_mixture(n: int = 600, num_classes: int = 3, radius: float = 1.5, std: float = 0.5,
                seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, 2], y [n])``: a 2-D mixture of ``num_classes`` Gaussians (std ``std``) centred
    on a circle of radius ``radius``, one per class, in equal numbers."""
    if not isinstance(n, int) or n < num_classes or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"need num_classes >= 2 and n >= num_classes, got n={n!r}, num_classes={num_classes!r}")
    _check_nonneg("std", std, positive=True)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    angle = 2 * math.pi * y.to(dtype) / num_classes + math.pi / 2
    centres = radius * torch.stack([angle.cos(), angle.sin()], 1)
    x = centres + std * torch.randn(n, 2, generator=g, dtype=dtype)
    return x, y


class ToyClassifier(nn.Module):
    r"""A small MLP classifier of 2-D points, $f(x) = g(x) - \frac{\|x\|^2}{2 s^2}\mathbf 1$.

    The second term is the same for every class, so it leaves $p(y|x)$ alone (the shift
    property) but makes $p(x) \propto \sum_y e^{f(x)[y]}$ integrable: an MLP's logits can grow
    linearly far from the data, the quadratic wins. ``envelope`` is $s$.
    """

    def __init__(self, num_classes: int = 3, hidden: int = 64, envelope: float = 3.0) -> None:
        super().__init__()
        _check_nonneg("envelope", envelope, positive=True)
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, num_classes))
        self.envelope = envelope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) - (x**2).sum(-1, keepdim=True) / (2 * self.envelope**2)


def train_toy_jem(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 300,
    seed: int = 0,
    lr: float = 1e-2,
    lim: float = 4.0,
    grid: int = 48,
    px_weight: float = 1.0,
    hidden: int = 32,
) -> tuple[ToyClassifier, History]:
    r"""Train a :class:`ToyClassifier` on 2-D points with JEM's objective, full batch, Adam,
    in the dtype of ``x`` (float64 on the CPU makes it repeatable).

    In two dimensions $Z$ needs no sampler: $\log Z \approx \log\sum_c e^{-E(x_c)}\,\Delta$
    over the centres $x_c$ of a ``grid`` x ``grid`` cell grid on $[-\mathrm{lim}, \mathrm{lim}]^2$
    (cell area $\Delta$), so the loss is the exact
    $\mathrm{CE} + w_x\,\big(\overline{E(x)} + \log Z\big) = -\overline{\log p(y|x)} - w_x\,\overline{\log p(x)}$,
    whose $\theta$-gradient is the difference of expectations that SGLD estimates for images.
    ``px_weight=0`` trains a plain classifier. The history has one record per 50 steps.
    """
    if x.ndim != 2 or x.shape[1] != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be float points [N, 2], got {x.dtype} {tuple(x.shape)}")
    _check_targets(x, y)
    _check_nonneg("px_weight", px_weight)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    seed_everything(seed)
    model = ToyClassifier(int(y.max()) + 1, hidden).to(x.device, x.dtype)
    _, pts = _grid(lim, grid, x.dtype)
    pts = pts.to(x.device)
    log_cell = math.log((2 * lim / grid) ** 2)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = History(meta={"model": "ToyClassifier", "objective": "JEM (exact log Z on a grid)",
                            "data": "toy mixture", "seed": seed, "steps": steps, "px_weight": px_weight})
    model.train()
    for step in range(steps):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if px_weight:
            log_z = torch.logsumexp(-energy(model(pts)), 0) + log_cell
            loss = loss + px_weight * (energy(logits).mean() + log_z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"the toy model's loss became {loss.item()} at step {step + 1}; lower lr")
            history.records.append({"epoch": step + 1, "train_loss": loss.item(),
                                    "train_acc": 100.0 * (logits.argmax(1) == y).double().mean().item()})
    model.eval()
    return model, history


def _grid(lim: float, n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.linspace(-lim, lim, 2 * n + 1, dtype=dtype)[1::2]        # cell centres
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    return centres, torch.stack([gx.flatten(), gy.flatten()], 1)


@torch.no_grad()
def grid_log_density(model: nn.Module, lim: float = 4.0, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(centres [n], log_p [n, n])``: the model's $\log p(x)$ at the centres of an
    ``n`` x ``n`` grid of cells on $[-\mathrm{lim}, \mathrm{lim}]^2$, normalised so that
    $\sum p \cdot \mathrm{cell\ area} = 1$ over the box. ``log_p[i, j]`` is at
    ``(x=centres[j], y=centres[i])``."""
    p = next(model.parameters())
    centres, pts = _grid(lim, n, p.dtype)
    log_q = -energy(model(pts.to(p.device))).reshape(n, n).cpu()
    cell = (2 * lim / n) ** 2
    return centres, log_q - torch.logsumexp(log_q.flatten(), 0) - math.log(cell)


def histogram_tv(samples: torch.Tensor, model: nn.Module, lim: float = 4.0, bins: int = 16,
                 resolution: int = 8) -> float:
    r"""Total variation distance between the histogram of 2-D ``samples`` and the model's
    density, both on ``bins`` x ``bins`` cells of $[-\mathrm{lim}, \mathrm{lim}]^2$:
    $\frac12\sum_b |\hat p_b - p_b|$ (samples outside the box count as mass the model lacks).
    0 is a perfect match, 1 disjoint. Even exact samples score about
    $\sqrt{\text{bins}^2 / (2\pi N)}$ from counting noise."""
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"samples must be [N, 2] points, got {tuple(samples.shape)}")
    _, log_p = grid_log_density(model, lim, bins * resolution)
    p = log_p.exp().reshape(bins, resolution, bins, resolution).sum((1, 3))
    p = p / p.sum()
    s = samples.detach().double().cpu()
    inside = (s.abs() < lim).all(1)
    idx = ((s[inside] + lim) / (2 * lim) * bins).floor().long().clamp(0, bins - 1)
    counts = torch.zeros(bins, bins, dtype=torch.float64)
    counts.index_put_((idx[:, 1], idx[:, 0]), torch.ones(len(idx), dtype=torch.float64), accumulate=True)
    return 0.5 * ((counts / len(s) - p).abs().sum().item() + (1 - inside.double().mean().item()))


# -- figures ---------------------------------------------------------------------------------

def plot_energy_landscape(model: nn.Module, lim: float = 4.0, points: torch.Tensor | None = None,
                          labels: torch.Tensor | None = None, title: str = r"$\log p(x)$ of the toy JEM",
                          ax=None, n: int = 80, boundaries: bool = False):
    r"""Heat map of the model's normalised $\log p(x) = -E(x) - \log Z$ on the box, with
    ``points`` on top (coloured by ``labels`` if given) and, with ``boundaries``, the
    classifier's decision boundaries (where $\arg\max_y p(y|x)$ changes) as white lines."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.2, 3.6))
    centres, log_p = grid_log_density(model, lim, n)
    c = centres.numpy()
    # filled contours (12 bands of one nat) read like a map and keep the PNG small
    top = math.ceil(log_p.max().item())
    mesh = ax.contourf(c, c, log_p.clamp_min(top - 12).numpy(), levels=list(range(top - 12, top + 1)), cmap="viridis")
    fig.colorbar(mesh, ax=ax, label=r"$\log p(x)$", shrink=0.85)
    if boundaries:
        p = next(model.parameters())
        _, pts = _grid(lim, n, p.dtype)
        with torch.no_grad():
            pred = model(pts.to(p.device)).argmax(-1).reshape(n, n).cpu().double()
        k = int(pred.max().item()) + 1
        ax.contour(c, c, pred.numpy(), levels=[i + 0.5 for i in range(k - 1)], colors="white", linewidths=1)
    if points is not None:
        pts = points.detach().cpu().double()
        inside = (pts.abs() < lim).all(1)
        style = dict(c="white") if labels is None else dict(c=labels.cpu()[inside].numpy(), cmap="tab10", vmin=0, vmax=9)
        ax.scatter(pts[inside, 0].numpy(), pts[inside, 1].numpy(), s=4, alpha=0.7, linewidths=0,
                   label=f"{'points' if labels is None else 'data, coloured by class'} ({int(inside.sum())} in view)",
                   **style)
        ax.legend(loc="lower left", fontsize=7)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def plot_toy_sgld(model: nn.Module, step_size: float = PAPER["step_size"], noise: float = PAPER["noise"],
                  n_steps: int = 200, n_chains: int = 1000, lim: float = 4.0, seed: int = 0, ax=None):
    r"""Run :func:`sgld` on the toy model from ``n_chains`` uniform starts and draw the final
    states over its $\log p(x)$; the title gives the sampler's temperature
    $\sigma^2/(2\alpha)$ and the histogram's total variation distance to $p(x)$."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x0 = (torch.rand(n_chains, 2, generator=g, dtype=dtype) * 2 - 1) * lim
    xs = sgld(lambda v: energy(model(v)), x0, n_steps, step_size, noise, generator=g)
    xs = torch.where(torch.isfinite(xs), xs, torch.full_like(xs, 1e9))   # diverged chains: out of view
    tv = histogram_tv(xs, model, lim)
    temp = sampler_temperature(step_size, noise) if step_size > 0 else float("inf")
    title = (rf"SGLD: $\alpha$ = {step_size:.3g}, $\sigma$ = {noise:.3g}, {n_steps} steps" + "\n"
             + rf"$T = \sigma^2/2\alpha$ = {temp:.2g}, TV to $p(x)$ = {tv:.2f}")
    return plot_energy_landscape(model, lim, xs, title=title, ax=ax)


def plot_ood_histograms(scores_in: torch.Tensor, scores_out: Mapping[str, torch.Tensor],
                        score: str = "log p(x)", title: str | None = None, ax=None, bins: int = 40):
    """Overlaid histograms of one score for the in-distribution test set and each OOD set."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3.2))
    allv = torch.cat([scores_in, *scores_out.values()]).double()
    lo, hi = torch.quantile(allv, 0.005).item(), torch.quantile(allv, 0.995).item()
    edges = torch.linspace(lo, hi if hi > lo else lo + 1, bins + 1).numpy()
    ax.hist(scores_in.clamp(lo, hi).numpy(), edges, density=True, alpha=0.6, label="test set (in-distribution)")
    for name, s in scores_out.items():
        ax.hist(s.clamp(lo, hi).numpy(), edges, density=True, histtype="step", lw=1.5, label=name)
    ax.set_xlabel(score)
    ax.set_ylabel("density")
    ax.set_title(title or f"{score} of in- and out-of-distribution images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_samples(images: torch.Tensor, nrow: int = 8, title: str = "SGLD samples", ax=None):
    """A grid of images given in $[-1, 1]$ pixel space (``[N, 3, H, W]``, as SGLD makes them);
    values outside the range are clipped for display."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 3, H, W] (or 1 channel), got {tuple(images.shape)}")
    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = torch.ones(c, rows * (h + 1) + 1, ncol * (w + 1) + 1)
    for k in range(n):
        r, q = divmod(k, ncol)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = x[k]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(0.45 * ncol + 0.4, 0.45 * rows + 0.6))
    ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if c == 1 else None, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_energy_trace(traces: Mapping[str, torch.Tensor], title: str = "Energies during JEM training", ax=None):
    """Mean energy of the data batch (solid) and of the SGLD samples (dashed) per training
    step, for ``{label: JEMObjective.energy_trace()}``. Training is healthy while the two stay
    close; a gap that runs away is divergence."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.2))
    for i, (label, t) in enumerate(traces.items()):
        ax.plot(t[:, 0].numpy(), color=f"C{i}", lw=1, label=f"{label}: data")
        ax.plot(t[:, 1].numpy(), color=f"C{i}", lw=1, ls="--", label=f"{label}: SGLD samples")
    ax.set_xlabel("training step")
    ax.set_ylabel(r"mean energy $E(x) = -\mathrm{LSE}\,f(x)$")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# -- self-checks for the exercises -----------------------------------------------------------
# Each check prints one line starting with a tick when the answer is right, says "not
# attempted yet" while the exercise still raises NotImplementedError, and raises an
# AssertionError with a hint when the answer is wrong.


def _is_tensor(got, shape) -> None:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(shape):
        raise AssertionError(f"expected a tensor of shape {tuple(shape)}, got {type(got).__name__} "
                             f"{tuple(getattr(got, 'shape', ()))}")


def check_energy(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 1: your ``fn(logits)`` must return $E(x) = -\\log\\sum_y e^{f(x)[y]}$ per row,
    finite for logits in the thousands, without ``torch.logsumexp``."""
    if not attempted(fn, torch.zeros(1, 3)):
        return
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 10.0, 1000.0):
        z = torch.randn(6, 10, generator=g, dtype=torch.float64) * scale
        got, want = fn(z), energy(z)
        _is_tensor(got, want.shape)
        if torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            continue
        if not torch.isfinite(got).all():
            raise AssertionError("inf/NaN for large logits: subtract each row's maximum before exp() and add it back")
        if torch.allclose(got, -want, rtol=1e-6):
            raise AssertionError("wrong sign: the energy is MINUS the log-sum-exp (low energy = high density)")
        if torch.allclose(got, -z.max(-1).values, rtol=1e-9):
            raise AssertionError("that is minus the largest logit: sum exp() over all classes, not just the top one")
        raise AssertionError(f"values differ at logit scale {scale:g}: check that you sum over the class dimension "
                             "(the last one) and take the log after the sum")
    print("✓ energy: correct")


def check_sgld_step(fn: Callable[..., torch.Tensor]) -> None:
    """Exercise 2: ``fn(x, grad_energy, step_size, noise, eps)`` must return one SGLD step
    $x - \\alpha \\nabla_x E + \\sigma\\,\\epsilon$ (``eps`` is the standard normal draw)."""
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    if not attempted(fn, x0, x0, 0.1, 0.1, x0):
        return
    g = torch.Generator().manual_seed(1)
    x, grad, eps = (torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(3))
    for alpha, sigma in ((0.1, 0.05), (0.3, 0.2), (0.01, math.sqrt(0.02))):
        got = fn(x, grad, alpha, sigma, eps)
        want = x - alpha * grad + sigma * eps
        _is_tensor(got, want.shape)
        if torch.allclose(got, want):
            continue
        if torch.allclose(got, x + alpha * grad + sigma * eps):
            raise AssertionError("you climb the energy: step AGAINST its gradient (x - alpha * grad)")
        if torch.allclose(got, x - alpha * grad + alpha * sigma * eps):
            raise AssertionError("the noise is not multiplied by the step size: add sigma * eps")
        if torch.allclose(got, x - alpha * grad + sigma**2 * eps) or torch.allclose(got, x - alpha * grad + math.sqrt(sigma) * eps):
            raise AssertionError("sigma is the noise's standard deviation: multiply eps by sigma itself")
        raise AssertionError(f"values differ at alpha={alpha}, sigma={sigma:.3g}: x_next = x - alpha * grad + sigma * eps")
    print("✓ SGLD step: correct")


def check_px_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 3: ``fn(logits_data, logits_samples)`` must return the contrastive surrogate
    $\\overline{E(x_\\mathrm{data})} - \\overline{E(x')}$ whose gradient estimates $-\\nabla_\\theta \\log p(x)$."""
    z = torch.zeros(2, 3)
    if not attempted(fn, z, z):
        return
    g = torch.Generator().manual_seed(2)
    ld = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
    lq = torch.randn(24, 10, generator=g, dtype=torch.float64) * 3 + 1
    got, want = fn(ld, lq), px_loss(ld, lq)
    if not isinstance(got, torch.Tensor) or got.ndim != 0:
        raise AssertionError("expected a scalar tensor (mean over each batch, then the difference)")
    if not torch.allclose(got, want):
        if torch.allclose(got, -want):
            raise AssertionError("wrong sign: minimising it must LOWER the data's energy and RAISE the samples' "
                                 "(data energy minus sample energy)")
        if torch.allclose(got, lq.max(-1).values.mean() - ld.max(-1).values.mean()):
            raise AssertionError("that uses the largest logit; the energy of p(x) is -logsumexp over classes")
        if torch.allclose(got, energy(ld).sum() - energy(lq).sum()):
            raise AssertionError("use batch MEANS: the two batches can differ in size")
        raise AssertionError(f"value {got.item():.6g} != {want.item():.6g}: mean E(data) - mean E(samples), "
                             "with E = -logsumexp(logits)")
    print("✓ contrastive p(x) loss: correct")


def check_sampler_temperature(answer: float | None) -> None:
    """Exercise 4: at which temperature $T$ (stationary density $\\propto p(x)^{1/T}$) does the
    paper's sampler, $\\alpha = 1$ and $\\sigma = 0.01$, sample?"""
    if answer is None or answer is ...:
        print("… not attempted yet: replace the ... with your number")
        return
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        raise AssertionError("answer with a number")
    want = sampler_temperature(1.0, 0.01)
    if math.isclose(answer, want, rel_tol=0.02):
        print(f"✓ temperature: correct -- T = sigma^2 / (2 alpha) = {want:g}, so the chains sample p(x)^{1 / want:,.0f}: "
              "nearly noise-free gradient descent on the energy")
    elif math.isclose(answer, 0.01**2, rel_tol=0.02):
        raise AssertionError("close: Langevin's noise variance is 2 * alpha * T, don't forget the factor 2")
    elif math.isclose(answer, 0.01 / 2, rel_tol=0.02):
        raise AssertionError("not quite: the temperature involves the noise VARIANCE sigma^2, not sigma")
    elif math.isclose(answer, 1.0, rel_tol=0.02):
        raise AssertionError("T = 1 is true Langevin, which needs sigma = sqrt(2 alpha) = 1.41, not 0.01")
    else:
        raise AssertionError("not quite: match x - alpha grad E + sigma eps to Langevin at temperature T, "
                             "x - alpha grad E + sqrt(2 alpha T) eps")
