"""Layer-wise learning-rate decay (BEiT/MAE fine-tuning): deeper layers keep a larger share of the lr.

With ``L = depth + 1`` "layers": the patch embedding, cls token and position embedding are layer 0,
block ``i`` is layer ``i + 1``, everything after the blocks (``norm``/``fc_norm``, ``head``) is layer
``L``. A parameter of layer ``l`` trains with ``lr * decay ** (L - l)``: the head at the full lr, block
``depth - 1`` at ``decay``, the patch embedding at ``decay ** L``.

The groups carry ``lr_scale`` and ``wd_scale``; :func:`mimscale.engine.deepspeed.set_hparams` multiplies
them into every step's lr and weight decay, so the groups work with the engine's schedule unchanged.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from torch import nn


def layer_id(name: str, depth: int) -> int:
    """Layer index of a ViT parameter name (timm names) in ``0..depth + 1``."""
    if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, depth: int, no_decay: AbstractSet[str] = frozenset()
) -> list[dict]:
    """AdamW parameter groups of ``model`` (a ViT, or a wrapper whose names start with ``prefix.``)
    keyed by (layer, decay?): ``{"params", "weight_decay", "wd_scale", "lr_scale", "layer"}``.

    No weight decay on 1-D parameters (biases, norms), tokens and ``no_decay`` names.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in no_decay
        lid = layer_id(name, depth)
        g = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "wd_scale": 1.0 if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - lid),
                "layer": lid,
            },
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]
