"""Several GPUs through PyTorch's own engine: ``torchrun`` starts one process per GPU, and the same
:func:`~minidistill.train.fit` call trains with ``DistributedDataParallel``.

    torchrun --nproc_per_node 4 benchmarks/cifar100_table.py --recipe paper

:func:`~minidistill.train.fit` calls :func:`init` itself, so any script that calls ``fit`` runs
on several GPUs when started by ``torchrun`` (a script may call it first, to know its rank early);
without ``torchrun`` (no ``WORLD_SIZE`` in the environment) it does nothing and everything runs in
one process as usual. Under ``torchrun``, ``fit``:

* keeps the uint8 training set on every rank's GPU (150 MB for CIFAR) and gives each rank its
  slice of every *global* batch (``recipe.batch_size`` images, split evenly), so the data order,
  the augmentation and hence the weights do not depend on the number of GPUs (to float
  tolerance), and a checkpoint resumes on any number of them;
* wraps the student and the objective's trainable parts in one ``DistributedDataParallel``, which
  averages their gradients (the frozen teacher is replicated and gets none); on CUDA the
  BatchNorm layers of both become ``SyncBatchNorm`` so that they normalise over the global
  batch as on one GPU (on CPU, with gloo, they cannot: their statistics are then per rank);
* scores each rank's part of the evaluation splits and sums the counts over ranks;
* writes checkpoints and cached teachers on rank 0 only (one machine, or a file system all ranks
  share: the others read what rank 0 wrote).

Objectives whose loss couples the examples of a batch (a batch of triplets, a batch-level
similarity matrix) see only their rank's part of it: such objectives do not reproduce a one-GPU
run exactly.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["init", "close", "is_distributed", "rank", "world_size", "is_main", "local_device", "barrier",
           "all_reduce_sum", "broadcast_object", "broadcast_buffers"]


def _started() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _started() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if _started() else 1


def is_main() -> bool:
    """Rank 0: the process that writes files and prints."""
    return rank() == 0


def local_device() -> torch.device:
    """This process's GPU (``cuda:$LOCAL_RANK``), or the CPU where there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init(backend: str | None = None) -> bool:
    """Start the default process group when launched by ``torchrun`` (``WORLD_SIZE`` set) and pin
    this process to its GPU; return whether it runs distributed. Without ``torchrun`` it does
    nothing and returns False. ``backend``: ``nccl`` on CUDA, ``gloo`` on the CPU by default."""
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if not dist.is_available():
        raise RuntimeError("this torch was built without torch.distributed; run on one process")
    if not _started():
        device = local_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # a long timeout: rank 0 alone downloads data and checks caches while the others wait
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                                timeout=datetime.timedelta(minutes=60))
    return is_distributed()


def close() -> None:
    """End the process group (call it at the end of a script started by ``torchrun``)."""
    if _started():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place, and return it (unchanged in one process)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so that all ranks evaluate and
    save one network."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)
