"""mimscale.masking: per-sample random masks (OBJECTIVES.md 1.5.1-1.5.2), visible indices, MaskCollate."""

from __future__ import annotations

import math

import pytest
import torch

from mimscale.data.loader import default_collate
from mimscale.masking import MaskCollate, MaskSpec, num_visible, random_masks, visible_indices


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- counts (1.5.1)


@pytest.mark.parametrize("n", [16, 49, 196])
@pytest.mark.parametrize("r", [0.25, 0.5, 0.75])
def test_row_sums_exact(n, r):
    b = 8
    mask = random_masks(b, n, r, _gen(1))  # bool [B, N]
    assert mask.shape == (b, n) and mask.dtype == torch.bool
    expected = n - math.floor(n * (1 - r))
    assert mask.sum(dim=1).tolist() == [expected] * b
    assert num_visible(n, r) == math.floor(n * (1 - r))


@pytest.mark.parametrize(
    "n,r,keep",
    [
        (196, 0.75, 49),  # the canonical ViT-B/16 case: 49, not 50
        (49, 0.25, 36),  # 36.75: floor 36, round 37
        (49, 0.5, 24),  # 24.5: floor 24, int(x + 0.5) 25
        (256, 0.75, 64),  # ViT-H/14
        (16, 0.0, 16),
        (10, 0.9, 1),  # 10 * 0.1 is 0.99999... in floating point; the exact value is 1
        (10, 0.7, 3),
    ],
)
def test_num_visible_uses_floor(n, r, keep):
    assert num_visible(n, r) == keep
    assert random_masks(2, n, r, _gen()).logical_not().sum(1).tolist() == [keep, keep]


@pytest.mark.parametrize("r", [-0.1, 1.0, 1.5])
def test_num_visible_rejects_bad_ratio(r):
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(16, r)


def test_ratio_zero_masks_nothing():
    mask = random_masks(4, 16, 0.0, _gen())
    assert not mask.any()
    assert visible_indices(mask).tolist() == [list(range(16))] * 4


# ----------------------------------------------------------------------------- per sample, seeded (1.5.2)


def test_rows_differ():
    mask = random_masks(8, 16, 0.75, _gen(0))  # [8, 16]
    assert len({tuple(row.tolist()) for row in mask}) > 1
    # 1820 possible masks per row: a shared mask would make all eight equal
    assert len({tuple(row.tolist()) for row in random_masks(8, 196, 0.75, _gen(0))}) == 8


def test_same_seed_bit_identical():
    a = random_masks(8, 196, 0.75, _gen(123))
    b = random_masks(8, 196, 0.75, _gen(123))
    assert torch.equal(a, b)
    c = random_masks(8, 196, 0.75, _gen(124))
    assert not torch.equal(a, c)


def test_global_rng_not_used():
    torch.manual_seed(0)
    a = random_masks(4, 49, 0.5, _gen(7))
    torch.manual_seed(99)
    b = random_masks(4, 49, 0.5, _gen(7))
    assert torch.equal(a, b)


def test_masks_are_uniform_over_positions():
    """Every patch position is masked with probability r (uniform without replacement)."""
    mask = random_masks(4000, 16, 0.75, _gen(3))  # [4000, 16]
    freq = mask.float().mean(0)  # [16]
    assert torch.allclose(freq, torch.full((16,), 0.75), atol=0.03)


# ----------------------------------------------------------------------------- visible indices


def test_visible_indices_sorted_and_inverse_consistent():
    b, n = 8, 49
    mask = random_masks(b, n, 0.75, _gen(5))  # [8, 49]
    idx = visible_indices(mask)  # [8, 12]
    assert idx.shape == (b, 12) and idx.dtype == torch.long
    assert torch.equal(idx, idx.sort(dim=1).values)  # raster order
    assert (idx[:, 1:] > idx[:, :-1]).all()  # strictly: no duplicates
    # inverse: the indices name exactly the unmasked slots
    rebuilt = torch.ones(b, n, dtype=torch.bool).scatter_(1, idx, False)
    assert torch.equal(rebuilt, mask)
    assert not mask.gather(1, idx).any()


def test_visible_indices_by_value():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])  # [2, 4]
    assert visible_indices(mask).tolist() == [[1, 3], [0, 1]]


def test_visible_indices_rejects_ragged_rows():
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    with pytest.raises(ValueError, match="different numbers"):
        visible_indices(mask)


# ----------------------------------------------------------------------------- spec and collate


def _samples(b: int = 4) -> list[dict]:
    g = _gen(11)
    return [{"image": torch.rand(3, 16, 16, generator=g), "label": i % 3, "key": f"s{i:03d}"} for i in range(b)]


def test_mask_spec():
    assert MaskSpec("none", 16).generate(4, _gen()) == {}
    out = MaskSpec("random", 16, 0.75).generate(4, _gen(2))
    assert set(out) == {"mask"}
    assert torch.equal(out["mask"], random_masks(4, 16, 0.75, _gen(2)))
    with pytest.raises(ValueError, match="unknown mask kind 'blocks'"):
        MaskSpec("blocks", 16).generate(4, _gen())


def test_mask_collate_adds_mask_to_the_default_collate():
    samples = _samples(4)
    collate = MaskCollate(MaskSpec("random", 16, 0.75))
    batch = collate(samples, _gen(9))
    plain = default_collate(samples)
    assert set(batch) == set(plain) | {"mask"}
    assert batch["image"].shape == (4, 3, 16, 16) and torch.equal(batch["image"], plain["image"])
    assert batch["label"].tolist() == [0, 1, 2, 0] and batch["label"].dtype == torch.long
    assert batch["key"] == ["s000", "s001", "s002", "s003"]
    assert batch["mask"].shape == (4, 16) and batch["mask"].dtype == torch.bool
    assert batch["mask"].sum(1).tolist() == [12] * 4
    # the masks come from the generator the loader passes (reproducible on resume)
    assert torch.equal(batch["mask"], collate(samples, _gen(9))["mask"])
    assert torch.equal(batch["mask"], random_masks(4, 16, 0.75, _gen(9)))


def test_mask_collate_none_spec_and_custom_base():
    samples = _samples(2)
    batch = MaskCollate(MaskSpec("none", 16))(samples, _gen())
    assert "mask" not in batch and batch["image"].shape == (2, 3, 16, 16)

    def base(s, generator):
        return {"n": len(s)}

    assert set(MaskCollate(MaskSpec("random", 16, 0.5), base)(samples, _gen())) == {"n", "mask"}


def test_mask_collate_is_picklable():
    import pickle

    c = pickle.loads(pickle.dumps(MaskCollate(MaskSpec("random", 16, 0.5))))
    assert c.spec == MaskSpec("random", 16, 0.5)


# ---- block_masks (BEiT blockwise, exact count: DTM 5.5.8, ConMIM "block")
from mimscale.masking import block_masks  # noqa: E402


@pytest.mark.parametrize("grid,count", [((14, 14), 75), ((4, 4), 6), ((8, 8), 0), ((7, 7), 49), ((16, 16), 98)])
def test_block_masks_exact_count(grid, count):
    m = block_masks(16, grid, count, torch.Generator().manual_seed(0))
    assert m.shape == (16, grid[0] * grid[1]) and m.dtype == torch.bool
    assert (m.sum(1) == count).all()


def test_block_masks_are_blocky_seeded_and_differ_across_samples():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = block_masks(8, (14, 14), 75, g()), block_masks(8, (14, 14), 75, g())
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) == 8
    # blocks, not salt-and-pepper: most masked patches have a masked 4-neighbour
    grid = a.view(8, 14, 14)
    nb = torch.zeros_like(grid)
    nb[:, 1:] |= grid[:, :-1]
    nb[:, :-1] |= grid[:, 1:]
    nb[:, :, 1:] |= grid[:, :, :-1]
    nb[:, :, :-1] |= grid[:, :, 1:]
    assert (grid & nb).sum() / grid.sum() > 0.9


def test_block_masks_rejects_impossible_count():
    with pytest.raises(ValueError):
        block_masks(1, (4, 4), 17, torch.Generator())


def test_block_masks_without_exact_count_follow_beits_generator():
    """ConMIM's (BEiT's) generator does not force the count: rows end at or below the target, on average just
    below it (~74.5 of 75 on 14 x 14); DTM's (exact) tops the short rows up."""
    free = block_masks(400, (14, 14), 75, torch.Generator().manual_seed(0), exact=False)
    counts = free.sum(1).float()
    assert (counts <= 75).all() and (counts < 75).any()
    assert 73.5 < counts.mean().item() < 75.0
    exact = block_masks(400, (14, 14), 75, torch.Generator().manual_seed(0), exact=True)
    assert (exact.sum(1) == 75).all()


def test_block_area_is_drawn_between_min_block_and_the_remainder():
    """When fewer than min_block patches remain, BEiT's random.uniform(min_block, remaining) draws areas
    below min_block too: small top-up blocks appear (area < 16 with h, w >= 1)."""
    m = block_masks(200, (14, 14), 20, torch.Generator().manual_seed(1), exact=False)
    assert (m.sum(1) <= 20).all() and (m.sum(1) > 16).float().mean() > 0.5
