"""``build_model``: ``model.init`` loads released weights into the objective before the engine wraps it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mimscale import config as C
from mimscale.engine.build import build_model
from mimscale.errors import ConfigError
from mimscale.models.vit import build_vit, timm_kwargs

pytestmark = pytest.mark.unit


def test_model_init_loads_a_timm_file_at_a_new_resolution(tmp_path, caplog):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    ref = TimmViT(**timm_kwargs(build_vit("vit_micro", 32, 4, pos_embed="learned", num_classes=3))).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    cfg = C.load(
        "tiny_cpu",
        [f"model.init={tmp_path / 'timm.safetensors'}", "model.pos_embed=learned", "model.img_size=64"],
    )
    with caplog.at_level("INFO", logger="mimscale.init"):
        obj = build_model(cfg)
    enc = obj.encoder
    assert torch.equal(enc.blocks[2].mlp.fc1.weight, ref.blocks[2].mlp.fc1.weight)
    assert enc.pos_embed.shape == (1, 1 + 16 * 16, 64)
    line = next(r.message for r in caplog.records if r.message.startswith("init encoder"))
    assert "pos_embed: bicubic 8x8 -> 16x16" in line and "head.weight" in line  # the head is ignored
    caplog.clear()
    build_model(cfg, device="meta")  # shapes only (FLOP counting): nothing is read
    assert not caplog.records or all(not r.message.startswith("init") for r in caplog.records)


def test_model_init_is_a_known_key():
    with pytest.raises(ConfigError, match="model.inti"):
        C.load("tiny_cpu", ["model.inti=x"])
    assert C.load("tiny_cpu", ["model.init=/w.pth"]).model.init == "/w.pth"
