"""Per-iteration schedules: linear warmup + half-cycle cosine (MAE recipe), and plain cosine."""

from __future__ import annotations

import math

import pytest

from mimscale.engine.schedule import cosine, warmup_cosine

TOTAL, WARM, PEAK, FINAL = 1000, 100, 2.4e-3, 1e-5


def lr(step, total=TOTAL, warmup=WARM, peak=PEAK, final=FINAL, start=0.0):
    return warmup_cosine(step, total, warmup, peak, final, start)


def test_endpoints():
    assert lr(0) == 0.0  # warmup starts from 0 (MAE)
    assert lr(WARM) == pytest.approx(PEAK, rel=1e-12)  # end of warmup = peak
    assert lr(TOTAL) == FINAL
    assert lr(TOTAL - 1) == pytest.approx(FINAL, abs=1e-8)  # (peak-final)(1-cos(pi/900))/2
    assert lr(0, start=1e-4) == 1e-4


def test_warmup_is_linear_and_increasing():
    vals = [lr(s) for s in range(WARM + 1)]
    assert all(b > a for a, b in zip(vals, vals[1:]))
    for s in (1, 25, 50, 99):
        assert vals[s] == pytest.approx(PEAK * s / WARM, rel=1e-12)
    assert lr(50, start=1e-4) == pytest.approx(1e-4 + (PEAK - 1e-4) * 0.5)


def test_decay_is_monotonic():
    vals = [lr(s) for s in range(WARM, TOTAL + 1)]
    assert all(b < a for a, b in zip(vals, vals[1:]))
    assert all(FINAL <= v <= PEAK for v in vals)


def test_half_of_the_cosine():
    mid = WARM + (TOTAL - WARM) // 2  # 550: progress exactly 0.5
    assert lr(mid) == pytest.approx((PEAK + FINAL) / 2, rel=1e-12)
    # a quarter: final + (peak - final) * (1 + cos(pi/4)) / 2
    q = WARM + (TOTAL - WARM) // 4  # 325: progress 0.25
    assert lr(q) == pytest.approx(FINAL + (PEAK - FINAL) * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12)


@pytest.mark.parametrize("step", [TOTAL, TOTAL + 1, 10 * TOTAL])
def test_beyond_total_is_final(step):
    assert lr(step) == FINAL


def test_no_warmup():
    assert lr(0, warmup=0) == pytest.approx(PEAK)
    assert lr(TOTAL // 2, warmup=0) == pytest.approx((PEAK + FINAL) / 2)


def test_warmup_equal_to_total():
    vals = [lr(s, total=100, warmup=100) for s in range(100)]
    assert vals == pytest.approx([PEAK * s / 100 for s in range(100)])
    assert lr(100, total=100, warmup=100) == FINAL


@pytest.mark.parametrize("step", [0, 50, 99, 100, 150, 199, 200, 500])
def test_warmup_longer_than_total(step):
    """warmup >= total: never above peak, never NaN (no division by total - warmup), ``final`` once the
    schedule is over (step >= total) as the docstring promises."""
    v = lr(step, total=100, warmup=200)
    assert math.isfinite(v) and 0.0 <= v <= PEAK
    if step >= 100:
        assert v == FINAL
    else:
        assert v == pytest.approx(PEAK * step / 200)


def test_zero_total():
    assert lr(0, total=0, warmup=0) == FINAL


def test_cosine():
    assert cosine(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(100, 100, 0.04, 0.4) == 0.4
    assert cosine(1000, 100, 0.04, 0.4) == 0.4
    assert cosine(5, 0, 0.04, 0.4) == 0.4  # degenerate schedule: the end value
    assert cosine(25, 100, 1.0, 0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    vals = [cosine(s, 100, 0.996, 1.0) for s in range(101)]  # EMA momentum rises monotonically
    assert all(b > a for a, b in zip(vals, vals[1:]))
    vals = [cosine(s, 100, 0.05, 0.0) for s in range(101)]  # weight decay falls monotonically
    assert all(b < a for a, b in zip(vals, vals[1:]))


def test_time_budget_total_follows_measured_progress():
    from mimscale.engine.schedule import time_budget_total

    assert time_budget_total(100, 1000, 30.0, None) == 1000  # no time budget: the configured total
    assert time_budget_total(0, 1000, 0.0, 600.0) == 1000  # nothing measured yet
    # slower than planned: 100 steps took 120 s of a 600 s budget -> the schedule spans 500 steps (position 0.2)
    assert time_budget_total(100, 1000, 120.0, 600.0) == 500
    # faster than planned: the configured total is a cap (position = step / total)
    assert time_budget_total(100, 1000, 6.0, 600.0) == 1000
    # the budget is spent: the schedule is at its end whatever the step
    assert time_budget_total(100, 1000, 600.0, 600.0) == 100 and time_budget_total(100, 1000, 900.0, 600.0) == 100
    for step, train_s in ((10, 50.0), (300, 200.0), (999, 599.0)):  # position = max(step/total, time/budget)
        total = time_budget_total(step, 1000, train_s, 600.0)
        assert step / total == pytest.approx(max(step / 1000, train_s / 600.0), rel=2e-3)
    # with the re-planned total the lr reaches its final value exactly when the budget is spent
    assert warmup_cosine(100, time_budget_total(100, 1000, 600.0, 600.0), 10, 1.0, 0.01) == 0.01
