"""Where and how big: the profile (smoke | course | paper), the device, the CPU thread count and
seeding; plus the two notebook helpers every chapter uses (the banner, and whether an exercise
was attempted).

``MINIDISTILL_PROFILE`` chooses the size of every experiment; ``auto`` (the default) picks
``course`` when a GPU is present and ``smoke`` otherwise. Notebooks read one :class:`Profile`
and pick their sizes from it with :meth:`Profile.pick`.

``MINIDISTILL_THREADS`` chooses how many threads torch computes with on the CPU; it is applied
once per process, when the profile is first read (:func:`cpu_threads` says what is chosen).
"""
from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "PROFILES",
    "Profile",
    "get_profile",
    "get_device",
    "device_name",
    "SMOKE_THREADS",
    "cpu_threads",
    "apply_threads",
    "seed_everything",
    "data_root",
    "show_progress",
    "banner",
    "attempted",
]

PROFILES = ("smoke", "course", "paper")

#: torch threads for a smoke-profile run on the CPU when ``MINIDISTILL_THREADS`` is not set.
#: Measured with ``benchmarks/cpu_threads.py`` on 2-core machines (one resnet8 epoch on 5000
#: shapes images, batch 128, medians): quiet, one thread is about as fast as two (3.2 s, 3.0 s);
#: beside other jobs two threads lose most of their time waiting for each other (4.3 s against
#: 25.9 s, worst 74.7 s; ``benchmarks/results/cpu_threads.json``; README, "CPU threads").
SMOKE_THREADS = 1

_threads_applied = False


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``device`` if given, else CUDA, then MPS, then CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device: str | torch.device | None = None) -> str:
    """A human name for the device, e.g. ``'NVIDIA H100 80GB HBM3'`` or ``'CPU (2 threads)'``."""
    device = get_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return _cpu_name(torch.get_num_threads())


def _cpu_name(threads: int) -> str:
    """``'CPU (1 thread)'``, ``'CPU (2 threads)'``: the name :func:`device_name` gives a CPU."""
    return f"CPU ({threads} thread{'' if threads == 1 else 's'})"


@dataclass(frozen=True)
class Profile:
    """How big the experiments are (``name``) and where they run (``device``)."""

    name: str
    device: torch.device

    @property
    def dataset(self) -> str:
        """The data set the chapters train on in this profile."""
        return "shapes" if self.name == "smoke" else "cifar10"

    def pick(self, **choices: Any) -> Any:
        """Return the value given for this profile: ``profile.pick(smoke=2, course=30)``.

        ``paper`` falls back to ``course`` when no paper value is given.
        """
        unknown = set(choices) - set(PROFILES)
        if unknown:
            raise ValueError(f"pick() got unknown profile(s) {sorted(unknown)}; expected {PROFILES}")
        if self.name in choices:
            return choices[self.name]
        if self.name == "paper" and "course" in choices:
            return choices["course"]
        raise KeyError(f"no value given for profile {self.name!r} (got {sorted(choices)})")

    def __str__(self) -> str:
        return f"profile={self.name} device={device_name(self.device)}"


def get_profile(name: str | None = None, device: str | torch.device | None = None) -> Profile:
    """The profile from ``name`` or ``$MINIDISTILL_PROFILE`` (``auto`` if unset).

    ``auto`` means ``course`` when a CUDA or MPS device is present and ``smoke`` otherwise.
    """
    name = (name or os.environ.get("MINIDISTILL_PROFILE") or "auto").strip().lower()
    dev = get_device(device)
    if name == "auto":
        name = "smoke" if dev.type == "cpu" else "course"
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r} (from MINIDISTILL_PROFILE or the argument); "
            f"expected one of {PROFILES} or 'auto'"
        )
    profile = Profile(name, dev)
    global _threads_applied
    if not _threads_applied:  # once per process: a later torch.set_num_threads of yours stays
        apply_threads(profile)
        _threads_applied = True
    return profile


def cpu_threads(profile: Profile) -> int | None:
    """How many threads torch should compute with on the CPU for ``profile``, or None to leave
    torch's own choice (one per core, or ``OMP_NUM_THREADS``).

    ``MINIDISTILL_THREADS`` (a positive integer) always wins. Unset or ``auto``: a smoke-profile
    run on the CPU uses :data:`SMOKE_THREADS`, unless ``OMP_NUM_THREADS`` is set (then torch
    already follows it); every other case is left to torch.
    """
    text = os.environ.get("MINIDISTILL_THREADS", "").strip().lower()
    if text not in ("", "auto"):
        try:
            threads = int(text)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"MINIDISTILL_THREADS must be a positive integer or 'auto', got {text!r}")
        return threads
    if profile.name == "smoke" and profile.device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        return SMOKE_THREADS
    return None


def apply_threads(profile: Profile) -> int:
    """Set torch's CPU thread count as :func:`cpu_threads` chooses; return the count in use.

    :func:`get_profile` calls it once per process, the first time a profile is read.
    """
    threads = cpu_threads(profile)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where data and cached checkpoints live: ``root``, else ``$MINIDISTILL_DATA``, else
    ``~/.cache/minidistill``. Created if missing."""
    path = Path(root or os.environ.get("MINIDISTILL_DATA") or Path.home() / ".cache" / "minidistill")
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def show_progress() -> bool:
    """Whether long runs draw progress bars (off when ``MINIDISTILL_PROGRESS=0``, as in CI and
    when publishing, so stored notebooks carry no stale bars)."""
    return os.environ.get("MINIDISTILL_PROGRESS", "1").strip().lower() not in ("0", "false", "no")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) for a repeatable run."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def banner(profile: Profile | None = None) -> Any:
    """The notebook banner: which profile and device produced the outputs below it.

    Returns an IPython Markdown object (shown as the setup cell's output), or a string when
    IPython is not installed.
    """
    profile = profile or get_profile()
    import datetime

    when = datetime.date.today().isoformat()
    sizes = {
        "smoke": "the **smoke** profile: a tiny offline data set and a few epochs, so the "
        "numbers below only show that the code runs. Re-run on a GPU (Colab) for the course profile.",
        "course": "the **course** profile: CIFAR at a size that finishes in minutes on a GPU.",
        "paper": "the **paper** profile: the paper's data and schedule where feasible.",
    }[profile.name]
    text = (
        f"Outputs on this page were produced on {device_name(profile.device)} "
        f"with torch {torch.__version__} on {when}, in {sizes}"
    )
    try:
        from IPython.display import Markdown
    except ImportError:  # pragma: no cover - IPython ships with every notebook kernel
        return text
    return Markdown(f"> ℹ️ {text}")


def attempted(fn: Callable, *args: Any) -> bool:
    """Whether an exercise function has been filled in: calls ``fn(*args)`` and returns False
    (with a one-line hint) when it raises ``NotImplementedError``, the exercise template's
    placeholder. Any other error propagates, so a student sees the traceback of their own code.

    Every chapter's ``check_*`` self-check starts with it, so running an exercise cell before
    attempting it prints a hint instead of failing (and nbval can run the unsolved notebook).
    """
    if not callable(fn):
        raise TypeError(f"expected the exercise function, got {type(fn).__name__}")
    try:
        fn(*args)
    except NotImplementedError:
        print("… not attempted yet: fill in the function above and run the cell again")
        return False
    return True
