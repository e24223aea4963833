"""ViT encoder: timm state_dict compatibility, subset forward, masks, checkpointing, drop-path."""

import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from mimscale.models import ARCHS, VisionTransformer, build_vit, timm_model_name
from mimscale.models.vit import DropPath, timm_kwargs


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _img(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return build_vit("vit_micro", 32, 4).eval()


# --------------------------------------------------------------------------- timm compatibility


@pytest.mark.parametrize("arch", ["vit_tiny", "vit_small", "vit_base"])
def test_strict_load_into_timm_create_model(arch):
    torch.manual_seed(0)
    img, p = (32, 4) if arch != "vit_base" else (224, 16)
    m = build_vit(arch, img, p)
    name = timm_model_name(arch, p, img)
    t = timm.create_model(name, pretrained=False, img_size=img, patch_size=p, num_classes=0)
    t.load_state_dict(m.state_dict(), strict=True)
    assert _shapes(t.state_dict()) == _shapes(m.state_dict())


@pytest.mark.parametrize("arch,p", [("vit_large", 16), ("vit_huge", 14)])
def test_large_huge_shapes_match_timm_on_meta(arch, p):
    with torch.device("meta"):
        m = build_vit(arch, 224, p)
        t = timm.create_model(
            timm_model_name(arch, p, 224), pretrained=False, img_size=224, patch_size=p, num_classes=0
        )
        t2 = TimmViT(**timm_kwargs(m))
    assert _shapes(t.state_dict()) == _shapes(m.state_dict()) == _shapes(t2.state_dict())
    t.load_state_dict(m.state_dict(), strict=True)  # meta load still checks keys and shapes
    n_params = sum(x.numel() for x in m.parameters()) + m.pos_embed.numel()
    assert n_params == sum(x.numel() for x in t.parameters())


def test_timm_model_names():
    assert timm_model_name("vit_base", 16, 224) == "vit_base_patch16_224"
    assert timm_model_name("vit_huge", 14, 224) == "vit_huge_patch14_224"
    assert timm_model_name("vit_large", 16, 224) == "vit_large_patch16_224"
    # not registered in timm -> a registered entry of the same shape (geometry via kwargs)
    assert timm.is_model(timm_model_name("vit_base", 14, 224))
    with pytest.raises(ValueError, match="timm_kwargs"):
        timm_model_name("vit_micro", 4, 32)
    with pytest.raises(ValueError, match="vit_base"):
        timm_model_name("vit_nope", 16, 224)


def test_build_vit_unknown_arch_names_valid_ones():
    with pytest.raises(ValueError) as e:
        build_vit("vit_gigantic", 224, 16)
    for a in ARCHS:
        assert a in str(e.value)


_EQUIV_CASES = [("vit_micro", gp, ls, nc) for gp in ("token", "avg") for ls in (None, 0.1) for nc in (0, 7)] + [
    ("vit_tiny", "token", None, 0),
    ("vit_tiny", "avg", 0.1, 7),
]


@pytest.mark.parametrize("arch,global_pool,ls,num_classes", _EQUIV_CASES)
def test_outputs_equal_timm(arch, global_pool, ls, num_classes):
    torch.manual_seed(1)
    m = build_vit(arch, 32, 4, global_pool=global_pool, layer_scale_init=ls, num_classes=num_classes).eval()
    if ls is not None:  # make layer scale non-trivial
        with torch.no_grad():
            for b in m.blocks:
                b.ls1.gamma.uniform_(0.5, 1.5)
                b.ls2.gamma.uniform_(0.5, 1.5)
    t = TimmViT(**timm_kwargs(m), weight_init="skip").eval()  # weights come from m
    t.load_state_dict(m.state_dict(), strict=True)
    has_fc_norm = global_pool == "avg"
    assert isinstance(m.fc_norm, torch.nn.LayerNorm) == has_fc_norm
    assert isinstance(m.norm, torch.nn.LayerNorm) != has_fc_norm
    assert ("blocks.0.ls1.gamma" in m.state_dict()) == (ls is not None)
    x = _img(3)
    with torch.no_grad():
        f, tf = m.forward_features(x), t.forward_features(x)
        y, ty = m(x), t(x)
    assert f.shape == (3, 1 + m.num_patches, m.embed_dim)
    assert y.shape == (3, num_classes or m.embed_dim)
    assert torch.allclose(f, tf, atol=1e-5, rtol=0)
    assert torch.allclose(y, ty, atol=1e-5, rtol=0)


def test_attributes(micro):
    assert (micro.num_patches, micro.grid_size, micro.patch_size) == (64, 8, 4)
    assert (micro.embed_dim, micro.num_heads, micro.depth) == (64, 4, 4)
    assert len(micro.blocks) == 4
    b = micro.blocks[0]
    for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
        assert hasattr(b, name)
    assert isinstance(b.ls1, torch.nn.Identity) and isinstance(b.drop_path1, torch.nn.Identity)


def test_layernorm_eps_and_exact_gelu(micro):
    assert all(m.eps == 1e-6 for m in micro.modules() if isinstance(m, torch.nn.LayerNorm))
    assert micro.blocks[0].mlp.act.approximate == "none"


# --------------------------------------------------------------------------- pos-embed / params / init


def test_sincos_pos_embed_is_persistent_buffer(micro):
    pe = micro.pos_embed
    assert pe.shape == (1, micro.num_patches + 1, micro.embed_dim)
    assert not pe.requires_grad
    assert all(p is not pe for p in micro.parameters())
    assert "pos_embed" not in dict(micro.named_parameters())
    assert "pos_embed" in micro.state_dict()
    assert torch.all(pe[0, 0] == 0) and pe.abs().max() <= 1
    assert micro.no_weight_decay() == {"cls_token"}


def test_learned_pos_embed_is_parameter():
    torch.manual_seed(0)
    m = build_vit("vit_micro", 32, 4, pos_embed="learned")
    params = dict(m.named_parameters())
    assert "pos_embed" in params and params["pos_embed"].requires_grad
    assert 0.01 < params["pos_embed"].std() < 0.03
    assert m.no_weight_decay() == {"cls_token", "pos_embed"}
    t = TimmViT(**timm_kwargs(m))
    t.load_state_dict(m.state_dict(), strict=True)


def test_mae_init():
    torch.manual_seed(0)
    m = build_vit("vit_tiny", 32, 4, num_classes=10)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            fan_out, fan_in = mod.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert mod.weight.abs().max() <= bound, name
            assert mod.weight.abs().max() > 0.9 * bound, name
            assert torch.all(mod.bias == 0), name
        elif isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
    w = m.patch_embed.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))
    assert 0.9 * bound < w.abs().max() <= bound
    assert torch.all(m.patch_embed.proj.bias == 0)
    assert abs(m.cls_token.std().item() - 0.02) < 0.006


def test_wrong_image_size_raises(micro):
    with pytest.raises(ValueError, match="img_size"):
        micro(torch.zeros(1, 3, 48, 48))


# --------------------------------------------------------------------------- subset forward / masks


def test_embed_and_add_cls_shapes(micro):
    x = _img(2)
    t = micro.embed(x)
    assert t.shape == (2, 64, 64)
    s = micro.add_cls(t[:, :5])
    assert s.shape == (2, 6, 64)
    cls = (micro.cls_token + micro.pos_embed[:, :1])[0, 0]
    assert torch.equal(s[0, 0], cls) and torch.equal(s[1, 0], cls)
    assert torch.equal(s[:, 1:], t[:, :5])
    assert torch.all(micro.pos_embed[0, 0] == 0)


def test_subset_forward_equals_manual_gather(micro):
    x = _img(3, seed=1)
    g = torch.Generator().manual_seed(2)
    keep = torch.stack([torch.randperm(64, generator=g)[:16] for _ in range(3)])  # per-sample different
    assert not torch.equal(keep[0], keep[1])
    with torch.no_grad():
        out = micro.forward_features(x, keep)
        tok = micro.embed(x)
        manual = torch.stack([tok[b, keep[b]] for b in range(3)])
        ref = micro.encode(micro.add_cls(manual))
        singles = torch.cat([micro.forward_features(x[b : b + 1], keep[b : b + 1]) for b in range(3)])
        full = micro.forward_features(x)
        full_idx = micro.forward_features(x, torch.arange(64).expand(3, -1))
    assert out.shape == (3, 17, 64)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert torch.allclose(out, singles, atol=1e-5, rtol=0)
    assert torch.allclose(full, full_idx, atol=1e-6, rtol=0)


def test_all_true_mask_equals_no_mask(micro):
    tok = micro.add_cls(micro.embed(_img(2)))
    L = tok.shape[1]
    with torch.no_grad():
        a = micro.encode(tok)
        b = micro.encode(tok, torch.ones(2, 1, L, L, dtype=torch.bool))
        c = micro.encode(tok, torch.ones(2, micro.num_heads, L, L, dtype=torch.bool))
    assert torch.allclose(a, b, atol=1e-6, rtol=0) and torch.allclose(a, c, atol=1e-6, rtol=0)


def _manual_attention(attn, x, bias):
    """Hand-written reference: softmax(q k^T / sqrt(d) + bias) v, then proj."""
    B, L, D = x.shape
    h, d = attn.num_heads, D // attn.num_heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (t.reshape(B, L, h, d).transpose(1, 2) for t in qkv.split(D, dim=-1))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
    return (w @ v).transpose(1, 2).reshape(B, L, D) @ attn.proj.weight.T + attn.proj.bias


def test_blocking_mask_equals_additive_inf_reference(micro):
    torch.manual_seed(3)
    tok = micro.add_cls(micro.embed(_img(2)))
    B, L, _ = tok.shape
    allowed = torch.rand(B, micro.num_heads, L, L) > 0.4
    allowed[..., 0] = True  # every query may see the cls key: no empty rows
    additive = torch.zeros(B, micro.num_heads, L, L).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        out_bool = micro.encode(tok, allowed)
        out_float = micro.encode(tok, additive)
        out_free = micro.encode(tok)
        attn = micro.blocks[0].attn
        x = micro.blocks[0].norm1(tok)
        ref = _manual_attention(attn, x, additive)
        got = attn(x, allowed)
    assert torch.allclose(out_bool, out_float, atol=1e-5, rtol=0)
    assert not torch.allclose(out_bool, out_free, atol=1e-3)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


def test_rel_bias_combined_with_mask(micro):
    torch.manual_seed(4)
    tok = micro.add_cls(micro.embed(_img(2)))
    B, L, _ = tok.shape
    bias = torch.randn(1, micro.num_heads, L, L)
    allowed = torch.rand(B, 1, L, L) > 0.3
    allowed[..., 0] = True
    with torch.no_grad():
        a = micro.encode(tok, allowed, rel_bias=bias)
        b = micro.encode(tok, bias.masked_fill(~allowed, float("-inf")))
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_forward_qkv_shares_weights(micro):
    attn = micro.blocks[1].attn
    n_params = sum(p.numel() for p in attn.parameters())
    assert n_params == 4 * 64 * 64 + 4 * 64  # fused qkv + proj only
    torch.manual_seed(5)
    x, y = torch.randn(2, 9, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.allclose(attn.forward_qkv(x, x), attn(x), atol=1e-6, rtol=0)
        out = attn.forward_qkv(y, x)  # queries from y, keys/values from x
        D, h, d = 64, attn.num_heads, 16
        q = (y @ attn.qkv.weight[:D].T + attn.qkv.bias[:D]).reshape(2, 5, h, d).transpose(1, 2)
        k = (x @ attn.qkv.weight[D : 2 * D].T + attn.qkv.bias[D : 2 * D]).reshape(2, 9, h, d).transpose(1, 2)
        v = (x @ attn.qkv.weight[2 * D :].T + attn.qkv.bias[2 * D :]).reshape(2, 9, h, d).transpose(1, 2)
        ref = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v).transpose(1, 2).reshape(2, 5, D)
        ref = attn.proj(ref)
        assert out.shape == (2, 5, 64)
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)
        m = torch.ones(2, 1, 5, 9, dtype=torch.bool)
        m[..., 3:] = False
        assert torch.allclose(attn.forward_qkv(y, x, m), attn.forward_qkv(y, x[:, :3]), atol=1e-6, rtol=0)
    # gradients reach the shared fused weight from both streams
    attn.zero_grad()
    attn.forward_qkv(y, x).sum().backward()
    gq, gkv = attn.qkv.weight.grad[:D], attn.qkv.weight.grad[D:]
    assert gq.abs().sum() > 0 and gkv.abs().sum() > 0
    attn.zero_grad(set_to_none=True)


def test_pool(micro):
    f = torch.randn(2, 5, 64)
    assert torch.equal(micro.pool(f, "cls"), f[:, 0])
    assert torch.allclose(micro.pool(f, "mean"), f[:, 1:].mean(1))
    with pytest.raises(ValueError):
        micro.pool(f, "max")


# --------------------------------------------------------------------------- training features


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(6)
    m = build_vit("vit_micro", 32, 4, layer_scale_init=0.5).train()
    x = _img(2, seed=6)
    keep = torch.randint(0, 64, (2, 20))

    def grads():
        m.zero_grad(set_to_none=True)
        m.forward_features(x, keep).square().mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = grads()
    m.set_grad_checkpointing(True)
    assert m.grad_checkpointing
    ck = grads()
    m.set_grad_checkpointing(False)
    assert ref.keys() == ck.keys()
    for n in ref:
        assert torch.allclose(ref[n], ck[n], atol=1e-6, rtol=1e-6), n


def test_drop_path_rates_linear():
    m = build_vit("vit_micro", 32, 4, drop_path_rate=0.3)
    rates = [b.drop_path1.p if isinstance(b.drop_path1, DropPath) else 0.0 for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(type(b.drop_path1) is type(b.drop_path2) for b in m.blocks)


def test_drop_path_eval_deterministic_train_stochastic_per_sample():
    torch.manual_seed(7)
    m = build_vit("vit_micro", 32, 4, drop_path_rate=0.5)
    x = _img(1, seed=7).expand(16, -1, -1, -1)  # 16 copies of one image
    m.eval()
    with torch.no_grad():
        e1, e2 = m.forward_features(x), m.forward_features(x)
        m.train()
        t1 = m.forward_features(x)
    assert torch.equal(e1, e2)
    assert torch.allclose(e1[0], e1[15], atol=1e-5)  # identical inputs, identical outputs in eval
    assert not torch.allclose(t1, e1, atol=1e-3)
    distinct = {tuple(t1[i, 0, :4].tolist()) for i in range(16)}
    assert len(distinct) > 1  # per-sample masks: identical inputs diverge

    dp = DropPath(0.5).train()
    y = dp(torch.ones(64, 3, 5))
    per_sample = y.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))  # whole sample dropped or scaled 1/keep
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


def test_bf16_model_accepts_fp32_images():
    torch.manual_seed(8)
    m = build_vit("vit_micro", 32, 4).eval()
    x = _img(2)
    with torch.no_grad():
        ref = m.forward_features(x)
        mb = m.to(torch.bfloat16)
        out = mb.forward_features(x)
        pooled = mb(x)
        sub = mb.forward_features(x, torch.arange(10).expand(2, -1))
    assert out.dtype == torch.bfloat16 and pooled.dtype == torch.bfloat16 and sub.shape == (2, 11, 64)
    assert (out.float() - ref).abs().max() < 0.2


def test_constructor_validation():
    with pytest.raises(ValueError, match="pos_embed"):
        VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4, pos_embed="rope")
    with pytest.raises(ValueError, match="global_pool"):
        VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4, global_pool="map")
    with pytest.raises(ValueError, match="divisible by 4"):
        VisionTransformer(img_size=32, patch_size=4, embed_dim=66, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        VisionTransformer(img_size=30, patch_size=4, embed_dim=64, depth=1, num_heads=4)


# --------------------------------------------------------------------------- pos_embed="relative" (BEiT layout)


def _randomise(m):
    """Non-zero values everywhere, so a key mix-up cannot hide behind zero-init tables / biases."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def test_relative_export_loads_strictly_into_timm_beit_and_matches():
    from timm.models.beit import Beit

    from mimscale.models.vit import timm_beit_kwargs

    torch.manual_seed(0)
    m = _randomise(build_vit("vit_micro", 32, 4, pos_embed="relative", layer_scale_init=0.1, init="beit")).eval()
    assert m.pos_embed is None and "pos_embed" not in m.state_dict()
    assert m.rel_pos_bias.relative_position_bias_table.shape == ((2 * 8 - 1) ** 2 + 3, 4)
    assert m.blocks[0].attn.qkv.bias is None  # BEiT: q and v biases only
    exported = m.export_state_dict(m.state_dict())
    assert "rel_pos_bias.relative_position_bias_table" not in exported and "blocks.0.gamma_1" in exported
    t = Beit(**timm_beit_kwargs(m)).eval()
    t.load_state_dict(exported, strict=True)
    x = _img()
    torch.testing.assert_close(t.forward_features(x), m.forward_features(x), atol=1e-5, rtol=1e-5)
    # the bias is live: changing the shared table changes the output
    with torch.no_grad():
        m.rel_pos_bias.relative_position_bias_table[:5] += 1.0
    assert (t.forward_features(x) - m.forward_features(x)).abs().max() > 1e-3
    # and the export layout loads back strictly into our encoder (eval/fine-tune read exports)
    back = build_vit("vit_micro", 32, 4, pos_embed="relative", layer_scale_init=0.1).eval()
    back.load_state_dict(exported, strict=True)
    torch.testing.assert_close(back.forward_features(x), t.forward_features(x), atol=1e-5, rtol=1e-5)
    diverged = dict(exported)
    diverged["blocks.1.attn.relative_position_bias_table"] = diverged["blocks.1.attn.relative_position_bias_table"] + 1
    with pytest.raises(RuntimeError, match="differ"):
        back.load_state_dict(diverged, strict=True)


@pytest.mark.parametrize("arch,ls", [("vit_base", 0.1), ("vit_large", 1e-5)])
def test_relative_export_loads_into_named_timm_beit_models(arch, ls):
    """The registry models themselves (pretrained=False), on the meta device: keys and shapes strictly."""
    with torch.device("meta"):
        m = build_vit(arch, 224, 16, pos_embed="relative", layer_scale_init=ls)
        name = timm_model_name(arch, 16, 224, pos_embed="relative")
        t = timm.create_model(name, pretrained=False, num_classes=0, global_pool="token")
    assert name == f"beit_{arch[4:]}_patch16_224"
    t.load_state_dict(m.export_state_dict(m.state_dict()), strict=True)
    assert _shapes(t.state_dict()) == _shapes(m.export_state_dict(m.state_dict()))


def test_relative_subset_forward_gathers_the_bias(micro):
    torch.manual_seed(0)
    m = _randomise(build_vit("vit_micro", 32, 4, pos_embed="relative", layer_scale_init=0.1)).eval()
    x = _img()
    keep = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(s))[:20] for s in (0, 1)])
    got = m.forward_features(x, keep)
    for b in range(2):  # reference: one sample, the full bias restricted to cls + its kept patches
        pos = torch.cat([torch.zeros(1, dtype=torch.long), keep[b] + 1])
        bias = m.rel_pos_bias()[:, :, pos][:, :, :, pos]
        ref = m.encode(m.add_cls(m.gather_tokens(m.embed(x[b : b + 1]), keep[b : b + 1])), rel_bias=bias)
        torch.testing.assert_close(got[b : b + 1], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="relative"):
        m.encode(torch.zeros(1, 5, 64))


# --------------------------------------------------------------------------- init schemes


def test_beit_init_truncates_at_one_sigma_and_rescales_by_depth():
    torch.manual_seed(0)
    m = build_vit("vit_small", 32, 4, pos_embed="relative", layer_scale_init=0.1, init="beit")
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert torch.all(mod.weight.abs() <= 0.02 + 1e-7), name
            if mod.bias is not None:
                assert torch.all(mod.bias == 0), name
    w = m.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02 * 0.5399) < 5e-4  # std of N(0, s) cut at +-s is 0.54 s
    assert 0.0199 < w.abs().max().item() <= 0.02
    for i, blk in enumerate(m.blocks):  # 1 / sqrt(2 l) on attn.proj and fc2
        s = 0.02 * 0.5399 / math.sqrt(2 * (i + 1))
        assert abs(blk.attn.proj.weight.std().item() - s) < 0.06 * s, i
        assert abs(blk.mlp.fc2.weight.std().item() - s) < 0.03 * s, i
        assert abs(blk.mlp.fc1.weight.std().item() - 0.02 * 0.5399) < 5e-4, i
    assert m.patch_embed.proj.weight.abs().max() <= 0.02 and m.cls_token.abs().max() <= 0.02
    assert torch.all(m.rel_pos_bias.relative_position_bias_table == 0)
    assert torch.all(m.blocks[3].attn.q_bias == 0) and torch.all(m.blocks[3].ls2.gamma == 0.1)


def test_timm_init_matches_timm_vit_statistics():
    torch.manual_seed(0)
    m = build_vit("vit_small", 32, 4, init="timm")
    w = m.blocks[5].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 3e-4 and w.abs().max() > 0.06  # practically untruncated
    assert abs(m.blocks[5].mlp.fc2.weight.std().item() - 0.02) < 3e-4  # no depth rescale
    assert m.cls_token.abs().max() < 1e-5  # N(0, 1e-6)
    c = m.patch_embed.proj  # PyTorch default conv init
    bound = 1 / math.sqrt(c.weight[0].numel())
    assert c.weight.abs().max() <= bound and c.weight.abs().max() > 0.9 * bound
    with pytest.raises(ValueError, match="init scheme"):
        m.init_weights("xavier")
