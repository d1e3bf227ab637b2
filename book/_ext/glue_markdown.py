"""Cross-document glue of Markdown outputs, which myst-nb 1.4 leaves unrendered.

A notebook stores a table with ``myst_nb.glue("key", IPython.display.Markdown(text),
display=False)``; a page pastes it with the ``{glue}`` directive and its ``:doc:`` option::

    ```{glue} key
    :doc: ../notebooks/01_kd_basics.ipynb
    ```

For another document myst-nb 1.4 renders only ``text/html``, images and ``text/plain``, so
a ``Markdown`` object would come out as ``<IPython.core.display.Markdown object>``, and
``{glue:md}`` works within one notebook only. This extension parses the glued
``text/markdown`` (a table, say) into document nodes before myst-nb's own step runs, and
makes the page depend on the notebook, so that a rebuilt notebook rebuilds the page too.
Anything else (HTML, images, text) is left to myst-nb.

A notebook stored without any outputs (not published yet) gets a short note in place of the
pasted output instead of a build warning; a notebook with outputs but without the key still
fails the build with myst-nb's warning, since that is a real mistake (a renamed key, say).
"""
from __future__ import annotations

from typing import Any

import nbformat
from docutils import nodes
from docutils.core import publish_doctree
from myst_nb.ext.glue.crossref import read_glue_cache
from myst_nb.ext.glue.utils import PendingGlueReference
from myst_parser.parsers.docutils_ import Parser as MystParser
from sphinx.application import Sphinx
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging

logger = logging.getLogger(__name__)


def markdown_to_nodes(text: str, inline: bool = False) -> list[nodes.Node]:
    """Parse MyST Markdown (tables included) into docutils nodes."""
    doctree = publish_doctree(
        text, parser=MystParser(),
        settings_overrides={"report_level": 4, "halt_level": 5, "myst_suppress_warnings": ["myst"]},
    )
    children = list(doctree.children)
    if inline and len(children) == 1 and isinstance(children[0], nodes.paragraph):
        children = list(children[0].children)
    return children


def has_outputs(path: str) -> bool:
    """Whether any code cell of the notebook at ``path`` has stored outputs."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # not a notebook (a MyST text notebook, say): let myst-nb decide
        return True
    return any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")


def not_published_note(refdoc: str) -> nodes.Node:
    text = (f"This output appears once {refdoc}.ipynb is published with its outputs "
            "(make publish on a GPU).")
    note = nodes.note()
    note += nodes.paragraph(text, text)
    return note


class RenderGluedMarkdown(SphinxPostTransform):
    """Replace pending cross-document glue references whose data is Markdown."""

    default_priority = 4  # before myst-nb's ReplacePendingGlueReferences (priority 5)

    def run(self, **kwargs: Any) -> None:
        folder = self.env.mystnb_config.output_folder
        for node in list(self.document.findall(PendingGlueReference)):
            if node.gtype == "text":  # {glue:text} wants text/plain: myst-nb handles it
                continue
            data = read_glue_cache(folder, node.refdoc).get(node.key, {}).get("data", {})
            if "text/markdown" in data and "text/html" not in data:
                node.replace_self(markdown_to_nodes(data["text/markdown"], node.inline))
            elif not data and not has_outputs(str(self.env.doc2path(node.refdoc))):
                logger.info(f"glue {node.key!r}: {node.refdoc} has no outputs yet", location=node)
                node.replace_self(not_published_note(node.refdoc))


def note_notebook_dependency(app: Sphinx, doctree: nodes.document) -> None:
    """A page that pastes from a notebook is rebuilt when that notebook changes."""
    env = app.env
    for node in doctree.findall(PendingGlueReference):
        env.note_dependency(str(env.doc2path(node.refdoc)))


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_post_transform(RenderGluedMarkdown)
    app.connect("doctree-read", note_notebook_dependency)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
