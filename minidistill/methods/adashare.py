r"""Chapter 4 -- AdaShare (Sun, Panda, Feris & Saenko, NeurIPS 2020): each task learns which residual
blocks of a shared network to run, through Gumbel-softmax samples (:mod:`~minidistill.methods.gumbel`).

The network :class:`AdaShareNet` with its policy logits ``[tasks, blocks, 2]`` (column 0 = select,
1 = skip); the regularisers :func:`sparsity_loss` and :func:`sharing_loss` as the paper writes them
(``form="paper"``, the default) or as the released code computes them (``form="code"``); three
tasks made from any image batch (:data:`TASKS`) and their objective :class:`MultiTaskLoss`;
:func:`learn_policy` (alternating short :func:`~minidistill.train.fit` passes), :func:`train_adashare`
and :func:`train_baseline` (on :func:`~minidistill.train.train_model`); :func:`evaluate_tasks` and
:func:`results_markdown`. The sampler, the figures (``adashare_plots.py``) and the exercises'
self-checks (``minidistill/exercises/adashare.py``) live in their own modules, re-exported here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..exercises.adashare import check_gumbel_max, check_sharing_loss, check_straight_through
from ..losses import Objective, upcast
from ..models import BasicBlock
from ..runtime import get_device, show_progress
from ..train import History, Recipe, Run, fit, train_model
from .adashare_plots import plot_estimator_budget, plot_estimator_race, plot_policy, plot_relaxed_samples
from .adashare_tasks import (TASKS, _check_tasks, _task_inputs, edge_map, evaluate_tasks, relative_gain,
                             results_markdown, rotate_batch)
from .gumbel import (ESTIMATORS, chi_square_test, check_tau, estimator_race, exact_gradient, gradient_samples,
                     gradient_statistics, gumbel_max, gumbel_noise, gumbel_softmax, kolmogorov_q, ks_two_sample,
                     mse_at_budget)

__all__ = [
    # the network, its policy and the regularisers
    "TASKS", "AdaShareNet", "IndependentNets", "select_probabilities", "sparsity_loss", "sharing_loss",
    "curriculum_schedule", "sample_policy", "random_policy", "policy_entropy", "deployed_parameters",
    # tasks, objective, training, evaluation
    "rotate_batch", "edge_map", "MultiTaskLoss", "learn_policy", "AdaShareRun", "train_adashare",
    "train_baseline", "evaluate_tasks", "relative_gain", "results_markdown",
    # re-exported from methods/adashare_tasks.py, methods/gumbel.py, methods/adashare_plots.py and exercises/adashare.py
    "gumbel_noise", "gumbel_max", "gumbel_softmax", "chi_square_test", "ks_two_sample", "kolmogorov_q",
    "ESTIMATORS", "exact_gradient", "gradient_samples", "gradient_statistics", "mse_at_budget", "estimator_race",
    "plot_relaxed_samples", "plot_policy",
    "plot_estimator_race", "plot_estimator_budget",
    "check_gumbel_max", "check_straight_through", "check_sharing_loss",
]


GATINGS = ("all", "policy", "gumbel", "stochastic_depth")


def _head(task: str, channels: int, num_classes: int) -> nn.Module:
    if task == "edges":  # dense: one value per position of the last feature map
        return nn.Conv2d(channels, 1, 1)
    out = num_classes if task == "class" else 4
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out))


class AdaShareNet(nn.Module):
    r"""A CIFAR ResNet shared by several tasks, each with its own head and its own policy.

    ``widths = (stem, stage 1, ...)``, ``blocks_per_stage`` :class:`~minidistill.models.BasicBlock`
    per stage: $L$ = ``blocks_per_stage * (len(widths) - 1)`` blocks. For task $m$, block $l$ computes

    $$x_{l+1} = d_{l,m}\,\mathrm{ReLU}\big(P_l(x_l) + F_l(x_l)\big) + (1 - d_{l,m})\,P_l(x_l),$$

    with $P_l$ the block's shortcut (the identity, or a 1x1 convolution where the shape changes, as in
    the released code) and $d_{l,m} \in [0, 1]$ the weight of "select". $d$ comes from the *gating*:

    - ``'all'``: $d = 1$ everywhere (hard parameter sharing; AdaShare's warm-up);
    - ``'policy'``: a fixed binary policy ``[tasks, blocks]`` (:meth:`fix_policy`);
    - ``'gumbel'``: in training, soft Gumbel-softmax samples of ``policy_logits`` at
      temperature ``tau`` for the last ``num_learnable`` blocks, the earlier ones forced to
      "select" (the curriculum); in eval mode, the most likely policy;
    - ``'stochastic_depth'``: in training, Bernoulli samples, survival falling linearly from 1 to
      ``p_last`` over the blocks (Huang et al. 2016); in eval mode, $d$ = that probability.

    ``policy_logits`` ``[tasks, blocks, 2]`` (column 0 = select, 1 = skip) start equal, so
    $P(\text{select}) = 1/2$, as in the released code. ``model(x)`` is the first task's output;
    :meth:`forward_tasks` runs all tasks, each on its own input, in one batched pass.
    """

    def __init__(self, tasks: Sequence[str] = TASKS, num_classes: int = 10,
                 widths: Sequence[int] = (16, 16, 32, 64), blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in (*widths, blocks_per_stage)):
            raise ValueError(f"widths must be (stem, stage 1, ...) positive ints, at least two, and blocks_per_stage "
                             f"an int >= 1, got {widths!r} and {blocks_per_stage!r}")
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
        check_tau(tau)
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
        """The select weights $d$ ``[tasks, blocks]`` for the next forward pass (sampled anew
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
        """Every task's output, task $m$ on ``inputs[m]`` (or all on one tensor), in one pass
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
    """One :class:`AdaShareNet` per task, sharing nothing: the baseline with the most parameters. The sum of
    the task losses trains it (for disjoint parameters, the same as training each network on its own task)."""

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
    r"""$\pi_{l,m} = \mathrm{softmax}(a_{l,m})_0$, the probability that task $m$ selects
    block $l$ (the paper's $\alpha_{l,k}$): ``[tasks, blocks, 2]`` logits in, ``[tasks, blocks]`` out."""
    if not isinstance(policy_logits, torch.Tensor) or policy_logits.ndim != 3 or policy_logits.shape[-1] != 2:
        raise ValueError("policy_logits must be [tasks, blocks, 2] (select, skip), got "
                         f"{tuple(getattr(policy_logits, 'shape', ()))}")
    return torch.softmax(upcast(policy_logits), -1)[..., 0]


FORMS = ("paper", "code")


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be 'paper' (the paper's) or 'code' (the released code's), got {form!r}")


def sparsity_loss(policy_logits: torch.Tensor, num_learnable: int | None = None, form: str = "paper") -> torch.Tensor:
    r"""The sparsity regulariser over the last ``num_learnable`` blocks (default: all), the
    ones whose policy is being learned:

    - ``form='paper'``: $\mathcal L_{sp} = \sum_m \sum_l \log \pi_{l,m}$, which pushes
      every $\pi$ towards "skip" and is unbounded below ($\to -\infty$ as any $\pi \to 0$);
    - ``form='code'``: the released code's cross-entropy towards the skip class, averaged over
      the $L_p$ blocks and summed over tasks, $\sum_m \frac1{L_p} \sum_l -\log(1 - \pi_{l,m}) \ge 0$.
    """
    _check_form(form)
    shape = select_probabilities(policy_logits).shape
    n = shape[1] if num_learnable is None else num_learnable
    if not isinstance(n, int) or not 1 <= n <= shape[1]:
        raise ValueError(f"num_learnable must be an int in [1, {shape[1]}], got {num_learnable!r}")
    log_p = torch.log_softmax(policy_logits[:, -n:], -1)  # log pi (column 0), log(1 - pi) (column 1)
    if form == "paper":
        return log_p[..., 0].sum()
    return -log_p[..., 1].mean(-1).sum()


def sharing_loss(policy_logits: torch.Tensor, form: str = "paper") -> torch.Tensor:
    r"""The sharing regulariser, summed over pairs of tasks $m_1 < m_2$ and over blocks
    $l = 0, \dots, L-1$ (numbered from the input):

    - ``form='paper'``: $\sum_{m_1<m_2} \sum_l \frac{L - l}{L}\,|\pi_{l,m_1} - \pi_{l,m_2}|$,
      weights $1, \frac{L-1}{L}, \dots, \frac1L$: disagreeing on *early* blocks costs most, so
      tasks share the low layers;
    - ``form='code'``: the released code's $\sum_{m_1<m_2} \sum_l \frac{l + 1}{L}\,|a_{l,m_1} - a_{l,m_2}|$
      on the raw select logits $a$ (not probabilities), weights increasing with depth.
    """
    _check_form(form)
    pi = select_probabilities(policy_logits)
    k, n = pi.shape
    pos = torch.arange(n, device=pi.device, dtype=pi.dtype)
    if form == "paper":
        values, weights = pi, (n - pos) / n
    else:
        values, weights = policy_logits[..., 0], (pos + 1) / n
    i, j = torch.triu_indices(k, k, offset=1, device=pi.device)
    return (weights * (values[i] - values[j]).abs()).sum()


def curriculum_schedule(rounds: int, num_blocks: int, curriculum_speed: int = 3) -> list[int]:
    r"""How many of the last blocks have a learnable policy in each policy round, rounds counted
    from 1: round $p$ learns the last $L_p = \min(L, \lceil p / c \rceil)$ blocks (one more block
    every $c$ rounds, from the top; the released code's ``p_epoch // c + 1`` with ``p_epoch`` from 0).
    Returns ``[L_1, ..., L_rounds]``."""
    for name, v in (("rounds", rounds), ("num_blocks", num_blocks), ("curriculum_speed", curriculum_speed)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return [min(num_blocks, p // curriculum_speed + 1) for p in range(rounds)]


def sample_policy(policy_logits: torch.Tensor, generator: torch.Generator | None = None,
                  greedy: bool = False, num_learnable: int | None = None) -> torch.Tensor:
    """A fixed binary policy ``[tasks, blocks]``: each of the last ``num_learnable`` blocks (default:
    all) selected with probability $\\pi_{l,m}$ (as the paper samples its architectures), or where
    $\\pi > 1/2$ when ``greedy``; the earlier blocks, which never entered the curriculum, selected."""
    pi = select_probabilities(policy_logits.detach()).cpu().double()
    n = pi.shape[1] if num_learnable is None else num_learnable
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= pi.shape[1]:
        raise ValueError(f"num_learnable must be an int in [0, {pi.shape[1]}], got {num_learnable!r}")
    drawn = pi > 0.5 if greedy else torch.rand(pi.shape, generator=generator, dtype=torch.float64) < pi
    drawn[:, : pi.shape[1] - n] = True
    return drawn.float()


def random_policy(num_tasks: int, num_blocks: int, num_selected: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A random binary policy ``[tasks, blocks]`` with exactly ``num_selected`` (task, block) pairs
    selected, chosen uniformly among all such policies."""
    if num_tasks < 1 or num_blocks < 1 or isinstance(num_selected, bool) or not isinstance(num_selected, int) \
            or not 0 <= num_selected <= num_tasks * num_blocks:
        raise ValueError(f"need num_tasks, num_blocks >= 1 and num_selected an int in [0, tasks * blocks], got "
                         f"{num_tasks}, {num_blocks}, {num_selected!r}")
    policy = torch.zeros(num_tasks * num_blocks)
    policy[torch.randperm(num_tasks * num_blocks, generator=generator)[:num_selected]] = 1.0
    return policy.view(num_tasks, num_blocks)


def policy_entropy(probabilities: torch.Tensor) -> float:
    r"""The mean binary entropy of select probabilities $\pi$, in bits: $-\frac{1}{ML}\sum_{l,m}
    [\pi\log_2\pi + (1-\pi)\log_2(1-\pi)]$; 1 for an undecided policy ($\pi = 1/2$), 0 for a decided one."""
    pi = torch.as_tensor(probabilities, dtype=torch.float64)
    if pi.numel() == 0 or (pi < 0).any() or (pi > 1).any():
        raise ValueError("probabilities must be a non-empty tensor of values in [0, 1]")
    return (-(torch.special.xlogy(pi, pi) + torch.special.xlogy(1 - pi, 1 - pi)) / math.log(2)).mean().item()


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


# -- the objective, training ------------------------------------------------------------------------

class MultiTaskLoss(Objective):
    r"""The multi-task objective for :func:`~minidistill.train.fit`: make each task's input and
    target from the batch ``(x, y)``, run ``model.forward_tasks``, and return the class logits and
    $\sum_m \lambda_m \mathcal L_m + \lambda_{sp}\,\mathcal L_{sparsity} + \lambda_{sh}\,\mathcal L_{sharing}$:
    cross-entropy for ``class`` and ``rotation``, L1 for ``edges`` (the released code's loss for
    depth); the regularisers (in ``form``, :func:`sparsity_loss` over the blocks the curriculum
    currently learns) only when their weights are > 0, as in :func:`learn_policy`'s policy pass.
    Terms (History columns ``train_<term>``): ``<task>_loss`` per task, and ``sparsity`` and
    ``sharing`` where the regularisers apply.
    """

    def __init__(self, tasks: Sequence[str] = TASKS, weights: Sequence[float] | None = None, *,
                 sparsity_weight: float = 0.0, sharing_weight: float = 0.0, form: str = "paper") -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        if "class" not in self.tasks:
            raise ValueError(f"tasks must include 'class' (fit reports its accuracy), got {self.tasks!r}")
        weights = tuple(float(w) for w in (weights if weights is not None else [1.0] * len(self.tasks)))
        if len(weights) != len(self.tasks) or any(not w >= 0 for w in weights):
            raise ValueError(f"weights must be {len(self.tasks)} non-negative numbers (one per task), got {weights!r}")
        for name, w in (("sparsity_weight", sparsity_weight), ("sharing_weight", sharing_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        _check_form(form)
        self.weights, self.form, self.sparsity_weight, self.sharing_weight = weights, form, sparsity_weight, sharing_weight

    def task_losses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """``([loss per task], outputs)``."""
        if getattr(model, "tasks", None) != self.tasks:
            raise ValueError(f"the model's tasks {getattr(model, 'tasks', None)} differ from the objective's {self.tasks}")
        inputs, targets = _task_inputs(self.tasks, x, y)
        outs = model.forward_tasks(inputs)
        losses = [F.l1_loss(out.float(), edge_map(x, tuple(out.shape[-2:]))) if t == "edges"
                  else F.cross_entropy(out.float(), target) for t, out, target in zip(self.tasks, outs, targets)]
        return losses, outs

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        losses, outs = self.task_losses(model, x, y)
        total = sum(w * loss for w, loss in zip(self.weights, losses))
        terms = {f"{t}_loss": loss.detach() for t, loss in zip(self.tasks, losses)}
        if self.sparsity_weight > 0 or self.sharing_weight > 0:
            if not isinstance(model, AdaShareNet):
                raise ValueError(f"the sparsity and sharing losses need an AdaShareNet's policy, got {type(model).__name__}")
            learned = model.num_learnable if model.gating == "gumbel" else None  # the curriculum's blocks
            sp, sh = sparsity_loss(model.policy_logits, learned, self.form), sharing_loss(model.policy_logits, self.form)
            total = total + self.sparsity_weight * sp + self.sharing_weight * sh
            terms.update(sparsity=sp.detach(), sharing=sh.detach())
        return total, outs[self.tasks.index("class")], terms


def learn_policy(model: AdaShareNet, data: Dataset, objective: MultiTaskLoss, *, rounds: int, batch_size: int = 512,
                 lr: float = 0.05, weight_decay: float = 5e-4, policy_lr: float = 0.01, tau0: float = 5.0,
                 tau_decay: float = 0.965, curriculum_speed: int = 3, sparsity_weight: float = 0.05,
                 sharing_weight: float = 0.05, form: str = "paper", seed: int = 0,
                 device: str | torch.device | None = None, amp: bool | str = "auto",
                 progress: bool | None = None) -> History:
    r"""AdaShare's policy-learning phase, after a hard-sharing warm-up.

    The training split is cut into two halves. Round $p$ is two one-epoch :func:`~minidistill.train.fit`
    calls with soft Gumbel-softmax gates at temperature $\tau_p$ (the released code's
    ``hard_sampling: False``): over the first half, the network weights learn ``objective``'s
    $\sum_m \lambda_m \mathcal L_m$ (SGD with momentum, constant ``lr``; the policy logits frozen);
    over the second half, the policy logits learn
    $\sum_m \lambda_m \mathcal L_m + \lambda_{sp}\mathcal L_{sp} + \lambda_{sh}\mathcal L_{sh}$ (Adam,
    ``policy_lr``; the weights frozen). Frozen means ``requires_grad_(False)``: ``fit`` optimises only
    parameters that require grad. Rounds are counted from 1: in round $p$ only the last
    $L_p$ = :func:`curriculum_schedule` blocks follow the policy, at $\tau_p =$ ``tau0`` $\cdot$
    ``tau_decay``$^{p-1}$. The model is left in the last round's gating, so blocks that never
    entered the curriculum stay forced to "select". Defaults are the
    released code's NYU-v2 2-task values where it has them (Adam lr 0.01, $\tau_0 = 5$, decay 0.965,
    $c = 3$, $\lambda_{sp} = \lambda_{sh} = 0.05$).

    Unlike the released code, which alternates the two updates with one optimiser per side for the
    whole phase, every pass here is a fresh ``fit`` with a fresh optimiser: SGD's momentum and Adam's
    moment estimates restart every round (Adam's first steps move each logit by about ``policy_lr``),
    the weights' learning rate is constant, and the temperature changes once per round.

    Returns a :class:`~minidistill.train.History`, one record per round: ``epoch`` (the round), ``tau``,
    ``num_learnable``, the policy pass's ``train_*`` columns (``train_class_loss``, ...,
    ``train_sparsity``, ``train_sharing``), the weight pass's as ``weights_train_*``, ``seconds``;
    ``meta['probabilities']``: the select probabilities ``[tasks, blocks]`` after each round.
    """
    if not isinstance(model, AdaShareNet):
        raise ValueError(f"model must be an AdaShareNet, got {type(model).__name__}")
    if not isinstance(rounds, int) or rounds < 1 or not 0 < tau_decay <= 1:
        raise ValueError(f"rounds must be an int >= 1 and tau_decay in (0, 1], got {rounds!r} and {tau_decay!r}")
    check_tau(tau0)
    regularised = MultiTaskLoss(objective.tasks, objective.weights, sparsity_weight=sparsity_weight,
                                sharing_weight=sharing_weight, form=form)
    schedule = curriculum_schedule(rounds, model.num_blocks, curriculum_speed)
    device = get_device(device)
    perm = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    halves = [dataclasses.replace(data, name=f"{data.name} (half {i + 1})", x_train=data.x_train[idx].to(device),
                                  y_train=data.y_train[idx].to(device))  # on the device once, not once per pass
              for i, idx in enumerate(perm.tensor_split(2))]
    if not 1 <= batch_size <= len(halves[0].x_train):
        raise ValueError(f"batch_size must be in [1, {len(halves[0].x_train)}] (half the training set), got {batch_size!r}")
    phases = [  # (objective, recipe): 0 = the weights' pass, 1 = the policy's pass
        (MultiTaskLoss(objective.tasks, objective.weights),
         Recipe(epochs=1, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule="constant")),
        (regularised, Recipe(epochs=1, batch_size=batch_size, lr=policy_lr, weight_decay=5e-4, schedule="constant",
                             optimizer="adam"))]
    history = History(meta=dict(form=form, rounds=rounds, tau0=tau0, tau_decay=tau_decay, curriculum_speed=curriculum_speed,
                                sparsity_weight=sparsity_weight, sharing_weight=sharing_weight, probabilities=[]))
    bar, tau, elapsed = None, float(tau0), 0.0
    if show_progress() if progress is None else progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds, desc="AdaShare policy", unit="round")
    try:  # however the rounds end, the bar is closed and every parameter is trainable again
        for p, n_learn in enumerate(schedule):
            model.use_gumbel(tau, n_learn)
            passes = []
            for phase, (obj, recipe) in enumerate(phases):
                model.requires_grad_(phase == 0)  # fit optimises only the parameters that require grad
                model.policy_logits.requires_grad_(phase == 1)
                passes.append(fit(model, halves[phase], obj, recipe, seed=seed * 10_000 + 2 * p + phase, device=device,
                                  amp=amp, progress=False, eval_splits=()).records[-1])
            elapsed += passes[0]["seconds"] + passes[1]["seconds"]
            record = {"epoch": p + 1, "tau": tau, "num_learnable": n_learn,
                      **{k: v for k, v in passes[1].items() if k.startswith("train_")},
                      **{f"weights_{k}": v for k, v in passes[0].items() if k.startswith("train_")}, "seconds": elapsed}
            history.records.append(record)
            history.meta["probabilities"].append(select_probabilities(model.policy_logits.detach()).cpu())
            tau *= tau_decay
            if bar is not None:
                bar.set_postfix(tau=f"{tau:.2f}", blocks=n_learn, loss=f"{record['train_loss']:.3g}")
                bar.update(1)
    finally:
        model.requires_grad_(True)
        if bar is not None:
            bar.close()
    model.use_gumbel(tau, schedule[-1])  # the curriculum as it ended: earlier blocks stay selected
    return history


@dataclass
class AdaShareRun:
    """What :func:`train_adashare` returns: the re-trained ``model`` (fixed ``policy``), the ``probabilities``
    it was sampled from, the ``greedy`` policy ($\\pi > 1/2$; reported, not trained), the number of blocks
    the curriculum reached (``num_learnable``; the others are selected), the three phases' histories, and
    the weights after the warm-up (``warm_state``)."""

    model: AdaShareNet
    policy: torch.Tensor
    probabilities: torch.Tensor
    greedy: torch.Tensor
    num_learnable: int
    warmup: History
    policy_history: History
    history: History
    warm_state: dict


def train_adashare(data: Dataset, recipe: Recipe, *, tasks: Sequence[str] = TASKS,
                   task_weights: Sequence[float] | None = None, warmup_epochs: int = 2, rounds: int = 6,
                   greedy: bool = False, seed: int = 0, model_kwargs: Mapping | None = None,
                   policy_kwargs: Mapping | None = None, **fit_kwargs) -> AdaShareRun:
    """AdaShare end to end, from seed ``seed``:

    1. warm-up: ``warmup_epochs`` of hard sharing (:func:`~minidistill.train.train_model` with
       ``recipe``'s optimiser and batch size; scored once, at the end: ``eval_every=None``);
    2. :func:`learn_policy` for ``rounds`` rounds (``policy_kwargs`` pass through);
    3. sample a fixed policy from the learned probabilities (:func:`sample_policy`; the most likely
       one if ``greedy``), blocks outside the curriculum selected;
    4. re-train a network with that policy for ``recipe.epochs`` (``train_model``, same seed),
       **from the same initial weights** (the released code's ``retrain_from_pl: False``).
    ``fit_kwargs`` go to both ``train_model`` runs; ``amp`` and ``progress`` also to :func:`learn_policy`.
    """
    model_kwargs, policy_kwargs = dict(model_kwargs or {}), dict(policy_kwargs or {})
    policy_kwargs.setdefault("batch_size", recipe.batch_size)
    objective, initial = MultiTaskLoss(tasks, task_weights), {}

    def build() -> AdaShareNet:  # the first call keeps its initial weights, later calls start from them
        net = AdaShareNet(tasks, data.num_classes, **model_kwargs)
        if initial:
            net.load_state_dict(initial)
        initial.update({k: v.detach().clone() for k, v in net.state_dict().items()})
        return net

    model, warm = train_model(lambda: build().share_all(), data, recipe.replace(epochs=warmup_epochs), objective,
                              seed=seed, description=f"AdaShare warm-up (seed {seed})",
                              **{**fit_kwargs, "eval_every": None})
    warm_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    policy_history = learn_policy(model, data, objective, rounds=rounds, seed=seed, device=next(model.parameters()).device,
                                  amp=fit_kwargs.get("amp", "auto"), progress=fit_kwargs.get("progress"), **policy_kwargs)
    probabilities = select_probabilities(model.policy_logits.detach()).cpu()
    learned = model.num_learnable  # the blocks the curriculum reached
    most_likely = sample_policy(model.policy_logits, greedy=True, num_learnable=learned)
    policy = most_likely if greedy else sample_policy(model.policy_logits, torch.Generator().manual_seed(seed),
                                                      num_learnable=learned)
    final, history = train_model(lambda: build().fix_policy(policy), data, recipe, objective, seed=seed,
                                 description=f"AdaShare re-train (seed {seed})", **fit_kwargs)
    return AdaShareRun(final, policy, probabilities, most_likely, learned, warm, policy_history, history, warm_state)


BASELINES = ("independent", "hard_sharing", "random", "stochastic_depth")


def train_baseline(kind: str, data: Dataset, recipe: Recipe, *, tasks: Sequence[str] = TASKS,
                   task_weights: Sequence[float] | None = None, seed: int = 0, num_selected: int | None = None,
                   p_last: float = 0.5, model_kwargs: Mapping | None = None, **fit_kwargs) -> Run:
    """Train one multi-task baseline from seed ``seed`` (:func:`~minidistill.train.train_model` with
    :class:`MultiTaskLoss`): ``'independent'`` (:class:`IndependentNets`), ``'hard_sharing'`` (every
    task runs every block), ``'random'`` (a fixed random policy with exactly ``num_selected``
    (task, block) pairs selected, default half of them, drawn from a generator seeded with
    ``10000 + seed``) or ``'stochastic_depth'`` (blocks dropped at random, survival from 1 down to
    ``p_last``). Returns a :class:`~minidistill.train.Run`."""
    if kind not in BASELINES:
        raise ValueError(f"kind must be one of {BASELINES}, got {kind!r}")
    model_kwargs = dict(model_kwargs or {})

    def build() -> nn.Module:
        if kind == "independent":
            return IndependentNets(tasks, data.num_classes, **model_kwargs)
        model = AdaShareNet(tasks, data.num_classes, **model_kwargs)  # gating 'all': hard sharing
        if kind == "random":  # its own random stream: never the draws that sample AdaShare's policy
            pairs = len(model.tasks) * model.num_blocks
            model.fix_policy(random_policy(len(model.tasks), model.num_blocks, pairs // 2 if num_selected is None
                                           else num_selected, torch.Generator().manual_seed(10_000 + seed)))
        return model.use_stochastic_depth(p_last) if kind == "stochastic_depth" else model

    return train_model(build, data, recipe, MultiTaskLoss(tasks, task_weights), seed=seed,
                       description=f"{kind} (seed {seed})", **fit_kwargs)
