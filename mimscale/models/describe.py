"""What an exported ViT is, written into its safetensors header: :func:`metadata` (architecture, sizes,
pooling, fc_norm, pos-embed type, objective, run, step) and :func:`timm_call`, the exact
``timm.create_model(...)`` call that builds the architecture and loads the file strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .vit import ARCHS, VisionTransformer

__all__ = ["metadata", "timm_call"]

#: the registry entry whose depth/width/heads ``timm.create_model`` overrides for each of our archs
_TIMM_BASE = {
    "vit_micro": "vit_tiny_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


def _arch(model: VisionTransformer) -> str:
    return next((a for a, s in ARCHS.items() if s["embed_dim"] == model.embed_dim and s["depth"] == model.depth), "vit")


def metadata(model: VisionTransformer, objective: str | None = None, run: str | None = None, step=None) -> dict:
    """The safetensors header of an export: strings only (the format's rule)."""
    meta = {
        "format": "pt",
        "mimscale": "1",
        "arch": _arch(model),
        "img_size": model.img_size,
        "patch_size": model.patch_size,
        "in_chans": model.in_chans,
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "mlp_ratio": model.mlp_ratio,
        "global_pool": model.global_pool,
        "fc_norm": model.global_pool == "avg",
        "num_classes": model.num_classes,
        "pos_embed": model.pos_embed_type,
        "layer_scale_init": model.layer_scale_init or "",
        "objective": objective or "",
        "run": run or "",
        "step": "" if step is None else step,
    }
    return {k: str(v) for k, v in meta.items()}


def timm_call(model: VisionTransformer, path: str | Path) -> str:
    """The ``timm.create_model(...)`` call that builds ``model``'s architecture and loads the file at ``path``
    strictly (``pretrained_cfg_overlay`` names the file and its class count, so timm keeps every key)."""
    arch = _arch(model)
    relative = model.pos_embed_type == "relative"
    if relative:
        name = "beit_large_patch16_224" if model.embed_dim >= 1024 else "beit_base_patch16_224"
    else:
        name = _TIMM_BASE.get(arch, "vit_base_patch16_224")
    args: dict[str, Any] = dict(
        img_size=model.img_size,
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        embed_dim=model.embed_dim,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=model.mlp_ratio,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
    )
    if relative:
        args.update(use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
        args["init_values"] = model.layer_scale_init or None
    else:
        args.update(fc_norm=model.global_pool == "avg", class_token=True, no_embed_class=False, pre_norm=False)
        if model.layer_scale_init:
            args["init_values"] = model.layer_scale_init
    kw = ", ".join(f"{k}={v!r}" for k, v in args.items())
    overlay = f"dict(file={str(path)!r}, num_classes={model.num_classes})"
    return f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay={overlay}, {kw})"
