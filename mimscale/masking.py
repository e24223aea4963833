"""Per-sample mask generators, run in the data loader's collate on CPU workers.

Project-wide convention: ``mask`` is ``bool [B, N]`` in raster order, True = masked (hidden from the
encoder / to be predicted). All randomness comes from the ``torch.Generator`` the loader passes in,
seeded from (seed, epoch, rank, worker, batch index), so a resumed run regenerates the same masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """MAE's rule: N_keep = floor(N * (1 - r)) (r = 0.75, N = 196 -> 49)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1)")
    return int(math.floor(num_patches * (1.0 - mask_ratio) + 1e-9))


def random_masks(batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform random masks, exactly ``N - floor(N(1-r))`` True per row, independent per sample.

    Returns ``bool [B, N]``.
    """
    keep = num_visible(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, generator=generator)
    order = noise.argsort(dim=1)                  # [B, N]: first `keep` are visible
    mask = torch.ones(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], False)
    return mask


def partition_masks(batch: int, num_patches: int, num_parts: int, mask_ratio: float,
                    generator: torch.Generator) -> torch.Tensor:
    """EMAE's K-way partition: per sample, ONE random permutation of the patches cut into ``num_parts`` (K)
    consecutive chunks of ``N_keep = floor(N(1-r))``; chunk k is the visible set of part k.

    The K visible sets are pairwise disjoint; when ``K * N_keep < N`` the leftover patches (the tail of the
    permutation) are hidden in every part. Returns ``bool [B, K, N]``, True = masked in that part.
    """
    keep = num_visible(num_patches, mask_ratio)
    if num_parts < 1 or num_parts * keep > num_patches:
        raise ValueError(f"cannot cut {num_patches} patches into num_parts={num_parts} disjoint visible sets of "
                         f"{keep} (mask_ratio={mask_ratio})")
    noise = torch.rand(batch, num_patches, generator=generator)
    order = noise.argsort(dim=1)                  # [B, N]: one permutation per sample
    visible = order[:, :num_parts * keep].reshape(batch, num_parts, keep)   # [B, K, N_keep]
    mask = torch.ones(batch, num_parts, num_patches, dtype=torch.bool)
    mask.scatter_(2, visible, False)
    return mask


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """Raster-ordered indices of the visible patches: ``mask [B, N]`` -> ``long [B, N_keep]``.

    Every row must hide the same number of patches (true for every generator here).
    """
    b = mask.shape[0]
    idx = (~mask).nonzero(as_tuple=False)[:, 1]
    if idx.numel() % max(b, 1):
        raise ValueError("mask rows hide different numbers of patches")
    return idx.view(b, -1)


@dataclass(frozen=True)
class MaskSpec:
    """What the collate must generate for an objective: ``kind`` and its parameters."""

    kind: str                     # "none" | "random" | "parts"
    num_patches: int
    mask_ratio: float = 0.0
    num_parts: int = 0            # "parts": K disjoint visible sets per sample (EMAE)

    def generate(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.kind == "none":
            return {}
        if self.kind == "random":
            return {"mask": random_masks(batch, self.num_patches, self.mask_ratio, generator)}
        if self.kind == "parts":
            return {"parts": partition_masks(batch, self.num_patches, self.num_parts, self.mask_ratio, generator)}
        raise ValueError(f"unknown mask kind '{self.kind}'")


class MaskCollate:
    """Loader collate: stack the samples, then add the objective's masks (picklable for workers)."""

    def __init__(self, spec: MaskSpec, base: Callable | None = None):
        self.spec = spec
        self.base = base

    def __call__(self, samples: list[dict], generator: torch.Generator) -> dict:
        from .data.loader import default_collate

        batch = (self.base or default_collate)(samples, generator)
        batch.update(self.spec.generate(len(samples), generator))
        return batch
