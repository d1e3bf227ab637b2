r"""Chapter 4 -- Gumbel-softmax (Jang et al.; Maddison et al., ICLR 2017) and AdaShare (Sun et al.,
NeurIPS 2020): learning, per task, which residual blocks to run.

Three parts, in the chapter's order:

1. **Sampling discrete choices.** :func:`gumbel_noise`, :func:`gumbel_max` (the exact sampler
   $\arg\max_i(\log\pi_i + g_i)$), :func:`gumbel_softmax` (its relaxation at temperature
   $\tau$, straight-through when ``hard=True``), :func:`chi_square_test` to check a sampler,
   and :func:`gradient_samples` / :func:`exact_gradient` to compare the score-function
   (REINFORCE) and Gumbel-softmax gradient estimators on a problem with a known gradient.
2. **AdaShare.** :class:`AdaShareNet`, a CIFAR ResNet whose blocks each task may select or
   skip, with per-task policy logits ``[tasks, blocks, 2]`` (column 0 = select, 1 = skip);
   the regularisers :func:`sparsity_loss` and :func:`sharing_loss` in the paper's form and
   in the released code's form (``form="code"``); :func:`learn_policy`, the alternating
   weight/policy phase with the curriculum (:func:`curriculum_schedule`) and temperature
   decay; :func:`sample_policy`, and :func:`train_adashare`, which chains warm-up, policy
   learning, sampling and re-training from the initial weights.
3. **The experiment and the exercises.** Three tasks made from any image batch
   (:data:`TASKS`: the class label, the rotation by k·90°, and a dense edge-strength map),
   :class:`MultiTaskLoss` for :func:`~minidistill.train.fit`, the baselines
   (:func:`train_baseline`: independent networks, hard sharing, a random policy, stochastic
   depth), :func:`evaluate_tasks`, :func:`results_markdown`, the figures and the self-checks.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset, DeviceLoader
from ..models import BasicBlock
from ..report import format_mean_std
from ..runtime import attempted, get_device, seed_everything, show_progress
from ..train import History, Recipe, TrainingDiverged, _autocast, _autocast_dtype, fit

__all__ = [
    # sampling and gradient estimators
    "gumbel_noise",
    "gumbel_max",
    "gumbel_softmax",
    "chi_square_test",
    "exact_gradient",
    "gradient_samples",
    "gradient_statistics",
    # the AdaShare network, policy and regularisers
    "TASKS",
    "AdaShareNet",
    "IndependentNets",
    "select_probabilities",
    "sparsity_loss",
    "sharing_loss",
    "curriculum_schedule",
    "sample_policy",
    "random_policy",
    "deployed_parameters",
    # tasks, objective, training, evaluation
    "rotate_batch",
    "edge_map",
    "MultiTaskLoss",
    "learn_policy",
    "AdaShareRun",
    "train_adashare",
    "train_baseline",
    "evaluate_tasks",
    "relative_gain",
    "results_markdown",
    # figures
    "plot_relaxed_samples",
    "plot_policy",
    # self-checks for the exercises
    "check_gumbel_max",
    "check_straight_through",
    "check_sharing_loss",
]


# ---------------------------------------------------------------------------------------------
# 1. Sampling discrete choices
# ---------------------------------------------------------------------------------------------

def _check_tau(tau: float) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau < math.inf):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {type(logits).__name__}"
                         + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else ""))
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise ValueError(f"{name} must have the categories in the last dimension, at least 2 of them; "
                         f"got shape {tuple(logits.shape)}")


def gumbel_noise(shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> torch.Tensor:
    r"""Standard Gumbel noise $g = -\log(-\log u)$, $u \sim \mathcal U(0, 1)$, of the given shape,
    drawn with :class:`torch.distributions.Gumbel` (which keeps $u$ away from 0 and 1, so $g$ is
    always finite). Uses torch's global random state: seed it with ``torch.manual_seed``."""
    zero = torch.zeros((), dtype=dtype, device=device)
    # validate_args=False: the argument check would copy a boolean to the host on every call
    return torch.distributions.Gumbel(zero, torch.ones_like(zero), validate_args=False).sample(tuple(shape))


def gumbel_max(logits: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
    r"""Exact categorical samples by the Gumbel-max trick:
    $$z = \arg\max_i \big(\log\pi_i + g_i\big) \sim \mathrm{Cat}(\pi),$$
    where ``logits`` are $\log\pi$ up to a constant. Returns int64 indices of shape
    ``logits.shape[:-1]``, or ``[num_samples, *logits.shape[:-1]]`` when ``num_samples`` is given."""
    _check_logits(logits)
    shape = tuple(logits.shape) if num_samples is None else (int(num_samples), *logits.shape)
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    return (logits + gumbel_noise(shape, dtype=logits.dtype, device=logits.device)).argmax(-1)


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, hard: bool = False) -> torch.Tensor:
    r"""A Gumbel-softmax (Concrete) sample over the last dimension:
    $$y_i = \frac{\exp\big((\log\pi_i + g_i)/\tau\big)}{\sum_j \exp\big((\log\pi_j + g_j)/\tau\big)},
    \qquad g_i \sim \mathrm{Gumbel}(0, 1).$$

    ``logits`` are $\log\pi$ up to a constant. As $\tau \to 0$ the sample tends to the one-hot
    Gumbel-max sample; as $\tau \to \infty$ to the uniform vector. With ``hard=True`` the forward
    value is that one-hot vector $h$ and the gradient is the soft sample's (straight-through):
    returned as $h + (y - \mathrm{sg}(y))$, which is exactly $h$ in the forward pass.
    Same distribution as :func:`torch.nn.functional.gumbel_softmax`.
    """
    _check_logits(logits)
    _check_tau(tau)
    g = gumbel_noise(logits.shape, dtype=logits.dtype, device=logits.device)
    y = torch.softmax((logits + g) / tau, dim=-1)
    if not hard:
        return y
    h = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
    return h + (y - y.detach())


def chi_square_test(counts: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
    r"""Pearson's goodness-of-fit test of observed ``counts`` against category ``probs``:
    $X^2 = \sum_i (O_i - n p_i)^2 / (n p_i)$ with $k - 1$ degrees of freedom, and the p-value
    $P(\chi^2_{k-1} \ge X^2) = Q\big(\tfrac{k-1}{2}, \tfrac{X^2}{2}\big)$ (regularised upper
    incomplete gamma function, :func:`torch.special.gammaincc`). Computed in float64.

    Returns ``{'statistic', 'dof', 'p_value'}``.
    """
    counts = torch.as_tensor(counts).double().flatten()
    probs = torch.as_tensor(probs).double().flatten()
    if counts.shape != probs.shape or len(counts) < 2:
        raise ValueError(f"counts and probs must be 1-D with the same length >= 2, got {tuple(counts.shape)} "
                         f"and {tuple(probs.shape)}")
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("counts must be non-negative with a positive total")
    if (probs <= 0).any() or abs(probs.sum().item() - 1) > 1e-6:
        raise ValueError(f"probs must be positive and sum to one, got sum {probs.sum().item():.6g}")
    expected = counts.sum() * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = len(counts) - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2)
    return {"statistic": stat.item(), "dof": dof, "p_value": p.item()}


def exact_gradient(logits: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    r"""The exact gradient of $\mathbb E_{z \sim \mathrm{Cat}(\mathrm{softmax}\,\theta)}[f(e_z)]$
    with respect to the logits $\theta$ (one vector ``[K]``), in float64:
    $$\nabla_\theta \sum_k \pi_k f(e_k) = \sum_k f(e_k)\,\pi_k\,(e_k - \pi) = \pi \odot (f - \pi^\top f).$$
    ``f`` maps a batch of (one-hot or relaxed) vectors ``[N, K]`` to values ``[N]``."""
    _check_logits(logits)
    if logits.ndim != 1:
        raise ValueError(f"logits must be one vector [K], got shape {tuple(logits.shape)}")
    pi = torch.softmax(logits.detach().double(), -1)
    fk = f(torch.eye(len(pi), dtype=torch.float64)).reshape(-1)
    return pi * (fk - (pi * fk).sum())


ESTIMATORS = ("reinforce", "reinforce_baseline", "gumbel_softmax", "straight_through")


def gradient_samples(logits: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], estimator: str,
                     num_samples: int = 10_000, tau: float = 1.0) -> torch.Tensor:
    r"""``num_samples`` independent one-sample estimates ``[N, K]`` of the gradient of
    $\mathbb E_{z\sim\mathrm{Cat}(\mathrm{softmax}\,\theta)}[f(e_z)]$ (float64):

    - ``'reinforce'``: the score function $f(e_z)\,\nabla_\theta \log \pi_z = f(e_z)(e_z - \pi)$;
    - ``'reinforce_baseline'``: the same with $f$ minus the mean of the *other* samples' $f$
      (a leave-one-out baseline; still unbiased);
    - ``'gumbel_softmax'``: $\nabla_\theta f(y)$ for a relaxed sample $y$ at temperature ``tau``
      (the gradient of a different, relaxed objective: biased);
    - ``'straight_through'``: $f$ evaluated at the hard sample, gradient through the soft one.
    """
    _check_logits(logits)
    if logits.ndim != 1:
        raise ValueError(f"logits must be one vector [K], got shape {tuple(logits.shape)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples!r}")
    # one row of logits per sample: the gradient of the summed surrogate w.r.t. row n is sample n's estimate
    theta = logits.detach().double().expand(num_samples, -1).clone().requires_grad_(True)
    if estimator.startswith("reinforce"):
        z = gumbel_max(theta.detach())
        fz = f(F.one_hot(z, theta.shape[-1]).double()).detach()
        if estimator == "reinforce_baseline":
            fz = fz - (fz.sum() - fz) / (num_samples - 1)
        log_pz = torch.log_softmax(theta, -1).gather(-1, z[:, None]).squeeze(-1)
        surrogate = (fz * log_pz).sum()
    else:
        y = gumbel_softmax(theta, tau, hard=estimator == "straight_through")
        surrogate = f(y).sum()
    (grad,) = torch.autograd.grad(surrogate, theta)
    return grad


def gradient_statistics(samples: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    r"""Bias $\|\bar g - \nabla\|$, variance $\sum_k \mathrm{Var}(g_k)$ (the trace of the
    covariance of one-sample estimates) and mean squared error $\mathbb E\|g - \nabla\|^2$ of
    gradient ``samples`` ``[N, K]`` against the ``exact`` gradient ``[K]``."""
    if samples.ndim != 2 or exact.shape != samples.shape[1:]:
        raise ValueError(f"samples must be [N, K] and exact [K], got {tuple(samples.shape)} and {tuple(exact.shape)}")
    samples, exact = samples.double(), exact.double()
    return {"bias": (samples.mean(0) - exact).norm().item(),
            "variance": samples.var(0).sum().item(),
            "mse": ((samples - exact) ** 2).sum(-1).mean().item()}


# ---------------------------------------------------------------------------------------------
# 2. AdaShare: a residual network with a select-or-skip policy per block and task
# ---------------------------------------------------------------------------------------------

#: The three tasks the chapter derives from any image batch: the class label (10-way for
#: CIFAR-10), the rotation by k·90° (4-way, the image is rotated first), and a dense regression
#: of the local edge strength (Sobel gradient magnitude, average-pooled to the last feature map).
TASKS = ("class", "rotation", "edges")
GATINGS = ("all", "policy", "gumbel", "stochastic_depth")


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    if not tasks or len(set(tasks)) != len(tasks) or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be distinct names from {TASKS}, got {tasks!r}")
    return tasks


def _head(task: str, channels: int, num_classes: int) -> nn.Module:
    if task == "edges":  # dense: one value per position of the last feature map
        return nn.Conv2d(channels, 1, 1)
    out = num_classes if task == "class" else 4
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out))


class AdaShareNet(nn.Module):
    r"""A CIFAR ResNet shared by several tasks, each with its own head and its own policy.

    ``widths = (stem, stage 1, stage 2, ...)``; every stage has ``blocks_per_stage`` residual
    blocks (:class:`~minidistill.models.BasicBlock`), so there are
    $L$ = ``blocks_per_stage * (len(widths) - 1)`` blocks. For task $k$, block $l$ computes

    $$x_{l+1} = v_{l,k}\,\mathrm{ReLU}\big(s_l(x_l) + F_l(x_l)\big) + (1 - v_{l,k})\,s_l(x_l),$$

    with $s_l$ the block's shortcut (the identity, or a 1x1 convolution where the shape
    changes, as in the released code) and $v_{l,k} \in [0, 1]$ the weight of "select". Where
    $v$ comes from is the *gating*:

    - ``'all'``: $v = 1$ everywhere (hard parameter sharing; AdaShare's warm-up);
    - ``'policy'``: a fixed binary policy ``[tasks, blocks]`` (:meth:`fix_policy`);
    - ``'gumbel'``: in training, soft Gumbel-softmax samples of ``policy_logits`` at
      temperature ``tau`` for the last ``num_learnable`` blocks, the earlier ones forced to
      "select" (the curriculum); in eval mode, the most likely policy;
    - ``'stochastic_depth'``: in training, Bernoulli samples with survival probability falling
      linearly from 1 to ``p_last`` over the blocks (Huang et al. 2016); in eval mode, $v$ = that
      probability.

    ``policy_logits`` ``[tasks, blocks, 2]`` (column 0 = select, column 1 = skip) start equal
    (0.5, 0.5), so $P(\text{select}) = 1/2$, as in the released code.
    ``model(x)`` returns the first task's output (the class logits when ``tasks[0] == 'class'``);
    :meth:`forward_tasks` runs all tasks, each on its own input, in one batched pass.
    """

    def __init__(self, tasks: Sequence[str] = TASKS, num_classes: int = 10,
                 widths: Sequence[int] = (16, 16, 32, 64), blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be (stem, stage 1, ...) positive ints, at least two, got {widths!r}")
        if not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be an int >= 1, got {blocks_per_stage!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for s, w in enumerate(widths[1:]):
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(c, w, 2 if s > 0 and b == 0 else 1))
                c = w
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleDict({t: _head(t, c, num_classes) for t in self.tasks})
        k, n = len(self.tasks), len(blocks)
        self.policy_logits = nn.Parameter(torch.full((k, n, 2), 0.5))
        self.register_buffer("policy", torch.ones(k, n))
        self.gating, self.tau, self.hard, self.num_learnable, self.p_last = "all", 5.0, False, n, 0.5
        for m in (*self.stem.modules(), *self.blocks.modules()):  # the heads keep PyTorch's default init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    # -- choosing the gating ----------------------------------------------------------------
    def share_all(self) -> "AdaShareNet":
        """Every task runs every block (hard parameter sharing)."""
        self.gating = "all"
        return self

    def fix_policy(self, policy: torch.Tensor) -> "AdaShareNet":
        """Run a fixed binary policy ``[tasks, blocks]`` (1 = select, 0 = skip)."""
        policy = torch.as_tensor(policy)
        if policy.shape != self.policy.shape:
            raise ValueError(f"policy must be [tasks, blocks] = {tuple(self.policy.shape)}, got {tuple(policy.shape)}")
        if not ((policy == 0) | (policy == 1)).all():
            raise ValueError("policy must hold only 0 (skip) and 1 (select)")
        self.policy.copy_(policy.to(self.policy))
        self.gating = "policy"
        return self

    def use_gumbel(self, tau: float, num_learnable: int | None = None, hard: bool = False) -> "AdaShareNet":
        """Gate with Gumbel-softmax samples of ``policy_logits`` at temperature ``tau``; only the
        last ``num_learnable`` blocks (default: all) follow the policy, the others are selected."""
        _check_tau(tau)
        n = self.num_blocks if num_learnable is None else num_learnable
        if not isinstance(n, int) or not 1 <= n <= self.num_blocks:
            raise ValueError(f"num_learnable must be an int in [1, {self.num_blocks}], got {num_learnable!r}")
        self.gating, self.tau, self.num_learnable, self.hard = "gumbel", float(tau), n, bool(hard)
        return self

    def use_stochastic_depth(self, p_last: float = 0.5) -> "AdaShareNet":
        """Drop blocks at random in training, survival falling linearly from 1 to ``p_last``."""
        if not 0 < p_last <= 1:
            raise ValueError(f"p_last must be in (0, 1], got {p_last!r}")
        self.gating, self.p_last = "stochastic_depth", float(p_last)
        return self

    def survival(self) -> torch.Tensor:
        r"""Stochastic depth's survival probabilities $p_l = 1 - \frac{l}{L}(1 - p_L)$, $l = 1..L$."""
        pos = torch.arange(1, self.num_blocks + 1, device=self.policy.device, dtype=torch.float32)
        return 1 - pos / self.num_blocks * (1 - self.p_last)

    def gates(self) -> torch.Tensor:
        """The select weights $v$ ``[tasks, blocks]`` for the next forward pass (sampled anew
        on each call in the stochastic gatings)."""
        k, n = self.policy.shape
        if self.gating == "all":
            return torch.ones(k, n, device=self.policy.device)
        if self.gating == "policy":
            return self.policy
        if self.gating == "stochastic_depth":
            p = self.survival().expand(k, n)
            return torch.bernoulli(p) if self.training else p
        if self.gating != "gumbel":
            raise ValueError(f"unknown gating {self.gating!r}; expected one of {GATINGS}")
        if self.training:
            v = gumbel_softmax(self.policy_logits, self.tau, hard=self.hard)[..., 0]
        else:
            v = (select_probabilities(self.policy_logits) > 0.5).float()
        fixed = n - self.num_learnable
        return torch.cat([torch.ones(k, fixed, device=v.device, dtype=v.dtype), v[:, fixed:]], 1)

    # -- running it ---------------------------------------------------------------------------
    def features(self, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """The last feature map for a batch ``x`` with one row of select weights per sample
        (``gates`` ``[N, blocks]``; ``None`` runs every block)."""
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            skip = block.shortcut(h)
            out = block.relu(block.body(h) + skip)
            if gates is None:
                h = out
            else:
                v = gates[:, i].view(-1, 1, 1, 1).to(out.dtype)
                h = skip + v * (out - skip)  # = v * out + (1 - v) * skip
        return h

    def forward_tasks(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every task's output, task $k$ on ``inputs[k]`` (or all on one tensor), in one pass
        over the concatenated batch with each sample gated by its task's policy."""
        k = len(self.tasks)
        xs = [inputs] * k if isinstance(inputs, torch.Tensor) else list(inputs)
        if len(xs) != k or any(x.shape != xs[0].shape for x in xs) or xs[0].ndim != 4:
            raise ValueError(f"inputs must be one [N, C, H, W] tensor or {k} of the same shape (one per task "
                             f"{self.tasks}), got {[tuple(x.shape) for x in xs]}")
        n = len(xs[0])
        gates = None if self.gating == "all" else self.gates().repeat_interleave(n, 0)
        h = self.features(torch.cat(xs) if k > 1 else xs[0], gates)
        return [self.heads[t](part) for t, part in zip(self.tasks, h.split(n))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = None if self.gating == "all" else self.gates()[:1].expand(len(x), -1)
        return self.heads[self.tasks[0]](self.features(x, gates))


class IndependentNets(nn.Module):
    """One :class:`AdaShareNet` per task, sharing nothing: the multi-task baseline with the
    most parameters. Trained by the same objective (the sum of the task losses, which for
    disjoint parameters is the same as training each network on its own task)."""

    def __init__(self, tasks: Sequence[str] = TASKS, num_classes: int = 10,
                 widths: Sequence[int] = (16, 16, 32, 64), blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        self.nets = nn.ModuleList(AdaShareNet((t,), num_classes, widths, blocks_per_stage) for t in self.tasks)

    def forward_tasks(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        xs = [inputs] * len(self.tasks) if isinstance(inputs, torch.Tensor) else list(inputs)
        if len(xs) != len(self.tasks):
            raise ValueError(f"expected {len(self.tasks)} inputs (one per task {self.tasks}), got {len(xs)}")
        return [net.forward_tasks(x)[0] for net, x in zip(self.nets, xs)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets[0](x)


def select_probabilities(policy_logits: torch.Tensor) -> torch.Tensor:
    r"""$\alpha_{l,k} = \mathrm{softmax}(a_{l,k})_0$, the probability that task $k$ selects
    block $l$: ``[tasks, blocks, 2]`` logits in, ``[tasks, blocks]`` out."""
    if not isinstance(policy_logits, torch.Tensor) or policy_logits.ndim != 3 or policy_logits.shape[-1] != 2:
        raise ValueError("policy_logits must be [tasks, blocks, 2] (select, skip), got "
                         f"{tuple(getattr(policy_logits, 'shape', ()))}")
    return torch.softmax(policy_logits.float() if policy_logits.dtype in (torch.float16, torch.bfloat16)
                         else policy_logits, -1)[..., 0]


FORMS = ("paper", "code")


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be 'paper' (as the paper writes it) or 'code' (as the released code "
                         f"computes it), got {form!r}")


def sparsity_loss(policy_logits: torch.Tensor, num_learnable: int | None = None, form: str = "paper") -> torch.Tensor:
    r"""The sparsity regulariser over the last ``num_learnable`` blocks (default: all), the
    ones whose policy is being learned:

    - ``form='paper'``: $\mathcal L_{sp} = \sum_k \sum_l \log \alpha_{l,k}$, which pushes
      every $\alpha$ towards "skip";
    - ``form='code'``: the released code's cross-entropy towards the skip class, averaged over
      the blocks and summed over tasks, $\sum_k \frac1n \sum_l -\log(1 - \alpha_{l,k})$.
    """
    _check_form(form)
    alpha_shape = select_probabilities(policy_logits).shape
    n = alpha_shape[1] if num_learnable is None else num_learnable
    if not isinstance(n, int) or not 1 <= n <= alpha_shape[1]:
        raise ValueError(f"num_learnable must be an int in [1, {alpha_shape[1]}], got {num_learnable!r}")
    log_p = torch.log_softmax(policy_logits[:, -n:], -1)  # log alpha (column 0), log(1 - alpha) (column 1)
    if form == "paper":
        return log_p[..., 0].sum()
    return -log_p[..., 1].mean(-1).sum()


def sharing_loss(policy_logits: torch.Tensor, form: str = "paper") -> torch.Tensor:
    r"""The sharing regulariser, summed over pairs of tasks $k_1 < k_2$ and over blocks
    $l = 0, \dots, L-1$ (numbered from the input):

    - ``form='paper'``: $\sum_{k_1<k_2} \sum_l \frac{L - l}{L}\,|\alpha_{l,k_1} - \alpha_{l,k_2}|$,
      weights $1, \frac{L-1}{L}, \dots, \frac1L$: disagreeing on *early* blocks costs most, so
      tasks share the low layers;
    - ``form='code'``: the released code's $\sum_{k_1<k_2} \sum_l \frac{l + 1}{L}\,|a_{l,k_1} - a_{l,k_2}|$
      on the raw select logits $a$ (not probabilities), weights increasing with depth.
    """
    _check_form(form)
    alpha = select_probabilities(policy_logits)
    k, n = alpha.shape
    pos = torch.arange(n, device=alpha.device, dtype=alpha.dtype)
    if form == "paper":
        values, weights = alpha, (n - pos) / n
    else:
        values, weights = policy_logits[..., 0], (pos + 1) / n
    i, j = torch.triu_indices(k, k, offset=1, device=alpha.device)
    return (weights * (values[i] - values[j]).abs()).sum()


def curriculum_schedule(rounds: int, num_blocks: int, curriculum_speed: int = 3) -> list[int]:
    r"""How many of the last blocks have a learnable policy in each policy round $p$:
    $\min(L, \lfloor p / c \rfloor + 1)$ (one more block every $c$ rounds, from the top)."""
    for name, v in (("rounds", rounds), ("num_blocks", num_blocks), ("curriculum_speed", curriculum_speed)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return [min(num_blocks, p // curriculum_speed + 1) for p in range(rounds)]


def sample_policy(policy_logits: torch.Tensor, generator: torch.Generator | None = None,
                  greedy: bool = False) -> torch.Tensor:
    """A fixed binary policy ``[tasks, blocks]``: each block selected with probability
    $\\alpha_{l,k}$ (as the paper samples its architectures), or where $\\alpha > 1/2$ when
    ``greedy``."""
    alpha = select_probabilities(policy_logits.detach()).cpu().double()
    if greedy:
        return (alpha > 0.5).float()
    return (torch.rand(alpha.shape, generator=generator, dtype=torch.float64) < alpha).float()


def random_policy(num_tasks: int, num_blocks: int, p_select: float = 0.5,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A random binary policy ``[tasks, blocks]``, each block selected with ``p_select``."""
    if not 0 <= p_select <= 1:
        raise ValueError(f"p_select must be in [0, 1], got {p_select!r}")
    if num_tasks < 1 or num_blocks < 1:
        raise ValueError(f"num_tasks and num_blocks must be >= 1, got {num_tasks} and {num_blocks}")
    return (torch.rand(num_tasks, num_blocks, generator=generator, dtype=torch.float64) < p_select).float()


def deployed_parameters(model: nn.Module) -> int:
    """Parameters a trained model needs at test time: the stem, the heads and every block that
    at least one task runs (all blocks unless a fixed policy skips some for every task); the
    policy logits are not counted. :class:`IndependentNets`: the sum over its networks."""
    if isinstance(model, IndependentNets):
        return sum(deployed_parameters(net) for net in model.nets)
    if not isinstance(model, AdaShareNet):
        raise ValueError(f"model must be an AdaShareNet or IndependentNets, got {type(model).__name__}")
    used = model.policy.amax(0) > 0 if model.gating == "policy" else torch.ones(model.num_blocks, dtype=torch.bool)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return (count(model.stem) + count(model.heads)
            + sum(count(b) for b, u in zip(model.blocks, used.tolist()) if u))


# ---------------------------------------------------------------------------------------------
# 3. Tasks made from images, the objective, training and evaluation
# ---------------------------------------------------------------------------------------------

def rotate_batch(x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate sample $i$ of a square batch ``[N, C, H, W]`` by $k_i \\cdot 90°$ with
    $k_i = (i + \\text{offset}) \\bmod 4$ (balanced, and random per image when batches are
    shuffled; ``offset`` = the batch's start index keeps a test set's angles fixed).
    Returns the rotated batch and the labels $k$ (int64)."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x must be a batch of square images [N, C, H, H], got {tuple(x.shape)}")
    out = torch.empty_like(x)
    for k in range(4):  # four strided slices: no per-sample Python work
        start = (k - offset) % 4
        out[start::4] = x[start::4].rot90(k, dims=(2, 3))
    return out, (torch.arange(len(x), device=x.device) + offset) % 4


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def edge_map(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    r"""The dense task's target: the Sobel gradient magnitude of the channel-mean image (borders
    replicated), average-pooled to ``size``: ``[N, C, H, W]`` in, float32 ``[N, 1, *size]`` out.
    The kernels are scaled by 1/8, so a unit step between neighbouring pixels gives 1/2."""
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images [N, C, H, W], got {tuple(x.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        g = F.pad(x.float().mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
        k = torch.stack([_SOBEL, _SOBEL.T])[:, None].to(g.device)
        grad = F.conv2d(g, k)
        mag = (grad.pow(2).sum(1, keepdim=True) + 1e-12).sqrt()
        return F.adaptive_avg_pool2d(mag, size)


def _task_inputs(tasks: Sequence[str], x: torch.Tensor, y: torch.Tensor, offset: int = 0):
    inputs, targets = [], []
    for t in tasks:
        if t == "rotation":
            xr, k = rotate_batch(x, offset)
            inputs.append(xr)
            targets.append(k)
        else:
            inputs.append(x)
            targets.append(y if t == "class" else None)  # edges: made from x once the output size is known
    return inputs, targets


class MultiTaskLoss(nn.Module):
    r"""The objective for :func:`~minidistill.train.fit`: from an image batch ``(x, y)`` make each
    task's input and target, run ``model.forward_tasks`` and return
    $\big(\sum_k \lambda_k \mathcal L_k,\ \text{class logits}\big)$. Losses: cross-entropy for
    ``class`` and ``rotation``, L1 for ``edges`` (the released code's loss for depth)."""

    def __init__(self, tasks: Sequence[str] = TASKS, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        if "class" not in self.tasks:
            raise ValueError(f"tasks must include 'class' (fit reports its accuracy), got {self.tasks!r}")
        weights = tuple(float(w) for w in (weights if weights is not None else [1.0] * len(self.tasks)))
        if len(weights) != len(self.tasks) or any(not w >= 0 for w in weights):
            raise ValueError(f"weights must be {len(self.tasks)} non-negative numbers (one per task), got {weights!r}")
        self.weights = weights

    def task_losses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """``([loss per task], outputs)``."""
        if getattr(model, "tasks", None) != self.tasks:
            raise ValueError(f"the model's tasks {getattr(model, 'tasks', None)} differ from the objective's {self.tasks}")
        inputs, targets = _task_inputs(self.tasks, x, y)
        outs = model.forward_tasks(inputs)
        losses = []
        for t, out, target in zip(self.tasks, outs, targets):
            if t == "edges":
                losses.append(F.l1_loss(out.float(), edge_map(x, tuple(out.shape[-2:]))))
            else:
                losses.append(F.cross_entropy(out.float(), target))
        return losses, outs

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, outs = self.task_losses(model, x, y)
        total = sum(w * loss for w, loss in zip(self.weights, losses))
        return total, outs[self.tasks.index("class")]


def _halves(data: Dataset, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    perm = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
    return (data.x_train[a], data.y_train[a]), (data.x_train[b], data.y_train[b])


def learn_policy(
    model: AdaShareNet,
    data: Dataset,
    objective: MultiTaskLoss,
    *,
    rounds: int,
    batch_size: int = 512,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    policy_lr: float = 0.01,
    tau0: float = 5.0,
    tau_decay: float = 0.965,
    curriculum_speed: int = 3,
    sparsity_weight: float = 0.05,
    sharing_weight: float = 0.05,
    form: str = "paper",
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: bool | str = "auto",
    progress: bool | None = None,
) -> History:
    r"""AdaShare's policy-learning phase, after a hard-sharing warm-up.

    The training split is cut into two halves. Each round is one pass over the first half
    updating the network weights (SGD with momentum, policy frozen) and one pass over the second
    half updating the policy logits (Adam, weights frozen) on
    $\sum_k \lambda_k \mathcal L_k + \lambda_{sp}\mathcal L_{sp} + \lambda_{sh}\mathcal L_{sh}$,
    both with soft Gumbel-softmax gates (as the released code trains, ``hard_sampling: False``).
    In round $p$ only the last :func:`curriculum_schedule` blocks follow the policy; after each
    round $\tau \leftarrow$ ``tau_decay`` $\cdot\,\tau$, from ``tau0``. Defaults are the code's
    NYU-v2 2-task values where it has them (Adam lr 0.01, $\tau_0 = 5$, decay 0.965, $c = 3$,
    $\lambda_{sp} = \lambda_{sh} = 0.05$).

    Returns a :class:`~minidistill.train.History` with one record per round (``epoch`` = round,
    ``tau``, ``num_learnable``, ``task_loss``, ``sparsity``, ``sharing``, ``seconds``) and
    ``meta['probabilities']``: the select probabilities ``[tasks, blocks]`` after each round.
    """
    if not isinstance(model, AdaShareNet):
        raise ValueError(f"model must be an AdaShareNet, got {type(model).__name__}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    _check_tau(tau0)
    if not 0 < tau_decay <= 1:
        raise ValueError(f"tau_decay must be in (0, 1], got {tau_decay!r}")
    _check_form(form)
    schedule = curriculum_schedule(rounds, model.num_blocks, curriculum_speed)
    device = get_device(device)
    channels_last = device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    (x1, y1), (x2, y2) = _halves(data, seed)
    loaders = [DeviceLoader(x, y, batch_size, mean=data.mean, std=data.std, train=True, device=device,
                            channels_last=channels_last, seed=seed + i) for i, (x, y) in enumerate(((x1, y1), (x2, y2)))]
    if not 1 <= batch_size <= len(x1):
        raise ValueError(f"batch_size must be in [1, {len(x1)}] (half the training set), got {batch_size!r}")
    weights = [p for name, p in model.named_parameters() if name != "policy_logits"]
    opt_w = torch.optim.SGD(weights, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    opt_a = torch.optim.Adam([model.policy_logits], lr=policy_lr, weight_decay=5e-4)
    dtype = _autocast_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    history = History(meta={"form": form, "rounds": rounds, "tau0": tau0, "tau_decay": tau_decay,
                            "curriculum_speed": curriculum_speed, "sparsity_weight": sparsity_weight,
                            "sharing_weight": sharing_weight, "probabilities": []})
    bar = None
    if show_progress() if progress is None else progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds, desc="AdaShare policy", unit="round")
    tau, elapsed = float(tau0), 0.0
    model.train()
    for p, n_learn in enumerate(schedule):
        t0 = time.perf_counter()
        model.use_gumbel(tau, n_learn)
        sums = torch.zeros(3, device=device)  # task loss, sparsity, sharing (policy passes)
        for phase, loader in enumerate(loaders):  # 0: weights on the first half, 1: policy on the second
            model.policy_logits.requires_grad_(phase == 1)
            for w in weights:
                w.requires_grad_(phase == 0)
            opt = opt_w if phase == 0 else opt_a
            loader.set_epoch(p)
            for x, y in loader:
                with _autocast(device, dtype):
                    loss, _ = objective(model, x, y)
                if phase == 1:
                    sp = sparsity_loss(model.policy_logits, n_learn, form)
                    sh = sharing_loss(model.policy_logits, form)
                    sums += torch.stack([loss.detach().float(), sp.detach(), sh.detach()])
                    loss = loss + sparsity_weight * sp + sharing_weight * sh
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        for w in weights:
            w.requires_grad_(True)
        model.policy_logits.requires_grad_(True)
        task_loss, sp, sh = (sums / len(loaders[1])).tolist()  # one host sync per round
        if not math.isfinite(task_loss):
            if bar is not None:
                bar.close()
            raise TrainingDiverged(f"the task loss became {task_loss} in policy round {p + 1}; lower lr or policy_lr")
        elapsed += time.perf_counter() - t0
        history.records.append({"epoch": p + 1, "tau": tau, "num_learnable": n_learn, "task_loss": task_loss,
                                "sparsity": sp, "sharing": sh, "seconds": elapsed})
        history.meta["probabilities"].append(select_probabilities(model.policy_logits.detach()).cpu())
        tau *= tau_decay
        if bar is not None:
            bar.set_postfix(tau=f"{tau:.2f}", blocks=n_learn, loss=f"{task_loss:.3g}")
            bar.update(1)
    if bar is not None:
        bar.close()
    model.use_gumbel(tau, model.num_blocks)
    model.eval()
    return history


@dataclass
class AdaShareRun:
    """What :func:`train_adashare` returns: the re-trained ``model`` (fixed ``policy``), the
    select ``probabilities`` it was sampled from, the three phases' histories, and the weights
    after the warm-up (``warm_state``, on the CPU: to learn another policy from the same start)."""

    model: AdaShareNet
    policy: torch.Tensor
    probabilities: torch.Tensor
    warmup: History
    policy_history: History
    history: History
    warm_state: dict


def train_adashare(
    data: Dataset,
    recipe: Recipe,
    *,
    tasks: Sequence[str] = TASKS,
    task_weights: Sequence[float] | None = None,
    warmup_epochs: int = 2,
    rounds: int = 6,
    greedy: bool = False,
    seed: int = 0,
    model_kwargs: Mapping | None = None,
    policy_kwargs: Mapping | None = None,
    **fit_kwargs,
) -> AdaShareRun:
    """AdaShare end to end, from seed ``seed``:

    1. warm-up: ``warmup_epochs`` of hard sharing (:func:`~minidistill.train.fit`, ``recipe``'s
       optimiser and batch size);
    2. :func:`learn_policy` for ``rounds`` rounds (``policy_kwargs`` pass through);
    3. sample a fixed policy from the learned probabilities (:func:`sample_policy`; the most
       likely one if ``greedy``);
    4. re-train a network with that policy for ``recipe.epochs``, **starting again from the
       same initial weights** (the released code's ``retrain_from_pl: False``).
    """
    model_kwargs, policy_kwargs = dict(model_kwargs or {}), dict(policy_kwargs or {})
    policy_kwargs.setdefault("batch_size", recipe.batch_size)
    seed_everything(seed)
    model = AdaShareNet(tasks, data.num_classes, **model_kwargs)
    initial = copy.deepcopy(model.state_dict())
    objective = MultiTaskLoss(tasks, task_weights)
    warm = fit(model.share_all(), data, objective, recipe.replace(epochs=warmup_epochs), seed=seed,
               description=f"AdaShare warm-up (seed {seed})", **fit_kwargs)
    warm_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    device = next(model.parameters()).device
    ph = learn_policy(model, data, objective, rounds=rounds, seed=seed, device=device,
                      progress=fit_kwargs.get("progress"), **policy_kwargs)
    probabilities = select_probabilities(model.policy_logits.detach()).cpu()
    policy = sample_policy(model.policy_logits, torch.Generator().manual_seed(seed), greedy=greedy)
    final = AdaShareNet(tasks, data.num_classes, **model_kwargs)
    final.load_state_dict(initial)
    final.fix_policy(policy)
    hist = fit(final, data, objective, recipe, seed=seed, description=f"AdaShare re-train (seed {seed})", **fit_kwargs)
    return AdaShareRun(final, policy, probabilities, warm, ph, hist, warm_state)


BASELINES = ("independent", "hard_sharing", "random", "stochastic_depth")


def train_baseline(
    kind: str,
    data: Dataset,
    recipe: Recipe,
    *,
    tasks: Sequence[str] = TASKS,
    task_weights: Sequence[float] | None = None,
    seed: int = 0,
    p_select: float = 0.5,
    p_last: float = 0.5,
    model_kwargs: Mapping | None = None,
    **fit_kwargs,
) -> tuple[nn.Module, History]:
    """Train one multi-task baseline from seed ``seed`` with :func:`~minidistill.train.fit`:
    ``'independent'`` (:class:`IndependentNets`), ``'hard_sharing'`` (every task runs every
    block), ``'random'`` (a fixed random policy, each block selected with ``p_select``, drawn
    from a generator seeded with ``10000 + seed``), or
    ``'stochastic_depth'`` (blocks dropped at random, survival from 1 down to ``p_last``)."""
    if kind not in BASELINES:
        raise ValueError(f"kind must be one of {BASELINES}, got {kind!r}")
    model_kwargs = dict(model_kwargs or {})
    seed_everything(seed)
    if kind == "independent":
        model = IndependentNets(tasks, data.num_classes, **model_kwargs)
    else:
        model = AdaShareNet(tasks, data.num_classes, **model_kwargs)
        if kind == "random":  # its own random stream: never the draws that sample AdaShare's policy
            model.fix_policy(random_policy(len(model.tasks), model.num_blocks, p_select,
                                           torch.Generator().manual_seed(10_000 + seed)))
        elif kind == "stochastic_depth":
            model.use_stochastic_depth(p_last)
    history = fit(model, data, MultiTaskLoss(tasks, task_weights), recipe, seed=seed,
                  description=f"{kind} (seed {seed})", **fit_kwargs)
    return model, history


@torch.no_grad()
def evaluate_tasks(model: nn.Module, data: Dataset, split: str = "test", *, batch_size: int = 1024,
                   device: str | torch.device | None = None, amp: bool | str = "auto") -> dict[str, float]:
    """Each task's test score: ``class_acc`` and ``rotation_acc`` (top-1, %; every test image
    rotated by $i \\bmod 4$ quarter turns) and ``edges_mae`` (mean absolute error of the edge map)."""
    tasks = getattr(model, "tasks", None)
    if tasks is None or not hasattr(model, "forward_tasks"):
        raise ValueError(f"model must be an AdaShareNet or IndependentNets, got {type(model).__name__}")
    device = get_device(device) if device is not None else next(model.parameters()).device
    dtype = _autocast_dtype(device, amp)
    loader = DeviceLoader.from_dataset(data, split, batch_size, train=False, device=device,
                                       channels_last=device.type == "cuda")
    model.eval()
    sums = torch.zeros(len(tasks), device=device, dtype=torch.float64)
    seen = 0
    for x, y in loader:
        inputs, targets = _task_inputs(tasks, x, y, offset=seen)
        seen += len(x)
        with _autocast(device, dtype):
            outs = model.forward_tasks(inputs)
        for i, (t, out, target) in enumerate(zip(tasks, outs, targets)):
            if t == "edges":
                err = (out.float() - edge_map(x, tuple(out.shape[-2:]))).abs().mean((1, 2, 3))
                sums[i] += err.sum()
            else:
                sums[i] += (out.argmax(1) == target).sum()
    n = len(loader.x)
    return {("edges_mae" if t == "edges" else f"{t}_acc"): s / n * (1 if t == "edges" else 100)
            for t, s in zip(tasks, sums.tolist())}


def relative_gain(scores: Mapping[str, Sequence[Mapping[str, float]]],
                  reference: str = "independent") -> dict[str, list[float]]:
    r"""$\Delta$ of each method's runs against ``reference``: the mean relative change over the
    tasks, each seed against the same seed's reference run, in %, higher is better
    (``*_mae`` errors count with a minus sign):
    $$\Delta = \frac1T \sum_t s_t\,\frac{M_t - M_t^{\mathrm{ref}}}{M_t^{\mathrm{ref}}} \cdot 100\,\%,
    \quad s_t = +1 \text{ for accuracies}, -1 \text{ for errors}.$$
    ``scores`` maps a method to one ``{metric: value}`` per seed (as :func:`evaluate_tasks` returns)."""
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not among the methods {sorted(scores)}")
    ref_runs = scores[reference]
    out = {}
    for method, runs in scores.items():
        if len(runs) != len(ref_runs):
            raise ValueError(f"{method} has {len(runs)} runs, {reference} has {len(ref_runs)}: pair them by seed")
        out[method] = [100 * sum((run[m] - ref[m]) / ref[m] * (-1 if m.endswith("mae") else 1) for m in ref) / len(ref)
                       for run, ref in zip(runs, ref_runs)]
    return out


def results_markdown(scores: Mapping[str, Sequence[Mapping[str, float]]], parameters: Mapping[str, int],
                     reference: str = "independent", digits: int = 2) -> str:
    """A Markdown table, one row per method: deployed parameters, each task's score (mean ±
    std over seeds) and :func:`relative_gain` $\\Delta$ against ``reference``."""
    deltas = relative_gain(scores, reference)
    metrics = list(scores[reference][0])
    names = {"class_acc": "class acc. (%) ↑", "rotation_acc": "rotation acc. (%) ↑", "edges_mae": "edge MAE ↓"}
    lines = ["| method | parameters | " + " | ".join(names.get(m, m) for m in metrics) + f" | Δ vs {reference} (%) ↑ |",
             "|---|---:|" + "---|" * (len(metrics) + 1)]
    for method, runs in scores.items():
        cells = [format_mean_std([r[m] for r in runs], 3 if m.endswith("mae") else digits) for m in metrics]
        lines.append(f"| {method} | {parameters[method]:,} | " + " | ".join(cells)
                     + f" | {format_mean_std(deltas[method], digits)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

_CORNERS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)


def plot_relaxed_samples(logits: torch.Tensor, taus: Sequence[float] = (0.1, 0.5, 1.0, 5.0),
                         num_samples: int = 300, seed: int = 0, labels: Sequence[str] = ("1", "2", "3")):
    r"""Gumbel-softmax samples of a 3-category distribution on the probability simplex, one
    triangle per temperature: near the corners (one-hot) for small $\tau$, near the centre for
    large $\tau$. The cross marks $\pi$, where the mean of the *discrete* samples lies.
    Seeded locally: the global random state is left as it was."""
    logits = torch.as_tensor(logits, dtype=torch.float64).flatten()
    if len(logits) != 3:
        raise ValueError(f"logits must have exactly 3 entries (a triangle), got {len(logits)}")
    for t in taus:
        _check_tau(t)
    if len(labels) != 3:
        raise ValueError(f"labels must name the 3 categories, got {labels!r}")
    pi = torch.softmax(logits, -1)
    fig, axes = plt.subplots(1, len(taus), figsize=(2.2 * len(taus) + 0.3, 2.5), squeeze=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for ax, tau in zip(axes[0], taus):
            y = gumbel_softmax(logits.expand(num_samples, 3), tau)
            xy = y @ _CORNERS
            ax.fill(*_CORNERS.T.numpy(), facecolor="0.95", edgecolor="0.4", lw=1)
            ax.scatter(*xy.T.numpy(), s=5, alpha=0.45, color="C0", label="relaxed samples")
            ax.plot(*(pi @ _CORNERS).numpy(), "x", color="C3", ms=9, mew=2, label=r"$\pi$")
            for (cx, cy), name in zip(_CORNERS.tolist(), labels):
                ax.annotate(name, (cx, cy), textcoords="offset points", ha="center",
                            xytext=(0, 4 if cy > 0 else -12), fontsize=9)
            ax.set_title(rf"$\tau$ = {tau:g}")
            ax.set_xlabel("simplex (corner = one-hot)")
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(-0.1, 1.1)
            ax.set_ylim(-0.15, 1.0)
    axes[0][-1].legend(fontsize=7, loc="upper right", framealpha=0.9)
    fig.suptitle(rf"Gumbel-softmax samples, $\pi$ = ({', '.join(f'{p:.2f}' for p in pi.tolist())})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_policy(values: torch.Tensor, tasks: Sequence[str], title: str = "Policy: which task runs which block",
                ax=None, colorbar: bool = True):
    """A blocks-by-tasks grid: rows are blocks (input at the top), columns are tasks; colour and
    number give $P(\\text{select})$ (or 1/0 for a fixed policy, drawn as ✓ and ·). Draws into
    ``ax`` when given one; ``colorbar=False`` leaves the colour scale out (0 white, 1 dark blue)."""
    values = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if values.ndim != 2 or values.shape[0] != len(tasks):
        raise ValueError(f"values must be [tasks, blocks] with {len(tasks)} tasks, got {tuple(values.shape)}")
    if (values < 0).any() or (values > 1).any():
        raise ValueError("values must be probabilities or a 0/1 policy, in [0, 1]")
    binary = bool(((values == 0) | (values == 1)).all())
    k, n = values.shape
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(1.2 * k + 2.0, 0.42 * n + 1.4))
    im = ax.imshow(values.T.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for j in range(k):
        for i in range(n):
            v = values[j, i].item()
            text = ("✓" if v else "·") if binary else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if v > 0.6 else "black")
    ax.set_xticks(range(k), list(tasks))
    ax.set_yticks(range(n), [str(i + 1) for i in range(n)])
    ax.set_xlabel("task")
    ax.set_ylabel("residual block (1 = nearest the input)")
    ax.set_title(title, fontsize=10)
    if colorbar:
        fig.colorbar(im, ax=ax, label="P(select)" if not binary else "selected", fraction=0.08)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Self-checks for the exercises. Each prints a tick when the answer is right, says "not
# attempted yet" while the exercise raises NotImplementedError, and raises an AssertionError
# with a hint that names the classic mistake when it is wrong.
# ---------------------------------------------------------------------------------------------


def _frequencies(samples: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(samples.flatten().long(), minlength=k).double() / samples.numel()


def check_gumbel_max(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Exercise 1: ``fn(logits, n)`` must return ``n`` category indices distributed as
    ``softmax(logits)``, by the Gumbel-max trick (uniform noise only: ``torch.rand``)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    if not attempted(fn, logits, 2):
        return
    n = 40_000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        got = fn(logits, n)
        if not isinstance(got, torch.Tensor) or got.shape != (n,) or got.is_floating_point():
            raise AssertionError(f"expected {n} integer indices (shape [{n}]), got {type(got).__name__} "
                                 f"{tuple(getattr(got, 'shape', ()))}: take the argmax over the last dimension")
        if got.min() < 0 or got.max() >= len(logits):
            raise AssertionError("indices out of range: argmax over the categories (the last dimension)")
        freq = _frequencies(got, len(logits))
        pi = torch.softmax(logits, -1)
        if chi_square_test(freq * n, pi)["p_value"] > 1e-4:
            print("✓ Gumbel-max sampler: its frequencies match softmax(logits) (χ² test)")
            return
        u = torch.rand(n, len(logits), dtype=torch.float64).clamp_min(1e-300)
        mistakes = {
            "the noise must be -log(-log u) (Gumbel); -log u is exponential noise":
                (logits - u.log()).argmax(-1),
            "add the noise to the logits (log-probabilities), not to the probabilities":
                (pi - (-u.log()).log()).argmax(-1),
            "take the argmax, not the argmin": (logits - (-u.log()).log()).argmin(-1),
        }
    distance = {hint: (freq - _frequencies(s, len(logits))).abs().sum().item() for hint, s in mistakes.items()}
    hint = min(distance, key=distance.get)
    if distance[hint] < 0.03:
        raise AssertionError(f"the frequencies are not softmax(logits): {hint}")
    raise AssertionError(f"the frequencies {[round(v, 3) for v in freq.tolist()]} are not softmax(logits) = "
                         f"{[round(v, 3) for v in pi.tolist()]}: argmax(logits + g) with g = -log(-log u)")


def check_straight_through(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 2: ``fn(y_soft)`` must return the one-hot vector of each row's argmax in the
    forward pass and pass the gradient to ``y_soft`` unchanged (the identity) in the backward."""
    g = torch.Generator().manual_seed(0)
    y = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    if not attempted(fn, y.detach().clone()):
        return
    out = fn(y)
    want = F.one_hot(y.argmax(-1), 4).double()
    if not isinstance(out, torch.Tensor) or out.shape != y.shape:
        raise AssertionError(f"expected a tensor of shape {tuple(y.shape)}, got {type(out).__name__} "
                             f"{tuple(getattr(out, 'shape', ()))}")
    if torch.allclose(out.detach().double(), y.detach() + want, atol=1e-9):
        raise AssertionError("the forward value is hard + soft: subtract the detached soft sample, h - y.detach() + y")
    if not torch.allclose(out.detach().double(), want, atol=1e-9):
        raise AssertionError("the forward value must be the one-hot argmax of each row (exactly 0 and 1)")
    if not out.requires_grad:
        raise AssertionError("no gradient reaches y_soft: a plain one-hot is constant; add y - y.detach()")
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * w).sum(), y)
    if not torch.allclose(grad, w, atol=1e-9):
        raise AssertionError("the gradient w.r.t. y_soft must be the identity (straight through): "
                             "detach the hard part and the *subtracted* soft part, not the added one")
    print("✓ straight-through: one-hot forward, identity gradient")


def check_sharing_loss(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 3: ``fn(alpha)`` must return the paper's sharing loss for select probabilities
    ``alpha`` ``[tasks, blocks]``: $\\sum_{k_1<k_2}\\sum_l \\frac{L-l}{L}|\\alpha_{l,k_1}-\\alpha_{l,k_2}|$,
    blocks numbered $l = 0, \\dots, L-1$ from the input."""
    g = torch.Generator().manual_seed(1)
    cases = [torch.rand(k, n, generator=g, dtype=torch.float64) for k, n in ((2, 3), (3, 6), (4, 5))]
    if not attempted(fn, cases[0]):
        return
    for alpha in cases:
        k, n = alpha.shape
        logits = torch.stack([alpha.log(), (1 - alpha).log()], -1)
        want = sharing_loss(logits)
        got = fn(alpha)
        if not isinstance(got, torch.Tensor) or got.ndim != 0:
            raise AssertionError("expected a scalar tensor (sum over pairs of tasks and over blocks)")
        got = got.double()
        pos = torch.arange(n, dtype=torch.float64)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        reversed_w = sum((((pos + 1) / n) * (alpha[i] - alpha[j]).abs()).sum() for i, j in pairs)
        if torch.isclose(got, reversed_w) and not torch.isclose(got, want):
            raise AssertionError("those are the released code's weights (l + 1)/L, which favour sharing the *late* "
                                 "blocks; the paper weights (L - l)/L so that early blocks are shared")
        if torch.isclose(got, 2 * want):
            raise AssertionError("each pair counted twice: sum over k1 < k2 only")
        ones_w = sum((alpha[i] - alpha[j]).abs().sum() for i, j in pairs)
        if torch.isclose(got, ones_w) and not torch.isclose(got, want):
            raise AssertionError("no depth weights: multiply block l's term by (L - l)/L")
        if not torch.isclose(got, want, atol=1e-9):
            raise AssertionError(f"value {got.item():.6g} != {want.item():.6g} for {k} tasks and {n} blocks: check the "
                                 "weights (L - l)/L with l from 0 and the absolute differences of alpha")
    print("✓ sharing loss: the paper's form")
