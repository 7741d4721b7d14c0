"""The threshold rule and the decision at their boundaries (issue 31: mutants that no contract case caught).

``python -m tests.mutations`` found that ``score > threshold`` for ``score >= threshold`` in ``decide`` and
``p_ng < p_ok`` for ``p_ng <= p_ok`` in ``choose_threshold`` survived every test; these pin the contract's ``≥``
and ``≤``."""

from __future__ import annotations

import pytest

from bdi.patchcore.calibration import choose_threshold, decide


def test_a_score_exactly_at_the_threshold_is_ng() -> None:
    assert decide(12.5, 12.5) == "ng"
    assert decide(12.499, 12.5) == "ok"


def test_ng_percentile_equal_to_the_ok_percentile_counts_as_overlap() -> None:
    # p_ok (99th of OK) == p_ng (5th of NG) == 12: the overlap branch (1.02·p_ok), not the midpoint (12)
    choice = choose_threshold([12, 12, 12], [12, 12], score_percentile=99)
    assert choice.ok_score_at_percentile == choice.ng_score_at_percentile == 12.0
    assert choice.threshold == pytest.approx(12 * 1.02)
