"""``pretrain(cfg)``: the entry point the CLI and launchers call; the loop itself is :mod:`.trainer`."""
from __future__ import annotations

from .setup import count_samples
from .trainer import Trainer, pretrain

__all__ = ["Trainer", "count_samples", "pretrain"]
