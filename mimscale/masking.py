"""Per-sample mask generators, run in the data loader's collate on CPU workers.

Project-wide convention: ``mask`` is ``bool [B, N]`` in raster order, True = masked (hidden from the
encoder / to be predicted). All randomness comes from the ``torch.Generator`` the loader passes in,
seeded from (seed, epoch, rank, worker, batch index), so a resumed run regenerates the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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
    order = noise.argsort(dim=1)  # [B, N]: first `keep` are visible
    mask = torch.ones(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], False)
    return mask


def partition_masks(
    batch: int, num_patches: int, num_parts: int, mask_ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """EMAE's K-way partition: per sample, ONE random permutation of the patches cut into ``num_parts`` (K)
    consecutive chunks of ``N_keep = floor(N(1-r))``; chunk k is the visible set of part k.

    The K visible sets are pairwise disjoint; when ``K * N_keep < N`` the leftover patches (the tail of the
    permutation) are hidden in every part. Returns ``bool [B, K, N]``, True = masked in that part.
    """
    keep = num_visible(num_patches, mask_ratio)
    if num_parts < 1 or num_parts * keep > num_patches:
        raise ValueError(
            f"cannot cut {num_patches} patches into num_parts={num_parts} disjoint visible sets of "
            f"{keep} (mask_ratio={mask_ratio})"
        )
    noise = torch.rand(batch, num_patches, generator=generator)
    order = noise.argsort(dim=1)  # [B, N]: one permutation per sample
    visible = order[:, : num_parts * keep].reshape(batch, num_parts, keep)  # [B, K, N_keep]
    mask = torch.ones(batch, num_parts, num_patches, dtype=torch.bool)
    mask.scatter_(2, visible, False)
    return mask


def block_masks(
    batch: int,
    grid: tuple[int, int],
    num_masked: int,
    generator: torch.Generator,
    min_block: int = 16,
    min_aspect: float = 0.3,
    max_attempts: int = 10,
    exact: bool = True,
) -> torch.Tensor:
    """BEiT blockwise masking (DTM's, with ``exact``; ConMIM's "block" mask, without): ``bool [B, H*W]``.

    Per sample, while fewer than ``num_masked`` patches are masked, place a rectangle: up to
    ``max_attempts`` draws of an area uniform between ``min_block`` and ``remaining`` (either order, as
    Python's ``random.uniform`` in the BEiT code), an aspect ratio log-uniform in ``[min_aspect,
    1/min_aspect]``, ``h = round(sqrt(area*aspect))``, ``w = round(sqrt(area/aspect))`` and a uniform top-left
    corner with the block inside the grid; a block is accepted when it adds between 1 and ``remaining`` new
    patches, and placement stops when a round adds nothing. With ``exact`` (DTM's code) uniformly random
    extra patches are then masked (or masked ones unmasked) so that every row has exactly ``num_masked``
    True; without it (BEiT's and ConMIM's code) a row may end below ``num_masked`` (mean ~74.5 of 75 for a
    14 x 14 grid), never above.
    """
    gh, gw = grid
    n = gh * gw
    if not 0 <= num_masked <= n:
        raise ValueError(f"num_masked={num_masked} must be in [0, {n}]")
    lo_a, hi_a = math.log(min_aspect), math.log(1.0 / min_aspect)
    out = torch.zeros(batch, n, dtype=torch.bool)
    for b in range(batch):
        m = torch.zeros(gh, gw, dtype=torch.bool)
        count = 0
        while count < num_masked:
            remaining, added = num_masked - count, 0
            for _ in range(max_attempts):
                u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
                area = min_block + (remaining - min_block) * u[0]
                aspect = math.exp(lo_a + (hi_a - lo_a) * u[1])
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if not (0 < h < gh and 0 < w < gw):
                    continue
                top, left = int(u[2] * (gh - h + 1)), int(u[3] * (gw - w + 1))
                new = h * w - int(m[top : top + h, left : left + w].sum())
                if 0 < new <= remaining:
                    m[top : top + h, left : left + w] = True
                    added = new
                    break
            if added == 0:
                break
            count += added
        flat = m.flatten()
        pool = (~flat if count < num_masked else flat).nonzero().flatten()
        if exact and count != num_masked:
            pick = pool[torch.randperm(pool.numel(), generator=generator)[: abs(num_masked - count)]]
            flat[pick] = count < num_masked
        out[b] = flat
    return out


def visible_indices(mask: torch.Tensor, num_keep: int | None = None) -> torch.Tensor:
    """Raster-ordered indices of the visible patches: ``mask bool [..., N]`` -> ``long [..., N_keep]``.

    With ``num_keep`` (the step's form: N_keep from the objective's config, e.g. :func:`num_visible`): a stable
    argsort of the mask (visible = 0 sorts first, ties keep raster order), cut at ``num_keep``: a shape fixed by
    the config, no host synchronisation, runs on any device. Rows that hide a different number of patches
    are NOT detected there (every generator here hides a fixed count per row).
    Without ``num_keep`` (tests, tools; a host read): N_keep is counted from the data, and rows hiding
    different numbers of patches raise ``ValueError``.
    """
    if num_keep is None:
        counts = (~mask).sum(dim=-1).flatten().tolist()
        if len(set(counts)) > 1:
            raise ValueError("mask rows hide different numbers of patches")
        num_keep = counts[0] if counts else 0
    return torch.argsort(mask.to(torch.uint8), dim=-1, stable=True)[..., :num_keep]


def unit_masks(batch: int, grid: int, unit: int, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """ "random_mps" masking: hide ``ceil(U * r)`` of the ``U = (grid / unit)^2`` aligned ``unit x unit``-patch
    squares, uniformly per sample -> ``bool [B, grid^2]`` (raster order, True = masked) with exactly
    ``unit^2 * ceil(U * r)`` True per row (ViT-B/16, 32-px units: 4 * 37 = 148 of 196)."""
    if grid % unit:
        raise ValueError(f"patch grid {grid} is not a multiple of the mask unit {unit}")
    gu = grid // unit
    k = math.ceil(gu * gu * mask_ratio - 1e-9)
    order = torch.rand(batch, gu * gu, generator=generator).argsort(dim=1)
    units = torch.zeros(batch, gu * gu, dtype=torch.bool)
    units.scatter_(1, order[:, :k], True)
    units = units.view(batch, gu, 1, gu, 1).expand(batch, gu, unit, gu, unit)
    return units.reshape(batch, grid * grid)


class MaskGenerator(Protocol):
    """What an objective's ``mask_spec()`` returns: a picklable per-batch generator (runs in loader workers)."""

    def generate(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class MaskSpec:
    """What the collate generates for an objective (the one mask mechanism): ``kind`` and its parameters.
    ``generate(batch, generator)`` runs in the loader workers on CPU and draws only from ``generator``.

    ============== =========================================== ==============================================
    kind           parameters                                  batch entries
    ============== =========================================== ==============================================
    none           --                                          --
    random         ``mask_ratio``                              ``mask bool [B, N]`` (MAE)
    parts          ``mask_ratio``, ``num_parts``               ``parts long [B, K, N_vis]`` (EMAE)
    block          ``num_masked``, ``min_block``, ``exact``    ``mask bool [B, N]`` (BEiT blocks: DTM exact,
                                                               ConMIM not)
    units          ``mask_ratio``, ``unit``                    ``mask bool [B, N]`` (ConMIM random_mps)
    crops          ``mask_ratio``, ``num_crops``               ``crop_masks bool [B, num_crops, N]`` (MAE+,
                                                               AdPE; ``num_patches`` per crop)
    permutation    ``least``                                   ``rank int16 [B, N]`` (MaPeT orders)
    ============== =========================================== ==============================================
    """

    kind: str
    num_patches: int
    mask_ratio: float = 0.0
    num_parts: int = 0
    num_masked: int = 0
    min_block: int = 16
    exact: bool = True
    unit: int = 1
    num_crops: int = 0
    least: int = 0

    def generate(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        n = self.num_patches
        if self.kind == "none":
            return {}
        if self.kind == "random":
            return {"mask": random_masks(batch, n, self.mask_ratio, generator)}
        if self.kind == "parts":
            return {"parts": partition_masks(batch, n, self.num_parts, self.mask_ratio, generator)}
        if self.kind == "block":
            g = _side(n)
            return {
                "mask": block_masks(
                    batch, (g, g), self.num_masked, generator, min_block=self.min_block, exact=self.exact
                )
            }
        if self.kind == "units":
            return {"mask": unit_masks(batch, _side(n), self.unit, self.mask_ratio, generator)}
        if self.kind == "crops":
            m = random_masks(batch * self.num_crops, n, self.mask_ratio, generator)
            return {"crop_masks": m.view(batch, self.num_crops, n)}
        if self.kind == "permutation":
            return {"rank": permutation_ranks(batch, n, generator)}
        raise ValueError(f"unknown mask kind '{self.kind}'")


def _side(num_patches: int) -> int:
    g = int(round(num_patches**0.5))
    if g * g != num_patches:
        raise ValueError(f"{num_patches} patches are not a square grid")
    return g


def permutation_ranks(batch: int, num_patches: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random factorisation orders: ``int16 [B, N]``, ``rank[b, i]`` in 1..N is the position of
    patch ``i`` (raster index) in sample ``b``'s order (the cls token implicitly has rank 0)."""
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)  # [B, N]: rank-1 -> patch
    return (order.argsort(dim=1) + 1).to(torch.int16)  # [B, N]: patch -> rank


class MaskCollate:
    """Loader collate: stack the samples, then add the objective's masks (picklable for workers)."""

    def __init__(self, spec: MaskGenerator, base: Callable | None = None):
        self.spec = spec
        self.base = base

    def __call__(self, samples: list[dict], generator: torch.Generator) -> dict:
        from .data.loader import default_collate

        batch = (self.base or default_collate)(samples, generator)
        batch.update(self.spec.generate(len(samples), generator))
        return batch


def grid_key(img_size: int, key: str) -> str:
    """The batch key of mask entry ``key`` for ``img_size`` images under a resolution schedule: ``"32px/mask"``."""
    return f"{img_size}px/{key}"


class GridMasks:
    """Masks for every image size of a resolution schedule (``train.resolution_schedule``), picklable for workers.

    ``specs`` maps image size -> that grid's generator; ``full`` is ``model.img_size``. The full size's entries
    keep their plain keys and are drawn first, so they equal a schedule-less run's; each smaller size's follow
    under :func:`grid_key` (``"16px/mask" bool [B, 16]``). Which size a step trains on is the trainer's choice
    (:func:`mimscale.engine.resolution.at_size` picks the entries), so the loader's stream and state do not
    depend on it: a resumed run regenerates the same batches wherever the switch falls.
    """

    def __init__(self, specs: dict[int, MaskGenerator], full: int):
        if full not in specs:
            raise ValueError(f"GridMasks needs the full size {full} among {sorted(specs)}")
        self.specs, self.full = dict(specs), full

    def generate(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = dict(self.specs[self.full].generate(batch, generator))
        for size in sorted(s for s in self.specs if s != self.full):
            out.update({grid_key(size, k): v for k, v in self.specs[size].generate(batch, generator).items()})
        return out
