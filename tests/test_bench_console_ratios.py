"""The console section's ratio figures: each pair's own ratio, so the section's drift is in neither."""

from __future__ import annotations

import pytest

from bus.bench.console import _paired_ratios


def test_a_drift_over_the_section_does_not_move_the_paired_ratio() -> None:
    """Rates falling 30% over the section, the console costing 3% in every pair and its run a
    step later in the drift: the paired ratio is each pair's, and the spread between pairs is
    none."""
    without = [40_000 * (1 - 0.3 * i / 8) for i in range(9)]
    # The console's 3%, and its run half a step later in the drift than its pair's.
    with_ = [rate * 0.97 * (1 - 0.3 / 16) for rate in without]

    figures = _paired_ratios("ratio", with_, without)

    assert figures["ratio"] == pytest.approx(0.97 * (1 - 0.3 / 16))
    assert figures["ratio_low"] == pytest.approx(figures["ratio"])
    assert figures["ratio_high"] == pytest.approx(figures["ratio"])
    assert figures["ratio_unpaired"] == pytest.approx(figures["ratio"])


def test_the_paired_ratio_is_the_median_of_the_pairs_and_its_quartiles_their_spread() -> None:
    """Pairs at two speeds (the machine's drift): the pairs' ratios are 0.8, 1.0, 0.95, 1.0,
    1.2, while the median of the runs with the console over the median of those without is 1.2."""
    without = [100.0, 200.0, 100.0, 200.0, 100.0]
    with_ = [80.0, 200.0, 95.0, 200.0, 120.0]

    figures = _paired_ratios("r", with_, without)

    assert figures["r"] == pytest.approx(1.0)
    assert figures["r_low"] == pytest.approx(0.95)
    assert figures["r_high"] == pytest.approx(1.0)
    assert figures["r_unpaired"] == pytest.approx(1.2)


def test_runs_that_do_not_pair_up_are_refused() -> None:
    with pytest.raises(ValueError):
        _paired_ratios("r", [1.0, 2.0], [1.0])
