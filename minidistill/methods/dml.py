r"""Chapter 7, part 1 -- Zhang, Xiang, Hospedales & Lu (CVPR 2018), "Deep Mutual Learning" (DML).

No pretrained teacher: $M$ networks start from different random weights and train together,
each with its own cross-entropy plus a mimicry term towards its peers' predictions,

$$\mathcal L_m = H\big(q, p^{(m)}\big) + \frac{1}{M-1}\sum_{l \ne m} \mathrm{KL}\big(p^{(l)} \,\|\, p^{(m)}\big),$$

$p^{(m)} = \mathrm{softmax}(z^{(m)})$ (the paper's $T = 1$), every peer $p^{(l)}$ a *target*: detached, it
receives no gradient from $\mathcal L_m$. The official code sums over the peers instead of
averaging (``reduction="sum"``; the two agree for $M = 2$). The paper's symbols for the number of
networks and its index are $K$, $k$; the course keeps $K$ for the number of classes and writes $M$, $m$.

Pieces: :func:`mimicry_loss`, :func:`dml_losses` (all $M$ losses at once) and
:class:`MutualLearning`, the objective that trains the $M$ networks with
:func:`minidistill.train.fit` -- network 1 is ``fit``'s ``model``, the others are the
objective's ``peers`` (trainable submodules, so ``fit`` optimises them too) -- in either update
order: ``"simultaneous"`` (one forward of every network, one backward of the summed losses) or
the paper's ``"alternating"`` one (update network 1, recompute, update network 2, ...).
:func:`train_mutual` builds and trains such a cohort. Chapter 8 (TriKD) reuses this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..losses import Objective, check_temperature, kd_loss, upcast
from ..runtime import seed_everything
from ..train import History, Recipe, build_model, evaluate, fit

__all__ = ["mimicry_loss", "dml_losses", "MutualLearning", "MutualRun", "train_mutual", "REDUCTIONS", "UPDATES"]

#: how the mimicry terms towards several peers are combined: the paper's mean, the official code's sum
REDUCTIONS = ("mean", "sum")
#: the two update orders of :class:`MutualLearning`
UPDATES = ("simultaneous", "alternating")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def mimicry_loss(logits: torch.Tensor, peer_logits: Sequence[torch.Tensor], *, reduction: str = "mean",
                 temperature: float = 1.0, check_inputs: bool = True) -> torch.Tensor:
    r"""Network $m$'s mimicry term: $\frac{1}{M-1}\sum_{l\ne m} T^2\,\mathrm{KL}(p^{(l)}_T\,\|\,p^{(m)}_T)$
    (``reduction="mean"``, the paper) or the plain sum over peers (``"sum"``, the official code),
    each KL a batch mean with the peer as the detached target
    (:func:`~minidistill.losses.kd_loss`). At the paper's $T = 1$ the factor $T^2$ is 1."""
    _check_choice("reduction", reduction, REDUCTIONS)
    check_temperature(temperature)
    if isinstance(peer_logits, torch.Tensor) or len(peer_logits) == 0:
        raise ValueError("peer_logits must be a non-empty list of [N, K] logits, one per peer")
    kls = [kd_loss(logits, p, temperature, check_inputs=check_inputs) for p in peer_logits]
    total = torch.stack(kls).sum()
    return total / len(kls) if reduction == "mean" else total


def dml_losses(logits_list: Sequence[torch.Tensor], targets: torch.Tensor, *, reduction: str = "mean",
               temperature: float = 1.0, check_inputs: bool = True
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    r"""The $M$ DML losses from the $M$ networks' logits on one batch:
    $\mathcal L_m = H(q, p^{(m)}) + \mathrm{mimicry}_m$ (:func:`mimicry_loss`, peers detached).

    Returns ``(losses, ce, kl)``, three lists of $M$ scalars. Because every peer is detached,
    ``sum(losses).backward()`` gives each network exactly the gradient of its own loss: the
    simultaneous update in one backward pass."""
    if isinstance(logits_list, torch.Tensor) or len(logits_list) < 2:
        raise ValueError(f"logits_list must hold the logits of at least 2 networks, got "
                         f"{len(logits_list) if not isinstance(logits_list, torch.Tensor) else 'one tensor'}")
    shape = tuple(logits_list[0].shape)
    for i, z in enumerate(logits_list):
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or tuple(z.shape) != shape:
            raise ValueError(f"every network's logits must be [N, K] of one shape {shape}, network {i + 1} "
                             f"gave {tuple(getattr(z, 'shape', ()))}")
    if targets.ndim != 1 or len(targets) != shape[0] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 class indices [{shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    losses, ces, kls = [], [], []
    for k, z in enumerate(logits_list):
        ce = F.cross_entropy(upcast(z), targets)
        kl = mimicry_loss(z, [p for l, p in enumerate(logits_list) if l != k], reduction=reduction,
                          temperature=temperature, check_inputs=check_inputs and k == 0)
        losses.append(ce + kl)
        ces.append(ce)
        kls.append(kl)
    return losses, ces, kls


class MutualLearning(Objective):
    r"""Deep mutual learning as one objective for :func:`~minidistill.train.fit`:
    ``fit(net1, data, MutualLearning([net2, ...]))`` trains all $M$ networks.

    ``update="simultaneous"``: every step runs all networks on the batch and minimises
    $\sum_m \mathcal L_m$ (peers detached inside each $\mathcal L_m$, so each network gets its
    own gradient); one forward per network per step.

    ``update="alternating"`` (the paper's Algorithm 1): step $s$ updates network
    $m = s \bmod M$ alone, against its peers' predictions recomputed *after* the previous
    network's update (under ``no_grad``). With ``same_batch=True`` (the paper) the $M$ steps of a
    round use the batch of the round's first step -- the batches ``fit`` hands over in between
    are skipped -- so each network gets $1/M$ of the steps: give it $M$ times the epochs for the
    same number of updates per network. ``same_batch=False`` takes each step's fresh batch (the
    official TensorFlow code's order). The held batch is not part of a checkpoint, so that
    variant cannot be resumed (``resumable = False``).

    Terms logged (means over the networks updated in the step): ``ce`` and ``kl``. The logits
    returned are network 1's (``fit``'s training accuracy is network 1's); in the alternating
    order only its own steps return them.
    """

    def __init__(self, peers: Sequence[nn.Module], *, update: str = "simultaneous", reduction: str = "mean",
                 temperature: float = 1.0, same_batch: bool = True) -> None:
        super().__init__()
        if isinstance(peers, nn.Module) and not isinstance(peers, nn.ModuleList):
            peers = [peers]
        if len(peers) < 1 or not all(isinstance(p, nn.Module) for p in peers):
            raise TypeError("peers must be a non-empty list of nn.Modules (the networks besides fit's model)")
        _check_choice("update", update, UPDATES)
        _check_choice("reduction", reduction, REDUCTIONS)
        check_temperature(temperature)
        self.peers = nn.ModuleList(peers)
        self.update, self.reduction, self.temperature, self.same_batch = update, reduction, temperature, same_batch
        self.resumable = not (update == "alternating" and same_batch)
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_networks(self) -> int:
        """$M$: ``fit``'s model plus the peers."""
        return 1 + len(self.peers)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        nets = [model, *self.peers]
        if self.update == "simultaneous":
            logits = [net(x) for net in nets]
            losses, ce, kl = dml_losses(logits, y, reduction=self.reduction, temperature=self.temperature,
                                        check_inputs=self.step == 0)
            m = len(nets)
            return (torch.stack(losses).sum(), logits[0],
                    {"ce": (sum(ce) / m).detach(), "kl": (sum(kl) / m).detach()})
        k = self.step % len(nets)
        if self.same_batch:
            if k == 0 or self._held is None:
                self._held = (x, y)
            x, y = self._held
        with torch.no_grad():   # the peers' current predictions: targets, recomputed every step
            peer_logits = [net(x) for i, net in enumerate(nets) if i != k]
        z = nets[k](x)
        ce = F.cross_entropy(upcast(z), y)
        kl = mimicry_loss(z, peer_logits, reduction=self.reduction, temperature=self.temperature,
                          check_inputs=self.step == 0)
        return ce + kl, (z if k == 0 else None), {"ce": ce.detach(), "kl": kl.detach()}


@dataclass
class MutualRun:
    """What :func:`train_mutual` returns: the $M$ trained networks, network 1's history (with the
    cohort's ``train_ce``/``train_kl``) and every network's final ``test_acc`` (%)."""

    models: list[nn.Module]
    history: History
    test_acc: list[float]


def train_mutual(
    networks: Sequence[str | Callable[[], nn.Module]],
    data: Dataset,
    recipe: Recipe | None = None,
    *,
    seed: int = 0,
    update: str = "simultaneous",
    reduction: str = "mean",
    temperature: float = 1.0,
    objective: Callable[[list[nn.Module]], Objective] | None = None,
    **fit_kwargs: Any,
) -> MutualRun:
    """Build ``networks`` (model names or builders) and train them together with
    :class:`MutualLearning` (or ``objective(peers)``, e.g. IE-DML's) on :func:`~minidistill.train.fit`.

    Network 1 is built right after ``seed_everything(seed)``, exactly like
    :func:`~minidistill.train.train_model`'s model of that seed, so it starts from the same
    weights as the student trained alone with that seed; network $k$ is built from seed
    ``seed + 1000 * (k - 1)``. Other keyword arguments go to ``fit``."""
    if isinstance(networks, str) or len(networks) < 2:
        raise ValueError(f"networks must list at least 2 networks, got {networks!r}")
    nets = []
    for k, spec in enumerate(networks):
        seed_everything(seed + 1000 * k)
        nets.append(build_model(spec, data.num_classes))
    if objective is None:
        obj: Objective = MutualLearning(nets[1:], update=update, reduction=reduction, temperature=temperature)
    else:
        obj = objective(nets[1:])
    fit_kwargs.setdefault("description", f"{'+'.join(type(n).__name__ for n in nets)} ({type(obj).__name__}, seed {seed})")
    history = fit(nets[0], data, obj, recipe, seed=seed, **fit_kwargs)
    accs = [history.final("test_acc")] + [evaluate(net, data)["acc"] for net in nets[1:]]
    for net in nets:
        net.eval()
    return MutualRun(nets, history, accs)
