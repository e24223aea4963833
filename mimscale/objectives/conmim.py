"""ConMIM: masked image modeling with denoising contrast (docs/objectives/conmim.md).

Per image, ONE random crop + flip gives two views (:class:`~mimscale.data.photometric.SharedGeometryViews`):
the student sees the crop with a mask token at its masked patches (BEiT-style: the full sequence goes through
the encoder), an EMA teacher (encoder + projector copies) sees the photometrically perturbed crop with no mask.
A projector maps every token to ``proj_out`` channels; the loss is a patch-level InfoNCE WITHIN each image::

    s = proj(student(mask_token-filled view))[:, 1:]     [B, N, C]    (cls dropped after the projector)
    t = proj_ema(teacher(perturbed view))[:, 1:]         [B, N, C]    (no gradient)
    logits_b = norm(s_b) @ norm(t_b)^T / tau             [B, N, N]    fp32
    loss = CE over the rows of masked positions, target = the row's own patch index (positives on the diagonal)

After every optimizer step the teacher moves towards the student's fp32 master weights,
``t = m t + (1 - m) s`` with ``m`` cosine from ``ema_m0`` to 1 (:mod:`mimscale.teachers.ema`).

Encoder: the recipes use ``model.pos_embed=relative`` (BEiT's shared relative position bias, no absolute
embedding, as the official code); the student adds the mask token before ``encoder.add_pos`` (a no-op then).
``init`` (default ``beit``) re-initialises the encoder, mask token and projector as the code does.
Deviations from the official code, on purpose: the unused ``lm_head`` of the original is not created.
Projector BatchNorm statistics are per micro-batch (no SyncBN): keep the reference per-device batch (64)
when reproducing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..amp import autocast
from ..data.photometric import Photometric, PhotometricConfig, SharedGeometryViews
from ..errors import ConfigError
from ..masking import MaskSpec
from ..models.vit import VisionTransformer, init_linear_, init_token_
from ..ranges import num
from ..teachers.ema import EMATeacher, hold_outside, momentum_at
from ..telemetry.flops import linear_flops, transformer_forward_flops
from .base import LossOutput, Objective, init_encoder, token_no_decay


class StatsPrecisionBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` that normalises in the dtype of its running statistics and returns the input's dtype.

    DeepSpeed casts parameters, not buffers, to bf16/fp16: the affine weight and bias are then bf16 beside fp32
    running statistics, a mix ``batch_norm`` refuses ("expected scalar type BFloat16 but found Float"). Here
    input, weight and bias go to the statistics' dtype (fp32: also the precision autocast gives batch norm).
    Exponential running averages only (``momentum`` set: a cumulative average would read the step count on the
    host). ``x [M, C]`` -> ``[M, C]``; state-dict keys as ``BatchNorm1d``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.running_mean
        dtype = stats.dtype if stats is not None else torch.float32
        w = None if self.weight is None else self.weight.to(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum
        assert momentum is not None, "exponential running averages only (see the class docstring)"
        y = F.batch_norm(
            x.to(dtype),
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            w,
            b,
            self.training or self.running_mean is None,
            momentum,
            self.eps,
        )
        return y.to(x.dtype)


class Projector(nn.Module):
    """Per-token head: ``layers - 1`` x [Linear (no bias) -> BatchNorm1d -> ReLU], then Linear (no bias) ->
    BatchNorm1d(affine=False). ``forward(x [B, L, D]) -> [B, L, out]``; BatchNorm statistics are over all
    ``B * L`` tokens."""

    def __init__(self, dim: int, hidden: int, out: int, layers: int):
        super().__init__()
        mods: list[nn.Module] = []
        width = dim
        for _ in range(layers - 1):
            mods += [nn.Linear(width, hidden, bias=False), StatsPrecisionBatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        mods += [nn.Linear(width, out, bias=False), StatsPrecisionBatchNorm1d(out, affine=False)]
        self.net = nn.Sequential(*mods)
        for m in self.net:
            if isinstance(m, nn.Linear):
                init_linear_(m, "beit")  # the code's: truncated normal 0.02 cut at +-1 std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return self.net(x.reshape(b * n, d)).view(b, n, -1)

    def flops(self, tokens: int) -> float:
        return sum(linear_flops(tokens, m.in_features, m.out_features) for m in self.net if isinstance(m, nn.Linear))


def patch_infonce(
    s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intra-image patch InfoNCE in fp32: ``s, t [B, N, C]``, ``mask bool [B, N]`` -> ``(loss, accuracy)``.

    ``logits_b = norm(s_b) norm(t_b)^T / temperature [B, N, N]``; the rows of masked positions (``M`` in the
    batch) are scored with cross-entropy against their own index (positive: the teacher feature of the same
    patch of the same image; negatives: the other ``N - 1`` patches of that image), averaged over the ``M``
    rows. ``accuracy``: fraction of those rows whose arg-max is the diagonal. Nothing masked -> loss 0.

    Fixed shapes (``M`` varies with block masks): every row is scored and the mask weights the mean, so there is
    no boolean indexing or ``nonzero`` (a host synchronisation on accelerators).
    """
    s = F.normalize(s.float(), dim=-1)
    t = F.normalize(t.float(), dim=-1)
    logits = torch.bmm(s, t.transpose(1, 2)) / temperature  # [B, N, N]
    b, n, _ = logits.shape
    target = torch.arange(n, device=logits.device).expand(b, n)  # [B, N]: each row's own patch index
    mask = mask.to(device=logits.device, dtype=torch.bool)
    rows = mask.sum().clamp_min(1).to(logits.dtype)  # M (1 when nothing is masked: loss 0, not NaN)
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(b, n)  # [B, N]
    loss = torch.where(mask, ce, 0.0).sum() / rows
    hit = logits.detach().argmax(dim=-1) == target  # [B, N]
    acc = (hit & mask).sum().to(logits.dtype) / rows
    return loss, acc


class ConMIM(Objective):
    """ConMIM: intra-image patch contrast between a masked student and an EMA teacher on a perturbed view."""

    name = "conmim"
    reference = "official code: TencentARC/ConMIM (docs/objectives/conmim.md)"
    teacher_encoder: EMATeacher  # set by hold_outside in __init__ (outside the module tree)
    teacher_projector: EMATeacher

    @dataclass
    class Config:
        temperature: float = num(0.1, "> 0")
        ema_m0: float = num(0.996, "[0, 1]")
        ema_schedule: Literal["cosine_to_1", "constant"] = "cosine_to_1"
        proj_hidden: int = num(4096, ">= 1")
        proj_out: int = num(256, ">= 1")
        proj_layers: int = num(3, ">= 1")
        mask_type: Literal["random_mps32", "block"] = "random_mps32"
        mask_ratio: float = num(0.75, "(0, 1)")  # random_mps32: ceil(U * r) units of mask_unit x mask_unit patches
        mask_unit: int = num(2, ">= 1")  # 2 x 2 patches = 32 px at p = 16, 28 px at p = 14 [unverified for H]
        block_num_masked: int = num(75, ">= 1")  # block: target masked patches per image [code]
        block_min_patches: int = num(16, ">= 1")  # block: smallest rectangle [code]
        block_exact_count: bool = False  # block: force the count; the code's generator does not [code]
        teacher_aug: PhotometricConfig = field(default_factory=PhotometricConfig)
        init: Literal["mae", "beit", "timm"] = "beit"  # encoder and mask token [code: BEiT's]
        wd_cls_token: bool = False  # [code: no_weight_decay = {pos_embed, cls_token}]
        wd_mask_token: bool = True  # [code: the 3-D mask token is decayed]

    @classmethod
    def tiny_config(cls) -> ConMIM.Config:
        """Small projector for contract tests on a 16-patch model."""
        return cls.Config(proj_hidden=48, proj_out=32, block_num_masked=6)

    def __init__(self, encoder: VisionTransformer, cfg: ConMIM.Config):
        super().__init__(encoder, cfg)
        n, grid = encoder.num_patches, encoder.grid_size
        if cfg.temperature <= 0:
            raise ConfigError(f"objective.temperature={cfg.temperature} must be > 0")
        if not 0.0 <= cfg.ema_m0 <= 1.0:
            raise ConfigError(f"objective.ema_m0={cfg.ema_m0} must be in [0, 1]")
        if cfg.proj_layers < 1 or cfg.proj_hidden < 1 or cfg.proj_out < 1:
            raise ConfigError(
                f"objective.proj_layers={cfg.proj_layers}, proj_hidden={cfg.proj_hidden} and "
                f"proj_out={cfg.proj_out} must be >= 1"
            )
        if cfg.mask_type == "random_mps32":
            if not 0.0 < cfg.mask_ratio < 1.0:
                raise ConfigError(f"objective.mask_ratio={cfg.mask_ratio} must be in (0, 1)")
            if cfg.mask_unit < 1 or grid % cfg.mask_unit:
                raise ConfigError(
                    f"objective.mask_unit={cfg.mask_unit} must divide the {grid}x{grid} patch grid "
                    f"(model.img_size / model.patch_size)"
                )
        elif not 0 < cfg.block_num_masked < n:
            raise ConfigError(
                f"objective.block_num_masked={cfg.block_num_masked} must be in [1, {n - 1}] for {n} patches"
            )
        cfg.teacher_aug.validate("objective.teacher_aug")
        init_encoder(encoder, cfg.init)
        d = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        init_token_(self.mask_token, cfg.init)
        self.projector = Projector(d, cfg.proj_hidden, cfg.proj_out, cfg.proj_layers)
        # fp32 EMA copies taken now, before DeepSpeed partitions or casts the student; held OUTSIDE the module
        # tree (ZeRO-3 expects every parameter under the engine's module to be its own), always in train mode
        hold_outside(self, "teacher_encoder", EMATeacher(encoder))
        hold_outside(self, "teacher_projector", EMATeacher(self.projector))
        self.teacher_encoder.train()
        self.teacher_projector.train()
        self.momentum = float(cfg.ema_m0)

    # ------------------------------------------------------------------ data side

    def mask_spec(self) -> MaskSpec:
        c, n = self.cfg, self.encoder.num_patches
        if c.mask_type == "random_mps32":
            return MaskSpec("units", n, c.mask_ratio, unit=c.mask_unit)
        return MaskSpec(
            "block", n, num_masked=c.block_num_masked, min_block=c.block_min_patches, exact=c.block_exact_count
        )

    def train_transform(self, default):
        return SharedGeometryViews(default, Photometric(self.cfg.teacher_aug))

    # ------------------------------------------------------------------ model

    def private_modules(self) -> list[nn.Module]:
        return [self.teacher_encoder, self.teacher_projector]

    def student_features(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BEiT-style encoder: ``img [B, C, H, W]``, ``mask bool [B, N]`` -> ``[B, 1 + N, D]``; the mask token
        replaces the patch embedding of masked patches before the position embedding is added."""
        e = self.encoder
        x = e.patch_embed(img.to(e.patch_embed.proj.weight.dtype))  # [B, N, D]
        w = mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)  # [B, N, 1]
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        return e.encode(e.add_cls(e.add_pos(x)))

    @torch.no_grad()
    def teacher_targets(self, img: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """EMA teacher on the full perturbed view: ``img [B, C, H, W]`` -> ``[B, N, proj_out]`` (fp32 weights;
        computed in ``dtype`` under autocast when the student trains in low precision)."""
        with autocast(img.device.type, dtype, enabled=dtype != torch.float32):
            teacher = cast(VisionTransformer, self.teacher_encoder.module)  # the EMA copy of the encoder
            z = teacher.forward_features(img.float())  # [B, 1 + N, D]
            return self.teacher_projector(z)[:, 1:].float()

    def forward(self, batch: dict) -> LossOutput:
        """``batch``: ``image``, ``image_teacher`` ``[B, C, H, W]`` (same crop), ``mask bool [B, N]``."""
        if "image_teacher" not in batch:
            raise ValueError("ConMIM needs batch['image_teacher'] (the perturbed view from its train_transform)")
        img, mask = batch["image"], batch["mask"]
        dtype = self.encoder.patch_embed.proj.weight.dtype
        t = self.teacher_targets(batch["image_teacher"], dtype)  # [B, N, C]
        s = self.projector(self.student_features(img, mask))[:, 1:]  # [B, N, C]
        loss, acc = patch_infonce(s, t, mask.to(s.device), self.cfg.temperature)
        momentum = torch.full((), self.momentum, device=loss.device)  # on the step's device (a fill, no copy)
        return LossOutput(loss, {"loss": loss.detach(), "pos_acc": acc.detach(), "ema_momentum": momentum})

    # ------------------------------------------------------------------ step hooks / state

    def after_optimizer_step(self, ctx) -> None:
        """EMA update from the student's fp32 master weights (collective under ZeRO-3: all ranks call it)."""
        c = self.cfg
        self.momentum = momentum_at(c.ema_schedule, ctx.step, ctx.total_steps, c.ema_m0)
        self.teacher_encoder.update(ctx, self.encoder, self.momentum)
        self.teacher_projector.update(ctx, self.projector, self.momentum)

    def checkpoint_state(self) -> dict:
        return {
            "teacher_encoder": self.teacher_encoder.checkpoint_state(),
            "teacher_projector": self.teacher_projector.checkpoint_state(),
            "ema_momentum": self.momentum,
        }

    def load_checkpoint_state(self, state: dict) -> None:
        from ..errors import CheckpointError

        want = {"teacher_encoder", "teacher_projector", "ema_momentum"}
        if set(state) != want:
            raise CheckpointError(f"ConMIM checkpoint state has keys {sorted(state)}, expected {sorted(want)}")
        self.teacher_encoder.load_checkpoint_state(state["teacher_encoder"])
        self.teacher_projector.load_checkpoint_state(state["teacher_projector"])
        self.momentum = float(state["ema_momentum"])

    # ------------------------------------------------------------------ accounting

    def flops_per_sample(self) -> float:
        """3 x (student: encoder on 1 + N tokens + projector) + 1 x (the same for the EMA teacher)."""
        e = self.encoder
        n = e.num_patches
        fwd = (
            linear_flops(n, e.patch_size**2 * e.in_chans, e.embed_dim)
            + transformer_forward_flops(1 + n, e.embed_dim, e.depth, e.mlp_ratio)
            + self.projector.flops(1 + n)
        )
        return 4.0 * fwd

    def no_weight_decay(self) -> set[str]:
        return token_no_decay(self, {"mask_token"})
