"""A complete objective to copy: masked-patch pixel regression with the encoder seeing mask tokens.

This file is the template the README's "Adding an objective" points to, and it is tested
(tests/objectives/test_template.py registers it as a plugin, runs the whole contract test and the
device-strict test on it and trains it for a few steps through ``python -m mimscale.train``). The step must
run on any device without host synchronisation: make tensors with ``device=``, take shapes from the config,
not the data (no ``nonzero`` / boolean-mask indexing / ``.item()``), see docs/testing.md. Copy it into your own package, rename it, and
register it in your ``pyproject.toml``::

    [project.entry-points."mimscale.objectives"]
    masked_pixels = "my_package.masked_pixels:MaskedPixels"

Then ``mimscale pretrain objective='{name: masked_pixels, mask_ratio: 0.6}'`` trains it, and
``mimscale objectives`` lists it. Everything the engine needs is below; the engine never branches on
the objective's name.

Tensor flow (``B`` images, ``N`` patches of ``P = p*p*C`` pixels, width ``D``):

    batch["image"] [B, C, H, W] --patch embed + pos--> [B, N, D]
    batch["mask"]  [B, N] bool (True = hidden; made by the collate from ``mask_spec()``)
    hidden slots <- mask_token [1, 1, D]  --> encoder blocks over [B, 1 + N, D] --> head [B, N, P]
    loss = mean over hidden patches of |pred - pixels| (fp32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mimscale.masking import MaskSpec
from mimscale.models.vit import VisionTransformer
from mimscale.objectives import LossOutput, Objective, StepContext
from mimscale.objectives.mae import patchify
from mimscale.ranges import num
from mimscale.telemetry.flops import linear_flops, transformer_forward_flops


class MaskedPixels(Objective):
    """Masked-patch pixel regression (L1) with mask tokens in the encoder: the project's template objective."""

    # The registry name: `objective.name` in recipes, the entry point's name, what `mimscale objectives` prints.
    name = "masked_pixels"
    # Where the defaults come from (shown by `mimscale objectives`): official code, paper, or our choice.
    reference = "template (our choice of every default)"

    @dataclass
    class Config:
        """Every knob: a default, and for numbers their valid range (`num`), checked by `mimscale check-config`
        and at launch with one clear line."""

        mask_ratio: float = num(0.6, "(0, 1)")
        head_dim: int = num(0, ">= 0")  # 0: a linear head; > 0: Linear-GELU-Linear with this width

    def __init__(self, encoder: VisionTransformer, cfg: MaskedPixels.Config):
        super().__init__(encoder, cfg)  # sets self.encoder, self.cfg
        d, p = encoder.embed_dim, encoder.patch_size
        self.patch_pixels = p * p * encoder.in_chans
        # Trained parameters live in submodules / parameters of the objective: DeepSpeed wraps the whole
        # objective, so they are optimised, partitioned (ZeRO-3) and checkpointed like the encoder.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.mask_token, std=0.02)
        self.head = (
            nn.Linear(d, self.patch_pixels)
            if cfg.head_dim == 0
            else nn.Sequential(nn.Linear(d, cfg.head_dim), nn.GELU(), nn.Linear(cfg.head_dim, self.patch_pixels))
        )

    def mask_spec(self) -> MaskSpec:
        """What the loader's collate makes per batch, on CPU workers, from per-sample generators (so a
        resumed run sees the same masks): here ``batch["mask"] bool [B, N]``."""
        return MaskSpec("random", self.encoder.num_patches, self.cfg.mask_ratio)

    def forward(self, batch: dict) -> LossOutput:
        """``batch["image"] [B, C, H, W]``, ``batch["mask"] [B, N]`` -> the fp32 loss and named scalars.
        Metrics must be detached scalars with the same keys on every rank (they are averaged in one
        collective with the step's flags)."""
        img, mask = batch["image"], batch["mask"]
        e = self.encoder
        tokens = e.embed(img)  # [B, N, D]
        hidden = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - hidden) + self.mask_token.to(tokens.dtype) * hidden
        z = e.encode(e.add_cls(tokens))[:, 1:]  # [B, N, D]
        pred = self.head(z).float()  # [B, N, P]
        target = patchify(img, e.patch_size).float()  # [B, N, P]
        err = (pred - target).abs().mean(dim=-1)  # [B, N]
        m = mask.float()
        loss = (err * m).sum() / m.sum().clamp(min=1.0)
        return LossOutput(loss, {"loss": loss.detach(), "masked_frac": m.mean().detach()})

    def flops_per_sample(self) -> float:
        """Training FLOPs per image (3x the forward of trained modules): what MFU, `bench plan` and the
        equal-compute comparison count."""
        e = self.encoder
        n = e.num_patches
        head = (
            linear_flops(n, e.embed_dim, self.patch_pixels)
            if self.cfg.head_dim == 0
            else (
                linear_flops(n, e.embed_dim, self.cfg.head_dim) + linear_flops(n, self.cfg.head_dim, self.patch_pixels)
            )
        )
        fwd = linear_flops(n, self.patch_pixels, e.embed_dim) + transformer_forward_flops(1 + n, e.embed_dim, e.depth)
        return 3.0 * (fwd + head)

    def no_weight_decay(self) -> set[str]:
        """Parameter names spared from weight decay besides 1-D ones (here: the encoder's tokens and ours)."""
        return super().no_weight_decay() | {"mask_token"}

    # ---- optional hooks (the defaults do nothing); shown here so a new objective knows they exist ----------
    def before_step(self, ctx: StepContext) -> None:
        """Once per optimizer step, before its micro-batches: schedules (``ctx.epoch``, ``ctx.lr_factor``)."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Once per optimizer step, after the update: EMA teachers (``ctx.master_params`` / ``master_shards``
        read the fp32 master weights at any ZeRO stage), adversaries, projections."""

    # frozen_modules() -> teachers (not optimised, not partitioned, not checkpointed);
    # private_modules() -> state the objective manages itself, saved through checkpoint_state();
    # train_transform(default) -> your own views (multi-crop, two views); cached_targets() -> targets read from
    # the shards (checked against their manifest); tiny_config() -> knobs for the contract test's tiny model.
