"""What the stored outputs are, written into the front pages at build time.

The website shows the outputs stored in the notebooks, and those come from either the small
``smoke`` profile (a CPU, a tiny data set) or the ``course`` profile (CIFAR on a GPU). A page
must not claim one while the notebooks hold the other, so the intro and the results page say it
with a directive that reads each notebook's ``metadata.minidistill`` when the book is built::

    ```{course-status} summary
    ```

    ```{course-status} table
    ```

``summary`` is an admonition with one sentence per kind of output; ``table`` lists each chapter's
stored outputs (profile, device, date) and its course-profile time on the publishing GPU and on
a Colab T4 (estimates until a GPU has measured them). The text comes from ``tools/status.py``,
which also writes the README's status block, so the two always say the same. A page using the
directive is rebuilt when a notebook changes.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from sphinx.application import Sphinx

from glue_markdown import markdown_to_nodes

_STATUS = Path(__file__).resolve().parents[2] / "tools" / "status.py"


def load_status_module():
    """``tools/status.py`` (the book excludes ``tools/``, so it is loaded by path), once."""
    name = "minidistill_tools_status"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _STATUS)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]


class CourseStatus(Directive):
    """``{course-status} summary`` or ``{course-status} table``."""

    required_arguments = 1
    has_content = False
    option_spec = {"class": directives.class_option}

    def run(self) -> list[nodes.Node]:
        kind = self.arguments[0].strip()
        if kind not in ("summary", "table"):
            raise self.error(f"course-status: expected 'summary' or 'table', got {kind!r}")
        env = self.state.document.settings.env
        status = load_status_module()
        root = Path(env.srcdir)
        # the chapters this website has (a notebook not yet in _toc.yml is not built)
        items = [item for item in status.statuses(root) if env.path2doc(str(item.path)) in env.found_docs]
        for item in items:
            env.note_dependency(str(item.path))
        if kind == "table":
            return markdown_to_nodes(status.table(items, links=False))
        smoke = any(item.profile != "course" for item in items)
        box = nodes.admonition(classes=["admonition", "warning" if smoke else "note"])
        title = "What the outputs on these pages are"
        box += nodes.title(title, title)
        box.extend(markdown_to_nodes(status.summary(items)))
        return [box]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("course-status", CourseStatus)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
