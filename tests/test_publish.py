"""The publish command: executes a notebook in place, stamps metadata, refuses course on CPU."""
import json
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from minidistill import publish


def _notebook(path, source):
    nb = new_notebook(cells=[new_code_cell(source)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)
    return path


def test_publish_writes_outputs_and_metadata(tmp_path):
    nb = _notebook(tmp_path / "a.ipynb", "import os; print('profile', os.environ['MINIDISTILL_PROFILE'])")
    report = tmp_path / "report.json"
    assert publish.main([str(nb), "--profile", "smoke", "--report", str(report)]) == 0
    out = nbformat.read(nb, as_version=4)
    assert out.cells[0].outputs[0]["text"].strip() == "profile smoke"
    meta = out.metadata["minidistill"]
    assert meta["profile"] == "smoke" and meta["wall_s"] >= 0 and "CPU" in meta["device"]
    rec = json.loads(report.read_text())
    assert rec[0]["status"] == "ok" and rec[0]["notebook"].endswith("a.ipynb")


def test_publish_reports_a_failing_notebook_and_leaves_it_untouched(tmp_path, capsys):
    nb = _notebook(tmp_path / "bad.ipynb", "raise ValueError('boom')")
    before = (tmp_path / "bad.ipynb").read_text()
    assert publish.main([str(nb), "--profile", "smoke"]) == 1
    assert "failed: CellExecutionError" in capsys.readouterr().out
    assert (tmp_path / "bad.ipynb").read_text() == before


def test_course_profile_refuses_to_publish_on_cpu(tmp_path):
    nb = _notebook(tmp_path / "a.ipynb", "1")
    with pytest.raises(SystemExit, match="needs a GPU"):
        publish.publish([nb], "course")
    with pytest.raises(ValueError, match="profile"):
        publish.publish([nb], "huge")


def test_missing_notebook_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        publish.main([str(tmp_path / "nope.ipynb"), "--profile", "smoke"])
