"""AdPE: adversarial positional embeddings, and its MAE+ baseline (docs/objectives/adpe.md).

**MAE+** (``mae_plus``, ``adv_type = 0``). Every image gives ``num_crops`` independent RandomResizedCrops
at ``crop_size`` px (``crop_scale``, bicubic, flip): the train transform returns ``image [num_crops, C, c, c]``
per sample and the objective flattens the batch to ``M = B * num_crops`` crops (image-major: row
``b * num_crops + j`` is crop j of image b). Each crop has a ``G_c x G_c`` grid of ``N_c`` patches and its own
random MAE mask (``crop_masks bool [B, num_crops, N_c]``, True = masked). The encoder is BEiT-style: it runs
on ALL ``1 + N_c`` tokens, masked slots hold a learned mask token, and the fixed 2-D sin-cos table is
generated here for the CROP grid (the encoder's own ``pos_embed`` buffer stays the ``model.img_size`` one,
which is what export and fine-tuning use; the paper re-generates sin-cos at fine-tune resolution). The
decoder maps all ``1 + N_c`` tokens to its width (no mask-token insertion), adds its own sin-cos table,
runs its blocks and predicts pixels; loss = MAE's norm-pix MSE over masked patches, fp32.

**AdPE** (``adpe``), absolute position encodings only (``pe_type = "ape"``):

* embedding mode (``adv_type = 1``): masked slots receive ``delta + pos_i`` with an adversarial
  ``delta [D]`` (init N(0, 0.02), like the mask token it REPLACES; no descent-trained mask token in this
  mode);
* coordinate mode (``adv_type = 2``): masked slots receive ``mask_token + sincos(col_i + d_col,
  row_i + d_row)`` with a global ``delta = (d_col, d_row)`` (init 0) shifting the continuous
  coordinates, in fp32; visible slots use the fixed table.

The adversarial update is single-loop descent-ascent: one forward/backward per micro-batch. ``delta`` lives
in :class:`AdversarialDelta`, a private module (outside DeepSpeed: replicated, fp32, not in the engine's
optimizer, clipping or ZeRO partitions). It is a buffer, not a parameter, so DeepSpeed never sees, zeroes or
releases it; each forward uses a fresh leaf copy whose gradient hook adds ``dL/d delta`` into the
module's fp32 accumulator during ``engine.backward`` (DeepSpeed already divides the loss by the gradient
accumulation steps, so the accumulator holds the mean over micro-batches). In ``after_optimizer_step`` the
accumulator is averaged across ranks (``ctx.all_reduce_mean``), NEGATED and fed to a torch AdamW with a
positive lr (ascent; equivalent to the original's negative-lr group: Adam's m flips sign, v is unchanged),
then ``delta`` is projected onto the eps-ball and the accumulator is zeroed. A non-finite accumulated
gradient (fp16 overflow) skips the adversarial step (decided on the device: ``delta`` and the AdamW state
are kept by ``torch.where``, no host read). Under fp16 the backward runs on the loss times DeepSpeed's loss
scale: the hook divides each gradient by ``ctx.loss_scale`` (recorded in ``before_step``; the scale only
changes in ``engine.step()``), so the accumulator always holds the true gradient (1.0 for bf16/fp32).

``adv_lr = adv_blr * eff_batch / 256 * ctx.lr_factor`` (the main warmup + cosine shape). ``eff_batch`` is the
``adv_batch_size`` knob when set, else images per micro-batch (seen in ``forward``) x ``ctx.grad_accum`` x
``ctx.world_size`` (= ``train.batch_size``, the same batch the main lr is scaled with).

RPE variants (``pe_type = "rpe"``) are not implemented (optional in the spec): ConfigError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform
from ..errors import ConfigError
from ..masking import MaskSpec
from ..models.pos_embed import grid_coords, sincos_2d, sincos_from_coords
from ..models.vit import Block, VisionTransformer
from ..ranges import num
from ..telemetry.flops import linear_flops, transformer_forward_flops
from .base import LossOutput, Objective, StepContext, init_encoder, token_no_decay
from .mae import check_mae_knobs, init_decoder_weights, masked_mse, normalize_patches, patchify

_NORMS = {0: 0, "none": 0, 1: 1, "l2": 1, 2: 2, "linf": 2}
_CAPTURABLE = ("cuda", "xpu", "hpu", "xla")  # device types where torch's AdamW keeps its step count on the device


# ----------------------------------------------------------------------------- data side (loader workers)


class MultiCrop:
    """``num_crops`` independent RandomResizedCrop+flip+normalise views of one image.

    ``(PIL image, generator) -> {"image": float32 [num_crops, C, crop, crop]}``; all randomness from the
    generator (each crop draws its own box and flip). Picklable (plain values only).
    """

    def __init__(self, num_crops: int, crop: TrainTransform):
        self.num_crops = num_crops
        self.crop = crop

    def __call__(self, img, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"image": torch.stack([self.crop(img, generator) for _ in range(self.num_crops)])}

    def __repr__(self) -> str:
        return f"MultiCrop({self.num_crops} x {self.crop!r})"


# ----------------------------------------------------------------------------- modules


def _cached_sincos(owner: nn.Module, dim: int, num_patches: int, cls_token: bool, device) -> torch.Tensor:
    """``sincos_2d(dim, sqrt(num_patches), cls_token)`` on ``device``, cached on ``owner`` (not a buffer: never
    saved, never seen by DeepSpeed) for the grids of a resolution schedule."""
    cache = owner.__dict__.setdefault("_grid_pos", {})
    key = (num_patches, cls_token, device)
    if key not in cache:
        grid = int(round(num_patches**0.5))
        cache[key] = sincos_2d(dim, grid, cls_token=cls_token).to(device)
    return cache[key]


class CropDecoder(nn.Module):
    """MAE+ decoder on all ``1 + N_c`` tokens: ``Linear D->d``, + sin-cos(d) for the crop grid, blocks, norm,
    ``Linear d->P``; ``forward(latent [M, 1+N_c, D]) -> pred [M, N_c, P]`` (cls dropped). The grid is the
    latent's (progressive resolution: smaller crops early on; the sin-cos table of another grid is regenerated)."""

    pos_embed: torch.Tensor  # a buffer: [1, 1 + N_c, d]

    def __init__(self, enc_dim: int, grid: int, patch_pixels: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.register_buffer("pos_embed", sincos_2d(dim, grid, cls_token=True), persistent=False)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        init_decoder_weights(self)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)
        x = x + self.pos_for(latent.shape[1] - 1).to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]

    def pos_for(self, num_patches: int) -> torch.Tensor:
        """The sin-cos table ``[1, 1 + N, d]`` of a square grid of ``num_patches`` (cached per grid and device)."""
        if num_patches == self.pos_embed.shape[1] - 1:
            return self.pos_embed
        return _cached_sincos(self, self.embed.out_features, num_patches, True, self.pos_embed.device)

    def flops(self, enc_dim: int, num_patches: int | None = None) -> float:
        n = (num_patches or self.pos_embed.shape[1] - 1) + 1
        return (
            linear_flops(n, enc_dim, self.embed.out_features)
            + transformer_forward_flops(n, self.embed.out_features, len(self.blocks))
            + linear_flops(n, self.embed.out_features, self.pred.out_features)
        )


class AdversarialDelta(nn.Module):
    """The adversarial perturbation ``delta [size]`` (fp32, init N(0, init_std), 0 for ``init_std = 0``) with
    its own ascent optimizer.

    ``delta`` is a (non-persistent) buffer, not an ``nn.Parameter``: DeepSpeed walks every parameter of the
    wrapped module (ZeRO-3 releases them all after each step, stage 0 zeroes and clips their grads), so a
    parameter here would be touched by it. :meth:`live` returns a differentiable leaf copy for one forward
    whose gradient is added into ``grad_acc [size]`` (fp32) during backward. Persisted via
    :meth:`_MultiCropMIM.checkpoint_state`.
    """

    delta: torch.Tensor  # buffers: [size]
    grad_acc: torch.Tensor

    def __init__(self, size: int, betas: tuple[float, float], eps: float, weight_decay: float, init_std: float = 0.0):
        super().__init__()
        self.register_buffer("delta", torch.zeros(size), persistent=False)
        if init_std > 0:
            nn.init.normal_(self.delta, std=init_std)
        self.register_buffer("grad_acc", torch.zeros(size), persistent=False)
        self.backward_calls = 0
        self.loss_scale = 1.0  # the factor the loss was multiplied by before backward (fp16); set per step
        self._opt_args: dict[str, Any] = dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._opt: torch.optim.Optimizer | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW over ``delta`` (built lazily, after the engine moved the module to its device). On accelerators
        it is ``capturable`` (its step count lives on the device), so :meth:`ascent_step` never reads the host."""
        if self._opt is None or self._opt.param_groups[0]["params"][0] is not self.delta:
            capturable = self.delta.device.type in _CAPTURABLE
            self._opt = torch.optim.AdamW([self.delta], lr=0.0, foreach=False, capturable=capturable, **self._opt_args)
        return self._opt

    def load_optimizer_state(self, state: dict) -> None:
        """Load an AdamW ``state_dict`` saved on any device: ``capturable`` and the step count's device follow
        where ``delta`` is now (a GPU checkpoint resumed on the CPU, or the other way round)."""
        opt = self.optimizer
        opt.load_state_dict(state)
        capturable = self.delta.device.type in _CAPTURABLE
        for group in opt.param_groups:
            group["capturable"] = capturable
        for st in opt.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(self.delta.device if capturable else "cpu", torch.float32)

    def live(self) -> torch.Tensor:
        """``delta`` as a fresh differentiable leaf (fp32) feeding ``grad_acc``; plain ``delta`` without grad."""
        if not torch.is_grad_enabled():
            return self.delta.detach()
        leaf = self.delta.detach().clone().requires_grad_(True)
        leaf.register_hook(self._accumulate)
        return leaf

    def _accumulate(self, grad: torch.Tensor) -> None:
        """The gradient hook: add ``grad / loss_scale`` (the loss-scaled fp16 gradient, unscaled) to ``grad_acc``."""
        self.grad_acc.add_(grad.detach().float(), alpha=1.0 / self.loss_scale)
        self.backward_calls += 1

    def ascent_step(self, lr: float, all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Average ``grad_acc`` across ranks, step AdamW on its NEGATION with ``lr >= 0``, zero it.

        Returns a device bool, False when the gradient was not finite: then ``delta`` and the optimizer state
        are left as they were (only the accumulator is zeroed). Decided on the device, no host
        synchronisation. Every rank must call this (collective)."""
        g = all_reduce_mean(self.grad_acc.clone())
        self.grad_acc.zero_()
        self.backward_calls = 0
        ok = torch.isfinite(g).all()  # [] bool, stays on the device
        opt = self.optimizer
        for group in opt.param_groups:
            group["lr"] = lr
        state = opt.state.get(self.delta, {})
        before = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
        delta0 = self.delta.detach().clone()
        self.delta.grad = torch.where(ok, -g, 0.0)  # finite either way; a skipped step is undone below
        opt.step()
        self.delta.grad = None
        with torch.no_grad():
            self.delta.copy_(torch.where(ok, self.delta, delta0))
            for k, v in opt.state[self.delta].items():
                if torch.is_tensor(v):  # the step count (on the device when capturable), exp_avg, exp_avg_sq
                    v.copy_(torch.where(ok, v, before.get(k, torch.zeros_like(v))))
        return ok

    @torch.no_grad()
    def project(self, norm: int, eps: float) -> None:
        """``norm`` 1: rescale so ``||delta||_2 <= eps``; 2: clamp entries to ``[-eps, eps]``; 0: nothing.
        On the device (a factor ``min(1, eps / ||delta||)``, no host comparison)."""
        if norm == 1:
            self.delta.mul_((eps / self.delta.norm().clamp_min(1e-30)).clamp(max=1.0))
        elif norm == 2:
            self.delta.clamp_(-eps, eps)


# ----------------------------------------------------------------------------- objective


@dataclass
class AdPEConfig:
    pe_type: Literal["ape", "rpe"] = "ape"  # "rpe" (iRPE-style) is not implemented
    adv_type: int = num(1, "[0, 2]")  # 0 none (MAE+) | 1 embedding mode | 2 coordinate mode
    adv_blr: float = num(1.5e-4, ">= 0")  # adv_lr = adv_blr * eff_batch / 256 * lr_factor [code/README]
    adv_wd: float = num(0.0, ">= 0")  # decoupled decay of delta (shrinks it); 0 in the original [code]
    adv_norm: Literal[0, 1, 2, "none", "l2", "linf"] = 0  # projection after each step [unverified]
    adv_eps: float = num(1.0, ">= 0")  # projection radius [unverified]
    adv_betas: tuple[float, float] = num((0.9, 0.95), "[0, 1)")  # the original shares the main AdamW's betas
    adv_adam_eps: float = num(1e-8, "> 0")
    adv_batch_size: int | None = num(None, ">= 1")  # eff_batch for adv_lr; None = micro-batch x grad_accum x world
    num_crops: int = num(4, ">= 1")
    crop_size: int = num(112, ">= 1")
    crop_scale: tuple[float, float] = num((0.08, 1.0), "(0, 1]")
    mask_ratio: float = num(0.75, "(0, 1)")  # 0 masks nothing: no loss
    norm_pix_loss: bool = True
    norm_pix_eps: float = num(1e-6, "> 0")
    decoder_dim: int = num(512, ">= 4")
    decoder_depth: int = num(8, ">= 0")
    decoder_heads: int = num(16, ">= 1")
    init: Literal["mae", "beit", "timm"] = "mae"  # encoder init [code: MAE's xavier]; the decoder keeps MAE's
    wd_cls_token: bool = True  # weight decay on the 3-D cls token [code: decayed]
    wd_mask_token: bool = True  # ... and on the mask token [code: decayed]


class _MultiCropMIM(Objective):
    """Shared implementation of MAE+ (adv_type 0) and AdPE (adv_type 1/2); see the module docstring.

    Progressive resolution (``train.resolution_schedule``): ``crop_size`` is in pixels of ``model.img_size``
    images, so at a scheduled size ``s`` the crops are ``crop_size * s / img_size`` px (:meth:`crop_at`; whole
    patches, else a ConfigError at start-up): the loader still crops at ``crop_size`` and each step downsamples
    the crops with the image (:func:`mimscale.engine.resolution.at_size`), the masks are those of the smaller
    crop grid, and the position tables (encoder, decoder, AdPE's shifted coordinates) are the sin-cos ones of
    the batch's grid. ``delta`` does not depend on the grid (a vector, or a shift in patch units)."""

    supports_resolution_schedule = True
    crop_pos: torch.Tensor  # a buffer: [1, N_c, D]

    def __init__(self, encoder: VisionTransformer, cfg: AdPEConfig):
        super().__init__(encoder, cfg)
        self._validate(encoder, cfg)
        init_encoder(encoder, cfg.init)
        p = encoder.patch_size
        self.grid = cfg.crop_size // p
        self.num_crop_patches = self.grid**2
        self.patch_pixels = p * p * encoder.in_chans
        self.adv_type = cfg.adv_type
        self.adv_norm = _NORMS[cfg.adv_norm]
        d = encoder.embed_dim
        self.register_buffer("crop_pos", sincos_2d(d, self.grid, cls_token=False), persistent=False)
        if self.adv_type != 1:  # embedding mode: delta replaces the mask token
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.normal_(self.mask_token, std=0.02)
        self.decoder = CropDecoder(
            d, self.grid, self.patch_pixels, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads
        )
        self.adv: AdversarialDelta | None = None
        if self.adv_type:
            # embedding mode: N(0, 0.02) like the mask token it replaces [code]; coordinate mode: zeros(2) [code]
            self.adv = AdversarialDelta(
                d if self.adv_type == 1 else 2,
                cfg.adv_betas,
                cfg.adv_adam_eps,
                cfg.adv_wd,
                init_std=0.02 if self.adv_type == 1 else 0.0,
            )
        self._micro_batch: int | None = None

    @staticmethod
    def _validate(encoder: VisionTransformer, cfg: AdPEConfig) -> None:
        if cfg.pe_type != "ape":
            raise ConfigError("objective.pe_type='rpe' (relative position AdPE) is not implemented; use 'ape'")
        if cfg.adv_type not in (0, 1, 2) or isinstance(cfg.adv_type, bool):
            raise ConfigError(f"objective.adv_type={cfg.adv_type!r} must be 0 (none), 1 (embedding) or 2 (coordinate)")
        if encoder.pos_embed_type != "sincos":
            raise ConfigError("mae_plus/adpe add a fixed sin-cos table for the crop grid: set model.pos_embed=sincos")
        if cfg.crop_size < encoder.patch_size or cfg.crop_size % encoder.patch_size:
            raise ConfigError(
                f"objective.crop_size={cfg.crop_size} must be a positive multiple of "
                f"model.patch_size={encoder.patch_size}"
            )
        if cfg.num_crops < 1:
            raise ConfigError(f"objective.num_crops={cfg.num_crops} must be >= 1")
        if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
            raise ConfigError(f"objective.crop_scale={list(cfg.crop_scale)} must satisfy 0 < min <= max <= 1")
        check_mae_knobs(cfg)
        if cfg.adv_blr < 0 or cfg.adv_wd < 0 or cfg.adv_eps < 0:
            raise ConfigError(
                f"objective.adv_blr={cfg.adv_blr}, adv_wd={cfg.adv_wd} and adv_eps={cfg.adv_eps} "
                "must be >= 0 (ascent comes from the negated gradient, not a negative lr)"
            )
        if cfg.adv_batch_size is not None and cfg.adv_batch_size < 1:
            raise ConfigError(f"objective.adv_batch_size={cfg.adv_batch_size} must be >= 1 (or null)")

    @classmethod
    def tiny_config(cls) -> AdPEConfig:
        """For the contract test (16 px images, p = 4): crops at 16 px (N_c = 16), a 48-d 1-block decoder."""
        return dataclasses.replace(cls.Config(), crop_size=16, decoder_dim=48, decoder_depth=1, decoder_heads=4)

    # ------------------------------------------------------------------ data

    def train_transform(self, default: Callable) -> MultiCrop:
        """``num_crops`` crops at ``crop_size`` with ``crop_scale`` (the recipe's ``data.crop_scale`` and image
        size are not used for training crops); flip, mean/std and channels follow ``default``."""
        crop = TrainTransform(
            self.cfg.crop_size,
            scale=self.cfg.crop_scale,
            ratio=getattr(default, "ratio", (3 / 4, 4 / 3)),
            hflip=getattr(default, "hflip", True),
            mean=getattr(default, "mean", IMAGENET_MEAN),
            std=getattr(default, "std", IMAGENET_STD),
            in_chans=self.encoder.in_chans,
        )
        return MultiCrop(self.cfg.num_crops, crop)

    def mask_spec(self) -> MaskSpec:
        return self.mask_spec_at(self.encoder.img_size)

    def crop_at(self, img_size: int) -> int:
        """The crop side at ``img_size`` (``crop_size`` scaled with the image); ConfigError unless whole patches."""
        full, p, c = self.encoder.img_size, self.encoder.patch_size, self.cfg.crop_size
        if (c * img_size) % (full * p):
            raise ConfigError(
                f"train.resolution_schedule: at {img_size} px the {c} px crops (objective.crop_size, of "
                f"{full} px images) would be {c * img_size / full:g} px, not whole {p} px patches; pick sizes s "
                f"with {c} x s / {full} a multiple of {p}"
            )
        return c * img_size // full

    def mask_spec_at(self, img_size: int) -> MaskSpec:
        """Each crop's random mask on the crop grid of ``img_size`` images (:meth:`crop_at`)."""
        n = (self.crop_at(img_size) // self.encoder.patch_size) ** 2
        return MaskSpec("crops", n, self.cfg.mask_ratio, num_crops=self.cfg.num_crops)

    # ------------------------------------------------------------------ model

    def private_modules(self) -> list[nn.Module]:
        return [self.adv] if self.adv is not None else []

    def flatten(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``image [B, nc, C, c, c]``, ``crop_masks bool [B, nc, N_c]`` -> crops ``[M, C, c, c]``, masks ``[M, N_c]``
        with ``M = B * nc`` (image-major). ``c``: ``crop_size``, or a smaller multiple of the patch size under
        a resolution schedule (the masks then of that grid)."""
        img, masks = batch["image"], batch["crop_masks"]
        nc, c, p = self.cfg.num_crops, img.shape[-1], self.encoder.patch_size
        if img.ndim != 5 or img.shape[1] != nc or img.shape[-2] != c or c % p or c > self.cfg.crop_size:
            raise ValueError(
                f"batch['image'] must be [B, {nc}, C, c, c] with c = {self.cfg.crop_size} (this objective's "
                f"train_transform) or a smaller multiple of {p}, got {tuple(img.shape)}"
            )
        n = (c // p) ** 2
        if masks.shape != (img.shape[0], nc, n):
            raise ValueError(f"batch['crop_masks'] must be [B, {nc}, {n}], got {tuple(masks.shape)}")
        return img.flatten(0, 1), masks.flatten(0, 1)

    def masked_pos(self, delta: torch.Tensor | None, grid: int | None = None) -> torch.Tensor:
        """Coordinate mode: sin-cos ``[N_c, D]`` (fp32) of the crop grid (``grid``, default the built one) shifted
        by ``delta = (d_col, d_row)``.

        Computed in fp64 and rounded once, like the fixed table, so ``delta = 0`` reproduces it exactly."""
        coords = grid_coords(grid or self.grid, dtype=torch.float64, device=self.crop_pos.device)
        if delta is not None:
            coords = coords + delta.to(torch.float64)
        return sincos_from_coords(self.encoder.embed_dim, coords).float()

    def encoder_input(self, crops: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Patch tokens with mask token / delta and position embeddings: ``[M, C, c, c]``, ``[M, N_c]`` ->
        ``[M, N_c, D]`` (no cls). Masked slot i gets ``mask_token + pos_i`` (adv_type 0), ``delta + pos_i`` (1)
        or ``mask_token + sincos(coords_i + delta)`` (2); visible slots ``patch_i + pos_i``."""
        proj = self.encoder.patch_embed.proj  # the conv runs on any multiple of p (crops != img_size)
        x = proj(crops.to(proj.weight.dtype)).flatten(2).transpose(1, 2)  # [M, N_c, D]
        m = masks.unsqueeze(-1)
        n = x.shape[1]  # the batch's crop grid (a resolution schedule: smaller early on)
        pos = (self.crop_pos if n == self.num_crop_patches else self.crop_pos_for(n)).to(x.dtype)  # [1, N_c, D]
        if self.adv_type == 1:
            assert self.adv is not None  # adv_type 1 and 2 build it
            fill = self.adv.live().to(x.dtype)
        else:
            fill = self.mask_token.to(x.dtype)
        x = torch.where(m, fill, x)
        if self.adv_type == 2:
            assert self.adv is not None
            shifted = self.masked_pos(self.adv.live(), int(round(n**0.5))).to(x.dtype)  # [N_c, D]
            pos = torch.where(m, shifted, pos)
        return x + pos

    def crop_pos_for(self, num_patches: int) -> torch.Tensor:
        """The fixed sin-cos table ``[1, N, D]`` (no cls slot) of a square crop grid of ``num_patches``."""
        return _cached_sincos(self, self.encoder.embed_dim, num_patches, False, self.crop_pos.device)

    def predict_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [M, N_c, D]`` -> ``pred [M, N_c, P]`` (encoder on all 1 + N_c tokens, then decoder)."""
        latent = self.encoder.encode(self.encoder.add_cls(tokens))  # [M, 1+N_c, D]
        return self.decoder(latent)

    def target(self, crops: torch.Tensor) -> torch.Tensor:
        """``crops [M, C, c, c]`` -> fp32 targets ``[M, N_c, P]`` (per-patch normalised if norm_pix_loss)."""
        t = patchify(crops.float(), self.encoder.patch_size)
        return normalize_patches(t, self.cfg.norm_pix_eps) if self.cfg.norm_pix_loss else t

    def forward(self, batch: dict) -> LossOutput:
        """``batch["image"] [B, nc, C, c, c]``, ``batch["crop_masks"] bool [B, nc, N_c]`` -> norm-pix MSE."""
        crops, masks = self.flatten(batch)
        self._micro_batch = batch["image"].shape[0]
        pred = self.predict_tokens(self.encoder_input(crops, masks))
        loss = masked_mse(pred, self.target(crops), masks)
        metrics = {"loss": loss.detach()}
        if self.adv is not None:
            metrics["adv_delta_norm"] = self.adv.delta.detach().float().norm()
        return LossOutput(loss, metrics)

    # ------------------------------------------------------------------ adversarial step

    def before_step(self, ctx: StepContext) -> None:
        """Record this step's loss scale (fp16; constant over its micro-batches) for the gradient hook."""
        if self.adv is not None:
            if not ctx.loss_scale > 0:
                raise ValueError(f"StepContext.loss_scale={ctx.loss_scale} must be > 0")
            self.adv.loss_scale = float(ctx.loss_scale)

    def adv_lr(self, ctx: StepContext) -> float:
        """``adv_blr * eff_batch / 256 * ctx.lr_factor`` (see the module docstring for ``eff_batch``)."""
        eff = self.cfg.adv_batch_size or (self._micro_batch or 0) * ctx.grad_accum * ctx.world_size
        return self.cfg.adv_blr * eff / 256 * ctx.lr_factor

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Ascent on delta: all-reduce-mean its gradient, negate, AdamW step, project. Collective when adversarial
        (every rank calls it once per optimizer step)."""
        if self.adv is None:
            return
        self.adv.ascent_step(self.adv_lr(ctx), ctx.all_reduce_mean)
        self.adv.project(self.adv_norm, self.cfg.adv_eps)

    def checkpoint_state(self) -> dict[str, Any]:
        if self.adv is None:
            return {}
        return {"delta": self.adv.delta.detach().cpu().clone(), "optimizer": self.adv.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if self.adv is None:
            return super().load_checkpoint_state(state)
        if set(state) != {"delta", "optimizer"}:
            raise ValueError(f"{self.name} checkpoint state must hold delta and optimizer, got {sorted(state)}")
        delta = torch.as_tensor(state["delta"])
        if delta.shape != self.adv.delta.shape:
            raise ValueError(
                f"{self.name}: checkpoint delta has shape {tuple(delta.shape)}, "
                f"expected {tuple(self.adv.delta.shape)} (adv_type={self.adv_type})"
            )
        with torch.no_grad():
            self.adv.delta.copy_(delta)
        self.adv.load_optimizer_state(state["optimizer"])
        self.adv.grad_acc.zero_()

    # ------------------------------------------------------------------ accounting

    def flops_per_sample(self) -> float:
        """3 x forward of num_crops x (patch embedding + encoder on 1 + N_c tokens + decoder on 1 + N_c)."""
        return self.flops_per_sample_at(self.encoder.img_size)

    def flops_per_sample_at(self, img_size: int) -> float:
        """:meth:`flops_per_sample` with the crops of ``img_size`` images (:meth:`crop_at`)."""
        e = self.encoder
        n = (self.crop_at(img_size) // e.patch_size) ** 2
        per_crop = (
            linear_flops(n, self.patch_pixels, e.embed_dim)
            + transformer_forward_flops(1 + n, e.embed_dim, e.depth, e.mlp_ratio)
            + self.decoder.flops(e.embed_dim, n)
        )
        return 3.0 * self.cfg.num_crops * per_crop

    def no_weight_decay(self) -> set[str]:
        return token_no_decay(self, {"mask_token"} if self.adv_type != 1 else set())


class MAEPlus(_MultiCropMIM):
    """MAE+: multi-crop (4 x 112 px) BEiT-style MAE on all tokens with a mask token (AdPE's baseline)."""

    name = "mae_plus"
    reference = "official code: maple-research-lab/AdPE, adv_type 0 (docs/objectives/adpe.md)"

    @dataclass
    class Config(AdPEConfig):
        adv_type: int = num(0, "[0, 2]")  # only 0 is MAE+ (the constructor says to use name: adpe)

    def __init__(self, encoder: VisionTransformer, cfg: AdPEConfig):
        if cfg.adv_type != 0:
            raise ConfigError(f"objective.adv_type={cfg.adv_type} with name mae_plus; use name: adpe for AdPE")
        super().__init__(encoder, cfg)


class AdPE(_MultiCropMIM):
    """AdPE: MAE+ with adversarial position embeddings of masked tokens (embedding / coordinate mode)."""

    name = "adpe"
    reference = "official code: maple-research-lab/AdPE (docs/objectives/adpe.md)"
    Config = AdPEConfig
