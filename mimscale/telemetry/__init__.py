"""Telemetry: metric sinks (JSONL, TensorBoard, wandb), progress display, memory numbers."""

from mimscale.telemetry.logger import METRIC_GROUPS, MetricLogger, read_jsonl, resolve_wandb_mode
from mimscale.telemetry.memory import memory_stats, reset_peak
from mimscale.telemetry.progress import Progress

__all__ = [
    "METRIC_GROUPS",
    "MetricLogger",
    "Progress",
    "memory_stats",
    "read_jsonl",
    "reset_peak",
    "resolve_wandb_mode",
]
