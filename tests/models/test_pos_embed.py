"""Fixed 2-D sin-cos position embeddings (column-first layout, raster order, zero cls slot)."""

import math

import numpy as np
import pytest
import torch

from mimscale.models.pos_embed import grid_coords, resample_rel_pos_table, sincos_2d, sincos_from_coords


def _numpy_reference(dim: int, grid: int) -> np.ndarray:
    """Independent float64 formulation: meshgrid with the column axis first, outer products."""
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # [G, G] each
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def half(c):
        a = np.outer(c.reshape(-1), omega)
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return np.concatenate([half(cols), half(rows)], axis=1)  # [G*G, dim], raster order


@pytest.mark.parametrize("dim,grid", [(8, 2), (32, 4), (64, 7), (768, 14)])
def test_shape_cls_zero_and_range(dim, grid):
    pe = sincos_2d(dim, grid)
    assert pe.shape == (1, grid * grid + 1, dim)
    assert pe.dtype == torch.float32
    assert not pe.requires_grad
    assert torch.all(pe[0, 0] == 0)
    assert pe.abs().max() <= 1.0
    no_cls = sincos_2d(dim, grid, cls_token=False)
    assert no_cls.shape == (1, grid * grid, dim)
    assert torch.equal(no_cls[0], pe[0, 1:])


@pytest.mark.parametrize("dim,grid", [(16, 3), (64, 7), (512, 14)])
def test_matches_independent_reference(dim, grid):
    ref = torch.from_numpy(_numpy_reference(dim, grid)).float()
    assert torch.allclose(sincos_2d(dim, grid)[0, 1:], ref, atol=1e-6, rtol=0)


def test_column_first_layout_by_value():
    # dim 8 -> 2 frequencies per half: omega = (1, 1/100). grid 2: patch i at (col, row) = (i % 2, i // 2).
    pe = sincos_2d(8, 2)[0]
    s1, c1, s2, c2 = math.sin(1.0), math.cos(1.0), math.sin(0.01), math.cos(0.01)
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],  # cls
            [0, 0, 1, 1, 0, 0, 1, 1],  # patch 0: col 0, row 0
            [s1, s2, c1, c2, 0, 0, 1, 1],  # patch 1: col 1, row 0  -> first half moves
            [0, 0, 1, 1, s1, s2, c1, c2],  # patch 2: col 0, row 1  -> second half moves
            [s1, s2, c1, c2, s1, s2, c1, c2],  # patch 3: col 1, row 1
        ],
        dtype=torch.float32,
    )
    assert torch.allclose(pe, expected, atol=1e-7, rtol=0)


def test_grid_coords_raster_order():
    c = grid_coords(3)
    assert c.shape == (9, 2)
    assert c[5].tolist() == [2.0, 1.0]  # patch 5: row 1, col 2 -> (col, row)
    assert c[7].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("bad", [6, 10, 0, 2])
def test_dim_not_divisible_by_4_raises(bad):
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(bad, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_from_coords(bad, torch.zeros(3, 2))


def test_coords_variant_reproduces_table_in_fp32():
    dim, grid = 64, 7
    table = sincos_2d(dim, grid)[0, 1:]
    delta = torch.zeros(2)
    emb = sincos_from_coords(dim, grid_coords(grid) + delta)
    assert emb.dtype == torch.float32
    assert (emb - table).abs().max() < 1e-6


def test_coords_batched_fractional_and_differentiable():
    dim = 16
    coords = torch.rand(3, 5, 2, dtype=torch.float64) * 4
    coords.requires_grad_(True)
    emb = sincos_from_coords(dim, coords)
    assert emb.shape == (3, 5, dim) and emb.dtype == torch.float64
    # value check for one entry: column half then row half
    col, row = coords[1, 2].detach().tolist()
    om = [10000 ** (-k / 4) for k in range(4)]
    exp = [math.sin(col * w) for w in om] + [math.cos(col * w) for w in om]
    exp += [math.sin(row * w) for w in om] + [math.cos(row * w) for w in om]
    assert torch.allclose(emb[1, 2].detach(), torch.tensor(exp, dtype=torch.float64), atol=1e-12)
    emb.sum().backward()
    assert coords.grad is not None and coords.grad.abs().sum() > 0


def test_coords_low_precision_promoted_to_fp32():
    c = grid_coords(4).to(torch.bfloat16)
    emb = sincos_from_coords(32, c)
    assert emb.dtype == torch.float32


def test_coords_wrong_trailing_axis_raises():
    with pytest.raises(ValueError, match="trailing axis"):
        sincos_from_coords(8, torch.zeros(4, 3))


@pytest.mark.parametrize("g0, g", [(4, 8), (8, 4), (4, 7), (7, 14), (14, 24), (2, 3)])
def test_relative_table_resize_equals_timm_beit(g0, g):
    """BEiT's table resize (geometric source offsets, bilinear, cls rows kept) against timm's own function
    (what its Beit checkpoint filter calls), for growing and shrinking grids."""
    from timm.layers import resize_rel_pos_bias_table

    table = torch.randn((2 * g0 - 1) ** 2 + 3, 3, generator=torch.Generator().manual_seed(g0 * 100 + g))
    ours = resample_rel_pos_table(table, g)
    ref = resize_rel_pos_bias_table(table, new_window_size=(g, g), new_bias_shape=((2 * g - 1) ** 2 + 3, 3))
    assert ours.shape == ref.shape and ours.dtype == table.dtype
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[-3:], table[-3:])
