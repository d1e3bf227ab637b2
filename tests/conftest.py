"""Shared fixtures for the package tests.

Every test runs with its own empty data root (``MINIDISTILL_DATA`` in a tmp dir, so nothing
reads or writes ``~/.cache/minidistill``), progress bars off, the ``smoke`` profile, two
torch threads (the CI machine has two cores) and matplotlib's non-interactive Agg backend.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minidistill.data import Dataset, make_shapes  # noqa: E402

torch.set_num_threads(2)
# The suite keeps its two threads: the first get_profile() would otherwise apply the smoke
# default (runtime.SMOKE_THREADS) to the whole process, and tests that compare a run in a child
# process (two threads) with one here must compute with the same thread count to match bit for bit.
import minidistill.runtime as _runtime  # noqa: E402

_runtime._threads_applied = True

_HOME_CACHE = Path.home() / ".cache" / "minidistill"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data root per test, no progress bars, the smoke profile; figures closed after."""
    root = tmp_path / "minidistill-data"
    monkeypatch.setenv("MINIDISTILL_DATA", str(root))
    monkeypatch.setenv("MINIDISTILL_PROGRESS", "0")
    monkeypatch.setenv("MINIDISTILL_PROFILE", "smoke")
    yield root
    plt.close("all")


@pytest.fixture(scope="session", autouse=True)
def never_touches_home_cache():
    """The suite must not create ``~/.cache/minidistill`` (every test has its own root)."""
    existed = _HOME_CACHE.exists()
    yield
    if not existed:
        assert not _HOME_CACHE.exists(), f"a test wrote into {_HOME_CACHE}; use the MINIDISTILL_DATA fixture"


@pytest.fixture
def data_dir(isolated_env: Path) -> Path:
    """The (not yet created) data root that ``MINIDISTILL_DATA`` points at in this test."""
    return isolated_env


@pytest.fixture(scope="session")
def tiny() -> Dataset:
    """A small shapes data set (512 train / 128 test, 16x16) for fast training tests.

    Shared by many tests: do not modify its tensors in place.
    """
    return make_shapes(n_train=512, n_test=128)
