"""Every per-step decision of the loop in one tensor: one collective and one host sync per optimizer step.

The flags (non-finite loss, signal received, time limit, evaluation due, save due) are ORed across ranks;
on logging steps the metric window's sums ride along in the same tensor and are summed. One
``all_reduce(SUM)`` then covers both (a flag is set on some rank iff its sum is > 0), and one ``tolist()``
brings the result to the host. Device-side flags (``isfinite`` of the loss) never sync on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

FLAGS = ("nonfinite", "signal", "time_up", "eval_due", "save_due")


@dataclass
class Agreed:
    """The all-rank result of one :meth:`StepFlags.agree`: each flag, and the metric means (if sent)."""

    nonfinite: bool = False
    signal: bool = False
    time_up: bool = False
    eval_due: bool = False
    save_due: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


class StepFlags:
    """Packs this rank's flags (+ optional metric sums) and reduces them over the data-parallel ranks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.collectives = 0  # how many reductions this object has issued (tests count them)

    def agree(
        self,
        nonfinite: torch.Tensor | bool,
        *,
        metrics: dict[str, torch.Tensor] | None = None,
        count: int = 0,
        **host: bool,
    ) -> Agreed:
        """``nonfinite``: a device bool (no sync); ``host``: the other flags as Python bools;
        ``metrics``: per-key sums over ``count`` micro-batches, averaged over all ranks' micro-batches.
        :meth:`pack` then :meth:`reduce`."""
        packed, keys = self.pack(nonfinite, metrics=metrics, count=count, **host)
        return self.reduce(packed, keys)

    def pack(
        self,
        nonfinite: torch.Tensor | bool,
        *,
        metrics: dict[str, torch.Tensor] | None = None,
        count: int = 0,
        **host: bool,
    ) -> tuple[torch.Tensor, list[str]]:
        """The device side of :meth:`agree`, no collective and no host read: ``packed float32 [len(FLAGS) + 1 + K]``
        on ``self.device`` (the flags, ``count``, then the ``K`` metrics in sorted key order) and those keys.

        Every metric must already be on ``self.device`` (a CPU tensor among device ones fails here)."""
        unknown = set(host) - set(FLAGS[1:])
        if unknown:
            raise TypeError(f"unknown step flags: {sorted(unknown)}")
        keys = sorted(metrics or {})
        host_part = torch.tensor([float(host.get(k, False)) for k in FLAGS[1:]] + [float(count)])
        parts = [
            torch.as_tensor(nonfinite, device=self.device).float().reshape(1),
            host_part.to(self.device, non_blocking=True),
        ]
        if keys:
            assert metrics is not None  # keys come from it
            parts.append(torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).to(self.device))
        return torch.cat(parts), keys

    def reduce(self, packed: torch.Tensor, keys: list[str]) -> Agreed:
        """Sum ``packed`` (from :meth:`pack`) over the data-parallel ranks (one collective when there are
        several) and read it on the host (the one host synchronisation of the step)."""
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(packed)
            self.collectives += 1
        values = packed.tolist()  # the one host synchronisation of the step
        flags = {k: values[i] > 0 for i, k in enumerate(FLAGS)}
        n = max(values[len(FLAGS)], 1.0)
        means = {k: values[len(FLAGS) + 1 + i] / n for i, k in enumerate(keys)}
        return Agreed(**flags, metrics=means)
