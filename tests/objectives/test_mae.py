"""MAE objective: every invariant of OBJECTIVES.md 1.5 on a tiny model, plus FLOPs, weight decay, gradients.

Tiny model: p = 4, 16x16 RGB images -> G = 4, N = 16 patches, P = p*p*C = 48 pixels per patch;
encoder vit_micro (D = 64, 4 heads) cut to 2 blocks, decoder width 32, 1 block, 4 heads ("2+1 blocks").
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from mimscale.masking import MaskSpec, random_masks, visible_indices
from mimscale.models.vit import build_vit
from mimscale.objectives import LossOutput
from mimscale.objectives.mae import MAE, masked_mse, normalize_patches, patchify, unpatchify

B, C, IMG, P_SIZE = 8, 3, 16, 4
N = (IMG // P_SIZE) ** 2  # 16
P = P_SIZE * P_SIZE * C  # 48
D_ENC, D_DEC = 64, 32


def make_mae(mask_ratio: float = 0.75, norm_pix: bool = True, seed: int = 0) -> MAE:
    torch.manual_seed(seed)
    enc = build_vit("vit_micro", img_size=IMG, patch_size=P_SIZE, depth=2)
    cfg = MAE.Config(mask_ratio=mask_ratio, norm_pix_loss=norm_pix, decoder_dim=D_DEC, decoder_depth=1, decoder_heads=4)
    return MAE(enc, cfg)


def make_batch(model: MAE, b: int = B, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, C, IMG, IMG, generator=g)  # [B, 3, 16, 16]
    return {"image": img, "label": torch.zeros(b, dtype=torch.long), **model.mask_spec().generate(b, g)}


@pytest.fixture(scope="module")
def mae() -> MAE:
    return make_mae()


def test_shapes_and_mask_spec(mae):
    assert mae.encoder.num_patches == N and mae.encoder.embed_dim == D_ENC and mae.patch_pixels == P
    assert mae.mask_spec() == MaskSpec("random", N, 0.75)
    batch = make_batch(mae)
    assert batch["mask"].shape == (B, N)
    pred = mae.predict(batch["image"], batch["mask"])
    assert pred.shape == (B, N, P)
    out = mae(batch)
    assert isinstance(out, LossOutput)
    assert out.loss.shape == () and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert set(out.metrics) == {"loss"} and not out.metrics["loss"].requires_grad
    assert out.metrics["loss"] == out.loss


# ----------------------------------------------------------------------------- 1.5.1 encoder input length


@pytest.mark.parametrize("r", [0.25, 0.5, 0.75])
def test_encoder_sequence_length(r):
    model = make_mae(r)
    seen = []
    h = model.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    try:
        batch = make_batch(model)
        model(batch)
    finally:
        h.remove()
    keep = math.floor(N * (1 - r))
    assert batch["mask"].sum(1).tolist() == [N - keep] * B
    assert seen == [(B, 1 + keep, D_ENC)]


def test_encoder_sees_only_visible_patches(mae):
    """Changing the pixels of a masked patch changes nothing the encoder computes."""
    batch = make_batch(mae, b=2)
    img, mask = batch["image"], batch["mask"]
    latent = mae.encoder.forward_features(img, visible_indices(mask))  # [2, 5, 64]
    hidden = mask[0].nonzero()[0, 0].item()  # a masked patch of sample 0
    gy, gx = divmod(hidden, IMG // P_SIZE)
    img2 = img.clone()
    img2[0, :, gy * P_SIZE : (gy + 1) * P_SIZE, gx * P_SIZE : (gx + 1) * P_SIZE] += 5.0
    latent2 = mae.encoder.forward_features(img2, visible_indices(mask))
    assert torch.equal(latent, latent2)


# ----------------------------------------------------------------------------- 1.5.2 per sample, determinism


def test_masks_differ_across_rows(mae):
    mask = make_batch(mae)["mask"]
    assert len({tuple(r.tolist()) for r in mask}) > 1


def test_loss_bit_exact_for_a_fixed_seed():
    a, b = make_mae(seed=3), make_mae(seed=3)
    ba, bb = make_batch(a, seed=5), make_batch(b, seed=5)
    assert torch.equal(ba["mask"], bb["mask"])
    la, lb = a(ba).loss, b(bb).loss
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa.grad, pb.grad), n
    # and a different mask seed gives a different loss
    assert not torch.equal(a(make_batch(a, seed=6)).loss, la)


# ----------------------------------------------------------------------------- 1.5.3 restore semantic


def test_decoder_places_each_visible_token_at_its_raster_slot(mae):
    """The decoder's first block gets ``[cls, slot_0 .. slot_{N-1}] + pos``, where slot i holds the
    (embedded) encoder output of patch i if visible, else the mask token; checked against a per-sample
    manual scatter written with Python loops."""
    batch = make_batch(mae)
    img, mask = batch["image"], batch["mask"]
    seen = []
    h = mae.decoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            mae.predict(img, mask)
            keep_idx = visible_indices(mask)  # [B, K]
            latent = mae.encoder.forward_features(img, keep_idx)  # [B, 1+K, 64]
            e = mae.decoder.embed(latent)  # [B, 1+K, 32]
    finally:
        h.remove()
    (x_in,) = seen
    assert x_in.shape == (B, 1 + N, D_DEC)
    expected = torch.empty(B, 1 + N, D_DEC)
    tok = mae.decoder.mask_token.detach()[0, 0]  # [32]
    mask_l, keep_l = mask.tolist(), keep_idx.tolist()
    for b in range(B):
        expected[b, 0] = e[b, 0]
        j = 0
        for i in range(N):
            if mask_l[b][i]:
                expected[b, 1 + i] = tok
            else:
                assert keep_l[b][j] == i
                expected[b, 1 + i] = e[b, 1 + j]
                j += 1
    expected += mae.decoder.pos_embed
    torch.testing.assert_close(x_in, expected, rtol=0, atol=1e-6)


def test_visible_slot_holds_the_token_of_that_patch(mae):
    """Identity-like probe: the encoder output for patch i (run on that patch alone among the visible
    ones) lands at decoder slot i, not at the j-th slot."""
    batch = make_batch(mae, b=4)
    img, mask = batch["image"], batch["mask"]
    keep_idx = visible_indices(mask)
    latent = mae.encoder.forward_features(img, keep_idx)
    seen = []
    h = mae.decoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            mae.decoder(latent, keep_idx)
    finally:
        h.remove()
    slots = seen[0][:, 1:] - mae.decoder.pos_embed[:, 1:]  # [B, N, 32]
    e = mae.decoder.embed(latent).detach()
    for b in range(4):
        for j, i in enumerate(keep_idx[b].tolist()):
            torch.testing.assert_close(slots[b, i], e[b, 1 + j], rtol=0, atol=1e-5)
        for i in mask[b].nonzero().flatten().tolist():
            torch.testing.assert_close(slots[b, i], mae.decoder.mask_token.detach()[0, 0], rtol=0, atol=1e-5)


def test_samples_do_not_leak_into_each_other(mae):
    batch = make_batch(mae, b=4)
    with torch.no_grad():
        pred = mae.predict(batch["image"], batch["mask"])
        img2 = batch["image"].clone()
        img2[1:] = torch.randn(3, C, IMG, IMG, generator=torch.Generator().manual_seed(9))
        mask2 = batch["mask"].clone()
        mask2[1:] = random_masks(3, N, 0.75, torch.Generator().manual_seed(9))
        pred2 = mae.predict(img2, mask2)
    torch.testing.assert_close(pred2[0], pred[0], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- 1.5.4 patchify


def test_unpatchify_inverts_patchify_exactly():
    x = torch.randn(2, C, IMG, IMG, generator=torch.Generator().manual_seed(0))  # [2, 3, 16, 16]
    t = patchify(x, P_SIZE)
    assert t.shape == (2, N, P)
    assert torch.equal(unpatchify(t, P_SIZE, C), x)
    # and the other way round
    assert torch.equal(patchify(unpatchify(t, P_SIZE, C), P_SIZE), t)


def test_patch_pixel_order_by_value():
    """Patch n = gy*G + gx (raster); inside it pixel (dy, dx, c) sits at (dy*p + dx)*C + c."""
    g = IMG // P_SIZE
    c_idx = torch.arange(C).view(C, 1, 1)
    y = torch.arange(IMG).view(1, IMG, 1)
    x = torch.arange(IMG).view(1, 1, IMG)
    img = (c_idx * 10000 + y * 100 + x).float().unsqueeze(0)  # [1, 3, 16, 16]: value encodes (c, y, x)
    t = patchify(img, P_SIZE)[0]  # [16, 48]
    for n in range(N):
        gy, gx = divmod(n, g)
        for dy in range(P_SIZE):
            for dx in range(P_SIZE):
                for c in range(C):
                    want = c * 10000 + (gy * P_SIZE + dy) * 100 + (gx * P_SIZE + dx)
                    assert t[n, (dy * P_SIZE + dx) * C + c].item() == want


def test_patchify_other_sizes():
    x = torch.randn(1, 1, 8, 8)
    t = patchify(x, 2)  # [1, 16, 4]
    assert t.shape == (1, 16, 4)
    assert torch.equal(t[0, 5], x[0, 0, 2:4, 2:4].flatten())  # patch (1, 1), one channel: dy*p+dx
    assert torch.equal(unpatchify(t, 2, 1), x)


# ----------------------------------------------------------------------------- 1.5.5 visible positions


def _pred_target_mask(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, N, P, generator=g)
    target = torch.randn(B, N, P, generator=g)
    mask = random_masks(B, N, 0.75, g)
    return pred, target, mask


def test_visible_positions_do_not_change_the_loss():
    pred, target, mask = _pred_target_mask()
    loss = masked_mse(pred, target, mask)
    pred2 = pred.clone()
    pred2[~mask] = 1e3 * torch.randn(int((~mask).sum()), P)
    assert torch.equal(masked_mse(pred2, target, mask), loss)
    pred3 = pred.clone()
    pred3[mask] += 0.1  # masked positions do change it
    assert not torch.equal(masked_mse(pred3, target, mask), loss)


def test_gradient_is_exactly_zero_at_visible_positions():
    pred, target, mask = _pred_target_mask(1)
    pred.requires_grad_(True)
    masked_mse(pred, target, mask).backward()
    assert pred.grad.shape == (B, N, P)
    assert torch.count_nonzero(pred.grad[~mask]) == 0
    assert (pred.grad[mask].abs().sum(-1) > 0).all()
    # d/dpred of sum_i m_i mean_p (pred - t)^2 / sum m
    expected = 2 * (pred - target) / P / mask.sum() * mask.unsqueeze(-1)
    torch.testing.assert_close(pred.grad, expected.detach())


def test_model_gradient_zero_at_visible_predictions(mae):
    batch = make_batch(mae)
    pred = mae.predict(batch["image"], batch["mask"]).detach().requires_grad_(True)
    masked_mse(pred, mae.target(batch["image"]), batch["mask"]).backward()
    assert torch.count_nonzero(pred.grad[~batch["mask"]]) == 0


def test_loss_is_a_mean_over_masked_patches():
    pred, target, mask = _pred_target_mask(2)
    per_patch = ((pred - target) ** 2).mean(-1)  # [B, N]
    torch.testing.assert_close(masked_mse(pred, target, mask), per_patch[mask].mean())


# ----------------------------------------------------------------------------- 1.5.6 oracle


def test_oracle_pred_equals_target():
    _, target, mask = _pred_target_mask(3)
    assert masked_mse(target.clone(), target, mask).item() == 0.0


def test_oracle_through_the_model(mae):
    """With pred forced to equal the target the model's own loss is 0."""
    batch = make_batch(mae)
    target = mae.target(batch["image"])
    assert masked_mse(target, target, batch["mask"]).item() == 0.0


def test_norm_pix_zero_prediction_loss():
    """pred = 0 and norm_pix on random images: loss = (P-1)/P * var/(var+eps) ~ 47/48."""
    model = make_mae(norm_pix=True)
    with torch.no_grad():  # make the decoder predict exactly 0
        model.decoder.pred.weight.zero_()
        model.decoder.pred.bias.zero_()
    batch = make_batch(model)
    assert torch.count_nonzero(model.predict(batch["image"], batch["mask"])) == 0
    loss = model(batch).loss
    assert abs(loss.item() - (P - 1) / P) < 1e-3
    # the exact value: mean over masked patches of (P-1)/P * var/(var+eps)
    t = patchify(batch["image"], P_SIZE)  # [B, N, 48]
    var = t.var(-1, unbiased=True)
    exact = ((P - 1) / P * var / (var + 1e-6))[batch["mask"]].mean()
    torch.testing.assert_close(loss, exact, rtol=1e-5, atol=1e-6)


def test_norm_pix_uses_unbiased_variance_and_eps_inside_sqrt():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, P, generator=g)
    base = (base - base.mean()) / base.std()  # unbiased variance exactly 1
    t = normalize_patches(base * 3.0 + 7.0, eps=1e-6)  # var 9
    assert abs(t.mean().item()) < 1e-6
    # sum of squares = (P-1) * var / (var + eps): unbiased gives 47, biased would give 48
    torch.testing.assert_close(t.pow(2).sum(), torch.tensor(47 * 9 / (9 + 1e-6)), rtol=1e-5, atol=0)
    # tiny variance 1e-6 == eps: sqrt(var + eps) gives 47/2; (std + eps) would give ~46.9
    t = normalize_patches(base * 1e-3, eps=1e-6)
    torch.testing.assert_close(t.pow(2).sum(), torch.tensor(47 / 2), rtol=1e-4, atol=0)


def test_constant_patch_target_is_zero_not_nan():
    img = torch.full((2, C, IMG, IMG), 0.7)
    img[1] = torch.randn(C, IMG, IMG)
    img[1, :, :P_SIZE, :P_SIZE] = -1.25  # one constant patch in sample 1
    model = make_mae(norm_pix=True)
    t = model.target(img)  # [2, 16, 48]
    assert torch.isfinite(t).all()
    # 0 up to the fp32 rounding of the patch mean (~1 ulp of 0.7, amplified by 1/sqrt(eps) = 1e3)
    assert t[0].abs().max() < 1e-3 and t[1, 0].abs().max() < 1e-3
    assert torch.count_nonzero(model.target(torch.zeros(1, C, IMG, IMG))) == 0  # exactly 0 when exact
    assert torch.count_nonzero(t[1, 1]) > 0
    assert torch.isfinite(model({"image": img, "mask": random_masks(2, N, 0.75, torch.Generator())}).loss)


def test_no_norm_pix_target_is_raw_pixels():
    model = make_mae(norm_pix=False)
    img = make_batch(model)["image"]
    assert torch.equal(model.target(img), patchify(img, P_SIZE))


# ----------------------------------------------------------------------------- 1.5.7 r = 0


def test_ratio_zero():
    """The config refuses r = 0 (nothing to predict; test_bad_mask_ratio_rejected), but the loss still guards
    sum(mask) = 0: a model whose ratio is set to 0 after the check encodes all N tokens and returns loss 0."""
    model = make_mae(mask_ratio=0.5)
    model.cfg.mask_ratio = 0.0
    seen = []
    h = model.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    try:
        batch = make_batch(model)
        assert not batch["mask"].any()
        loss = model(batch).loss
    finally:
        h.remove()
    assert seen == [(B, N + 1, D_ENC)]
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()  # and backward is finite too
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_mask_ratio_rejected():
    from mimscale.errors import ConfigError

    enc = build_vit("vit_micro", img_size=IMG, patch_size=P_SIZE, depth=1)
    for r in (1.0, -0.1, 0.0):
        with pytest.raises(ConfigError, match=r"objective.mask_ratio=.* must be in \(0, 1\)"):
            MAE(enc, MAE.Config(mask_ratio=r, decoder_dim=D_DEC, decoder_depth=1, decoder_heads=4))


@pytest.mark.parametrize(
    "dim,heads,depth,word",
    [
        (32, 5, 1, "objective.decoder_heads=5"),
        (30, 3, 1, "objective.decoder_dim=30"),
        (32, 0, 1, "objective.decoder_heads=0"),
        (32, 4, -1, "objective.decoder_depth=-1"),
    ],
)
def test_bad_decoder_shape_is_a_config_error(dim, heads, depth, word):
    """One-line ConfigError, not a ValueError traceback from deep inside the decoder (regression)."""
    from mimscale.errors import ConfigError

    enc = build_vit("vit_micro", img_size=IMG, patch_size=P_SIZE, depth=1)
    with pytest.raises(ConfigError, match=word):
        MAE(enc, MAE.Config(decoder_dim=dim, decoder_heads=heads, decoder_depth=depth))


# ----------------------------------------------------------------------------- 1.5.8 sin-cos tables


@pytest.mark.parametrize("which,width", [("encoder", D_ENC), ("decoder", D_DEC)])
def test_sincos_tables(mae, which, width):
    table = getattr(mae, which).pos_embed
    assert table.shape == (1, N + 1, width)
    assert table.dtype == torch.float32
    assert torch.count_nonzero(table[0, 0]) == 0
    assert table.abs().max() <= 1.0
    assert table[0, 1:].abs().sum(-1).min() > 0  # every patch slot is encoded
    assert not table.requires_grad
    names = {n for n, _ in mae.named_parameters()}
    assert f"{which}.pos_embed" not in names
    assert any(b is table for b in mae.buffers())


def test_sincos_tables_distinct_per_patch(mae):
    t = mae.decoder.pos_embed[0, 1:]  # [16, 32]
    assert torch.unique(t, dim=0).shape[0] == N


# ----------------------------------------------------------------------------- precision


def test_loss_in_fp32_when_the_model_runs_in_bf16():
    model = make_mae()
    batch = make_batch(model)
    ref = model(batch).loss
    bf = copy.deepcopy(model).to(torch.bfloat16)
    assert next(bf.parameters()).dtype == torch.bfloat16
    assert batch["image"].dtype == torch.float32
    pred = bf.predict(batch["image"], batch["mask"])
    assert pred.dtype == torch.bfloat16  # the forward does run in bf16
    assert bf.target(batch["image"]).dtype == torch.float32
    out = bf(batch)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, rtol=2e-2, atol=0)
    out.loss.backward()
    assert next(bf.parameters()).grad is not None


def test_masked_mse_upcasts_before_the_difference():
    pred, target, mask = _pred_target_mask(4)
    pred_bf = pred.bfloat16()
    out = masked_mse(pred_bf, target, mask)
    assert out.dtype == torch.float32
    assert torch.equal(out, masked_mse(pred_bf.float(), target, mask))


# ----------------------------------------------------------------------------- FLOPs (OBJECTIVES.md 8)


@pytest.mark.parametrize(
    "arch,patch,gflops,tol",
    [("vit_base", 16, 58.7, 0.005), ("vit_large", 16, 124.5, 0.01), ("vit_huge", 14, 291.4, 0.01)],
)
def test_flops_per_sample_official(arch, patch, gflops, tol):
    with torch.device("meta"):
        model = MAE(build_vit(arch, img_size=224, patch_size=patch), MAE.Config())
    assert model.flops_per_sample() / 1e9 == pytest.approx(gflops, rel=tol)


def test_flops_scale_with_mask_ratio():
    with torch.device("meta"):
        enc = build_vit("vit_base", img_size=224, patch_size=16)
        lo, hi = MAE(enc, MAE.Config(mask_ratio=0.75)), MAE(enc, MAE.Config(mask_ratio=0.5))
    assert 0 < lo.flops_per_sample() < hi.flops_per_sample()


# ----------------------------------------------------------------------------- optimiser-facing


def test_no_weight_decay(mae):
    assert mae.no_weight_decay() == set()  # MAE's code decays both 3-D tokens
    spare = MAE(mae.encoder, dataclasses.replace(mae.cfg, wd_mask_token=False, wd_cls_token=False))
    names = spare.no_weight_decay()
    assert names == {"decoder.mask_token", "encoder.cls_token"}
    params = dict(mae.named_parameters())
    assert names <= set(params)  # real parameter names
    assert not any("pos_embed" in n for n in names)  # buffers, never parameters


def test_init_knob_reinitialises_the_encoder_only():
    """objective.init: mae (xavier, the code's) by default; beit re-initialises the encoder (truncated normal
    at +-1 sigma, depth rescale) and leaves MAE's xavier decoder alone."""
    torch.manual_seed(0)
    enc = build_vit("vit_micro", 16, 4, depth=2)
    model = MAE(enc, dataclasses.replace(MAE.Config(), decoder_dim=32, decoder_depth=1, decoder_heads=2, init="beit"))
    assert enc.blocks[0].mlp.fc1.weight.abs().max() <= 0.02
    assert enc.blocks[1].attn.proj.weight.abs().max() <= 0.02 / 2 + 1e-7
    w = model.decoder.blocks[0].mlp.fc1.weight
    assert w.abs().max() > 0.05  # xavier bound sqrt(6 / 160) = 0.19


def test_every_parameter_gets_a_gradient():
    model = make_mae()
    model(make_batch(model)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    zero = [n for n, p in model.named_parameters() if torch.count_nonzero(p.grad) == 0]
    assert zero == []
