"""Progressive resolution for pre-training (``train.resolution_schedule``): smaller images early, ``model.img_size``
at the end, as FFCV's ResNet recipes and fast-MAE work do to cut time-to-accuracy.

The schedule maps a fraction of the training budget to an image size. The fraction is the lr schedule's own
position (``step / total``; under ``train.schedule_by_time`` the time-re-planned total), so the switch falls where
the cosine says the run is, and with a step budget the size is a pure function of the step: a resumed run
regenerates it. The loader's workers crop at ``model.img_size`` and draw the masks of every size of the schedule
(:class:`mimscale.masking.GridMasks`); :func:`at_size` downsamples the batch on the device (antialiased bilinear)
and keeps the masks of the current grid. The loader's stream and state therefore do not depend on the schedule's
position, and checkpoints hold nothing new.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch.nn.functional as F

from ..masking import grid_key


class ResolutionSchedule:
    """``phases``: ``(fraction, img_size)`` pairs, fractions increasing from 0 (validated by
    :func:`mimscale.config.validate`); ``full``: ``model.img_size`` (the last phase's size)."""

    def __init__(self, phases: Sequence[tuple[float, int]], full: int):
        self.fractions = [float(f) for f, _ in phases]
        self.sizes = [int(s) for _, s in phases]
        self.full = full

    def size_at(self, fraction: float) -> int:
        """The image size at ``fraction`` of the budget (the last phase that has started)."""
        return self.sizes[max(0, bisect.bisect_right(self.fractions, fraction) - 1)]

    def distinct_sizes(self) -> list[int]:
        return sorted(set(self.sizes))

    def mean_flops(self, flops_at: Callable[[int], float]) -> float:
        """Training FLOPs per image averaged over the budget: each phase's FLOPs per image (``flops_at(size)``)
        weighted by its share of the steps (the planned cost; ``perf/train_pflops`` sums the actual steps)."""
        ends = [*self.fractions[1:], 1.0]
        return sum((end - start) * flops_at(s) for start, end, s in zip(self.fractions, ends, self.sizes))

    def __repr__(self) -> str:
        return " -> ".join(f"{s} px from {f:.0%}" for f, s in zip(self.fractions, self.sizes))


def at_size(batch: dict, size: int, full: int) -> dict:
    """The batch of a step at ``size``: ``image [B, C, full, full]`` downsampled to ``[B, C, size, size]``
    (antialiased bilinear, on the batch's device) and the ``"{size}px/..."`` mask entries under their plain
    keys; every other size's entries are dropped. ``size == full``: the plain entries, unchanged.

    Images of another side (MAE+ / AdPE crops, ``[B, num_crops, C, c, c]``: ``c`` px of a ``full`` px image)
    shrink by the same factor, to ``c * size / full`` px (a whole number: the objective checks its crop sizes)."""
    prefix = grid_key(size, "")
    out = {k: v for k, v in batch.items() if "px/" not in k}
    if size == full:
        return out
    out.update({k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)})
    img = batch["image"]
    side = img.shape[-1] * size // full
    if side * full != img.shape[-1] * size:
        raise ValueError(f"{img.shape[-1]} px images do not shrink to whole pixels at {size}/{full} of the size")
    flat = img.reshape(-1, *img.shape[-3:]).float()  # [B*..., C, c, c]
    small = F.interpolate(flat, size=(side, side), mode="bilinear", antialias=True)
    out["image"] = small.reshape(*img.shape[:-2], side, side).to(img.dtype)
    return out
