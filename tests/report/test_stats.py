"""The league's noise bands: mean ± std and Welch's t-test against values worked out by hand / from tables."""

from __future__ import annotations

import math

import pytest

from mimscale.report.stats import betainc, mean_std, t_two_sided_p, welch_p, within_noise

pytestmark = pytest.mark.unit


def test_mean_std():
    assert mean_std([]) == (None, None)
    assert mean_std([3.0]) == (3.0, None)
    m, s = mean_std([60.0, 61.0, 62.0])
    assert m == pytest.approx(61.0) and s == pytest.approx(1.0)


def test_student_t_against_table_values():
    # two-sided critical values (t, df) at p = 0.05 from any t table, and the Cauchy case (df=1: p = 1 - 2/pi*atan t)
    for t, df in ((12.706, 1), (4.303, 2), (2.776, 4), (2.228, 10), (1.960, 1e6)):
        assert t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)
    assert t_two_sided_p(1.0, 1) == pytest.approx(1 - 2 / math.pi * math.atan(1.0))
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert betainc(2.0, 3.0, 0.0) == 0.0 and betainc(2.0, 3.0, 1.0) == 1.0
    assert betainc(1.0, 1.0, 0.3) == pytest.approx(0.3)  # the uniform distribution


def test_welch():
    # t = -3 / sqrt(2/3), df = 4 (equal variances and sizes): p = 0.0213
    assert welch_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.021312, abs=1e-5)
    assert welch_p([1, 2, 3], [4, 5, 6]) == pytest.approx(welch_p([4, 5, 6], [1, 2, 3]))
    assert welch_p([1.0], [1.0, 2.0]) is None and within_noise([1.0], [2.0, 3.0]) is None
    assert welch_p([5, 5], [5, 5]) == 1.0 and welch_p([5, 5], [6, 6]) == 0.0
    assert within_noise([60.0, 61.0, 62.0], [60.5, 61.5, 62.5]) is True
    assert within_noise([60.0, 61.0, 62.0], [70.0, 70.2, 70.4]) is False
