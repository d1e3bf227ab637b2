"""The chapter status shown to readers comes from the notebooks' metadata: the README's block
matches tools/status.py, and the front pages use the build-time directive, never typed claims."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


status = _load("minidistill_tools_status", ROOT / "tools" / "status.py")


def write_notebook(path: Path, profile: str | None, **meta) -> Path:
    minidistill = {"profile": profile, **meta} if profile else {}
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": [f"# {path.stem} title\n"]}],
          "metadata": {"minidistill": minidistill}, "nbformat": 4, "nbformat_minor": 5}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb))
    return path


def test_readme_status_block_matches_the_notebooks():
    text = (ROOT / "README.md").read_text()
    assert text.count(status.BEGIN) == 1 and text.count(status.END) == 1, "README.md lost its status markers"
    block = text[text.index(status.BEGIN):text.index(status.END) + len(status.END)]
    assert block == status.readme_block(), "README.md's chapter status is stale: run `make status`"


def test_every_chapter_is_in_the_status_table():
    items = status.statuses()
    assert [s.path.name for s in items] == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    table = status.table(items)
    for s in items:
        assert f"(notebooks/{s.path.name})" in table


def test_smoke_outputs_are_never_called_course_outputs(tmp_path):
    write_notebook(tmp_path / "notebooks" / "01_a.ipynb", "smoke", device="CPU (1 threads)",
                   date="2026-11-30T16:00:00", estimate_s=100)
    write_notebook(tmp_path / "notebooks" / "02_b.ipynb", "smoke", estimate_s=40)
    items = status.statuses(tmp_path)
    text = status.summary(items)
    assert text.startswith("Chapters 1 and 2 hold smoke-profile outputs") and "owed" in text
    assert "course-profile outputs" not in text
    row = status.table(items).splitlines()[2]
    assert "smoke outputs from CPU (1 threads) on 2026-11-30; course run owed" in row
    assert "100 s (estimate)" in row and "≈ 17 min (estimate)" in row
    assert "CPU" not in status.table(items, detail=False)


def test_course_outputs_use_the_measured_run(tmp_path):
    run = {"device": "NVIDIA H200", "wall_s": 61.2, "date": "2026-12-01T10:00:00"}
    write_notebook(tmp_path / "notebooks" / "01_a.ipynb", "course", device="NVIDIA H200",
                   date="2026-12-01T10:00:00", estimate_s=100, course_runs=[run])
    write_notebook(tmp_path / "notebooks" / "02_b.ipynb", "smoke", estimate_s=40)
    write_notebook(tmp_path / "notebooks" / "03_c.ipynb", None)
    items = status.statuses(tmp_path)
    assert items[0].gpu_time == "61 s" and items[0].t4_time == "≈ 11 min (estimate)"
    assert items[2].outputs() == "no recorded outputs" and items[2].gpu_time == "–"
    text = status.summary(items)
    assert "chapter 1 holds course-profile outputs" in text.lower()
    assert "chapter 2 holds smoke-profile outputs" in text and "chapter 3 holds no recorded outputs" in text
    write_notebook(tmp_path / "notebooks" / "02_b.ipynb", "course", device="NVIDIA H200")
    write_notebook(tmp_path / "notebooks" / "03_c.ipynb", "course", device="NVIDIA H200")
    assert status.summary(status.statuses(tmp_path)).startswith("All 3 chapters show course-profile outputs")


@pytest.mark.parametrize("numbers, words", [([3], "chapter 3"), ([1, 2], "chapters 1 and 2"),
                                            ([1, 2, 3, 4, 5, 6], "chapters 1–6"),
                                            ([1, 2, 3, 5], "chapters 1–3 and 5"), ([1, 2, 5], "chapters 1, 2 and 5")])
def test_chapter_ranges_read_well(tmp_path, numbers, words):
    group = [status.Status(Path(f"{n:02d}_x.ipynb"), "x", "smoke", None, None, None, False) for n in numbers]
    assert status._chapters(group) == words


def test_replace_block_needs_the_markers():
    text = f"before\n{status.BEGIN}\nold\n{status.END}\nafter\n"
    assert status.replace_block(text, "NEW") == "before\nNEW\nafter\n"
    with pytest.raises(SystemExit, match="no status block"):
        status.replace_block("no markers", "NEW")


def test_front_pages_take_the_status_from_the_build_not_from_typing():
    intro, results = (ROOT / "book" / "intro.md").read_text(), (ROOT / "book" / "results.md").read_text()
    assert "```{course-status} summary" in intro and "```{course-status} table" in intro
    assert "```{course-status} summary" in results
    for page in (intro, results, (ROOT / "README.md").read_text()):
        assert not re.search(r"published pages show .?course.?-profile runs", page, re.I)
        assert "Each chapter reproduces its paper's main claim at course size" not in page
        assert "**done**" not in page
    # the results caption claims spread only where the table gives n > 1
    assert "mean ± standard deviation over seeds with the number of runs" not in results
    assert "n = 1" in results
