"""The non-finite policy: a step whose loss is NaN/Inf on any rank, or whose update DeepSpeed skipped for
inf/NaN gradients, is dropped on every rank and counted; after ``patience`` such steps in a row the
policy stops the run or rolls back to the last checkpoint with a smaller lr."""

from __future__ import annotations

from typing import Literal

from .state import TrainState

Action = Literal["continue", "stop", "rollback"]


class NonFinitePolicy:
    def __init__(self, patience: int, on_nonfinite: str, rollback_lr_scale: float, state: TrainState):
        self.patience, self.mode, self.scale, self.state = patience, on_nonfinite, rollback_lr_scale, state

    def bad(self, can_roll_back: bool) -> Action:
        """Record one dropped step; what to do now."""
        self.state.nonfinite_total += 1
        self.state.nonfinite_in_row += 1
        if self.state.nonfinite_in_row < self.patience:
            return "continue"
        return "rollback" if self.mode == "rollback" and can_roll_back else "stop"

    def good(self) -> None:
        self.state.nonfinite_in_row = 0

    def rolled_back(self) -> None:
        self.state.nonfinite_in_row = 0
        self.state.lr_scale *= self.scale
