"""The book's own Sphinx extensions (book/_ext): author-year labels in the list of references."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("pybtex")
pytest.importorskip("sphinx")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import author_year_bib  # noqa: E402
from pybtex.database import parse_string  # noqa: E402

sys.path.remove(str(ROOT / "book" / "_ext"))

BIB = r"""
@article{a, author = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff}, title = {X}, year = {2015}}
@article{b, author = {Srinivas, Suraj and Fleuret, Fran{\c{c}}ois}, title = {Y}, year = {2018}}
@article{c, author = {M{\"u}ller, Rafael}, title = {Z}, year = {2019}}
@article{d, author = {De, Soham and Smith, Samuel L.}, title = {W}, year = {2020}}
@article{e, author = {Zhang, Ying and Xiang, Tao and Lu, Huchuan}, title = {V1}, year = {2018}}
@article{f, author = {Zhang, Ying and Li, Wei and Lu, Huchuan}, title = {V2}, year = {2018}}
"""


def test_labels_are_author_year_like_the_text():
    entries = list(parse_string(BIB, "bibtex").entries.values())
    labels = list(author_year_bib.AuthorYearLabelStyle().format_labels(entries))
    assert labels == ["Hinton et al., 2015", "Srinivas and Fleuret, 2018", "Müller, 2019",
                      "De and Smith, 2020", "Zhang et al., 2018a", "Zhang et al., 2018b"]


def test_the_book_selects_the_style():
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]
    assert config["config"]["bibtex_reference_style"] == "author_year"
    assert config["config"]["bibtex_default_style"] == "author_year"
    assert "author_year_bib" in config["local_extensions"]
