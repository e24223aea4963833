"""Per-iteration schedules: linear warmup then half-cycle cosine (MAE's recipe, fractional epochs)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float, start: float = 0.0) -> float:
    """Value at optimizer step ``step`` (0-based): linear ``start -> peak`` over ``warmup`` steps,
    then half-cycle cosine ``peak -> final`` until ``total``; ``final`` after that."""
    if step >= total:  # also when warmup >= total: the schedule is over, whatever warmup asked for
        return final
    if step < warmup:
        return start + (peak - start) * step / warmup
    progress = (step - warmup) / (total - warmup)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cycle cosine ``start -> end`` without warmup (weight decay, EMA momentum)."""
    if total <= 0 or step >= total:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / total))


def time_budget_total(step: int, total: int, train_s: float, budget_s: float | None) -> int:
    """The steps a schedule spans when it must end at a training-time budget (``train.schedule_by_time``):
    re-planned from the run's own throughput so far, the schedule's position ``step / result`` is
    ``max(step / total, train_s / budget_s)``. ``total`` (from the epochs) is a cap; ``step`` once the budget
    is spent (the schedule is at its end). No budget, or nothing trained yet: ``total``."""
    if not budget_s or train_s <= 0 or step <= 0:
        return total
    return max(step, min(total, round(step * budget_s / train_s)))
