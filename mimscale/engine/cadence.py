"""When to save, evaluate and stop: step counts and wall-clock/training-time triggers, each a small part.

Every time source is injectable (``now``), so tests drive the minute triggers with a fake clock.
A part answers a *local* question (``due_local``: has my clock passed the mark?); the loop ORs the
answers of all ranks in one collective (:mod:`.flags`) and then tells the part what was agreed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Now = Callable[[], float]


class SaveCadence:
    """Checkpoint every ``every_steps`` optimizer steps and/or every ``every_minutes`` of wall-clock."""

    def __init__(self, every_steps: int = 0, every_minutes: float | None = None, now: Now = time.monotonic):
        self.every_steps, self.every_minutes, self.now = every_steps, every_minutes, now
        self.last = now()

    def due_local(self) -> bool:
        return bool(self.every_minutes and self.now() - self.last >= 60 * self.every_minutes)

    def due(self, step: int, agreed_time: bool) -> bool:
        return bool(self.every_steps and step % self.every_steps == 0) or agreed_time

    def saved(self) -> None:
        self.last = self.now()


class EvalCadence:
    """Evaluate every ``every_steps`` steps and/or every ``every_minutes`` of *training* time (the
    train clock, evaluation excluded). The next due time lives in ``TrainState.next_eval_s`` so a
    resumed run keeps the schedule."""

    def __init__(self, every_steps: int = 0, every_minutes: float | None = None):
        self.every_steps, self.every_minutes = every_steps, every_minutes

    def first_due_s(self) -> float | None:
        return 60 * self.every_minutes if self.every_minutes else None

    def due_local(self, train_s: float, next_eval_s: float | None) -> bool:
        return next_eval_s is not None and train_s >= next_eval_s

    def due_by_steps(self, step: int) -> bool:
        return bool(self.every_steps and step % self.every_steps == 0)

    def advance(self, next_eval_s: float | None) -> float | None:
        return None if next_eval_s is None or not self.every_minutes else next_eval_s + 60 * self.every_minutes


class TimeLimit:
    """``train.max_minutes`` of training time, then the run ends (with its final evaluation)."""

    def __init__(self, max_minutes: float | None):
        self.max_minutes = max_minutes

    def due_local(self, train_s: float) -> bool:
        return bool(self.max_minutes and train_s > 60 * self.max_minutes)


class Clock:
    """Training time (evaluation and saving excluded) and device-hours, carried across resumes."""

    def __init__(self, world_size: int, train_s: float = 0.0, device_hours: float = 0.0, now: Now = time.time):
        self.world_size, self.prior_s, self.prior_dh, self.now = world_size, train_s, device_hours, now
        self.start, self.paused_s = now(), 0.0

    def segment_s(self) -> float:
        return self.now() - self.start - self.paused_s

    def train_s(self) -> float:
        return self.prior_s + self.segment_s()

    def device_hours(self) -> float:
        return self.prior_dh + self.segment_s() * self.world_size / 3600.0

    def pause(self) -> _Paused:
        """``with clock.pause():`` -- time inside does not count as training (evaluation, saving)."""
        return _Paused(self)


class _Paused:
    def __init__(self, clock: Clock):
        self.clock = clock

    def __enter__(self):
        self.t0 = self.clock.now()

    def __exit__(self, *exc):
        self.clock.paused_s += self.clock.now() - self.t0
        return False
