"""Shared check of the learning tests: an engine-written BEiT-layout encoder export against timm's Beit."""

import torch

from mimscale.models.vit import build_vit


def check_beit_export(path, img: int, patch: int) -> None:
    """The engine's exported encoder loads strictly into timm's Beit and into mimscale's encoder, same output."""
    from safetensors.torch import load_file
    from timm.models.beit import Beit

    from mimscale.models.vit import timm_beit_kwargs

    state = load_file(str(path))
    assert "pos_embed" not in state and "blocks.1.attn.relative_position_bias_table" in state
    ours = build_vit("vit_micro", img, patch, pos_embed="relative", layer_scale_init=0.1).eval()
    ours.load_state_dict(state, strict=True)
    timm_model = Beit(**timm_beit_kwargs(ours)).eval()
    timm_model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, img, img)
    torch.testing.assert_close(timm_model.forward_features(x), ours.forward_features(x), atol=1e-5, rtol=1e-5)
    assert state["blocks.0.attn.relative_position_bias_table"].abs().max() > 0  # the bias was trained
