"""Analytic FLOP counts (forward, 2 x multiply-accumulates of linear layers and the two attention matmuls).

Norms, softmax, GELU and the loss are ignored, as in docs/objectives/README.md (Compute per image). A training
step counts 3x forward for modules that receive gradients and 1x for frozen/EMA teachers.
"""

from __future__ import annotations


def transformer_forward_flops(
    tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0, attn_keys: int | None = None
) -> float:
    """Forward FLOPs of ``depth`` pre-norm blocks on ``tokens`` query tokens of width ``dim``.

    ``attn_keys`` (default: ``tokens``) is the key length of the attention matmuls.
    """
    keys = tokens if attn_keys is None else attn_keys
    linear = 2.0 * tokens * dim * dim * (4 + 2 * mlp_ratio)  # qkv (3) + proj (1) + mlp (2 x ratio)
    attention = 2.0 * 2.0 * tokens * keys * dim  # q @ k^T and attn @ v
    return depth * (linear + attention)


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out
