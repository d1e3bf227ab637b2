"""Run the notebooks the way Colab would see them: without the book's packages.

Colab has torch, torchvision, numpy, matplotlib, IPython and ipywidgets 7.7, and a notebook's
setup cell installs ``minidistill`` on top; it has none of the packages that build this website
(``myst_nb``, ``jupyter_book``, Sphinx). A notebook that imports one of them works in the book's
environment and breaks on Colab. ``make test`` therefore runs its nbval pass with a folder early
on ``PYTHONPATH`` whose packages of those names raise ``ImportError``:

    python tools/colab_like.py _build/colab-like      # write the folder (the Makefile does this)
    PYTHONPATH=_build/colab-like:tools pytest -p colab_like --nbval-lax ... notebooks

As a pytest plugin (``-p colab_like``, with ``tools`` on ``PYTHONPATH``) it names the blocked
packages in the report header, fails at once if the folder is not on ``PYTHONPATH``, and adds
a hint to a cell that hit nbval's ``--nbval-cell-timeout``: what a smoke cell should take, and
what to do when the machine is busy.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

#: packages that build the website and that Colab does not have
BLOCKED = ("myst_nb", "jupyter_book", "myst_parser", "sphinx")

_SHIM = '''"""Made by tools/colab_like.py: {name} is blocked in the Colab-like notebook pass."""
raise ImportError(
    "{name} is a package that builds the course website; Colab does not have it and the "
    "notebook's setup cell does not install it, so a notebook must not import it. Show results "
    "tables with minidistill.report.show_results(key, table), which needs no book package. "
    "(This ImportError comes from make test's Colab-like notebook pass, tools/colab_like.py.)"
)
'''

TIMEOUT_HINT = (
    "A cell ran past nbval's --nbval-cell-timeout ({timeout} s). In the smoke profile a whole notebook "
    "takes under a minute on 2 quiet CPU cores, so this cell is not slow but starved: the machine is "
    "busy (see `uptime`: a load average above the number of cores), or torch runs more threads than "
    "there are free cores. What to do: stop the other CPU jobs, or run with MINIDISTILL_THREADS=1 "
    "(the smoke default unless MINIDISTILL_THREADS or OMP_NUM_THREADS says otherwise), and check that "
    "MINIDISTILL_PROFILE is smoke; on a slow machine raise the limit with `make test CELL_TIMEOUT=900`. "
    "Cells after this one in the same notebook are reported as xfail."
)


def make_shim(folder: str | os.PathLike) -> Path:
    """Write one package per name in :data:`BLOCKED` into ``folder``, each raising ImportError."""
    folder = Path(folder)
    for name in BLOCKED:
        package = folder / name
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(_SHIM.format(name=name))
    return folder


def shim_on_path() -> str | None:
    """The entry of ``PYTHONPATH`` that holds the blocking packages, if any."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and all((Path(entry) / name / "__init__.py").is_file() for name in BLOCKED):
            return entry
    return None


# --- the pytest plugin ------------------------------------------------------------------------

def pytest_configure(config) -> None:
    if shim_on_path() is None:
        raise SystemExit("colab_like: the blocking folder is not on PYTHONPATH; write it with "
                         "`python tools/colab_like.py _build/colab-like` and put that folder first "
                         "on PYTHONPATH (make test-notebooks does both)")


def pytest_report_header(config) -> str:
    return (f"Colab-like kernels: {', '.join(BLOCKED)} raise ImportError (from {shim_on_path()}); "
            f"cell timeout {config.getoption('nbval_cell_timeout', default='?')} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and "Timeout of" in str(call.excinfo.value):
        timeout = item.config.getoption("nbval_cell_timeout", default="?")
        report.sections.append(("what to do about the timeout", TIMEOUT_HINT.format(timeout=timeout)))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/colab_like.py FOLDER", file=sys.stderr)
        return 2
    print(f"wrote {make_shim(argv[0])} ({', '.join(BLOCKED)} raise ImportError)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
