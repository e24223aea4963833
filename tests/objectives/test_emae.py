"""EMAE objective: every invariant of OBJECTIVES.md 2.5 on a tiny model, plus K mapping, chunking, FLOPs, learning.

Tiny model: encoder vit_micro (D = 64, 4 heads) cut to 2 blocks, decoder width 32, 1 block, 4 heads.
Two geometries: 16x16 RGB, p = 4 -> N = 16 (r = 0.75: N_keep = 4, K = 4, K*N_keep = N) and the odd one
20x20, p = 4 -> N = 25 (r = 0.75: N_keep = 6, K = 4, one leftover patch hidden in every part).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mimscale.errors import ConfigError
from mimscale.masking import MaskCollate, MaskSpec, num_visible, partition_masks
from mimscale.models.vit import build_vit
from mimscale.objectives import LossOutput, available
from mimscale.objectives.emae import EMAE, resolve_num_parts, self_consistency
from mimscale.objectives.mae import MAE, masked_mse

B, C, P_SIZE = 8, 3, 4
D_ENC, D_DEC = 64, 32
GEOMS = [(16, 16), (20, 25)]  # (img, N)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_emae(img: int = 16, mask_ratio: float = 0.75, seed: int = 0, in_chans: int = C, **knobs) -> EMAE:
    torch.manual_seed(seed)
    enc = build_vit("vit_micro", img_size=img, patch_size=P_SIZE, in_chans=in_chans, depth=2)
    cfg = EMAE.Config(mask_ratio=mask_ratio, decoder_dim=D_DEC, decoder_depth=1, decoder_heads=4, **knobs)
    return EMAE(enc, cfg)


def make_batch(model: EMAE, b: int = B, seed: int = 0) -> dict:
    g = _gen(seed)
    img = model.encoder.img_size
    image = torch.randn(b, model.encoder.in_chans, img, img, generator=g)  # [B, C, H, W]
    return {"image": image, "label": torch.zeros(b, dtype=torch.long), **model.mask_spec().generate(b, g)}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def emae() -> EMAE:
    return make_emae()


# ----------------------------------------------------------------------------- API and shapes


def test_registered_with_spec_defaults():
    assert available()["emae"] is EMAE
    cfg = EMAE.Config()
    assert (
        cfg.num_parts,
        cfg.mask_ratio,
        cfg.sc_weight,
        cfg.sc_loss,
        cfg.sc_stopgrad,
        cfg.sc_start_epoch,
        cfg.parts_chunk,
    ) == (None, 0.75, 1.0, "mse", "symmetric", 0.0, None)
    assert (cfg.norm_pix_loss, cfg.norm_pix_eps, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == (
        True,
        1e-6,
        512,
        8,
        16,
    )


@pytest.mark.parametrize("img,n", GEOMS)
def test_shapes_mask_spec_and_metrics(img, n):
    model = make_emae(img)
    k, keep = 4, num_visible(n, 0.75)
    assert model.num_parts == k and model.num_keep == keep
    assert model.mask_spec() == MaskSpec("parts", n, 0.75, num_parts=k)
    batch = make_batch(model)
    assert batch["parts"].shape == (B, k, n) and batch["parts"].dtype == torch.bool
    preds = model.predict(batch["image"], batch["parts"])
    assert preds.shape == (k, B, n, P_SIZE * P_SIZE * C)
    out = model(batch)
    assert isinstance(out, LossOutput)
    assert out.loss.shape == () and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert set(out.metrics) == {"loss", "loss_rec", "loss_sc"}
    assert all(not v.requires_grad for v in out.metrics.values())
    assert out.metrics["loss"] == out.loss
    torch.testing.assert_close(out.loss, out.metrics["loss_rec"] + out.metrics["loss_sc"], rtol=0, atol=1e-6)


def test_collate_output_through_maskcollate(emae):
    g = _gen(1)
    samples = [{"image": torch.randn(C, 16, 16, generator=g), "label": i, "key": f"{i:06d}"} for i in range(B)]
    batch = MaskCollate(emae.mask_spec())(samples, g)
    assert batch["parts"].shape == (B, 4, 16) and "mask" not in batch
    assert torch.isfinite(emae(batch).loss)


# ----------------------------------------------------------------------------- 2.5.1 / 2.5.2 partition


@pytest.mark.parametrize(
    "n,r", [(16, 0.75), (25, 0.75), (196, 0.75), (256, 0.75), (16, 0.5), (16, 0.8), (196, 0.8), (49, 0.5)]
)
def test_partition_invariants(n, r):
    k = resolve_num_parts(n, r)
    keep = math.floor(n * (1 - r))
    parts = partition_masks(B, n, k, r, _gen(3))  # [B, K, N]
    assert parts.shape == (B, k, n) and parts.dtype == torch.bool
    for b in range(B):
        visible = [set((~parts[b, j]).nonzero().flatten().tolist()) for j in range(k)]
        assert all(len(v) == keep for v in visible)  # each part shows floor(N(1-r))
        union = set().union(*visible)
        assert len(union) == k * keep  # pairwise disjoint
        if k * keep == n:
            assert union == set(range(n))
    hidden_in = parts.sum(dim=1)  # [B, N]: in how many parts hidden
    if k * keep == n:
        assert (hidden_in == k - 1).all()
    else:  # leftovers are hidden in all K parts
        assert ((hidden_in == k - 1) | (hidden_in == k)).all()
        assert ((hidden_in == k).sum(1) == n - k * keep).all()


def test_odd_n_has_one_leftover_hidden_in_every_part():
    parts = make_batch(make_emae(20))["parts"]  # [8, 4, 25], N_keep = 6
    hidden_in = parts.sum(dim=1)
    assert (hidden_in == 4).sum(1).tolist() == [1] * B
    assert (hidden_in == 3).sum(1).tolist() == [24] * B


def test_partition_rejects_impossible_cuts():
    with pytest.raises(ValueError, match="num_parts=5"):
        partition_masks(2, 16, 5, 0.75, _gen())  # 5 * 4 > 16
    with pytest.raises(ValueError, match="mask kind"):
        MaskSpec("nope", 16).generate(2, _gen())


# ----------------------------------------------------------------------------- 2.5.7 per sample; determinism


def test_masks_differ_across_samples_and_parts(emae):
    parts = make_batch(emae)["parts"]  # [8, 4, 16]
    assert len({tuple(p.flatten().tolist()) for p in parts}) == B
    assert len({tuple(p.tolist()) for p in parts[:, 0]}) > 1
    assert all(len({tuple(p.tolist()) for p in parts[b]}) == 4 for b in range(B))


def test_deterministic_for_a_fixed_generator():
    a = partition_masks(B, 196, 4, 0.75, _gen(11))
    torch.manual_seed(123)  # the global RNG plays no part
    b = partition_masks(B, 196, 4, 0.75, _gen(11))
    assert torch.equal(a, b)
    assert not torch.equal(a, partition_masks(B, 196, 4, 0.75, _gen(12)))
    m1, m2 = make_emae(seed=3), make_emae(seed=3)
    b1, b2 = make_batch(m1, seed=5), make_batch(m2, seed=5)
    assert torch.equal(b1["parts"], b2["parts"])
    l1, l2 = m1(b1).loss, m2(b2).loss
    assert torch.equal(l1, l2)
    l1.backward()
    l2.backward()
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1.grad, p2.grad), n


# ----------------------------------------------------------------------------- K mapping and config errors


@pytest.mark.parametrize("r,k", [(0.75, 4), (0.5, 2), (0.8, 5)])
@pytest.mark.parametrize("n", [16, 196])
def test_mask_ratio_to_num_parts(r, k, n):
    assert resolve_num_parts(n, r) == k
    if n == 16:
        model = make_emae(16, r)
        assert model.num_parts == k and model.mask_spec().num_parts == k
        assert make_batch(model)["parts"].shape == (B, k, 16)


def test_auto_num_parts_is_capped_by_the_floor():
    # r = 0.62, N = 16: N_keep = floor(6.08) = 6, round(1/0.38) = 3 but only 16 // 6 = 2 parts fit
    assert resolve_num_parts(16, 0.62) == 2
    assert resolve_num_parts(16, 0.75, num_parts=3) == 3  # fewer parts than 1/(1-r): leftovers


@pytest.mark.parametrize(
    "r,num_parts,match",
    [
        (0.2, None, "num_parts=1"),  # round(1.25) = 1
        (0.4, None, "mask_ratio >= 0.5"),  # round(1.67) = 2, but 2 * floor(9.6) > 16
        (0.75, 5, "num_parts=5"),  # 5 * 4 > 16
        (0.75, 1, "num_parts=1"),
        (0.97, None, "no visible patch"),  # floor(16 * 0.03) = 0
        (1.0, None, "mask_ratio"),
        (0.0, None, r"mask_ratio=0.0 must be in \(0, 1\)"),  # nothing to predict
    ],
)
def test_config_errors_are_one_line(r, num_parts, match):
    with pytest.raises(ConfigError, match=match) as e:
        make_emae(16, r, num_parts=num_parts)
    assert "\n" not in str(e.value)


def test_config_errors_other_knobs():
    with pytest.raises(ConfigError, match="parts_chunk"):
        make_emae(parts_chunk=0)
    with pytest.raises(ConfigError, match="sc_weight"):
        make_emae(sc_weight=-1.0)
    with pytest.raises(ConfigError, match="decoder_dim"):
        EMAE(build_vit("vit_micro", img_size=16, patch_size=4, depth=1), EMAE.Config(decoder_dim=30, decoder_heads=4))


def test_recipe_knobs_validate_through_the_config_loader():
    from mimscale import config as Cfg

    cfg = Cfg.load("emae_vit_b16", ["data.train=/tmp/x.tar"])
    knobs = Cfg.objective_knobs(cfg)
    assert isinstance(knobs, EMAE.Config) and knobs.mask_ratio == 0.75 and knobs.sc_weight == 1.0
    assert cfg.train.epochs == 300 and cfg.optim.warmup_epochs == 15
    cfg = Cfg.load("emae_vit_l16", ["data.train=/tmp/x.tar", "objective.num_parts=2", "objective.parts_chunk=1"])
    assert Cfg.objective_knobs(cfg).num_parts == 2
    with pytest.raises(ConfigError, match="sc_stopgrad"):
        Cfg.load("emae_vit_b16", ["data.train=/tmp/x.tar", "objective.sc_stopgrad=asym"])


# ----------------------------------------------------------------------------- 2.5.3 lambda_sc = 0 is mean of MAE


@pytest.mark.parametrize("img,n", GEOMS)
def test_sc_weight_zero_equals_mean_of_k_mae_losses(img, n):
    model = make_emae(img, sc_weight=0.0)
    mae = MAE(model.encoder, MAE.Config(mask_ratio=0.75, decoder_dim=D_DEC, decoder_depth=1, decoder_heads=4))
    mae.decoder.load_state_dict(model.decoder.state_dict())  # same encoder object, same decoder weights
    batch = make_batch(model)
    out = model(batch)
    assert torch.equal(out.loss, out.metrics["loss_rec"]) and out.metrics["loss_sc"] > 0
    out.loss.backward()
    g_emae = _grads(model)
    model.zero_grad()
    losses = [mae({"image": batch["image"], "mask": batch["parts"][:, k]}).loss for k in range(model.num_parts)]
    ref = torch.stack(losses).mean()
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-7)
    ref.backward()
    g_mae = _grads(mae)
    assert set(g_mae) == set(g_emae)
    for name in g_mae:
        torch.testing.assert_close(g_emae[name], g_mae[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- 2.5.4 L_sc zero / positive


def test_sc_is_zero_when_the_decoder_ignores_its_input():
    model = make_emae()
    with torch.no_grad():
        model.decoder.pred.weight.zero_()
        model.decoder.pred.bias.copy_(torch.randn(model.decoder.pred.bias.shape, generator=_gen(4)))
    out = model(make_batch(model))
    assert out.metrics["loss_sc"].item() == 0.0
    assert out.metrics["loss_rec"] > 0


def test_sc_is_positive_for_a_random_model(emae):
    out = emae(make_batch(emae))
    assert out.metrics["loss_sc"] > 1e-4


# ----------------------------------------------------------------------------- 2.5.5 stop-gradient


def _pairwise_reference(x: torch.Tensor, masks: torch.Tensor):
    """Brute force over ordered pairs with separate leaves for both sides of every pair.

    Returns (value, d/d(online side) summed per part, d/d(stop-gradient side) summed per part)."""
    k = x.shape[0]
    count = sum((masks[a] & masks[b]).sum() for a in range(k) for b in range(k) if a != b).float()
    value = torch.zeros(())
    g_online, g_sg_side = torch.zeros_like(x), torch.zeros_like(x)
    for a in range(k):
        for b in range(k):
            if a == b:
                continue
            xa = x[a].detach().clone().requires_grad_(True)
            xb = x[b].detach().clone().requires_grad_(True)
            both = masks[a] & masks[b]
            term = (xa - xb).pow(2).mean(-1)[both].sum() / count
            ga, gb = torch.autograd.grad(term, (xa, xb))
            value += term.detach()
            g_online[a] += ga
            g_sg_side[b] += gb
    return value, g_online, g_sg_side


@pytest.mark.parametrize("n", [16, 25])
def test_sc_gradient_never_reaches_the_stop_gradient_side(n):
    k, b, p = 4, 3, 5
    masks = partition_masks(b, n, k, 0.75, _gen(6)).transpose(0, 1)  # [K, B, N]
    x = torch.randn(k, b, n, p, generator=_gen(7), requires_grad=True)  # stands for the decoder outputs
    value, g_online, g_sg_side = _pairwise_reference(x, masks)
    sc = self_consistency(x, masks)
    torch.testing.assert_close(sc, value, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(sc, x)
    # for each pair (a, b) only pred_a moves: d/d(pred_b) of that term contributes nothing
    torch.testing.assert_close(grad, g_online, rtol=1e-5, atol=1e-8)
    assert g_sg_side.abs().sum() > 0  # ... although without the detach it would
    # without stop-gradient both sides are pulled (ablation knob sc_stopgrad="none")
    (grad_none,) = torch.autograd.grad(self_consistency(x, masks, stopgrad=False), x)
    torch.testing.assert_close(grad_none, g_online + g_sg_side, rtol=1e-5, atol=1e-8)


def test_sc_stopgrad_applies_after_the_decoder():
    """Model-level: gradients of the decoder's pred layer from L_sc equal those through the online side only."""
    model = make_emae(sc_weight=1.0)
    batch = make_batch(model)
    preds = model.predict(batch["image"], batch["parts"])  # [K, B, N, P]
    masks = batch["parts"].transpose(0, 1)
    _, g_online, _ = _pairwise_reference(preds.detach(), masks)
    (g_sc,) = torch.autograd.grad(self_consistency(preds, masks), preds)
    torch.testing.assert_close(g_sc, g_online, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["symmetric", "none"])
def test_forward_routes_sc_stopgrad_to_the_decoder_outputs(mode):
    """Through ``EMAE.forward``: the gradient reaching the decoder's output is d(L_rec) plus the online side
    of L_sc only ("symmetric", the default), or plus both sides ("none")."""
    model = make_emae(sc_weight=1.0, sc_stopgrad=mode)
    batch = make_batch(model)
    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append(out)

    hook = model.decoder.register_forward_hook(keep)
    model(batch).loss.backward()
    hook.remove()
    (pred,) = seen  # [K*B, N, P]: one decoder call
    k, n = model.num_parts, model.encoder.num_patches
    masks = batch["parts"].transpose(0, 1)  # [K, B, N]
    x = pred.detach().view(k, B, n, -1).requires_grad_(True)
    (g_rec,) = torch.autograd.grad(masked_mse(x, model.target(batch["image"]), masks), x)
    _, g_online, g_sg_side = _pairwise_reference(x.detach(), masks)
    expected = g_rec + g_online + (g_sg_side if mode == "none" else 0)
    torch.testing.assert_close(pred.grad.view(k, B, n, -1), expected, rtol=1e-4, atol=1e-9)


def test_sc_masks_restrict_pairs_to_patches_hidden_in_both():
    """A patch visible in part a never enters any pair that involves a."""
    k, b, n, p = 4, 2, 16, 3
    masks = partition_masks(b, n, k, 0.75, _gen(8)).transpose(0, 1)
    x = torch.randn(k, b, n, p, generator=_gen(9), requires_grad=True)
    (grad,) = torch.autograd.grad(self_consistency(x, masks), x)
    assert (grad[~masks] == 0).all()
    y = x.detach().clone()
    y[~masks] = 1e3  # change predictions at visible slots
    assert self_consistency(y, masks) == self_consistency(x.detach(), masks)


# ----------------------------------------------------------------------------- 2.5.6 permutation of parts


@pytest.mark.parametrize("img,n", GEOMS)
def test_permuting_parts_leaves_the_loss_unchanged(img, n):
    model = make_emae(img)
    batch = make_batch(model)
    out = model(batch)
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        out_p = model({**batch, "parts": batch["parts"][:, perm]})
        for key in ("loss", "loss_rec", "loss_sc"):
            torch.testing.assert_close(out_p.metrics[key], out.metrics[key], rtol=0, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------- 2.5.7 encoder batch K*B


def _record_batches(model, batch) -> tuple[list, list]:
    enc_seen, dec_seen = [], []
    h1 = model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: enc_seen.append(tuple(a[0].shape)))
    h2 = model.decoder.blocks[0].register_forward_pre_hook(lambda m, a: dec_seen.append(tuple(a[0].shape)))
    try:
        model(batch)
    finally:
        h1.remove()
        h2.remove()
    return enc_seen, dec_seen


@pytest.mark.parametrize("img,n", GEOMS)
def test_encoder_and_decoder_run_once_on_k_times_b(img, n):
    model = make_emae(img)
    keep = num_visible(n, 0.75)
    enc_seen, dec_seen = _record_batches(model, make_batch(model))
    assert enc_seen == [(4 * B, 1 + keep, D_ENC)]
    assert dec_seen == [(4 * B, 1 + n, D_DEC)]


def test_encoder_sees_only_the_visible_patches_of_each_part(emae):
    """Changing a patch hidden in part 0 changes nothing part 0's encoder computes, but changes another part."""
    batch = make_batch(emae, b=2)
    img, parts = batch["image"], batch["parts"]
    hidden = parts[0, 0].nonzero()[0, 0].item()
    gy, gx = divmod(hidden, 4)
    img2 = img.clone()
    img2[0, :, gy * 4 : (gy + 1) * 4, gx * 4 : (gx + 1) * 4] += 5.0
    with torch.no_grad():
        a, b = emae.predict(img, parts), emae.predict(img2, parts)
    assert torch.equal(a[0, 0], b[0, 0])
    assert not torch.equal(a[:, 0], b[:, 0])
    assert torch.equal(a[:, 1], b[:, 1])  # other images untouched


# ----------------------------------------------------------------------------- parts_chunk


@pytest.mark.parametrize("chunk", [1, 3])
def test_parts_chunk_matches_one_batched_call(chunk):
    full, chunked = make_emae(seed=2), make_emae(seed=2, parts_chunk=chunk)
    batch = make_batch(full, seed=3)
    enc_seen, _ = _record_batches(chunked, batch)
    sizes = [chunk, 4 - chunk] if chunk == 3 else [1] * 4
    assert enc_seen == [(s * B, 5, D_ENC) for s in sizes]
    chunked.zero_grad()
    out_f, out_c = full(batch), chunked(batch)
    for key in out_f.metrics:
        torch.testing.assert_close(out_c.metrics[key], out_f.metrics[key], rtol=1e-6, atol=1e-7, msg=key)
    out_f.loss.backward()
    out_c.loss.backward()
    g_f, g_c = _grads(full), _grads(chunked)
    assert set(g_f) == set(g_c) == {n for n, _ in full.named_parameters()}
    for name in g_f:
        torch.testing.assert_close(g_c[name], g_f[name], rtol=1e-4, atol=1e-6, msg=name)


def test_parts_chunk_with_encoder_activation_checkpointing():
    full, chunked = make_emae(seed=2), make_emae(seed=2, parts_chunk=2)
    chunked.encoder.set_grad_checkpointing(True)
    batch = make_batch(full, seed=4)
    out_f, out_c = full(batch), chunked(batch)
    torch.testing.assert_close(out_c.loss, out_f.loss, rtol=1e-6, atol=1e-7)
    out_f.loss.backward()
    out_c.loss.backward()
    for (name, pf), (_, pc) in zip(full.named_parameters(), chunked.named_parameters()):
        torch.testing.assert_close(pc.grad, pf.grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- sc warm-in (epoch)


def test_sc_weight_warm_in_from_the_epoch():
    model = make_emae(sc_start_epoch=2.0)
    batch = make_batch(model)
    with torch.no_grad():
        rec, sc = (model(batch).metrics[k] for k in ("loss_rec", "loss_sc"))
        # unknown epoch: full weight (documented default)
        torch.testing.assert_close(model(batch).loss, rec + sc, rtol=1e-6, atol=0)
        model.set_epoch(0.0)
        assert torch.equal(model(batch).loss, rec)
        model.set_epoch(1.0)
        torch.testing.assert_close(model(batch).loss, rec + 0.5 * sc, rtol=1e-6, atol=0)
        model.set_epoch(7.5)
        torch.testing.assert_close(model(batch).loss, rec + sc, rtol=1e-6, atol=0)
        # the batch's epoch wins over set_epoch (scalar, per-sample tensor or float)
        assert torch.equal(model({**batch, "epoch": torch.zeros(())}).loss, rec)
        torch.testing.assert_close(
            model({**batch, "epoch": torch.full((B,), 0.5)}).loss, rec + 0.25 * sc, rtol=1e-6, atol=0
        )
        torch.testing.assert_close(model({**batch, "epoch": 1.5}).loss, rec + 0.75 * sc, rtol=1e-6, atol=0)
    assert model.sc_weight_at(None) == 1.0 and model.sc_weight_at(-1.0) == 0.0
    assert make_emae(sc_weight=0.5).sc_weight_at(0.0) == 0.5  # sc_start_epoch = 0: no warm-in


def test_zero_sc_weight_keeps_every_parameter_in_the_graph():
    model = make_emae(sc_start_epoch=1.0)
    model.set_epoch(0.0)
    out = model(make_batch(model))
    out.loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ----------------------------------------------------------------------------- compute (section 8)


def test_flops_tiny_model_vs_mae(emae):
    mae = MAE(emae.encoder, MAE.Config(decoder_dim=D_DEC, decoder_depth=1, decoder_heads=4))
    ratio = emae.flops_per_sample() / mae.flops_per_sample()
    assert 3.5 < ratio < 4.0  # K = 4 parts; the patch embedding runs once per image


@pytest.mark.parametrize("arch,patch,ratio", [("vit_base", 16, 3.96), ("vit_large", 16, 3.98), ("vit_huge", 14, 3.99)])
def test_flops_match_objectives_section_8(arch, patch, ratio):
    with torch.device("meta"):
        enc = build_vit(arch, img_size=224, patch_size=patch)
        emae, mae = EMAE(enc, EMAE.Config()), MAE(enc, MAE.Config())
    assert emae.num_parts == 4
    assert emae.flops_per_sample() / mae.flops_per_sample() == pytest.approx(ratio, abs=0.005)
    if arch == "vit_base":
        assert emae.flops_per_sample() / 1e9 == pytest.approx(232.7, rel=0.01)


def test_no_weight_decay_names(emae):
    names = {n for n, _ in emae.named_parameters()}
    assert emae.no_weight_decay() == set()  # as MAE's code: both 3-D tokens decayed
    spare = EMAE(emae.encoder, dataclasses.replace(emae.cfg, wd_mask_token=False, wd_cls_token=False))
    assert {"encoder.cls_token", "decoder.mask_token"} == spare.no_weight_decay() <= names


# ----------------------------------------------------------------------------- learning on real data


@pytest.mark.slow
def test_learns_on_fashion_mnist(tmp_path):
    """~40 AdamW steps of the tiny EMAE on real Fashion-MNIST shards: the reconstruction loss on a held-out
    batch with fixed masks falls well below its start and below the predict-zero baseline."""
    from mimscale.data.loader import ShardLoader
    from mimscale.data.shards import write_fashion_mnist
    from mimscale.data.transforms import EvalTransform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dirs = write_fashion_mnist(tmp_path, splits=("train",), limit=512, shard_size=256)
        loader = ShardLoader(
            dirs["train"],
            batch_size=512,
            num_workers=0,
            mode="eval",
            transform=EvalTransform(16, mean=(0.286,), std=(0.353,), in_chans=1),
        )
        images = next(iter(loader))["image"]  # [512, 1, 16, 16]
        assert images.shape == (512, 1, 16, 16)
        model = make_emae(16, in_chans=1, seed=0)
        g = _gen(0)
        held = {"image": images[:64], **model.mask_spec().generate(64, g)}

        def held_out() -> dict:
            model.eval()
            with torch.no_grad():
                m = model(held).metrics
            model.train()
            return m

        before = held_out()
        t = model.target(held["image"])
        zero_baseline = masked_mse(torch.zeros_like(t), t, held["parts"].transpose(0, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
        for _ in range(40):
            idx = torch.randint(0, 512, (32,), generator=g)
            out = model({"image": images[idx], **model.mask_spec().generate(32, g)})
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        after = held_out()
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(after["loss_sc"])
    assert after["loss_rec"] < 0.5 * before["loss_rec"], (before, after)
    assert after["loss_rec"] < 0.92 * zero_baseline, (after, zero_baseline)


def test_objectives_cli_says_emae_has_no_public_code(capsys):
    """`mimscale objectives` names each method's source; EMAE's defaults are our reading (no public code)."""
    from mimscale.cli import main

    assert main(["objectives"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = next(k for k, line in enumerate(out) if line.startswith("emae "))
    assert "NO public code" in out[i + 1] and "docs/objectives/emae.md" in out[i + 1]
    assert any("official code: facebookresearch/mae" in line for line in out)
