"""``TrainState``: what the loop carries across steps and across resumes (saved as ``trainer.pt``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TrainState:
    """The loop's own counters. Components that persist something keep it here, so one
    ``state_dict()`` is the whole trainer state of a checkpoint.

    ``train_s``/``device_hours`` are the clock's totals at the last save; ``next_eval_s`` is the
    evaluation cadence's next due time (training seconds); ``summary`` holds the kNN results so far.
    """

    step: int = 0
    train_s: float = 0.0
    device_hours: float = 0.0
    next_eval_s: float | None = None
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    lr_scale: float = 1.0
    train_flops: float = 0.0  # training FLOPs so far, each step at its own resolution (perf/train_pflops)
    wandb_id: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Load a saved state; keys this version does not know are ignored, missing ones keep defaults."""
        for f in fields(self):
            if f.name in d:
                setattr(self, f.name, d[f.name])
        self.nonfinite_in_row = 0  # a resumed run starts a fresh streak
