"""Building the trained module from the config: encoder + objective, activation checkpointing, compile,
and the backend switches (TF32). The Trainer and ``bench throughput`` build through here, so both measure
the same thing."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import config as C
from ..models.vit import Block, build_vit
from ..objectives import build_objective

log = logging.getLogger("mimscale.train")


def build_model(cfg: C.Config, device: str | torch.device | None = None) -> nn.Module:
    """The objective (encoder inside) for ``cfg``; ``device="meta"`` builds shapes only (FLOP counting).
    With ``model.compile`` every transformer block is compiled in place (see :func:`compile_blocks`)."""
    m = cfg.model
    with torch.device(device) if device is not None else _NoDevice():
        encoder = build_vit(
            m.arch,
            m.img_size,
            m.patch_size,
            m.in_chans,
            drop_path_rate=m.drop_path,
            layer_scale_init=m.layer_scale_init,
            pos_embed=m.pos_embed,
        )
        encoder.set_grad_checkpointing(m.grad_checkpointing)
        objective = build_objective(cfg.objective["name"], encoder, C.objective_knobs(cfg))
    if m.init and device != "meta":  # before DeepSpeed wraps it; a resumed run's checkpoint then overrides
        from ..models.init import init_module

        init_module(objective, m.init)
    if m.compile and device != "meta":
        n = compile_blocks(objective)
        log.info("model.compile: %d transformer blocks compiled with torch.compile (first steps compile)", n)
    return objective


def compile_blocks(module: nn.Module) -> int:
    """``torch.compile`` each :class:`Block` of ``module`` in place (``nn.Module.compile``: the module tree,
    parameter names and state_dict keys stay as they are, so checkpoints, ZeRO partitioning and the timm
    export are unchanged). Per-block compilation keeps graphs small, composes with per-block activation
    checkpointing and leaves objective-specific glue (masking, gathers) eager. Returns the count."""
    blocks = [b for b in module.modules() if isinstance(b, Block)]
    for b in blocks:
        b.compile()
    return len(blocks)


def configure_backends(cfg: C.Config, accelerator: str) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (``train.tf32``; off = exact fp32)."""
    if accelerator != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32


class _NoDevice:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
