"""EMAE: efficient masked autoencoders with self-consistency (docs/objectives/emae.md).

Every image is split into K disjoint visible sets ("parts") cut from ONE random permutation per sample
(made by the collate, ``parts bool [B, K, N]``, True = masked). The MAE task runs on all K parts in the
same step: the encoder and the MAE decoder see the K parts stacked along the batch axis (``K*B``
sequences, part-major: row ``k*B + b`` is part k of image b). Two losses, both in fp32:

* reconstruction: MAE's norm-pix MSE over the hidden patches of each part, averaged over the K parts;
* self-consistency: for every ordered pair of parts (a, b), a != b, and every patch hidden in both,
  ``mean_P (pred_a - sg(pred_b))^2``, averaged over pairs and patches; ``sg`` (stop-gradient) is applied
  AFTER the decoder.

``loss = loss_rec + w(epoch) * loss_sc`` with ``w`` ramped linearly from 0 at epoch 0 to ``sc_weight`` at
``sc_start_epoch`` (constant ``sc_weight`` when ``sc_start_epoch == 0``). The epoch is read from
``batch["epoch"]`` when the batch carries it, else from the last :meth:`EMAE.set_epoch` call; if neither
was given the full ``sc_weight`` is used.

Every choice beyond "K disjoint parts + a self-consistency loss" is [unverified] (no public code) and is a
knob of :class:`EMAE.Config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..masking import MaskSpec, num_visible, visible_indices
from ..models.vit import VisionTransformer
from ..ranges import num
from ..telemetry.flops import linear_flops, transformer_forward_flops
from .base import LossOutput, Objective, StepContext, init_encoder, require_absolute_pos, token_no_decay
from .mae import MAEDecoder, masked_mse, normalize_patches, patchify


def resolve_num_parts(num_patches: int, mask_ratio: float, num_parts: int | None = None) -> int:
    """K for an EMAE run, or ConfigError (one line) when ``N`` patches cannot give K >= 2 disjoint parts.

    ``num_parts=None`` means ``round(1 / (1 - r))``, capped at ``N // N_keep`` (the floor in
    ``N_keep = floor(N(1-r))`` can make the rounded value one too many, e.g. r = 0.62, N = 16).
    A user-set ``num_parts`` must satisfy ``num_parts * N_keep <= N``.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ConfigError(f"objective.mask_ratio={mask_ratio} must be in (0, 1)")
    keep = num_visible(num_patches, mask_ratio)
    if keep < 1:
        raise ConfigError(f"objective.mask_ratio={mask_ratio} leaves no visible patch of {num_patches}; lower it")
    if num_parts is None:
        k = min(int(round(1.0 / (1.0 - mask_ratio))), num_patches // keep)
        if k < 2:
            raise ConfigError(
                f"objective.mask_ratio={mask_ratio} gives num_parts={k}: EMAE needs >= 2 "
                f"disjoint visible parts of floor(N(1-r))={keep} of N={num_patches} patches; "
                "use mask_ratio >= 0.5"
            )
        return k
    if num_parts < 2 or num_parts * keep > num_patches:
        raise ConfigError(
            f"objective.num_parts={num_parts} cannot partition {num_patches} patches into disjoint "
            f"visible parts of {keep} (mask_ratio={mask_ratio}); use 2 <= num_parts <= "
            f"{num_patches // keep} or leave num_parts unset"
        )
    return num_parts


def self_consistency(preds: torch.Tensor, masks: torch.Tensor, stopgrad: bool = True) -> torch.Tensor:
    """Pairwise agreement of the K predictions of each patch, fp32 scalar.

    ``preds [K, B, N, P]`` (decoder outputs of the K parts), ``masks bool [K, B, N]`` (True = hidden in that
    part). For every ordered pair (a, b), a != b, and every patch i hidden in both a and b:
    ``e = mean_P (preds[a, :, i] - sg(preds[b, :, i]))^2``; the result is the mean of ``e`` over all those
    (pair, sample, patch) triples (0 if there are none). With ``stopgrad`` the b side is detached, so the
    term of pair (a, b) only moves pred_a; summed over both orders this is, for gradients, half of the
    plain pairwise loss without stop-gradient.

    Memory: keeps K-1 differences of the size of ``preds`` for backward (one per part shift).
    """
    x = preds.float()
    other_side = x.detach() if stopgrad else x
    total = x.new_zeros(())
    count = x.new_zeros(())
    for shift in range(1, x.shape[0]):  # pairs (a, (a+shift) % K) for all a at once: each ordered pair once
        other = other_side.roll(-shift, dims=0)
        both = (masks & masks.roll(-shift, dims=0)).to(x.dtype)  # [K, B, N]
        err = (x - other).pow(2).mean(dim=-1)  # [K, B, N]
        total = total + (err * both).sum()
        count = count + both.sum()
    return total / count.clamp_min(1.0)


class EMAE(Objective):
    """EMAE: MAE on K disjoint parts of every image per step + a self-consistency loss between parts."""

    name = "emae"
    supports_resolution_schedule = True
    reference = (
        "NO public code: everything beyond the paper's description is our reading [unverified] "
        "(docs/objectives/emae.md)"
    )

    @dataclass
    class Config:
        mask_ratio: float = num(0.75, "(0, 1)")  # 0 masks nothing: no loss
        num_parts: int | None = num(None, ">= 2")  # None: round(1 / (1 - mask_ratio)) (4 for 0.75) [unverified]
        sc_weight: float = num(1.0, ">= 0")  # lambda_sc [unverified]
        sc_loss: Literal["mse"] = "mse"  # [unverified]
        sc_stopgrad: Literal["symmetric", "none"] = "symmetric"  # "none": ablation only [unverified]
        sc_start_epoch: float = num(0.0, ">= 0")  # lambda_sc ramps 0 -> sc_weight over [0, sc_start_epoch] [unverified]
        parts_chunk: int | None = num(None, ">= 1")  # parts per encoder+decoder call; < K recomputes chunks in backward
        norm_pix_loss: bool = True
        norm_pix_eps: float = num(1e-6, "> 0")
        decoder_dim: int = num(512, ">= 4")
        decoder_depth: int = num(8, ">= 0")
        decoder_heads: int = num(16, ">= 1")
        init: Literal["mae", "beit", "timm"] = "mae"  # no EMAE code: MAE's (xavier) [our choice]
        wd_cls_token: bool = True  # as MAE's code [our choice]
        wd_mask_token: bool = True  # as MAE's code [our choice]

    def __init__(self, encoder: VisionTransformer, cfg: EMAE.Config):
        super().__init__(encoder, cfg)
        require_absolute_pos(encoder, self.name)
        init_encoder(encoder, cfg.init)
        self.num_parts = resolve_num_parts(encoder.num_patches, cfg.mask_ratio, cfg.num_parts)
        self.num_keep = num_visible(encoder.num_patches, cfg.mask_ratio)
        if cfg.decoder_dim < 4 or cfg.decoder_dim % 4 or cfg.decoder_heads < 1 or cfg.decoder_dim % cfg.decoder_heads:
            raise ConfigError(
                f"objective.decoder_dim={cfg.decoder_dim} must be a multiple of 4 (sin-cos table) and "
                f"of objective.decoder_heads={cfg.decoder_heads}"
            )
        if cfg.decoder_depth < 0:
            raise ConfigError(f"objective.decoder_depth={cfg.decoder_depth} must be >= 0")
        if cfg.sc_weight < 0 or cfg.sc_start_epoch < 0:
            raise ConfigError(
                f"objective.sc_weight={cfg.sc_weight} and objective.sc_start_epoch={cfg.sc_start_epoch} must be >= 0"
            )
        if cfg.parts_chunk is not None and cfg.parts_chunk < 1:
            raise ConfigError(f"objective.parts_chunk={cfg.parts_chunk} must be >= 1 (or unset for all parts at once)")
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
        self._epoch: float | None = None

    # ------------------------------------------------------------------ schedule

    def before_step(self, ctx: StepContext) -> None:
        self.set_epoch(ctx.epoch)

    def set_epoch(self, epoch: float | None) -> None:
        """Fractional epoch (step / steps_per_epoch) for the self-consistency warm-in; ``batch["epoch"]`` wins."""
        self._epoch = None if epoch is None else float(epoch)

    def sc_weight_at(self, epoch: float | None) -> float:
        """``sc_weight * min(1, epoch / sc_start_epoch)``; the full weight when the epoch is unknown or
        ``sc_start_epoch == 0``."""
        w, start = self.cfg.sc_weight, self.cfg.sc_start_epoch
        if epoch is None or start <= 0:
            return w
        return w * min(1.0, max(0.0, epoch / start))

    @staticmethod
    def _batch_epoch(batch: dict) -> float | None:
        e = batch.get("epoch")
        if e is None:
            return None
        if torch.is_tensor(e):
            return float(e.reshape(-1)[0])
        if isinstance(e, (list, tuple)):
            return float(e[0])
        return float(e)

    # ------------------------------------------------------------------ model

    def mask_spec(self) -> MaskSpec:
        return self.mask_spec_at(self.encoder.img_size)

    def mask_spec_at(self, img_size: int) -> MaskSpec:
        """The K parts on the grid of ``img_size`` images (progressive resolution: K stays the full grid's)."""
        n = (img_size // self.encoder.patch_size) ** 2
        if self.num_parts * num_visible(n, self.cfg.mask_ratio) > n:
            raise ConfigError(
                f"EMAE's {self.num_parts} parts of floor(N(1-r)) patches do not fit the {n} patches of {img_size} px "
                f"images (objective.mask_ratio={self.cfg.mask_ratio}); start train.resolution_schedule larger"
            )
        return MaskSpec("parts", n, self.cfg.mask_ratio, num_parts=self.num_parts)

    def target(self, img: torch.Tensor) -> torch.Tensor:
        """``img [B, C, H, W]`` -> fp32 targets ``[B, N, P]`` (per-patch normalised if norm_pix_loss)."""
        t = patchify(img.float(), self.encoder.patch_size)
        return normalize_patches(t, self.cfg.norm_pix_eps) if self.cfg.norm_pix_loss else t

    def _predict_flat(self, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``tokens [B, N, D]`` (embedded image), ``masks bool [k, B, N]`` -> ``pred [k*B, N, P]``.

        One encoder call and one decoder call on ``k*B`` sequences (row ``j*B + b`` = part j of image b).
        """
        k, b, n = masks.shape
        keep = num_visible(n, self.cfg.mask_ratio)  # the batch's grid (progressive resolution: smaller early on)
        keep_idx = visible_indices(masks.reshape(k * b, n), keep)  # [k*B, N_keep]: fixed shape, no sync
        rows = torch.arange(b, device=tokens.device).repeat(k).unsqueeze(1)  # [k*B, 1]
        visible = tokens[rows, keep_idx.to(tokens.device)]  # [k*B, N_keep, D]
        latent = self.encoder.encode(self.encoder.add_cls(visible))  # [k*B, 1+N_keep, D]
        return self.decoder(latent, keep_idx, n)  # [k*B, N, P]

    def predict(self, img: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """``img [B, C, H, W]``, ``parts bool [B, K, N]`` -> ``preds [K, B, N, P]`` for every patch slot.

        The patch embedding runs once per image. With ``parts_chunk < K`` the parts run in chunks, each
        under non-reentrant activation checkpointing when gradients are on, so only the predictions of
        all K parts stay alive and each chunk's encoder/decoder activations are recomputed in backward.
        """
        b, k, n = parts.shape
        masks = parts.transpose(0, 1)  # [K, B, N]
        tokens = self.encoder.embed(img, any_size=True)  # [B, N, D]
        chunk = self.cfg.parts_chunk or k
        if chunk >= k:
            pred = self._predict_flat(tokens, masks)
        else:
            outs = []
            for s in range(0, k, chunk):
                m = masks[s : s + chunk]
                if torch.is_grad_enabled():
                    outs.append(checkpoint(self._predict_flat, tokens, m, use_reentrant=False))
                else:
                    outs.append(self._predict_flat(tokens, m))
            pred = torch.cat(outs, dim=0)
        return pred.view(k, b, n, -1)

    def forward(self, batch: dict) -> LossOutput:
        """``batch["image"] [B, C, H, W]``, ``batch["parts"] bool [B, K, N]``, optional ``batch["epoch"]``."""
        img, parts = batch["image"], batch["parts"]
        if parts.ndim != 3 or parts.shape[1] != self.num_parts:
            raise ValueError(f"batch['parts'] must be [B, {self.num_parts}, N], got {tuple(parts.shape)}")
        preds = self.predict(img, parts)  # [K, B, N, P]
        masks = parts.transpose(0, 1)  # [K, B, N]
        # every part hides the same number of patches, so the masked mean over all K*B rows is the
        # mean over parts of MAE's per-part loss
        loss_rec = masked_mse(preds, self.target(img), masks)
        epoch = self._batch_epoch(batch)
        w = self.sc_weight_at(self._epoch if epoch is None else epoch)
        stopgrad = self.cfg.sc_stopgrad == "symmetric"
        if w > 0:
            loss_sc = self_consistency(preds, masks, stopgrad)
            loss = loss_rec + w * loss_sc
        else:
            with torch.no_grad():
                loss_sc = self_consistency(preds, masks, stopgrad)
            loss = loss_rec
        return LossOutput(loss, {"loss": loss.detach(), "loss_rec": loss_rec.detach(), "loss_sc": loss_sc.detach()})

    def flops_per_sample(self) -> float:
        return self.flops_per_sample_at(self.encoder.img_size)

    def flops_per_sample_at(self, img_size: int) -> float:
        """3 x forward: patch embedding once, then encoder (1 + N_keep tokens) and decoder on each of K parts."""
        e = self.encoder
        n = (img_size // e.patch_size) ** 2
        keep = num_visible(n, self.cfg.mask_ratio)
        fwd = linear_flops(n, self.patch_pixels, e.embed_dim) + self.num_parts * (
            transformer_forward_flops(1 + keep, e.embed_dim, e.depth) + self.decoder.flops(e.embed_dim, keep, n)
        )
        return 3.0 * fwd

    def no_weight_decay(self) -> set[str]:
        return token_no_decay(self, {"decoder.mask_token"})
