"""Every notebook runs on Colab as it is: one repository URL, a setup cell that installs only the
package, GPU metadata, imports Colab has, and widgets that exist in Colab's ipywidgets 7.7.

The notebooks are read as JSON (nothing is executed); the Colab-like *run* of the notebooks is
make test's nbval pass (tools/colab_like.py), tested at the end of this file.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + [ROOT / "book" / "write_your_own.ipynb"]
IDS = [p.relative_to(ROOT).as_posix() for p in NOTEBOOKS]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
URL = CONFIG["repository"]["url"]

#: what a notebook may import: the standard library and what Colab ships (plus the package)
COLAB_HAS = {"torch", "torchvision", "numpy", "matplotlib", "IPython", "ipywidgets", "tqdm", "scipy"}
ALLOWED_IMPORTS = set(sys.stdlib_module_names) | COLAB_HAS | {"minidistill"}
#: packages a notebook must never import (book building, testing): named in the failure
BOOK_ONLY = {"myst_nb", "jupyter_book", "myst_parser", "sphinx", "nbformat", "nbclient", "nbval", "pytest"}

#: The widget names a notebook may use: ipywidgets 7.x core controls. Each one, and each
#: constructor keyword listed, was checked in the ipywidgets 7.7.5 wheel from PyPI (Colab ships
#: 7.7.x): ``ipywidgets/widgets/__init__.py`` exports them, and the keywords are the public traits
#: of each class (``class_trait_names()``, less comm/keys/log). ipywidgets 8 renamed some
#: (``description_tooltip`` -> ``tooltip``), which is why keywords are checked too.
_SLIDER = {"value", "min", "max", "step", "description", "description_tooltip", "disabled", "continuous_update",
           "orientation", "readout", "readout_format", "layout", "style"}
WIDGETS_77 = {
    "FloatSlider": _SLIDER,
    "IntSlider": _SLIDER,
    "FloatLogSlider": _SLIDER | {"base"},
    "Dropdown": {"options", "value", "index", "label", "description", "description_tooltip", "disabled",
                 "layout", "style"},
    "Checkbox": {"value", "description", "description_tooltip", "disabled", "indent", "layout", "style"},
}
INTERACTION_77 = {"interact", "interactive", "fixed"}
ALLOWED_WIDGETS = set(WIDGETS_77) | INTERACTION_77


def cells(path: Path, kind: str = "code") -> list[str]:
    nb = json.loads(path.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def parse(source: str) -> ast.Module:
    """A code cell as Python: IPython magics and shell lines (``%``, ``!``) become blank lines."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    return ast.parse("\n".join(lines))


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def setup_cell(path: Path) -> str:
    for source in cells(path):
        if "google.colab" in source:
            return source
    pytest.fail(f"{path.name}: no setup cell (a code cell that installs the package when 'google.colab' is loaded)")


# --- one repository URL ---------------------------------------------------------------------

def test_config_has_one_repository_url_and_colab_buttons():
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", URL), URL
    assert CONFIG["repository"]["branch"] == "main"
    assert CONFIG["repository"]["path_to_book"] == ""          # else Colab links 404
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_setup_cell_installs_the_package_from_the_config_url_and_nothing_else(path):
    source = setup_cell(path)
    strings = {node.value for node in ast.walk(parse(source)) if isinstance(node, ast.Constant)
               and isinstance(node.value, str)}
    installs = {s for s in strings if s.startswith("git+") or "://" in s}
    assert installs == {f"git+{URL}"}, f"{path.name} installs {installs}, expected only git+{URL} (_config.yml)"
    # Colab keeps its own torch, torchvision, numpy, matplotlib and ipywidgets: never upgrade them.
    assert not strings & {"-U", "--upgrade", "--force-reinstall", "torch", "torchvision", "numpy", "ipywidgets"}
    assert '"google.colab" in sys.modules' in source or "'google.colab' in sys.modules" in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_colab_badge_opens_this_notebook_from_the_config_repository(path):
    owner_repo = URL.removeprefix("https://github.com/")
    branch = CONFIG["repository"]["branch"]
    want = f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/{path.relative_to(ROOT).as_posix()}"
    badges = re.findall(r"\((https://colab\.research\.google\.com/github/[^)\s]+)\)", "\n".join(cells(path, "markdown")))
    assert badges == [want], f"{path.name}: Colab badge links {badges}, expected [{want}]"


def test_prose_names_only_the_config_url():
    """The README and the book's pages mention the repository by the one URL in _config.yml."""
    for page in [ROOT / "README.md", *sorted((ROOT / "book").glob("*.md"))]:
        for found in re.findall(r"https://github\.com/minidistill/[\w.-]+", page.read_text()):
            assert found == URL, f"{page.name} names {found}, but _config.yml's repository.url is {URL}"


def test_package_dependencies_are_ranges_that_colab_already_meets():
    """pip on Colab then installs the package alone: every dependency is one Colab ships, with a
    lower bound only (a pin or an upper bound would make pip replace Colab's torch or numpy)."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        assert name in COLAB_HAS, f"{requirement!r}: Colab does not ship {name}; the setup cell would have to install it"
        assert not re.search(r"==|<|~=|!=", requirement), f"{requirement!r}: use a lower bound only"


# --- metadata -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_opens_on_a_gpu_with_a_python3_kernel(path):
    meta = json.loads(path.read_text())["metadata"]
    assert meta.get("accelerator") == "GPU", f"{path.name}: metadata.accelerator should be 'GPU'"
    kernel = meta.get("kernelspec", {})
    assert kernel.get("name") == "python3" and kernel.get("language") == "python", f"{path.name}: kernelspec {kernel}"


# --- imports --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_imports_only_what_colab_has(path):
    modules = set().union(*(imported_modules(parse(source)) for source in cells(path)))
    tops = {m.split(".")[0] for m in modules}
    book = sorted(tops & BOOK_ONLY)
    assert not book, f"{path.name} imports {book}: Colab lacks them (results tables: minidistill.report.show_results)"
    unknown = sorted(tops - ALLOWED_IMPORTS)
    assert not unknown, f"{path.name} imports {unknown}, which Colab lacks and the setup cell does not install"


def test_the_import_scan_sees_every_form():
    tree = parse("import a.b as c\nfrom d.e import f\nfrom . import g\n%matplotlib inline\n!pip list\n"
                 "def h():\n    import myst_nb\n")
    assert imported_modules(tree) == {"a.b", "d.e", "myst_nb"}


# --- widgets --------------------------------------------------------------------------------

def widget_uses(tree: ast.Module) -> tuple[set[str], list[tuple[str, set[str]]]]:
    """Names taken from ipywidgets, and (name, keywords) of each call to one of them."""
    names, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ipywidgets":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            modules |= {alias.asname or alias.name for alias in node.names if alias.name.split(".")[0] == "ipywidgets"}
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            names.add(node.attr)
        if isinstance(node, ast.Call):
            func = node.func
            name = (func.id if isinstance(func, ast.Name) and func.id in names else
                    func.attr if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    and func.value.id in modules else None)
            if name is not None:
                calls.append((name, {k.arg for k in node.keywords if k.arg}))
    return names, calls


def test_allowed_widgets_exist_in_ipywidgets_7_7():
    assert ALLOWED_WIDGETS == {"interact", "interactive", "fixed", "FloatSlider", "IntSlider", "Dropdown",
                               "Checkbox", "FloatLogSlider"}
    try:  # where ipywidgets 7.x is installed (a Colab-like environment), check against it as well
        import ipywidgets
    except ImportError:
        return
    if ipywidgets.__version__.startswith("7."):
        for name in ALLOWED_WIDGETS:
            assert hasattr(ipywidgets, name), name
        for name, keywords in WIDGETS_77.items():
            traits = set(getattr(ipywidgets, name).class_trait_names())
            assert keywords <= traits, (name, keywords - traits)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_widgets_are_ipywidgets_7_core_controls(path):
    for source in cells(path):
        names, calls = widget_uses(parse(source))
        assert names <= ALLOWED_WIDGETS, f"{path.name} uses {sorted(names - ALLOWED_WIDGETS)} (not an ipywidgets 7.7 core control we allow)"
        for name, keywords in calls:
            if name in WIDGETS_77:
                extra = keywords - WIDGETS_77[name]
                assert not extra, f"{path.name}: {name}({', '.join(sorted(extra))}=...) does not exist in ipywidgets 7.7"


def test_the_widget_scan_catches_ipywidgets_8_names():
    names, calls = widget_uses(parse("import ipywidgets as w\nfrom ipywidgets import FloatSlider, TagsInput\n"
                                     "w.Stack()\nFloatSlider(value=1, tooltip='x')\n"))
    assert names == {"FloatSlider", "TagsInput", "Stack"}
    assert sorted(calls) == [("FloatSlider", {"value", "tooltip"}), ("Stack", set())]
    assert "tooltip" not in WIDGETS_77["FloatSlider"]


# --- the Colab-like run (make test-notebooks) --------------------------------------------------

def test_colab_like_folder_blocks_the_book_packages(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import colab_like
    finally:
        sys.path.remove(str(ROOT / "tools"))
    folder = colab_like.make_shim(tmp_path / "colab-like")
    env = {**os.environ, "PYTHONPATH": str(folder)}
    for name in ("myst_nb", "jupyter_book"):
        run = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert run.returncode != 0 and "ImportError" in run.stderr and "show_results" in run.stderr, run.stderr
    ok = subprocess.run([sys.executable, "-c", "import torch, matplotlib, IPython, minidistill.report"],
                        env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_make_test_runs_the_notebooks_colab_like():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("test-notebooks:", 1)[1].split("\n\n", 1)[0]
    assert "PYTHONPATH=$(CURDIR)/$(COLAB_LIKE)" in recipe and "-p colab_like" in recipe
    assert "--nbval-cell-timeout=$(CELL_TIMEOUT)" in recipe
    assert re.search(r"^test: .*test-notebooks", makefile, re.M)


def _colab_like_nbval(tmp_path: Path, source: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a one-cell notebook through make test's Colab-like nbval pass; return pytest's run."""
    pytest.importorskip("nbval")
    pytest.importorskip("ipykernel")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import colab_like
    finally:
        sys.path.remove(str(ROOT / "tools"))
    folder = colab_like.make_shim(tmp_path / "colab-like")
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": "cell0", "metadata": {}, "outputs": [],
                     "source": source}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "nb.ipynb").write_text(json.dumps(nb))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT / "tools")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "colab_like", "--nbval-lax", "--nbval-current-env",
                           f"--nbval-cell-timeout={timeout}", "-p", "no:cacheprovider",
                           "nb.ipynb"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def test_a_notebook_that_imports_myst_nb_fails_the_colab_like_pass(tmp_path):
    run = _colab_like_nbval(tmp_path, "from myst_nb import glue\nglue('x', 1)\n")
    assert run.returncode != 0, run.stdout
    assert "1 failed" in run.stdout and "show_results" in run.stdout, run.stdout[-3000:]


def test_a_cell_timeout_says_what_to_do(tmp_path):
    run = _colab_like_nbval(tmp_path, "import time\ntime.sleep(8)\n", timeout=2)
    assert run.returncode != 0, run.stdout
    assert "what to do about the timeout" in run.stdout and "MINIDISTILL_THREADS=1" in run.stdout, run.stdout[-3000:]
    assert "CELL_TIMEOUT=900" in run.stdout
