"""MAE: masked autoencoder with normalised-pixel regression (docs/objectives/mae.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..masking import MaskSpec, num_visible, visible_indices
from ..models.pos_embed import sincos_2d
from ..models.vit import Block, VisionTransformer
from ..ranges import num
from ..telemetry.flops import linear_flops, transformer_forward_flops
from .base import LossOutput, Objective, init_encoder, token_no_decay


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """``img [B, C, H, W]`` -> ``[B, N, p*p*C]``; inside a patch pixel (dy, dx, c) is at (dy*p + dx)*C + c."""
    b, c, h, w = img.shape
    gh, gw = h // p, w // p
    x = img.reshape(b, c, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, p*p*C]`` -> ``[B, C, H, W]`` (square grid)."""
    b, n, _ = x.shape
    g = int(round(n**0.5))
    x = x.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


def normalize_patches(t: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-patch ``(t - mean) / sqrt(var_unbiased + eps)`` in fp32; a constant patch gives 0."""
    t = t.float()
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True, unbiased=True)
    return (t - mean) / (var + eps).sqrt()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE, in fp32. ``pred, target [B, N, P]``, ``mask [B, N]``.

    Returns 0 (not NaN) when nothing is masked.
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, N]
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1.0)


def check_mae_knobs(cfg) -> None:
    """ConfigError for a mask ratio outside (0, 1) (0 leaves nothing to predict) or a decoder shape the sin-cos
    table / heads cannot take."""
    from ..errors import ConfigError

    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ConfigError(f"objective.mask_ratio={cfg.mask_ratio} must be in (0, 1)")
    if cfg.decoder_dim < 4 or cfg.decoder_dim % 4 or cfg.decoder_heads < 1 or cfg.decoder_dim % cfg.decoder_heads:
        raise ConfigError(
            f"objective.decoder_dim={cfg.decoder_dim} must be a multiple of 4 (sin-cos table) and "
            f"of objective.decoder_heads={cfg.decoder_heads}"
        )
    if cfg.decoder_depth < 0:
        raise ConfigError(f"objective.decoder_depth={cfg.decoder_depth} must be >= 0")


def init_decoder_weights(module: nn.Module) -> None:
    """MAE's decoder init: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MAEDecoder(nn.Module):
    """Lightweight decoder: encoded visible tokens + mask tokens at hidden slots -> pixels per patch."""

    pos_embed: torch.Tensor  # a buffer: [1, 1 + N, d]

    def __init__(self, enc_dim: int, num_patches: int, patch_pixels: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = int(round(num_patches**0.5))
        self.register_buffer("pos_embed", sincos_2d(dim, grid, cls_token=True), persistent=False)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        self.num_patches, self.dim, self.heads = num_patches, dim, heads
        nn.init.normal_(self.mask_token, std=0.02)
        init_decoder_weights(self)

    def forward(self, latent: torch.Tensor, keep_idx: torch.Tensor, num_patches: int | None = None) -> torch.Tensor:
        """``latent [B, 1+K, D_enc]`` (cls first), ``keep_idx long [B, K]`` -> ``pred [B, N, P]``; ``num_patches``:
        ``N`` of another square grid than the built one (progressive resolution; its sin-cos table is regenerated)."""
        n = num_patches or self.num_patches
        x = self.embed(latent)  # [B, 1+K, d]
        b = x.shape[0]
        slots = self.mask_token.to(x.dtype).expand(b, n, self.dim)
        idx = keep_idx.unsqueeze(-1).expand(-1, -1, self.dim)
        slots = slots.scatter(1, idx, x[:, 1:])  # [B, N, d], raster order
        x = torch.cat([x[:, :1], slots], dim=1) + self.pos_for(n).to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]

    def pos_for(self, num_patches: int) -> torch.Tensor:
        """The sin-cos table ``[1, 1 + N, d]`` of a square grid of ``num_patches`` (cached per grid and device)."""
        if num_patches == self.num_patches:
            return self.pos_embed
        cache = self.__dict__.setdefault("_grid_pos", {})
        key = (num_patches, self.pos_embed.device)
        if key not in cache:
            grid = int(round(num_patches**0.5))
            cache[key] = sincos_2d(self.dim, grid, cls_token=True).to(self.pos_embed.device)
        return cache[key]

    def flops(self, enc_dim: int, visible: int, num_patches: int | None = None) -> float:
        n = (num_patches or self.num_patches) + 1
        return (
            linear_flops(1 + visible, enc_dim, self.dim)
            + transformer_forward_flops(n, self.dim, len(self.blocks))
            + linear_flops(n, self.dim, self.pred.out_features)
        )


def decoder_metadata(objective: nn.Module) -> dict[str, str] | None:
    """The safetensors header of a run's ``decoder.safetensors`` (:data:`mimscale.models.init.DECODER_FILE`,
    beside ``encoder.safetensors`` at every checkpoint and at the end; strings): the objective, the decoder's
    width, depth and heads, and the knobs a Hugging Face ``ViTMAEForPreTraining`` config needs (mask ratio,
    norm-pix loss). None for an objective without a :class:`MAEDecoder` (its decoder is not written)."""
    dec = getattr(objective, "decoder", None)
    cfg = getattr(objective, "cfg", None)
    if not isinstance(dec, MAEDecoder) or cfg is None:
        return None
    meta = {
        "format": "pt",
        "mimscale": "1",
        "decoder": "mae",
        "objective": getattr(objective, "name", ""),
        "decoder_dim": dec.dim,
        "decoder_depth": len(dec.blocks),
        "decoder_heads": cfg.decoder_heads,
        "mask_ratio": cfg.mask_ratio,
        "norm_pix_loss": cfg.norm_pix_loss,
    }
    return {k: str(v) for k, v in meta.items()}


class MAE(Objective):
    """Hide ``mask_ratio`` of the patches, encode the rest, regress normalised pixels of the hidden ones."""

    name = "mae"
    supports_resolution_schedule = True
    reference = "official code: facebookresearch/mae (docs/objectives/mae.md)"

    @dataclass
    class Config:
        mask_ratio: float = num(0.75, "(0, 1)")  # 0 masks nothing: no loss
        norm_pix_loss: bool = True
        norm_pix_eps: float = num(1e-6, "> 0")
        decoder_dim: int = num(512, ">= 4")
        decoder_depth: int = num(8, ">= 0")
        decoder_heads: int = num(16, ">= 1")
        loss: Literal["mse"] = "mse"
        init: Literal["mae", "beit", "timm"] = "mae"  # encoder init [code: xavier]; the decoder keeps MAE's
        wd_cls_token: bool = True  # weight decay on the 3-D cls token [code: decayed]
        wd_mask_token: bool = True  # ... and on the decoder's mask token [code: decayed]

    def __init__(self, encoder: VisionTransformer, cfg: MAE.Config):
        super().__init__(encoder, cfg)
        check_mae_knobs(cfg)
        init_encoder(encoder, cfg.init)
        p = encoder.patch_size
        self.patch_pixels = p * p * encoder.in_chans
        self.decoder = MAEDecoder(
            encoder.embed_dim,
            encoder.num_patches,
            self.patch_pixels,
            cfg.decoder_dim,
            cfg.decoder_depth,
            cfg.decoder_heads,
        )

    def mask_spec(self) -> MaskSpec:
        return self.mask_spec_at(self.encoder.img_size)

    def mask_spec_at(self, img_size: int) -> MaskSpec:
        return MaskSpec("random", (img_size // self.encoder.patch_size) ** 2, self.cfg.mask_ratio)

    @property
    def num_keep(self) -> int:
        """Visible patches per image, ``floor(N (1 - mask_ratio))``: the step's shapes come from this, not the data."""
        return num_visible(self.encoder.num_patches, self.cfg.mask_ratio)

    def target(self, img: torch.Tensor) -> torch.Tensor:
        """``img [B, C, H, W]`` -> fp32 targets ``[B, N, P]`` (per-patch normalised if norm_pix_loss)."""
        t = patchify(img.float(), self.encoder.patch_size)
        return normalize_patches(t, self.cfg.norm_pix_eps) if self.cfg.norm_pix_loss else t

    def predict(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``img [B, C, H, W]``, ``mask bool [B, N]`` -> ``pred [B, N, P]`` for every patch slot."""
        n = mask.shape[1]  # the batch's grid (progressive resolution: smaller early on)
        keep_idx = visible_indices(mask, num_visible(n, self.cfg.mask_ratio))  # [B, K]: K from N and the config
        latent = self.encoder.forward_features(img, keep_idx, any_size=True)  # [B, 1+K, D]
        return self.decoder(latent, keep_idx, n)

    def forward(self, batch: dict) -> LossOutput:
        img, mask = batch["image"], batch["mask"]
        pred = self.predict(img, mask)
        loss = masked_mse(pred, self.target(img), mask)
        return LossOutput(loss, {"loss": loss.detach()})

    def flops_per_sample(self) -> float:
        return self.flops_per_sample_at(self.encoder.img_size)

    def flops_per_sample_at(self, img_size: int) -> float:
        e = self.encoder
        n = (img_size // e.patch_size) ** 2
        k = num_visible(n, self.cfg.mask_ratio)
        fwd = (
            linear_flops(n, self.patch_pixels, e.embed_dim)
            + transformer_forward_flops(1 + k, e.embed_dim, e.depth)
            + self.decoder.flops(e.embed_dim, k, n)
        )
        return 3.0 * fwd

    def no_weight_decay(self) -> set[str]:
        return token_no_decay(self, {"decoder.mask_token"})
