"""Fixed 2-D sin-cos position embeddings.

Layout (project convention, docs/objectives/README.md): for width ``W`` the first
``W/2`` channels encode the **column** coordinate and the last ``W/2`` the
**row** coordinate. Each half uses ``W/4`` frequencies
``omega_k = 10000 ** (-k / (W/4))``, k = 0..W/4-1, laid out as
``[sin(c * omega_0..), cos(c * omega_0..)]``. Patches are in raster order
(patch ``i`` sits at row ``i // G``, column ``i % G``) and the optional cls
slot (index 0) is all zeros.

``sincos_from_coords`` takes arbitrary (possibly fractional, possibly
differentiable) coordinates, which AdPE's coordinate mode perturbs; the fixed
table ``sincos_2d`` is built on it, so a zero perturbation reproduces the table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sincos_2d", "sincos_from_coords", "grid_coords", "resample_abs_pos_embed", "resample_rel_pos_table"]

_TEMPERATURE = 10000.0


def _check_dim(dim: int) -> None:
    if not isinstance(dim, int) or dim <= 0 or dim % 4 != 0:
        raise ValueError(
            f"2-D sin-cos position embedding needs a positive width divisible by 4 "
            f"(half for columns, half for rows, each split into sin and cos); got dim={dim!r}"
        )


def grid_coords(grid: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Integer grid coordinates in raster order.

    Returns:
        coords: ``[grid*grid, 2]`` with ``coords[i] = (col, row) = (i % grid, i // grid)``.
    """
    if grid <= 0:
        raise ValueError(f"grid must be positive, got {grid}")
    idx = torch.arange(grid * grid, device=device)
    return torch.stack([idx % grid, idx // grid], dim=-1).to(dtype)


def sincos_from_coords(dim: int, coords: Tensor) -> Tensor:
    """Sin-cos embedding of continuous 2-D coordinates.

    Args:
        dim: embedding width ``W`` (multiple of 4).
        coords: ``[..., N, 2]`` float coordinates, last axis ``(col, row)``.
            May require grad (gradients flow through sin/cos).

    Returns:
        ``[..., N, W]``: ``[sin(col*w), cos(col*w), sin(row*w), cos(row*w)]``
        with ``w`` the ``W/4`` frequencies. Computed in at least fp32 (bf16/fp16
        inputs are promoted, since sin/cos of large arguments in bf16 is wrong by
        whole periods); the output dtype is the promoted coordinate dtype.
    """
    _check_dim(dim)
    if coords.shape[-1] != 2:
        raise ValueError(f"coords must have a trailing axis of size 2 (col, row); got shape {tuple(coords.shape)}")
    if not coords.is_floating_point() or coords.dtype in (torch.float16, torch.bfloat16):
        coords = coords.to(torch.float32)
    quarter = dim // 4
    k = torch.arange(quarter, dtype=coords.dtype, device=coords.device)
    omega = _TEMPERATURE ** (-k / quarter)  # [W/4]
    out = []
    for axis in (0, 1):  # column first, then row
        angle = coords[..., axis : axis + 1] * omega  # [..., N, W/4]
        out.append(torch.sin(angle))
        out.append(torch.cos(angle))
    return torch.cat(out, dim=-1)


def sincos_2d(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos table for a ``grid x grid`` patch grid.

    Args:
        dim: embedding width ``W`` (multiple of 4, else ``ValueError``).
        grid: patch-grid side ``G``.
        cls_token: prepend an all-zero row for the cls slot.

    Returns:
        ``[1, G*G + int(cls_token), W]`` float32. Computed in float64 and rounded
        once to float32.
    """
    _check_dim(dim)
    table = sincos_from_coords(dim, grid_coords(grid, dtype=torch.float64))  # [N, W]
    if cls_token:
        table = torch.cat([table.new_zeros(1, dim), table], dim=0)
    return table.to(torch.float32).unsqueeze(0)


def resample_abs_pos_embed(pos: Tensor, grid: int, prefix: int = 1) -> Tensor:
    """A learned absolute position embedding on a new patch grid (as timm resamples: bicubic, antialiased,
    ``align_corners=False``; the ``prefix`` cls slots are kept as they are).

    ``pos: [1, prefix + G0*G0, D] -> [1, prefix + grid*grid, D]`` (float32 math, input dtype out).
    """
    import torch.nn.functional as F

    n0 = pos.shape[1] - prefix
    g0 = int(round(n0**0.5))
    if g0 * g0 != n0:
        raise ValueError(f"pos_embed with {n0} patch slots is not a square grid")
    if g0 == grid:
        return pos
    dim = pos.shape[-1]
    patches = pos[:, prefix:].float().reshape(1, g0, g0, dim).permute(0, 3, 1, 2)  # [1, D, G0, G0]
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)
    return torch.cat([pos[:, :prefix], patches], dim=1)


def _beit_offsets(src_side: int, dst_side: int) -> Tensor:
    """Where BEiT places the ``src_side`` offsets of a table when it resizes it for ``dst_side`` offsets
    (``float64 [src_side]``, symmetric about 0): the steps out from the centre grow geometrically,
    ``1, q, q^2, ...``, so the ``src_side // 2`` offsets on each side reach about ``dst_side // 2``. The ratio
    ``q`` is found by bisection in ``[1.01, 1.5]`` to ``1e-6``, as BEiT does (a shrinking table stays at
    ``q ~ 1.01``: the source then spans more than the target)."""
    n, reach = src_side // 2, dst_side // 2
    lo, hi, q = 1.01, 1.5, 1.01
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q**n) / (1.0 - q) > reach:  # 1 + q + ... + q^(n-1)
            hi = q
        else:
            lo = q
    steps = torch.tensor([q**i for i in range(n)], dtype=torch.float64)
    right = torch.cumsum(steps, 0)  # [n]: 1, 1 + q, 1 + q + q^2, ...
    return torch.cat([-right.flip(0), right.new_zeros(1), right])


def _linear_matrix(src: Tensor, dst: Tensor) -> Tensor:
    """``[len(dst), len(src)]`` weights of piecewise-linear interpolation from points ``src`` (increasing) to
    ``dst``; a target outside ``src`` takes the nearest end value."""
    if len(src) == 1:  # a 1x1 grid's single offset: a constant
        return torch.ones(len(dst), 1, dtype=src.dtype)
    t = dst.clamp(src[0], src[-1])
    right = torch.searchsorted(src, t, right=True).clamp(1, len(src) - 1)  # src[right-1] <= t < src[right]
    left = right - 1
    w = (t - src[left]) / (src[right] - src[left])  # [T]
    out = torch.zeros(len(dst), len(src), dtype=src.dtype)
    rows = torch.arange(len(dst))
    out[rows, left] = 1.0 - w
    out[rows, right] += w
    return out


def resample_rel_pos_table(table: Tensor, grid: int) -> Tensor:
    """A BEiT relative position bias table for a new patch grid, as BEiT (and timm's Beit checkpoint filter)
    resizes it: each head's ``(2G0-1) x (2G0-1)`` offset grid sits on geometrically spaced positions
    (:func:`_beit_offsets`: fine near offset 0, stretched or squeezed towards the edges) and is sampled
    bilinearly at the integer offsets ``-(G-1)..G-1`` of the new grid (offset 0 stays offset 0; outside the
    source span the edge value). The three cls rows (cls->patch, patch->cls, cls->cls) are kept.

    ``table: [(2G0-1)^2 + 3, h] -> [(2*grid-1)^2 + 3, h]`` (float64 math, input dtype out).
    """
    side0 = math.isqrt(table.shape[0] - 3) if table.shape[0] >= 3 else -1
    if side0 * side0 != table.shape[0] - 3 or side0 % 2 == 0:
        raise ValueError(f"a relative position table of {table.shape[0]} rows is not (2G-1)^2 + 3")
    side = 2 * grid - 1
    if side0 == side:
        return table
    w = _linear_matrix(_beit_offsets(side0, side), torch.arange(-(side // 2), side // 2 + 1, dtype=torch.float64))
    w = w.to(table.device)
    heads = table.shape[1]
    z = table[:-3].double().reshape(side0, side0, heads).permute(2, 0, 1)  # [h, S0, S0] (row offset, col offset)
    z = w @ z @ w.T  # [h, S, S]: rows and columns interpolated alike
    z = z.permute(1, 2, 0).reshape(side * side, heads).to(table.dtype)
    return torch.cat([z, table[-3:]], dim=0)
