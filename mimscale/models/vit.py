"""Vision Transformer encoder for masked-image-modeling pre-training.

The parameter / buffer names and shapes equal timm's
``timm.models.vision_transformer.VisionTransformer`` built with the same
arguments (class token, position embedding on the cls slot too, no pre-norm),
so ``timm_model.load_state_dict(model.state_dict(), strict=True)`` works and
the exported encoder can be fine-tuned with any timm-based recipe.

What this module adds over a plain timm ViT:

* forward on a per-sample subset of patch tokens (``keep_idx``), the
  MAE-style encoder;
* ``encode(tokens, attn_mask)`` with a boolean SDPA mask (True = may attend)
  so objectives can run custom attention patterns (two-stream, BEiT-style);
* ``Attention.forward_qkv(x_q, x_kv)`` which reuses the fused qkv weights for
  cross-stream attention;
* a fixed 2-D sin-cos ``pos_embed`` kept as a persistent *buffer*: in the
  state_dict (timm loads it), never seen by the optimizer or weight decay;
* ``pos_embed="relative"``: the BEiT layout (no absolute embedding, one
  relative position bias table shared by all blocks, q/v biases without a k
  bias); :meth:`VisionTransformer.export_state_dict` writes it with the table
  copied into every block, which loads strictly into timm's ``Beit``
  (``beit_base_patch16_224`` / ``beit_large_patch16_224``);
* three initialisation schemes (``init_weights(scheme)``): MAE's xavier,
  BEiT's truncated normal with the depth rescale, timm's truncated normal;
* per-block activation checkpointing (non-reentrant).

Shapes: ``B`` batch, ``C`` channels, ``H, W`` image size, ``N`` patches,
``K`` kept patches, ``L`` sequence length, ``D`` width, ``h`` heads.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .pos_embed import resample_abs_pos_embed, sincos_2d

__all__ = [
    "ARCHS",
    "INIT_SCHEMES",
    "POS_EMBEDS",
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "RelativePositionBias",
    "VisionTransformer",
    "build_vit",
    "timm_beit_kwargs",
    "timm_kwargs",
    "timm_model_name",
    "init_linear_",
    "init_token_",
    "trunc_normal_sigma_",
]

LN_EPS = 1e-6
POS_EMBEDS = ("sincos", "learned", "relative")
#: ``mae``: xavier-uniform (MAE code); ``beit``: truncated normal std 0.02 cut at +-1 std with the
#: 1/sqrt(2 l) rescale of each block's output projections (BEiT / ConMIM / DTM code); ``timm``: timm's
#: truncated normal std 0.02 (cut at +-2, i.e. practically untruncated), cls ~ N(0, 1e-6) (MaPeT code).
INIT_SCHEMES = ("mae", "beit", "timm")

#: Encoder shapes. ``vit_micro`` is not a timm architecture; it exists for fast tests.
ARCHS: dict[str, dict[str, Any]] = {
    "vit_micro": dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
}

# A timm registry entry with the same width/depth/heads for each arch; used when
# the canonical ``{arch}_patch{p}_{img}`` name is not registered in timm (the
# entry's geometry is then overridden by ``img_size=`` / ``patch_size=``).
_TIMM_REFERENCE = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


# --------------------------------------------------------------------------- init helpers


def trunc_normal_sigma_(t: Tensor, std: float) -> Tensor:
    """In place: normal(0, std) truncated at +-1 std (the BEiT-family codes' ``trunc_normal_``, whose
    bounds equal ``std``). The resulting standard deviation is about 0.54 std."""
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-std, b=std)


@torch.no_grad()
def init_token_(t: Tensor, scheme: str) -> Tensor:
    """A learned token (mask token, auxiliary token) under ``scheme``: ``mae`` N(0, 0.02), ``beit``
    :func:`trunc_normal_sigma_` (0.02), ``timm`` truncated normal 0.02 cut at +-2 (absolute)."""
    if scheme == "mae":
        return nn.init.normal_(t, std=0.02)
    if scheme == "beit":
        return trunc_normal_sigma_(t, 0.02)
    if scheme == "timm":
        return nn.init.trunc_normal_(t, std=0.02)
    raise ValueError(f"init scheme must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")


@torch.no_grad()
def init_linear_(m: nn.Linear, scheme: str) -> None:
    """A Linear layer under ``scheme`` (see :meth:`VisionTransformer.init_weights`); bias 0."""
    if scheme == "mae":
        nn.init.xavier_uniform_(m.weight)
    elif scheme == "beit":
        trunc_normal_sigma_(m.weight, 0.02)
    elif scheme == "timm":
        nn.init.trunc_normal_(m.weight, std=0.02)
    else:
        raise ValueError(f"init scheme must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
    if m.bias is not None:
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- layers


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> linear projection (a strided conv).

    ``forward(x: [B, C, H, W]) -> [B, N, D]`` with patches in raster order.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])} "
                f"(build the model with the matching img_size)"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample.

    ``forward(x: [B, ...]) -> [B, ...]``; identity in eval mode or when ``p == 0``.
    Kept samples are scaled by ``1 / (1 - p)``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3g}"


class LayerScale(nn.Module):
    """Per-channel learned scale ``x * gamma`` (``gamma: [D]``)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """``fc1 -> GELU (exact) -> fc2``; ``forward(x: [..., D]) -> [..., D]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and SDPA.

    ``qkv.weight`` is ``[3D, D]`` with rows ``[q; k; v]``, each split into ``h``
    heads of ``D/h`` channels (timm's layout).

    Masks (``attn_mask``) follow ``F.scaled_dot_product_attention``: a boolean
    tensor with True = may attend, or a float tensor added to the logits;
    broadcastable to ``[B, h, Lq, Lk]`` (typically ``[B, 1, Lq, Lk]``). A query
    row that may attend to nothing yields NaN, as in SDPA.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # qv_bias (BEiT layout): ``qkv`` without bias plus ``q_bias [D]`` and ``v_bias [D]``; keys get no bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias and not qv_bias)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias and qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias and qv_bias else None
        self.proj = nn.Linear(dim, dim)

    def qkv_bias(self) -> Tensor | None:
        """The ``[3D]`` bias of the fused projection (``[q_bias; 0; v_bias]`` in the BEiT layout) or None."""
        if self.q_bias is None:
            return self.qkv.bias
        assert self.v_bias is not None  # q_bias and v_bias exist together
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def _heads(self, t: Tensor) -> Tensor:
        """``[B, L, D] -> [B, h, L, D/h]``."""
        B, L, _ = t.shape
        return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        """``q: [B, h, Lq, d]``, ``k, v: [B, h, Lk, d]`` -> ``[B, Lq, D]`` after ``proj``."""
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        B, _, Lq, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, Lq, self.dim))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Self-attention. ``x: [B, L, D]``, ``attn_mask: [B, 1|h, L, L]`` -> ``[B, L, D]``."""
        B, L, D = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self._attend(q, k, v, attn_mask)

    def forward_qkv(self, x_q: Tensor, x_kv: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Cross-stream attention with the same (shared) fused qkv weights.

        Queries come from ``x_q: [B, Lq, D]``, keys and values from
        ``x_kv: [B, Lk, D]``; ``attn_mask: [B, 1|h, Lq, Lk]``. Returns ``[B, Lq, D]``.
        ``forward_qkv(x, x, m) == forward(x, m)``.
        """
        D = self.dim
        w_q, w_kv = self.qkv.weight[:D], self.qkv.weight[D:]
        bias = self.qkv_bias()
        b_q, b_kv = (None, None) if bias is None else (bias[:D], bias[D:])
        q = self._heads(F.linear(x_q, w_q, b_q))
        k, v = F.linear(x_kv, w_kv, b_kv).chunk(2, dim=-1)
        return self._attend(q, self._heads(k), self._heads(v), attn_mask)


class Block(nn.Module):
    """Pre-norm transformer block.

    ``x = x + drop_path1(ls1(attn(norm1(x))))``;
    ``x = x + drop_path2(ls2(mlp(norm2(x))))``.
    ``ls*`` / ``drop_path*`` are ``nn.Identity`` when unused.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        qv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qv_bias=qv_bias)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``x: [B, L, D]``, ``attn_mask: [B, 1|h, L, L]`` (True = attend) -> ``[B, L, D]``."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def relative_position_index(grid: int) -> Tensor:
    """BEiT's index into the relative position table for a ``grid x grid`` patch grid plus a cls token.

    Returns ``long [1 + N, 1 + N]`` (``N = grid**2``, raster order, cls first). Patch pairs index
    ``(dr + G - 1) * (2G - 1) + (dc + G - 1)`` for the row / column offsets ``dr, dc`` of query minus key;
    the last three rows of the table are cls->patch, patch->cls and cls->cls.
    """
    n_rel = (2 * grid - 1) ** 2
    rc = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)  # [2, N]
    d = (rc[:, :, None] - rc[:, None, :]).permute(1, 2, 0) + (grid - 1)  # [N, N, 2]
    idx = torch.empty(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    idx[1:, 1:] = d[..., 0] * (2 * grid - 1) + d[..., 1]
    idx[0, :] = n_rel
    idx[:, 0] = n_rel + 1
    idx[0, 0] = n_rel + 2
    return idx


class RelativePositionBias(nn.Module):
    """A learned relative position bias shared by all blocks (BEiT), per head.

    ``relative_position_bias_table: [(2G-1)^2 + 3, h]`` (init 0); ``forward()`` -> ``[1, h, 1+N, 1+N]``;
    ``forward(positions: long [B, L])`` (indices into the ``1 + N`` sequence, cls = 0) -> ``[B, h, L, L]``
    for a per-sample subset of tokens.
    """

    relative_position_index: Tensor  # a buffer: long [1 + N, 1 + N]

    def __init__(self, grid: int, num_heads: int) -> None:
        super().__init__()
        self.grid = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)

    def forward(self, positions: Tensor | None = None) -> Tensor:
        table, idx = self.relative_position_bias_table, self.relative_position_index
        if positions is None:
            return table[idx].permute(2, 0, 1).unsqueeze(0)  # [1, h, L, L]
        pos = positions.to(device=idx.device, dtype=torch.long)
        sub = idx[pos[:, :, None], pos[:, None, :]]  # [B, L, L]
        return table[sub].permute(0, 3, 1, 2)  # [B, h, L, L]


# --------------------------------------------------------------------------- model


class VisionTransformer(nn.Module):
    """ViT encoder (cls token + patch tokens), state_dict-compatible with timm.

    Args:
        img_size: square input side ``H = W``.
        patch_size: patch side ``p``; ``N = (img_size / p) ** 2``.
        in_chans: input channels ``C``.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer shape.
        drop_path_rate: stochastic depth, linear from 0 (first block) to this value (last).
        pos_embed: ``"sincos"`` (fixed persistent buffer), ``"learned"`` (Parameter) or
            ``"relative"`` (BEiT: no absolute embedding, ``pos_embed`` is None, one shared
            :class:`RelativePositionBias` ``rel_pos_bias``, q/v biases without k bias).
        layer_scale_init: LayerScale init value; ``None`` disables LayerScale.
        init: initialisation scheme, one of ``INIT_SCHEMES`` (see :meth:`init_weights`).
        num_classes: ``0`` -> no head (``forward`` returns pooled features).
        global_pool: ``"token"`` (cls; final ``norm`` before pooling) or ``"avg"``
            (mean of patch tokens; as in timm, ``norm`` is Identity and ``fc_norm``
            normalises the pooled vector).
    """

    pos_embed: Tensor | None  # a buffer (sincos), a Parameter (learned) or None (relative)

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        pos_embed: str = "sincos",
        layer_scale_init: float | None = None,
        num_classes: int = 0,
        global_pool: str = "token",
        init: str = "mae",
    ) -> None:
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {', '.join(POS_EMBEDS)}, got {pos_embed!r}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.drop_path_rate = drop_path_rate
        self.pos_embed_type = pos_embed
        self.layer_scale_init = layer_scale_init
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias: RelativePositionBias | None = None
        if pos_embed == "sincos":
            # persistent: saved in the state_dict (timm's strict load needs it); not a Parameter.
            self.register_buffer("pos_embed", sincos_2d(embed_dim, self.grid_size, cls_token=True), persistent=True)
        elif pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        else:
            self.pos_embed = None
            self.rel_pos_bias = RelativePositionBias(self.grid_size, num_heads)

        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                drop_path=dpr[i],
                layer_scale_init=layer_scale_init,
                qv_bias=pos_embed == "relative",
            )
            for i in range(depth)
        )
        use_fc_norm = global_pool == "avg"  # timm's rule when fc_norm=None
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LN_EPS) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(init)

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self, scheme: str = "mae") -> None:
        """(Re-)initialise every weight with ``scheme`` (one of ``INIT_SCHEMES``):

        * ``"mae"`` (MAE code): xavier-uniform Linear (bias 0), the patch conv as a Linear on its
          flattened ``[D, C*p*p]`` kernel (bias 0), cls N(0, 0.02);
        * ``"beit"`` (BEiT / ConMIM / DTM code): Linear and patch-conv weights, cls (and a learned
          pos_embed) truncated normal std 0.02 cut at +-1 std (:func:`trunc_normal_sigma_`), biases 0,
          then block ``l`` (1-based) has ``attn.proj.weight`` and ``mlp.fc2.weight`` divided by
          ``sqrt(2 l)``;
        * ``"timm"`` (timm's ViT default, MaPeT code): Linear weights truncated normal std 0.02 (cut at
          +-2 absolute), biases 0, cls N(0, 1e-6), the patch conv keeps PyTorch's default init.

        All schemes: LayerNorm (1, 0), a learned pos_embed truncated normal std 0.02, the relative
        position table 0, q/v biases 0, LayerScale ``layer_scale_init``.
        """
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"init scheme must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
        self.init_scheme = scheme
        conv = self.patch_embed.proj
        if scheme == "mae":
            bound = math.sqrt(6.0 / (conv.weight.shape[0] + conv.weight[0].numel()))  # xavier on [D, C*p*p]
            conv.weight.uniform_(-bound, bound)
            nn.init.normal_(self.cls_token, std=0.02)
        elif scheme == "beit":
            trunc_normal_sigma_(conv.weight, 0.02)
            trunc_normal_sigma_(self.cls_token, 0.02)
        else:
            conv.reset_parameters()
            nn.init.normal_(self.cls_token, std=1e-6)
        assert conv.bias is not None  # the patch conv is built with a bias
        nn.init.zeros_(conv.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            if scheme == "beit":
                trunc_normal_sigma_(self.pos_embed, 0.02)
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)  # bounds +-2 (absolute): ~N(0, 0.02)
        if self.rel_pos_bias is not None:
            nn.init.zeros_(self.rel_pos_bias.relative_position_bias_table)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear_(m, scheme)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, Attention) and m.q_bias is not None:
                assert m.v_bias is not None  # q_bias and v_bias exist together
                nn.init.zeros_(m.q_bias)
                nn.init.zeros_(m.v_bias)
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, m.init_values)
        if scheme == "beit":
            for i, blk in enumerate(cast("list[Block]", self.blocks)):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def no_weight_decay(self) -> set[str]:
        """Parameter names that must not get weight decay (tokens / learned pos-emb).
        Biases and norm weights are handled by the optimizer's 1-D rule. The relative position
        table (2-D) is decayed, as in the BEiT-family code."""
        names = {"cls_token"}
        if isinstance(self.pos_embed, nn.Parameter):
            names.add("pos_embed")
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (training mode only)."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ export layout

    _SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"

    def export_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """This model's ``state_dict()`` (or a gathered copy of it) in the layout timm loads strictly.

        Identity for absolute embeddings (timm's ``VisionTransformer``). For ``pos_embed="relative"`` it
        is timm's ``Beit`` layout with per-block tables (``beit_base_patch16_224``): the shared table is
        copied to ``blocks.{i}.attn.relative_position_bias_table`` and LayerScale ``blocks.{i}.ls1.gamma``
        / ``ls2.gamma`` become ``blocks.{i}.gamma_1`` / ``gamma_2``. :meth:`load_state_dict` takes both
        layouts back.
        """
        if self.rel_pos_bias is None:
            return dict(state)
        out = {}
        for k, v in state.items():
            if k == self._SHARED_TABLE:
                for i in range(self.depth):
                    out[f"blocks.{i}.attn.relative_position_bias_table"] = v.clone()
                continue
            out[_rename_layer_scale(k, to_timm=True)] = v
        return out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Accept the export layout of :meth:`export_state_dict` (per-block tables, ``gamma_1/2``) as well."""
        if self.rel_pos_bias is not None and prefix + self._SHARED_TABLE not in state_dict:
            keys = [f"{prefix}blocks.{i}.attn.relative_position_bias_table" for i in range(self.depth)]
            if all(k in state_dict for k in keys):
                tables = [state_dict.pop(k) for k in keys]
                if any(not torch.equal(tables[0], t) for t in tables[1:]):
                    error_msgs.append(
                        "the per-block relative position bias tables differ (a fine-tuned BEiT?); "
                        "this encoder shares one table across blocks"
                    )
                state_dict[prefix + self._SHARED_TABLE] = tables[0]
            for k in [k for k in state_dict if k.startswith(prefix + "blocks.") and ".gamma_" in k]:
                state_dict[prefix + _rename_layer_scale(k[len(prefix) :], to_timm=False)] = state_dict.pop(k)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ pieces

    def embed(self, x: Tensor, any_size: bool = False) -> Tensor:
        """Patch embedding plus the patch slots of ``pos_embed``.

        ``x: [B, C, H, W]`` (any float dtype; cast to the weight dtype) -> ``[B, N, D]``. With ``any_size`` a
        square ``x`` of another multiple of the patch size is embedded on its own grid ``g = H / p`` (``N = g*g``;
        progressive resolution, ``train.resolution_schedule``) with :meth:`pos_for_grid`'s position embedding.
        """
        x = x.to(self.patch_embed.proj.weight.dtype)
        h, w = x.shape[-2:]
        if not any_size or (h, w) == (self.img_size, self.img_size) or h != w or h % self.patch_size:
            return self.add_pos(self.patch_embed(x))  # the built grid (or PatchEmbed's one-line error)
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, g*g, D]
        if self.pos_embed is None:
            raise ValueError("pos_embed='relative' runs only on the built grid (its table is not resampled per step)")
        return tokens + self.pos_for_grid(h // self.patch_size)[:, 1:].to(tokens.dtype)

    def pos_for_grid(self, grid: int) -> Tensor:
        """``pos_embed`` on a ``grid x grid`` patch grid: ``[1, 1 + grid*grid, D]`` (cls slot first). Sin-cos is
        regenerated for the grid (cached per grid and device); learned is resampled bicubic as timm does
        (:func:`~.pos_embed.resample_abs_pos_embed`; differentiable, so the built table keeps training)."""
        pos = self.pos_embed
        if pos is None:
            raise ValueError("pos_embed='relative' has no absolute position embedding")
        if grid == self.grid_size:
            return pos
        if isinstance(pos, nn.Parameter):
            return resample_abs_pos_embed(pos, grid)
        cache = self.__dict__.setdefault("_grid_pos", {})
        key = (grid, pos.device, pos.dtype)
        if key not in cache:
            cache[key] = sincos_2d(self.embed_dim, grid, cls_token=True).to(device=pos.device, dtype=pos.dtype)
        return cache[key]

    def add_pos(self, tokens: Tensor) -> Tensor:
        """Add the absolute embedding of the patch slots: ``[B, N, D] -> [B, N, D]`` (identity for
        ``pos_embed="relative"``, whose positions enter as the attention bias in :meth:`encode`)."""
        if self.pos_embed is None:
            return tokens
        return tokens + self.pos_embed[:, 1:].to(tokens.dtype)

    def add_cls(self, tokens: Tensor) -> Tensor:
        """Prepend ``cls_token (+ pos_embed[:, :1])``: ``[B, n, D] -> [B, 1 + n, D]``."""
        cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :1]
        cls = cls.to(tokens.dtype)
        return torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    @staticmethod
    def gather_tokens(tokens: Tensor, keep_idx: Tensor) -> Tensor:
        """Per-sample gather: ``tokens: [B, N, D]``, ``keep_idx: [B, K]`` (long) -> ``[B, K, D]``."""
        if keep_idx.ndim != 2 or keep_idx.shape[0] != tokens.shape[0]:
            raise ValueError(f"keep_idx must be [B, K] with B={tokens.shape[0]}, got shape {tuple(keep_idx.shape)}")
        idx = keep_idx.to(device=tokens.device, dtype=torch.long)
        return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    def encode(self, tokens: Tensor, attn_mask: Tensor | None = None, rel_bias: Tensor | None = None) -> Tensor:
        """Run all blocks then ``self.norm``.

        Args:
            tokens: ``[B, L, D]``.
            attn_mask: boolean ``[B, 1|h, L, L]``, True = may attend (or a float
                additive mask), passed to ``F.scaled_dot_product_attention``.
            rel_bias: optional float additive attention bias ``[B|1, h|1, L, L]``
                (e.g. a relative-position bias), combined with ``attn_mask``. With
                ``pos_embed="relative"`` and no ``rel_bias`` the shared table's bias for the full
                ``1 + N`` sequence is used (other lengths must pass theirs, see ``forward_features``).

        Returns:
            ``[B, L, D]``.
        """
        if self.rel_pos_bias is not None and rel_bias is None:
            if tokens.shape[1] != 1 + self.num_patches:
                raise ValueError(
                    f"pos_embed='relative' on {tokens.shape[1]} tokens: pass rel_bias for a subset "
                    f"(rel_pos_bias(positions)), or the full 1 + {self.num_patches} sequence"
                )
            rel_bias = self.rel_pos_bias()
        mask = _combine_masks(attn_mask, rel_bias, tokens.dtype)
        x = tokens
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if use_ckpt:
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return self.norm(x)

    # ------------------------------------------------------------------ forward

    def forward_features(self, x: Tensor, keep_idx: Tensor | None = None, any_size: bool = False) -> Tensor:
        """Encode an image, optionally on a per-sample subset of patches.

        Args:
            x: ``[B, C, H, W]``.
            keep_idx: ``[B, K]`` long patch indices in ``0..N-1`` (raster order),
                may differ per sample; ``None`` keeps all ``N`` patches.
            any_size: accept another square multiple of the patch size (its own grid, see :meth:`embed`).

        Returns:
            ``[B, 1 + K, D]`` (cls first, then the kept patches in ``keep_idx`` order).
        """
        t = self.embed(x, any_size)
        bias = None
        if keep_idx is not None:
            t = self.gather_tokens(t, keep_idx)
            if self.rel_pos_bias is not None:  # cls (0) then the kept patches (1 + index)
                idx = keep_idx.to(device=t.device, dtype=torch.long) + 1
                bias = self.rel_pos_bias(torch.cat([idx.new_zeros(idx.shape[0], 1), idx], dim=1))
        return self.encode(self.add_cls(t), rel_bias=bias)

    @staticmethod
    def pool(feats: Tensor, how: str) -> Tensor:
        """``feats: [B, 1 + K, D] -> [B, D]``; ``how`` = ``"cls"`` (token 0) or
        ``"mean"`` (mean of the patch tokens 1..K). Aliases: ``"token"``, ``"avg"``."""
        if how in ("cls", "token"):
            return feats[:, 0]
        if how in ("mean", "avg"):
            return feats[:, 1:].mean(dim=1)
        raise ValueError(f"pool must be 'cls' or 'mean', got {how!r}")

    def forward_head(self, feats: Tensor) -> Tensor:
        """``feats: [B, 1 + K, D]`` -> ``[B, D]`` (no head) or ``[B, num_classes]``."""
        return self.head(self.fc_norm(self.pool(feats, self.global_pool)))

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, C, H, W]`` -> ``[B, D]`` if ``num_classes == 0`` else ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))


def _rename_layer_scale(key: str, to_timm: bool) -> str:
    """``blocks.3.ls1.gamma`` <-> ``blocks.3.gamma_1`` (timm's Beit names its LayerScale this way)."""
    parts = key.split(".")
    if to_timm and len(parts) == 4 and parts[0] == "blocks" and parts[2] in ("ls1", "ls2") and parts[3] == "gamma":
        return f"blocks.{parts[1]}.gamma_{parts[2][2]}"
    if not to_timm and len(parts) == 3 and parts[0] == "blocks" and parts[2] in ("gamma_1", "gamma_2"):
        return f"blocks.{parts[1]}.ls{parts[2][-1]}.gamma"
    return key


def _combine_masks(attn_mask: Tensor | None, rel_bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Merge a boolean (True = attend) / float mask and a float bias into one SDPA mask."""
    if attn_mask is not None and attn_mask.ndim != 4:
        raise ValueError(f"attn_mask must be 4-D [B, 1|heads, Lq, Lk], got shape {tuple(attn_mask.shape)}")
    if rel_bias is None:
        return attn_mask
    bias = rel_bias.to(dtype)
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, float("-inf"))
    return bias + attn_mask.to(dtype)


# --------------------------------------------------------------------------- factory / timm


def build_vit(arch: str, img_size: int, patch_size: int, in_chans: int = 3, **kw: Any) -> VisionTransformer:
    """Build a named architecture from ``ARCHS``; ``kw`` overrides / adds ctor args."""
    if arch not in ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; valid: {', '.join(ARCHS)}")
    args = {**ARCHS[arch], **kw}
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, **args)


def timm_model_name(arch: str, patch_size: int, img_size: int, pos_embed: str = "sincos") -> str:
    """timm registry name for ``arch``, e.g. ``("vit_base", 16, 224) -> "vit_base_patch16_224"``.

    ``pos_embed="relative"``: the BEiT entry of the same width, e.g. ``beit_base_patch16_224`` (pass
    ``img_size=`` / ``patch_size=`` for other geometries, ``global_pool="token"`` for our final norm).

    Returns ``f"{arch}_patch{patch_size}_{img_size}"`` when timm registers it (or
    timm is not importable). Otherwise returns a registered entry with the same
    width/depth/heads (e.g. ``vit_base_patch16_224`` for ViT-B/14) - always pass
    ``img_size=`` and ``patch_size=`` to ``timm.create_model``, which override the
    entry's geometry. ``vit_micro`` has no timm entry: use ``timm_kwargs`` with
    ``timm.models.vision_transformer.VisionTransformer`` instead.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; valid: {', '.join(ARCHS)}")
    if arch not in _TIMM_REFERENCE:
        raise ValueError(
            f"{arch!r} has no timm registry entry; build timm's VisionTransformer(**timm_kwargs(model)) instead"
        )
    if pos_embed == "relative":
        beit = {"vit_base": "beit_base_patch16_224", "vit_large": "beit_large_patch16_224"}
        if arch not in beit:
            raise ValueError(f"{arch!r} has no timm BEiT registry entry; build timm's Beit(**timm_beit_kwargs(model))")
        return beit[arch]
    name = f"{arch}_patch{patch_size}_{img_size}"
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a hard dependency
        return name
    return name if timm.is_model(name) else _TIMM_REFERENCE[arch]


def timm_kwargs(model: VisionTransformer) -> dict[str, Any]:
    """Constructor kwargs for ``timm.models.vision_transformer.VisionTransformer``
    giving the same state_dict keys and shapes (and the same forward) as ``model``."""
    return dict(
        img_size=model.img_size,
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        embed_dim=model.embed_dim,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=model.mlp_ratio,
        qkv_bias=model.qkv_bias,
        init_values=model.layer_scale_init or None,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        fc_norm=model.global_pool == "avg",
        class_token=True,
        no_embed_class=False,
        pre_norm=False,
        drop_path_rate=model.drop_path_rate,
    )


def timm_beit_kwargs(model: VisionTransformer) -> dict[str, Any]:
    """Constructor kwargs for ``timm.models.beit.Beit`` that load ``model.export_state_dict(...)`` strictly
    (``pos_embed="relative"`` models) and give the same forward."""
    if model.rel_pos_bias is None:
        raise ValueError("timm_beit_kwargs needs a pos_embed='relative' model; use timm_kwargs")
    return dict(
        img_size=model.img_size,
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        embed_dim=model.embed_dim,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=model.mlp_ratio,
        qkv_bias=model.qkv_bias,
        init_values=model.layer_scale_init or None,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        use_abs_pos_emb=False,
        use_rel_pos_bias=True,
        use_shared_rel_pos_bias=False,
        drop_path_rate=model.drop_path_rate,
    )
