r"""Chapter 6 -- Grathwohl, Wang, Jacobsen, Duvenaud, Norouzi, Swersky (ICLR 2020), "Your
Classifier is Secretly an Energy Based Model and You Should Treat it Like One" (JEM).

A classifier's logits $f(x)$ also define an energy-based model of its inputs:

$$p(x, y) = \frac{e^{f(x)[y]}}{Z}, \qquad p(x) = \frac{\sum_y e^{f(x)[y]}}{Z}, \qquad
  E(x) = -\mathrm{LSE}_y\, f(x)[y] .$$

JEM trains $\log p(y|x) + \log p(x)$; the gradient of $\log p(x)$ needs samples from the
model. The paper draws them with what it calls stochastic gradient Langevin dynamics (SGLD):
Langevin dynamics on the input, run from persistent chains kept in a replay buffer, i.e.
persistent contrastive divergence (PCD; Tieleman 2008). The gradient in it is the model's exact
$\nabla_x E(x)$, not a stochastic estimate; :func:`sgld` keeps the paper's name.

**Symbols.** The SGLD step size is $\eta$ (the official code's ``sgld_lr``, the argument
``step_size``), its noise standard deviation $\sigma$ (``sgld_std``, ``noise``); the course
keeps $\alpha$ for the weight of a distillation term.

**Input space.** :class:`~minidistill.data.DeviceLoader` feeds networks *normalised* images
$(x/255 - \mu_c)/\sigma_c$; JEM's sampler settings (step $\eta = 1$, noise $\sigma = 0.01$,
data noise $0.03$, restarts from $\mathcal U(-1, 1)$) are defined on the official code's pixels
in $[-1, 1]$. So the SGLD chains and the replay buffer live in $[-1, 1]$ pixels, and
:class:`PixelSpace` maps a state to the network's input before each evaluation (autograd
carries the gradient through the affine map): the paper's numbers keep their meaning.

The 2-D toy and the figures live in :mod:`minidistill.methods.jem_plots`, the exercises'
self-checks in :mod:`minidistill.exercises.jem`; all are importable from here too.
"""
from __future__ import annotations

import importlib
import math
import warnings
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from ..data import Dataset, make_shapes
from ..losses import Objective, upcast
from ..metrics import auroc
from ..models import BasicBlock, PreActBlock, create_model
from ..runtime import seed_everything
from ..train import History, Recipe, TrainingDiverged, train_model

# Defined in the chapter's other modules (which import this one); ``__getattr__`` below loads them.
_MOVED = {
    **dict.fromkeys(("toy_mixture", "ToyClassifier", "train_toy_jem", "grid_log_density", "histogram_tv",
                     "plot_energy_landscape", "plot_toy_sgld", "plot_ood_histograms", "plot_samples",
                     "plot_energy_trace"), "minidistill.methods.jem_plots"),
    **dict.fromkeys(("check_energy", "check_sgld_step", "check_px_loss", "check_forgetting_steps"),
                    "minidistill.exercises.jem"),
}

__all__ = [
    # the model's densities
    "energy", "joint_energy", "px_loss", "jem_loss",
    # the sampler
    "langevin_noise", "sampler_temperature", "sgld", "ReplayBuffer", "PixelSpace",
    # training
    "JEMDiverged", "JEMObjective", "without_batchnorm", "energy_model", "JEMResult", "train_jem",
    # evaluation
    "make_gratings", "ood_sets", "ood_scores", "ood_aurocs",
    # the 2-D toy and the figures (jem_plots), the exercises' self-checks (exercises.jem)
    *_MOVED,
]

# The official code's sampler and training defaults (train_wrn_ebm.py, README of wgrathwohl/JEM).
PAPER = dict(step_size=1.0, noise=0.01, n_steps=20, buffer_size=10_000, reinit_prob=0.05, data_noise=0.03)


def _check_logits(logits: torch.Tensor, name: str = "logits", ndim: int | None = None) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {type(logits).__name__} "
                         f"{getattr(logits, 'dtype', '')}")
    if logits.ndim < 1 or logits.shape[-1] < 1 or (ndim is not None and logits.ndim != ndim):
        want = f"{ndim}-D [N, K]" if ndim is not None else "[..., K] with K >= 1 classes"
        raise ValueError(f"{name} must be {want}, got shape {tuple(logits.shape)}")


def _check_targets(ref: torch.Tensor, y: torch.Tensor, num_classes: int | None = -1, name: str = "y") -> None:
    """``y`` must be int64 class indices ``[len(ref)]`` in ``[0, num_classes)``; ``num_classes=-1``
    (default) reads $K$ from ``ref``'s last dimension (logits), ``None`` only asks for ``>= 0``.
    Reads two numbers back from the device: for public entry points, not per training step."""
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (len(ref),):
        raise ValueError(f"{name} must be int64 class indices of shape [{len(ref)}], got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if len(y):
        k = ref.shape[-1] if num_classes == -1 else num_classes
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (k is not None and hi >= k):
            want = f"[0, {k})" if k is not None else ">= 0"
            raise ValueError(f"{name} must hold class indices in {want}"
                             + (f" for logits of {k} classes" if k is not None else "")
                             + f", got values from {lo} to {hi}")


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
    return -torch.logsumexp(upcast(logits), dim=-1)


def joint_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The joint energy $E(x, y) = -f(x)[y]$, so that $p(x, y) \propto e^{-E(x, y)}$.

    ``logits`` ``[N, K]``, ``y`` int64 ``[N]`` with values in ``[0, K)`` -> ``[N]``.
    """
    _check_logits(logits, ndim=2)
    _check_targets(logits, y)
    return _joint_energy(logits, y)


def _joint_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -upcast(logits).gather(1, y.view(-1, 1)).squeeze(1)


def px_loss(logits_data: torch.Tensor, logits_samples: torch.Tensor) -> torch.Tensor:
    r"""The contrastive surrogate for $-\log p(x)$: $\overline{E(x_\mathrm{data})} - \overline{E(x')}$,
    batch means, $x' \sim p_\theta$ (SGLD samples: constants, with no graph to the sampler).

    Its gradient is the estimate of $-\partial\log p_\theta(x)/\partial\theta = \partial E(x)/\partial\theta -
    \mathbb E_{p_\theta(x')}[\partial E(x')/\partial\theta]$: it pulls the data's energy down and
    the samples' energy up. Its value, the *energy gap*, is what :class:`JEMObjective` guards.
    """
    _check_logits(logits_data, "logits_data", ndim=2)
    _check_logits(logits_samples, "logits_samples", ndim=2)
    if logits_data.shape[1] != logits_samples.shape[1]:
        raise ValueError(f"logits_data and logits_samples must have the same number of classes, got "
                         f"{logits_data.shape[1]} and {logits_samples.shape[1]}")
    return energy(logits_data).mean() - energy(logits_samples).mean()


def jem_loss(logits_data: torch.Tensor, y: torch.Tensor, logits_samples: torch.Tensor | None = None,
             px_weight: float = 1.0, pyx_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""JEM's loss, the negative of $\log p(y|x) + \log p(x)$ with the contrastive estimate:

    $$\mathcal L = w_{y|x}\,\overline{E(x, y) - E(x)} + w_x\,\Big(\overline{E(x)} - \overline{E(x')}\Big)$$

    where $E(x, y) - E(x) = -\log p(y|x)$ is the cross-entropy (Bayes' rule: $Z$ cancels); the
    paper's CIFAR runs use $w_{y|x} = w_x = 1$. Returns ``(loss, terms)``, ``terms`` the
    detached ``ce``, ``energy_data`` ($\overline{E(x)}$) and, given samples, ``energy_samples``
    ($\overline{E(x')}$) and ``gap`` (their difference, :func:`px_loss`). ``logits_samples=None``
    requires ``px_weight=0``: the plain classifier. ``y`` must hold class indices in ``[0, K)``.
    """
    _check_logits(logits_data, "logits_data", ndim=2)
    _check_targets(logits_data, y)
    _check_nonneg("px_weight", px_weight)
    _check_nonneg("pyx_weight", pyx_weight)
    if px_weight and logits_samples is None:
        raise ValueError("px_weight > 0 needs logits_samples (the model's logits on SGLD samples)")
    if logits_samples is not None:
        _check_logits(logits_samples, "logits_samples", ndim=2)
        if logits_samples.shape[1] != logits_data.shape[1]:
            raise ValueError(f"logits_data and logits_samples must have the same number of classes, got "
                             f"{logits_data.shape[1]} and {logits_samples.shape[1]}")
    return _jem_loss(logits_data, y, logits_samples, px_weight, pyx_weight)


def _jem_loss(logits_data, y, logits_samples, px_weight, pyx_weight):
    """:func:`jem_loss` without the checks (which read the labels' range back from the device):
    what :class:`JEMObjective` calls at every training step, after ``fit`` checked the labels."""
    e_data = energy(logits_data)
    ce = (_joint_energy(logits_data, y) - e_data).mean()
    loss = pyx_weight * ce
    terms = {"ce": ce, "energy_data": e_data.mean()}
    if logits_samples is not None:
        e_samples = energy(logits_samples)
        gap = e_data.mean() - e_samples.mean()          # px_loss
        terms.update(energy_samples=e_samples.mean(), gap=gap)
        if px_weight:
            loss = loss + px_weight * gap
    return loss, {k: v.detach() for k, v in terms.items()}


# -- the sampler -----------------------------------------------------------------------------

def langevin_noise(step_size: float) -> float:
    r"""The noise std that makes SGLD with step $\eta$ a Langevin sampler of $p \propto e^{-E}$:
    $\sigma = \sqrt{2\eta}$ (the paper's equation, $x - \frac{\alpha}{2}\nabla_x E + \mathcal N(0, \alpha)$
    with the paper's $\alpha = 2\eta$)."""
    _check_nonneg("step_size", step_size, positive=True)
    return math.sqrt(2.0 * step_size)


def sampler_temperature(step_size: float, noise: float) -> float:
    r"""The temperature $T = \sigma^2 / (2\eta)$ at which SGLD with step $\eta$ and noise
    $\sigma$ samples (for small steps): its stationary density is $\propto e^{-E/T} = p^{1/T}$.
    Langevin is $T = 1$; the official code's $\eta = 1$, $\sigma = 0.01$ is $T = 5\cdot 10^{-5}$."""
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
    r"""Run ``n_steps`` of Langevin dynamics (the paper's "SGLD") on all chains at once:

    $$x_{k+1} = x_k - \eta\,\nabla_x E(x_k) + \sigma\,\epsilon_k, \qquad \epsilon_k \sim \mathcal N(0, I),$$

    with ``energy_fn(x) -> [N]`` energies of the ``N`` chains ``x`` ``[N, ...]``, $\eta$ =
    ``step_size`` and $\sigma$ = ``noise``. The gradient is exact (nothing here is a stochastic
    gradient). The paper writes the step as $x - \frac{\alpha}{2}\nabla_x E + \mathcal N(0, \alpha)$
    (its $\alpha = 2\eta$), true Langevin dynamics, which samples $p \propto e^{-E}$: $\sigma = \sqrt{2\eta}$
    (:func:`langevin_noise`). The official code decouples the two (``sgld_lr`` $= \eta = 1$,
    ``sgld_std`` $= \sigma = 0.01$, 20 steps: gradient *ascent* on $\mathrm{LSE} f$), the defaults here.

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
    chains back. ``samples`` is a registered buffer, so ``.to(device)`` moves it with its
    objective and ``fit``'s checkpoints save it: a resumed run continues the same chains.
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
        """Write the chains' new states ``x`` back into rows ``idx``. Where ``idx`` names a row
        more than once (the draw is with replacement, as in the official code), the last chain
        wins, always: every write to a row carries that chain's state, so the result does not
        depend on the order in which threads write (an indexed assignment with repeated indices
        does not fix it), and a run is reproducible."""
        if x.shape[1:] != self.samples.shape[1:] or len(x) != len(idx):
            raise ValueError(f"x must be [{len(idx)}, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        order = torch.arange(len(idx), device=idx.device)
        last = torch.full((len(self.samples),), -1, dtype=order.dtype, device=idx.device)
        last = last.scatter_reduce(0, idx, order, "amax")           # each row's last writer
        self.samples[idx] = x.detach().to(self.samples.dtype)[last[idx]]


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


class JEMObjective(Objective):
    r"""JEM as an :class:`~minidistill.losses.Objective` for :func:`~minidistill.train.fit`.

    Per training step: noise $\sigma_\mathrm{data}$ is added to the batch (in pixel space);
    ``n_samples`` chains (default: the batch size) are drawn from the :class:`ReplayBuffer`,
    moved by :func:`sgld` with the model in eval mode, and written back; data and samples go
    through the model in one forward pass; loss and terms are :func:`jem_loss`'s (``fit`` logs
    ``ce``, ``energy_data``, ``energy_samples``, ``gap`` per epoch). ``px_weight=0`` is the plain
    classifier with the same data noise, no sampling. ``space`` maps the chains' pixel space
    to the network's input (``None``: the identity).

    Divergence guard: the largest energy gap $|\overline{E(x)} - \overline{E(x')}|$ since the
    last check stays on the device and is read every ``check_every`` training steps and at the
    last step of every epoch (never per SGLD step); above ``max_energy_gap`` or not finite, it
    raises :class:`JEMDiverged` with a report, before ``fit`` would see a NaN loss.

    Resuming: all the state that carries over between steps is in registered buffers (the
    replay buffer's chains; the pixel map's constants), which ``fit``'s checkpoints keep, and
    the guard holds nothing across an epoch's end, when checkpoints are written; the sampler
    draws from the global RNG, whose state ``fit`` saves too. So a run resumed from a checkpoint
    continues exactly as if never stopped (``resumable`` stays True).
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
        self._worst: torch.Tensor | None = None

    def to_model(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.space is None else self.space.to_model(u)

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.space is None else self.space.from_model(x)

    def sample(self, model: nn.Module, n: int, n_steps: int | None = None) -> torch.Tensor:
        """``n`` chains from the buffer after SGLD (model in eval mode), written back and returned."""
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

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if self.data_noise:
            x = self.to_model(self.from_model(x) + self.data_noise * torch.randn_like(x))
        logits_q = None
        if self.px_weight:
            xq = self.sample(model, self.n_samples or len(x))
            logits_all = model(torch.cat([x, self.to_model(xq).to(x.dtype)]))
            logits, logits_q = logits_all[: len(x)], logits_all[len(x):]
        else:  # the plain classifier: no sampling
            logits = model(x)
        loss, terms = _jem_loss(logits, y, logits_q, self.px_weight, self.pyx_weight)
        if logits_q is not None:
            self._guard(terms["gap"])
        return loss, logits, terms

    def _guard(self, gap: torch.Tensor) -> None:
        gap = gap.abs()
        self._worst = gap if self._worst is None else torch.maximum(self._worst, gap)  # NaN propagates
        if ((self.step + 1) % self.check_every == 0 or (self.step + 1) % self.steps_per_epoch == 0
                or self.step + 1 >= self.total_steps):   # (epoch ends: nothing is held over a checkpoint)
            worst, self._worst = self._worst.item(), None
            if not worst <= self.max_energy_gap:
                raise JEMDiverged(
                    f"JEM diverged by training step {self.step + 1}: the energy gap |mean E(data) - mean "
                    f"E(samples)| reached {worst:.4g} (limit {self.max_energy_gap:.4g}). The SGLD samples no longer "
                    f"track the model, so the p(x) term would blow the logits up. Remedies (from the official "
                    f"code's README): more data noise (data_noise=0.1 is more stable than 0.03), a lower learning "
                    f"rate or a longer warm-up, more SGLD steps per update (n_steps), a smaller SGLD step_size.")


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
    """What :func:`train_jem` returns: the trained model, its history (with the objective's
    terms as ``train_ce``, ``train_energy_data``, ... columns) and the objective (which holds
    the replay buffer)."""

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
    r"""Train a JEM: :func:`~minidistill.train.train_model` with a :class:`JEMObjective`.

    ``model`` is a model name (built from ``seed`` by :func:`energy_model`, i.e. without batch
    norm) or a module. ``px_weight=0`` trains the same network as a plain classifier (same
    initial weights, data order and data noise; no SGLD). SGLD runs in pixel space $[-1, 1]$
    (:class:`PixelSpace`) with the paper's defaults. Raises :class:`JEMDiverged` with a report
    if the energy gap exceeds ``max_energy_gap``; extra keyword arguments go to ``fit``
    (``eval_every=None`` for a run whose test curve nobody plots).
    """
    if not isinstance(data, Dataset):
        raise ValueError(f"data must be a minidistill Dataset, got {type(data).__name__}")
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a train.Recipe, got {type(recipe).__name__}")
    if isinstance(model, str):
        name, build = model, lambda: energy_model(model, data.num_classes)
    elif isinstance(model, nn.Module):
        name, build = type(model).__name__, lambda: model
        if px_weight and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            warnings.warn("the model has batch-norm layers: real images and SGLD samples will share batch "
                          "statistics; JEM uses none (see without_batchnorm)", stacklevel=2)
    else:
        raise ValueError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
    seed_everything(seed)  # the buffer's uniform start depends on the seed alone
    buffer = ReplayBuffer(buffer_size, data.x_train.shape[1:], reinit_prob=reinit_prob)
    objective = JEMObjective(buffer, PixelSpace.from_dataset(data), n_steps=n_steps, step_size=step_size,
                             noise=noise, data_noise=data_noise, px_weight=px_weight, pyx_weight=pyx_weight,
                             n_samples=n_samples, max_energy_gap=max_energy_gap)
    description = fit_kwargs.pop("description", None) or f"{'JEM' if px_weight else 'plain'} {name} (seed {seed})"
    net, history = train_model(build, data, recipe, objective, seed=seed, description=description, **fit_kwargs)
    history.meta["jem"] = {"n_steps": n_steps, "step_size": step_size, "noise": noise, "buffer_size": buffer_size,
                           "reinit_prob": reinit_prob, "data_noise": data_noise, "px_weight": px_weight,
                           "pyx_weight": pyx_weight}
    return JEMResult(net, history, objective)


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
    """Out-of-distribution image sets made offline, uint8 ``[n, 3, H, W]`` at ``data``'s image
    size: ``uniform noise`` (every pixel uniform in 0..255), ``constant colour`` (one random
    colour per image), ``interpolated test images`` (the pixel mean of two random test images,
    the paper's "interpolated CIFAR-10"), ``gratings`` (:func:`make_gratings`) and ``shapes``
    (the smoke data set drawn at this size, unless ``data`` is shapes)."""
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

    - ``-E(x)``: $\mathrm{LSE}_y f(x)[y] = -E(x) = \log p(x) + \log Z$, the paper's "$\log p(x)$"
      score: the log density *unnormalised* ($Z$ is unknown), which is all a ranking needs;
    - ``max p(y|x)``: the classifier's confidence;
    - ``approx. mass``: $-\|\partial \log p(x)/\partial x\|_2$ (gradient in $[-1, 1]$ pixel space).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    mean, std = space.mean.to(device), space.std.to(device)     # (the caller's space stays where it is)
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"-E(x)": [], "max p(y|x)": [], "approx. mass": []}
    try:
        for i in range(0, len(images), batch_size):
            u = PixelSpace.from_uint8(images[i:i + batch_size].to(device)).requires_grad_(True)
            with torch.enable_grad():
                logits = model(((u + 1) / 2 - mean) / std).float()
                log_px = -energy(logits)
                (grad,) = torch.autograd.grad(log_px.sum(), u)
            out["-E(x)"].append(log_px.detach().cpu())
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
    def one(s_in: torch.Tensor, s_out: torch.Tensor) -> float:
        return auroc(torch.cat([s_in, s_out]), torch.cat([torch.ones(len(s_in)), torch.zeros(len(s_out))]).long())

    return {name: {score: one(s_in, s_out[score]) for score, s_in in scores_in.items()}
            for name, s_out in scores_out.items()}


def __getattr__(name: str):
    """The toy and the figures (:mod:`~minidistill.methods.jem_plots`) and the exercises'
    self-checks (:mod:`minidistill.exercises.jem`), imported on first use."""
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MOVED))
