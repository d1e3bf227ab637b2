"""Results tables: mean ± sample std, Markdown layout."""
import statistics

import pytest

from minidistill.report import format_mean_std, mean_std, results_table


def test_mean_std_is_the_sample_std():
    vals = [88.1, 88.5, 88.9]
    m, s = mean_std(vals)
    assert m == pytest.approx(statistics.mean(vals))
    assert s == pytest.approx(statistics.stdev(vals))
    assert mean_std([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_format_mean_std():
    assert format_mean_std([1.0, 3.0]) == "2.00 ± 1.41 (n=2)"
    assert format_mean_std([72.5], digits=1) == "72.5 (n=1)"


def test_results_table_layout_and_missing_reported_numbers():
    t = results_table({"alone": [80.0, 82.0], "KD": [84.0]}, ours="ours (%)",
                      reported={"paper": {"alone": "72.50"}})
    lines = t.splitlines()
    assert lines[0] == "| method | ours (%) | paper |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| alone | 81.00 ± 1.41 (n=2) | 72.50 |"
    assert lines[3] == "| KD | 84.00 (n=1) | – |"


def test_metrics_table_formats_columns_scales_extra_and_missing():
    from minidistill.report import metrics_table
    rows = {"a": [{"acc": 90.0, "ece": 0.05}, {"acc": 92.0, "ece": 0.03}], "b": [{"acc": 50.0}]}
    text = metrics_table(rows, {"acc": "ACC (%)", "ece": ("ECE (%)", 100.0, 1)}, extra={"params": {"a": "1,000"}})
    lines = text.splitlines()
    assert lines[0] == "| method | params | ACC (%) | ECE (%) |"
    assert lines[2] == "| a | 1,000 | 91.00 ± 1.41 (n=2) | 4.0 ± 1.4 (n=2) |"
    assert lines[3] == "| b | – | 50.00 (n=1) | – |"
    custom = metrics_table(rows, ["acc"], cell=lambda key, values: "x" if max(values) > 60 else None)
    assert custom.splitlines()[2:] == ["| a | x |", "| b | 50.00 (n=1) |"]


def test_show_results_stores_what_myst_nb_glue_stores(monkeypatch):
    """The hidden output is myst-nb's glue format, made without importing myst_nb."""
    import IPython.display

    from minidistill.report import GLUE_PREFIX, show_results

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: shown.append((a, k)))
    show_results("demo_results", "| a | b |\n|---|---|\n| 1 | 2 |")
    (visible, _), (bundle, kw) = shown
    assert visible[0].data.startswith("| a | b |")
    assert bundle[0][GLUE_PREFIX + "text/markdown"].endswith("| 1 | 2 |")
    assert kw == {"raw": True, "metadata": {"scrapbook": {"name": "demo_results", "mime_prefix": GLUE_PREFIX}}}
    try:
        from myst_nb.ext.glue import GLUE_PREFIX as theirs
    except ImportError:
        theirs = GLUE_PREFIX
    assert theirs == GLUE_PREFIX
    with pytest.raises(ValueError, match="key"):
        show_results("not a key", "x")
    with pytest.raises(TypeError, match="table"):
        show_results("k", 3)
