"""MaPeT: masked and permuted pre-training with two-stream attention (docs/objectives/mapet.md).

Per sample the collate draws a random factorisation order (``MaskSpec("permutation")``, ``rank int16 [B, N]``,
patch ranks 1..N; the cls token has rank 0). Tokens with rank < ``least`` form the context ``C`` (cls +
``least - 1`` patches); the other ``M = N + 1 - least`` patches form the predicted set ``P`` and are
predicted autoregressively in that order.

Streams (``Lc = 1 + N + M`` content tokens, ``M`` query tokens; ViT-B/16: 344 and 147):

* content ``[h ; a]``: ``h`` = cls + patch embeddings with the encoder's position embedding, ``a_j = z + pos_j``
  one auxiliary position token per ``j`` in P (raster order), ``z`` a learned vector;
* query ``g_j = z + pos_j`` (same init as ``a``), one per ``j`` in P (raster order).

Both streams run through the ENCODER's blocks with shared weights: the two streams are concatenated along
the sequence (``[content ; query]``, ``Lc + M`` rows), queries come from every row, keys/values only from the
content rows (``Attention.forward_qkv``), so LayerNorms, LayerScale, MLP and the per-sample drop-path decision
are shared by construction. Who may attend to whom (:func:`two_stream_masks`, True = attend, boolean
``(B, 1, Lq, Lk)`` built on the device from the ranks; no float masks):

* content row i: content t iff t in C or rank(t) < rank(i) or t = i; aux a_k iff rank(k) > rank(i);
* aux row a_j: content t iff t in C; every aux key;
* query row j: content t iff t in C or rank(t) < rank(j) (never its own content); aux a_k iff rank(k) >= rank(j).

Head: the encoder's final LayerNorm on the query stream -> ``Linear(D -> vocab)``: logits ``[B, M, vocab]`` in
raster order of P; targets are the per-patch codes gathered with the same index; cross-entropy in fp32.

Targets (``target_source``):

* ``"shards"`` (the recipe): k-CLIP codes cached in the shards (``kclip.npy``, ``uint16 [N]`` per sample,
  ``mimscale data add-targets --kind codes``). They were computed on a deterministic centre crop, so the
  train transform is that same crop + colour jitter only (:class:`CenterCropJitter`): no random crops, no
  flips (section 6.3/6.4) - whatever ``data.crop_scale`` / ``data.hflip`` say.
* ``"pixel_mean"``: a tokenizer-free stand-in for tests and smoke runs without cached codes: the code of a
  patch is its mean normalised intensity quantised into ``vocab_size`` uniform bins over [-2, 2]. Computed
  from the transformed image itself, so the recipe's default transform is kept.

Position embedding: the paper uses a learned absolute one; set ``model.pos_embed: learned`` (the recipes
do). With the sin-cos buffer the objective works unchanged (``pos_j`` is then fixed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..data.photometric import ColorJitter
from ..data.transforms import EvalTransform
from ..errors import ConfigError, DataError
from ..masking import MaskSpec
from ..models.vit import Block, VisionTransformer, init_linear_, init_token_
from ..ranges import num
from ..telemetry.flops import linear_flops, transformer_forward_flops
from .base import LossOutput, Objective, init_encoder, require_absolute_pos, token_no_decay
from .mae import patchify


def resolve_least(num_patches: int, least_context: int | None, predict_ratio: float) -> int:
    """``least`` (context size incl. cls): ``least_context`` if set, else ``N + 1 - round(ratio * N)``.

    ViT-B/16: N = 196, ratio 0.75 -> 50 (cls + 49 patches in C, 147 predicted); H/14: N = 256 -> 65.
    """
    if least_context is None:
        if not 0.0 < predict_ratio <= 1.0:
            raise ConfigError(f"objective.predict_ratio={predict_ratio} must be in (0, 1]")
        least = num_patches + 1 - int(round(predict_ratio * num_patches))
    else:
        least = least_context
    if not 1 <= least <= num_patches:
        raise ConfigError(
            f"objective.least_context={least} must be in [1, {num_patches}] (cls counts as 1; at "
            f"least one of the N={num_patches} patches must be predicted)"
        )
    return least


def two_stream_masks(
    rank: torch.Tensor, least: int, aux_tokens: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean attention masks (True = may attend) of both streams, built on ``rank``'s device.

    ``rank int [B, N]`` (patch ranks 1..N, a permutation per row). Returns, with ``M = N + 1 - least`` and
    ``Lc = 1 + N + M`` (``1 + N`` without aux tokens):

    * ``content bool [B, 1, Lc, Lc]``: rows/keys = cls, patches 0..N-1 (raster), aux tokens (raster order of P);
    * ``query bool [B, 1, M, Lc]``: one row per predicted patch (raster order of P);
    * ``pred_idx long [B, M]``: the raster indices of P, ascending.
    """
    if rank.ndim != 2:
        raise DataError(f"batch['rank'] must be [B, N], got shape {tuple(rank.shape)}")
    b, n = rank.shape
    m = n + 1 - least
    r = torch.cat([rank.new_zeros(b, 1), rank], dim=1).long()  # [B, 1+N], cls rank 0
    in_c = r < least  # [B, 1+N]
    # predicted patches first, each group in raster order (stable sort: no data-dependent shapes, no sync)
    pred_idx = in_c[:, 1:].to(torch.uint8).argsort(dim=1, stable=True)[:, :m]  # [B, M]
    rp = r[:, 1:].gather(1, pred_idx)  # [B, M] ranks of P
    own = torch.eye(n + 1, dtype=torch.bool, device=rank.device)
    cc = in_c[:, None, :] | (r[:, None, :] < r[:, :, None]) | own  # [B, 1+N, 1+N]
    qc = in_c[:, None, :] | (r[:, None, :] < rp[:, :, None])  # [B, M, 1+N]
    if not aux_tokens:
        return cc[:, None], qc[:, None], pred_idx
    ca = rp[:, None, :] > r[:, :, None]  # [B, 1+N, M]
    ac = in_c[:, None, :].expand(b, m, n + 1)  # [B, M, 1+N]
    aa = torch.ones(b, m, m, dtype=torch.bool, device=rank.device)  # [B, M, M]
    qa = rp[:, None, :] >= rp[:, :, None]  # [B, M, M]
    content = torch.cat([torch.cat([cc, ca], dim=2), torch.cat([ac, aa], dim=2)], dim=1)
    query = torch.cat([qc, qa], dim=2)
    return content[:, None], query[:, None], pred_idx


def two_stream_block(blk: Block, x: torch.Tensor, mask: torch.Tensor, lc: int) -> torch.Tensor:
    """One encoder block on both streams at once. ``x [B, Lc + M, D]`` = ``[content ; query]``,
    ``mask bool [B, 1, Lc + M, Lc]``; keys/values come from the ``Lc`` content rows only. Returns the same shape.

    Weights, LayerNorms, LayerScale and the per-sample drop-path draw are shared by the two streams."""
    n = blk.norm1(x)
    x = x + blk.drop_path1(blk.ls1(blk.attn.forward_qkv(n, n[:, :lc], mask)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class CenterCropJitter(EvalTransform):
    """The train transform for cached codes: the deterministic centre crop the codes were computed on
    (shorter side resized to ``img_size / crop_pct``, bicubic, centre crop) + colour jitter, then normalise.

    Jitter (as torchvision's ``ColorJitter(j, j, j)``, no hue): brightness, contrast and saturation factors
    uniform in ``[1 - j, 1 + j]``, applied in a random order; all draws from ``generator``. No flips and no
    random crops: the codes are tied to the exact pixels.
    """

    def __init__(self, img_size, mean, std, in_chans: int, crop_pct: float = 1.0, jitter: float = 0.4):
        super().__init__(img_size, mean=mean, std=std, in_chans=in_chans, crop_pct=crop_pct)
        if not 0.0 <= jitter < 1.0:
            raise ConfigError(f"objective.color_jitter={jitter} must be in [0, 1)")
        self.jitter = float(jitter)
        self._jitter = ColorJitter(self.jitter)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        img = self._prepare(img)
        short = int(min(self.size) / self.crop_pct)
        img = TF.resize(img, short, interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, list(self.size))
        if self.jitter > 0:
            if generator is None:
                raise ValueError("CenterCropJitter needs a generator for its colour jitter")
            img = self._jitter(img, generator)
        return self._finish(img)

    def __repr__(self) -> str:
        return f"CenterCropJitter({self._fields()}, crop_pct={self.crop_pct}, jitter={self.jitter})"


class MaPeT(Objective):
    """MaPeT: permuted autoregressive prediction of k-CLIP codes with two-stream attention and aux position tokens."""

    name = "mapet"
    reference = "official code: aimagelab/MaPeT (docs/objectives/mapet.md)"

    @dataclass
    class Config:
        least_context: int | None = num(None, ">= 1")  # |C| incl. cls; None: N + 1 - round(predict_ratio * N)
        predict_ratio: float = num(0.75, "(0, 1]")  # used when least_context is None
        vocab_size: int = num(8192, ">= 2")  # k-CLIP centroids
        target_source: Literal["shards", "pixel_mean"] = "shards"  # pixel_mean: tests / smoke runs only
        target_key: str = "kclip.npy"  # shard field holding the codes (uint16 [N] per sample)
        label_smoothing: float = num(0.0, "[0, 1)")
        aux_pos_tokens: bool = True  # False: XLNet-style (no aux tokens in the content stream)
        crop_pct: float = num(1.0, "(0, 1]")  # centre crop the cached codes were computed on (1.0: full square)
        target_image_size: int | None = num(None, ">= 1")  # the codes' size (add-targets --image-size); None: model's
        color_jitter: float = num(0.4, "[0, 1)")
        init: Literal["mae", "beit", "timm"] = "timm"  # encoder and z [code: timm's ViT init]
        wd_cls_token: bool = False  # [code: no_weight_decay = {pos_embed, cls_token}]
        wd_mask_token: bool = True  # weight decay on z [code: its 3-D mask positional token is decayed]

    def __init__(self, encoder: VisionTransformer, cfg: MaPeT.Config):
        super().__init__(encoder, cfg)
        require_absolute_pos(encoder, self.name)
        init_encoder(encoder, cfg.init)
        n, d = encoder.num_patches, encoder.embed_dim
        self.least = resolve_least(n, cfg.least_context, cfg.predict_ratio)
        self.num_pred = n + 1 - self.least
        if cfg.vocab_size < 2:
            raise ConfigError(f"objective.vocab_size={cfg.vocab_size} must be >= 2")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ConfigError(f"objective.label_smoothing={cfg.label_smoothing} must be in [0, 1)")
        if not 0.0 < cfg.crop_pct <= 1.0:
            raise ConfigError(f"objective.crop_pct={cfg.crop_pct} must be in (0, 1]")
        if not 0.0 <= cfg.color_jitter < 1.0:
            raise ConfigError(f"objective.color_jitter={cfg.color_jitter} must be in [0, 1)")
        if cfg.target_image_size is not None and cfg.target_image_size < 1:
            raise ConfigError(f"objective.target_image_size={cfg.target_image_size} must be >= 1 (or null)")
        if isinstance(encoder.norm, nn.Identity):
            raise ConfigError("MaPeT needs the encoder's final LayerNorm (build it with global_pool='token')")
        self.z = nn.Parameter(torch.zeros(1, 1, d))  # the shared content of every aux / query token
        self.head = nn.Linear(d, cfg.vocab_size)
        init_token_(self.z, cfg.init)
        init_linear_(self.head, "timm")  # the code's decoder head init

    @classmethod
    def tiny_config(cls) -> MaPeT.Config:
        """For the contract test: batches there carry no cached codes, so use the pixel-mean stand-in."""
        return cls.Config(vocab_size=64, target_source="pixel_mean")

    # ------------------------------------------------------------------ data side

    def mask_spec(self) -> MaskSpec:
        return MaskSpec("permutation", self.encoder.num_patches, least=self.least)

    def train_transform(self, default):
        """Cached codes: centre crop + colour jitter (:class:`CenterCropJitter`) with the recipe's size and
        normalisation; targets computed from the image itself (``pixel_mean``): ``default``."""
        if self.cfg.target_source != "shards":
            return default
        return CenterCropJitter(
            default.size,
            default.mean,
            default.std,
            default.in_chans,
            crop_pct=self.cfg.crop_pct,
            jitter=self.cfg.color_jitter,
        )

    def cached_targets(self) -> dict | None:
        """What must be in the shards' manifest (:func:`mimscale.data.targets.check_targets`, called by the
        pre-training task before its loader starts): the codes field, the size they were computed at and the
        centre-crop rule; ``None`` when the codes are computed from the batch (``pixel_mean``). The token grid
        is checked on every batch (codes must be ``[B, N]``)."""
        if self.cfg.target_source != "shards":
            return None
        size = self.cfg.target_image_size or self.encoder.img_size
        return {"names": [self.cfg.target_key], "image_size": size, "crop_pct": self.cfg.crop_pct}

    # ------------------------------------------------------------------ targets

    def codes(self, batch: dict) -> torch.Tensor:
        """Per-patch target codes ``long [B, N]`` in raster order."""
        n, v = self.encoder.num_patches, self.cfg.vocab_size
        if self.cfg.target_source == "pixel_mean":
            mean = patchify(batch["image"].float(), self.encoder.patch_size).mean(dim=-1)  # [B, N]
            return ((mean + 2.0) / 4.0 * v).long().clamp_(0, v - 1)
        key = self.cfg.target_key
        if key not in batch:
            raise DataError(
                f"the batch has no '{key}' codes: cache them into the shards with `mimscale data "
                "add-targets --kind codes`, or set objective.target_source=pixel_mean for a smoke run"
            )
        codes = batch[key]
        if not torch.is_tensor(codes) or codes.ndim != 2 or codes.shape[1] != n:
            shape = tuple(codes.shape) if torch.is_tensor(codes) else type(codes).__name__
            raise DataError(
                f"batch['{key}'] must be [B, {n}] codes (one per patch of the {self.encoder.grid_size}"
                f"x{self.encoder.grid_size} grid), got {shape}"
            )
        codes = codes.long()
        if codes.device.type == "cpu":
            if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < v:
                raise DataError(
                    f"batch['{key}'] has codes outside [0, {v}): objective.vocab_size={v} does not match the tokenizer"
                )
        else:  # no host sync on accelerators
            torch._assert_async(((codes >= 0) & (codes < v)).all(), f"{key} codes outside [0, vocab_size={v})")
        return codes

    # ------------------------------------------------------------------ model

    def run_streams(self, x: torch.Tensor, mask: torch.Tensor, lc: int) -> torch.Tensor:
        """All encoder blocks on ``x [B, Lc + M, D]`` (content then query rows) with ``mask [B, 1, Lc + M, Lc]``
        (boolean, or an additive float mask) -> the final-normed query stream ``[B, M, D]``."""
        enc = self.encoder
        use_ckpt = enc.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in cast("list[Block]", enc.blocks):
            if use_ckpt:
                x = checkpoint(two_stream_block, blk, x, mask, lc, use_reentrant=False)
            else:
                x = two_stream_block(blk, x, mask, lc)
        return enc.norm(x[:, lc:])

    def streams(self, img: torch.Tensor, rank: torch.Tensor):
        """Inputs of :meth:`run_streams`: ``img [B, C, H, W]``, ``rank int [B, N]`` -> ``x [B, Lc + M, D]``,
        ``mask bool [B, 1, Lc + M, Lc]``, ``Lc`` and ``pred_idx long [B, M]``."""
        enc = self.encoder
        content_mask, query_mask, pred_idx = two_stream_masks(rank.to(img.device), self.least, self.cfg.aux_pos_tokens)
        mask = torch.cat([content_mask, query_mask], dim=2)
        torch._assert_async(mask.any(dim=-1).all(), "MaPeT: an attention row may attend to nothing")
        h = enc.add_cls(enc.embed(img))  # [B, 1+N, D]
        assert enc.pos_embed is not None  # require_absolute_pos in __init__
        pos = enc.pos_embed[:, 1:].to(h.dtype).expand(h.shape[0], -1, -1)  # [B, N, D]
        aux = enc.gather_tokens(pos, pred_idx) + self.z.to(h.dtype)  # [B, M, D]
        content = torch.cat([h, aux], dim=1) if self.cfg.aux_pos_tokens else h  # [B, Lc, D]
        return torch.cat([content, aux], dim=1), mask, content.shape[1], pred_idx

    def logits(self, img: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``img [B, C, H, W]``, ``rank int [B, N]`` -> ``logits [B, M, vocab]`` (raster order of P), ``pred_idx [B, M]``."""
        x, mask, lc, pred_idx = self.streams(img, rank)
        return self.head(self.run_streams(x, mask, lc)), pred_idx

    def forward(self, batch: dict) -> LossOutput:
        codes = self.codes(batch)
        logits, pred_idx = self.logits(batch["image"], batch["rank"])
        target = codes.to(pred_idx.device).gather(1, pred_idx)  # [B, M], same order as logits
        logits = logits.float().flatten(0, 1)
        loss = F.cross_entropy(logits, target.flatten(), label_smoothing=self.cfg.label_smoothing)
        acc = (logits.detach().argmax(dim=-1) == target.flatten()).float().mean()
        return LossOutput(loss, {"loss": loss.detach(), "acc": acc})

    # ------------------------------------------------------------------ accounting

    def flops_per_sample(self) -> float:
        """3 x forward: patch embedding, ``depth`` blocks on ``Lc + M`` rows attending to ``Lc`` keys (the query
        rows project only q, not k/v), the head on the M query tokens (section 8: 262.7 GF for ViT-B/16)."""
        e = self.encoder
        m = self.num_pred
        lc = 1 + e.num_patches + (m if self.cfg.aux_pos_tokens else 0)
        blocks = transformer_forward_flops(
            lc + m, e.embed_dim, e.depth, e.mlp_ratio, attn_keys=lc
        ) - e.depth * linear_flops(m, e.embed_dim, 2 * e.embed_dim)
        fwd = (
            linear_flops(e.num_patches, e.patch_size**2 * e.in_chans, e.embed_dim)
            + blocks
            + linear_flops(m, e.embed_dim, self.cfg.vocab_size)
        )
        return 3.0 * fwd

    def no_weight_decay(self) -> set[str]:
        return token_no_decay(self, {"z"})
