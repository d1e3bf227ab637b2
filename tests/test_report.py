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
