"""One citation style: author–year in the text *and* in the list of references.

``bibtex_reference_style: author_year`` makes sphinxcontrib-bibtex cite as "Hinton et al. [2015]"
in the text, but the list on the references page still shows the formatting style's labels
(``alpha``: [HVD15]). This registers a pybtex formatting style, ``author_year``, whose labels are
the same author–year text ("Hinton et al., 2015"; "Srinivas and Fleuret, 2018"; a, b, ... added
when two entries would share a label) and whose list is sorted by author, year and title. The
book selects it with ``bibtex_default_style: author_year`` in ``_config.yml``.
"""
from __future__ import annotations

import string
from collections import Counter
from typing import Any, Iterable, Iterator

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.application import Sphinx


def _surname(person) -> str:
    return " ".join(Text.from_latex(part).render_as("text") for part in person.prelast_names + person.last_names)


def author_year(entry) -> str:
    """'Hinton et al., 2015', 'Srinivas and Fleuret, 2018', 'Jordan, 2024'."""
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    year = entry.fields.get("year", "n.d.")
    if not people:
        return f"{entry.fields.get('title', entry.key)}, {year}"
    if len(people) == 1:
        who = _surname(people[0])
    elif len(people) == 2:
        who = f"{_surname(people[0])} and {_surname(people[1])}"
    else:
        who = f"{_surname(people[0])} et al."
    return f"{who}, {year}"


class AuthorYearLabelStyle(BaseLabelStyle):
    """Labels as in the text: author–year, with a, b, ... where two entries would collide."""

    def format_labels(self, sorted_entries: Iterable) -> Iterator[str]:
        entries = list(sorted_entries)
        labels = [author_year(e) for e in entries]
        counts, seen = Counter(labels), Counter()
        for label in labels:
            if counts[label] > 1:
                yield label + string.ascii_lowercase[seen[label]]
                seen[label] += 1
            else:
                yield label


class AuthorYearStyle(UnsrtStyle):
    """``unsrt``'s entry formatting, author–year labels, sorted by author, year and title."""

    default_label_style = "author_year"
    default_sorting_style = "author_year_title"


def setup(app: Sphinx) -> dict[str, Any]:
    register_plugin("pybtex.style.labels", "author_year", AuthorYearLabelStyle, force=True)
    register_plugin("pybtex.style.formatting", "author_year", AuthorYearStyle, force=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
