"""Layer-wise lr decay groups: every parameter once, MAE's layer ids and scales, no decay on 1-D/tokens."""

from __future__ import annotations

import pytest

from mimscale.eval.layer_decay import layer_decay_groups, layer_id
from mimscale.models.vit import build_vit


def test_layer_ids():
    assert [layer_id(n, 4) for n in ("cls_token", "pos_embed", "patch_embed.proj.weight")] == [0, 0, 0]
    assert layer_id("blocks.0.attn.qkv.weight", 4) == 1 and layer_id("blocks.3.mlp.fc2.bias", 4) == 4
    assert [layer_id(n, 4) for n in ("fc_norm.weight", "head.weight", "norm.bias")] == [5, 5, 5]


@pytest.mark.parametrize("decay", [0.65, 0.75])
def test_scales_and_decay(decay):
    model = build_vit("vit_micro", 16, 4, 3, num_classes=10, global_pool="avg", pos_embed="learned")  # depth 4
    groups = layer_decay_groups(model, 0.05, decay, model.depth, model.no_weight_decay())
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): (g["weight_decay"], g["wd_scale"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expect = {
        "head.weight": 1.0,
        "fc_norm.weight": 1.0,
        "blocks.3.attn.qkv.weight": decay,
        "blocks.0.mlp.fc1.weight": decay**4,
        "patch_embed.proj.weight": decay**5,
        "cls_token": decay**5,
        "pos_embed": decay**5,
    }
    for name, scale in expect.items():
        assert scale_of[id(named[name])] == pytest.approx(scale), name
    for name in ("head.weight", "blocks.2.attn.proj.weight", "patch_embed.proj.weight"):
        assert wd_of[id(named[name])] == (0.05, 1.0), name
    for name in ("head.bias", "fc_norm.weight", "blocks.1.norm1.bias", "cls_token", "pos_embed"):
        assert wd_of[id(named[name])] == (0.0, 0.0), name
    assert len(groups) == 2 * (model.depth + 2)  # (layer, decay?) pairs: every layer has both kinds
