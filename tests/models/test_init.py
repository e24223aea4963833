"""``model.init``: each released layout is built here from its published key names (timm ViT and Beit, BEiT's
shared table, the official MAE pre-training checkpoint, Hugging Face ViT / ViTMAE), loaded, and checked for
equal outputs against the model that wrote it; grids resample; wrong files are refused in one line."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from mimscale.errors import CheckpointError
from mimscale.eval.source import load_source
from mimscale.models.init import init_module, load_encoder, read_weights
from mimscale.models.pos_embed import resample_abs_pos_embed, resample_rel_pos_table, sincos_2d
from mimscale.models.vit import build_vit, timm_beit_kwargs, timm_kwargs

pytestmark = pytest.mark.unit
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _save(sd: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"model": sd, "epoch": 3}, path)


def _randomize(m: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _timm_vit(num_classes: int = 5, global_pool: str = "token"):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    ours = build_vit("vit_micro", 32, 8, pos_embed="learned", num_classes=num_classes, global_pool=global_pool)
    m = TimmViT(**timm_kwargs(ours)).eval()
    _randomize(m)
    return m


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_vit_with_head_loads_with_equal_outputs(tmp_path, suffix, caplog):
    timm_model = _timm_vit()
    _save(timm_model.state_dict(), tmp_path / f"w{suffix}")
    ours = build_vit("vit_micro", 32, 8, pos_embed="learned", num_classes=5).eval()
    with caplog.at_level(logging.INFO, logger="mimscale.init"):
        lines = init_module(ours, tmp_path / f"w{suffix}")
    assert len(lines) == 1 and "(timm): loaded" in lines[0] and "missing 0" in lines[0], lines
    assert any("init encoder" in r.message for r in caplog.records)
    assert torch.allclose(ours(X), timm_model(X), atol=1e-5)


def test_timm_head_is_ignored_by_an_encoder_and_by_eval_sources(tmp_path):
    timm_model = _timm_vit()
    _save(timm_model.state_dict(), tmp_path / "w.safetensors")
    enc = build_vit("vit_micro", 32, 8, pos_embed="learned").eval()
    line = init_module(enc, tmp_path / "w.safetensors")[0]
    assert "unexpected-and-ignored 2 (head.bias, head.weight)" in line
    assert torch.allclose(enc.forward_features(X), timm_model.forward_features(X), atol=1e-5)
    src = load_source(tmp_path / "w.safetensors")  # `mimscale eval` takes the timm file with its head
    assert src.pos_embed == "learned" and src.img_size == 32 and src.format == "timm"
    assert torch.allclose(src.encoder.forward_features(X), timm_model.forward_features(X), atol=1e-5)


def test_timm_avg_pool_fc_norm_model_is_an_eval_source(tmp_path):
    timm_model = _timm_vit(num_classes=0, global_pool="avg")
    _save(timm_model.state_dict(), tmp_path / "w.safetensors")
    src = load_source(tmp_path / "w.safetensors")
    assert torch.allclose(src.encoder(X), timm_model(X), atol=1e-5)


def _timm_beit(shared: bool):
    from timm.models.beit import Beit

    ours = build_vit("vit_micro", 32, 8, pos_embed="relative", layer_scale_init=0.1)
    m = Beit(**timm_beit_kwargs(ours)).eval()
    _randomize(m)
    sd = m.state_dict()
    if shared:  # one table for all blocks (what a shared-bias BEiT pre-training holds)
        table = sd["blocks.0.attn.relative_position_bias_table"]
        for k in [k for k in sd if k.endswith("relative_position_bias_table")]:
            sd[k] = table.clone()
        m.load_state_dict(sd)
    return m, sd


def test_timm_beit_and_beit_shared_table_load_with_equal_outputs(tmp_path):
    m, sd = _timm_beit(shared=True)
    _save(sd, tmp_path / "beit.pth")
    ours = build_vit("vit_micro", 32, 8, pos_embed="relative", layer_scale_init=0.1).eval()
    line = init_module(ours, tmp_path / "beit.pth")[0]
    assert "(beit)" in line and "missing 0" in line
    assert torch.allclose(ours(X), m(X), atol=1e-5)
    # BEiT's own layout: one rel_pos_bias table (+ its index buffer), no per-block copies
    own = {k: v for k, v in sd.items() if "relative_position" not in k}
    own["rel_pos_bias.relative_position_bias_table"] = sd["blocks.0.attn.relative_position_bias_table"]
    own["rel_pos_bias.relative_position_index"] = torch.zeros(3, dtype=torch.long)
    _save(own, tmp_path / "beit_own.safetensors")
    ours2 = build_vit("vit_micro", 32, 8, pos_embed="relative", layer_scale_init=0.1).eval()
    init_module(ours2, tmp_path / "beit_own.safetensors")
    assert torch.allclose(ours2(X), m(X), atol=1e-5)


def test_beit_per_block_tables_are_averaged_and_said(tmp_path):
    _, sd = _timm_beit(shared=False)
    _save(sd, tmp_path / "b.safetensors")
    ours = build_vit("vit_micro", 32, 8, pos_embed="relative", layer_scale_init=0.1)
    line = init_module(ours, tmp_path / "b.safetensors")[0]
    assert "averaged" in line
    mean = torch.stack([sd[f"blocks.{i}.attn.relative_position_bias_table"] for i in range(4)]).mean(0)
    assert torch.allclose(ours.rel_pos_bias.relative_position_bias_table, mean)


def _mae(decoder_dim=32, depth=1):
    from mimscale.objectives.mae import MAE

    enc = build_vit("vit_micro", 32, 8)
    obj = MAE(enc, MAE.Config(mask_ratio=0.5, decoder_dim=decoder_dim, decoder_depth=depth, decoder_heads=4)).eval()
    _randomize(obj.decoder, 2)
    _randomize(obj.encoder, 3)
    with torch.no_grad():
        obj.encoder.pos_embed.copy_(sincos_2d(64, 4))  # MAE's encoder table is the fixed sin-cos one
    return obj


def _official_mae_layout(obj) -> dict:
    """Our MAE renamed to the official pre-training checkpoint's key names."""
    sd = {k: v for k, v in obj.encoder.state_dict().items()}
    names = {"embed": "decoder_embed", "blocks": "decoder_blocks", "norm": "decoder_norm", "pred": "decoder_pred"}
    for k, v in obj.decoder.state_dict().items():
        head, _, rest = k.partition(".")
        if k == "mask_token":
            sd["mask_token"] = v
        elif k == "pos_embed":
            sd["decoder_pos_embed"] = v
        else:
            sd[f"{names[head]}.{rest}"] = v
    return sd


def test_official_mae_checkpoint_loads_encoder_and_decoder(tmp_path):
    src = _mae()
    torch.save({"model": _official_mae_layout(src), "optimizer": {}, "epoch": 799}, tmp_path / "mae.pth")
    dst = _mae()
    _randomize(dst, 9)
    lines = init_module(dst, tmp_path / "mae.pth")
    assert len(lines) == 2 and "init encoder" in lines[0] and "(mae)" in lines[0] and "init decoder" in lines[1]
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    assert torch.allclose(dst.predict(X, mask), src.predict(X, mask), atol=1e-5)
    with pytest.raises(CheckpointError, match="decoder_dim"):  # a decoder of another width: refused
        init_module(_mae(decoder_dim=16), tmp_path / "mae.pth")


def test_wrong_architecture_and_unknown_files_are_refused(tmp_path):
    _save(_timm_vit().state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="width 64 x 4 blocks.*set model.arch"):
        init_module(build_vit("vit_tiny", 32, 8), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="model.pos_embed=relative"):
        _, sd = _timm_beit(True)
        _save(sd, tmp_path / "b.safetensors")
        init_module(build_vit("vit_micro", 32, 8), tmp_path / "b.safetensors")
    _save({"conv1.weight": torch.zeros(3)}, tmp_path / "resnet.safetensors")
    with pytest.raises(CheckpointError, match="no ViT weights recognised"):
        init_module(build_vit("vit_micro", 32, 8), tmp_path / "resnet.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        read_weights(tmp_path / "nothing.pth")


def test_new_grid_resamples_learned_and_regenerates_sincos(tmp_path):
    from timm.layers import resample_abs_pos_embed as timm_resample

    timm_model = _timm_vit()
    _save(timm_model.state_dict(), tmp_path / "w.safetensors")
    big = build_vit("vit_micro", 64, 8, pos_embed="learned")
    line = init_module(big, tmp_path / "w.safetensors")[0]
    assert "resampled 1 (pos_embed: bicubic 4x4 -> 8x8)" in line
    ref = timm_resample(timm_model.pos_embed.detach(), [8, 8], num_prefix_tokens=1)
    assert torch.allclose(big.pos_embed, ref, atol=1e-6)
    fixed = build_vit("vit_micro", 64, 8)  # sin-cos: the table is regenerated for the new grid
    line = init_module(fixed, tmp_path / "w.safetensors")[0]
    assert "sin-cos regenerated" in line and torch.equal(fixed.pos_embed, sincos_2d(64, 8))


def test_relative_table_resampling_keeps_offsets_and_cls_rows():
    table = torch.randn(7 * 7 + 3, 2)
    assert torch.equal(resample_rel_pos_table(table, 4), table)
    out = resample_rel_pos_table(table, 8)  # 4x4 -> 8x8 grid: 7x7 -> 15x15 offsets
    assert out.shape == (15 * 15 + 3, 2) and torch.equal(out[-3:], table[-3:])
    grid = out[:-3].reshape(15, 15, 2)
    assert torch.allclose(grid[7, 7], table[:-3].reshape(7, 7, 2)[3, 3])  # offset 0 stays offset 0
    pos = torch.randn(1, 17, 8)
    assert torch.equal(resample_abs_pos_embed(pos, 4), pos)


def test_eval_source_and_init_take_our_run_and_export(tmp_path):
    enc = build_vit("vit_micro", 32, 8)
    _randomize(enc, 4)
    _save(enc.export_state_dict(enc.state_dict()), tmp_path / "e.safetensors")
    other = build_vit("vit_micro", 32, 8)
    assert "missing 0" in load_encoder(other, read_weights(tmp_path / "e.safetensors"))
    assert torch.equal(other(X), enc(X))


def _hf_available():
    return pytest.importorskip("transformers")


def test_hf_vit_folder_loads_with_equal_outputs(tmp_path, monkeypatch):
    _hf_available()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    hf = ViTModel(cfg, add_pooling_layer=True).eval()
    _randomize(hf, 5)
    hf.save_pretrained(tmp_path / "hf")
    src = load_source(tmp_path / "hf")  # a Hugging Face folder: config.json + model.safetensors
    assert src.format == "hf" and src.pos_embed == "learned"
    with torch.no_grad():
        ref = hf(pixel_values=X).last_hidden_state
    assert torch.allclose(src.encoder.forward_features(X), ref, atol=1e-5)


def test_hf_vitmae_for_pretraining_loads_encoder_and_decoder(tmp_path, monkeypatch):
    _hf_available()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=32,
        patch_size=8,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=128,
        mask_ratio=0.5,
        layer_norm_eps=1e-6,
        norm_pix_loss=True,
    )
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    def mae_table(dim: int) -> torch.Tensor:  # as transformers lays out a released MAE's fixed table
        t = build_2d_sinusoidal_position_embedding(height=4, width=4, embed_dim=dim, cls_token=True)
        return torch.cat([t[..., dim // 2 :], t[..., : dim // 2]], dim=-1).reshape(1, 17, dim)

    hf = ViTMAEForPreTraining(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.2)
        hf.vit.embeddings.position_embeddings.copy_(mae_table(64))
        hf.decoder.decoder_pos_embed.copy_(mae_table(32))
    hf.save_pretrained(tmp_path / "hfmae")
    obj = _mae()
    lines = init_module(obj, tmp_path / "hfmae")
    assert "(hf)" in lines[0] and "missing 0" in lines[0] and "init decoder" in lines[1] and "missing 0" in lines[1]
    assert "resampled 0" in lines[0]  # the file's fixed table is our sin-cos table
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf(pixel_values=X, noise=noise)
    mask = out.mask.bool()  # 1 = hidden, in raster order
    pred = obj.predict(X, mask)
    assert torch.allclose(pred, out.logits, atol=1e-4)


@pytest.mark.parametrize("img_size", [64, 24])  # a 4x4 grid -> 8x8 (the table grows) and -> 3x3 (it shrinks)
def test_beit_at_a_new_grid_gives_what_timm_beit_gives_at_that_size(tmp_path, img_size):
    from timm.models.beit import Beit, checkpoint_filter_fn

    m, sd = _timm_beit(shared=True)
    _save(sd, tmp_path / "beit.safetensors")
    ours = build_vit("vit_micro", img_size, 8, pos_embed="relative", layer_scale_init=0.1).eval()
    line = init_module(ours, tmp_path / "beit.safetensors")[0]
    g = img_size // 8
    assert f"relative_position_bias_table: BEiT-interpolated 4x4 -> {g}x{g}" in line and "missing 0" in line
    want = resample_rel_pos_table(sd["blocks.0.attn.relative_position_bias_table"], g)
    assert torch.allclose(ours.rel_pos_bias.relative_position_bias_table, want)
    # timm's own Beit built at the new size, the same file through its checkpoint filter: the same outputs
    theirs = Beit(**timm_beit_kwargs(ours)).eval()
    theirs.load_state_dict(checkpoint_filter_fn(dict(sd), theirs), strict=True)
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
