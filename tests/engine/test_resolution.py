"""Progressive resolution (``train.resolution_schedule``): the schedule, the batch at a step's size, the masks of
every grid, the config checks, the encoder and MAE decoder on a smaller grid, and one real run through the
Trainer that is interrupted right after the switch and resumes with equal losses and FLOPs counted per size."""

from __future__ import annotations

import pytest
import torch
from launch_utils import tiny_overrides

from mimscale import config as C
from mimscale.engine.resolution import ResolutionSchedule, at_size
from mimscale.errors import ConfigError
from mimscale.masking import GridMasks, MaskSpec
from mimscale.models.pos_embed import resample_abs_pos_embed, sincos_2d
from mimscale.models.vit import build_vit
from mimscale.objectives.mae import MAE
from mimscale.telemetry.logger import read_jsonl


def test_size_follows_the_fraction_of_the_budget():
    s = ResolutionSchedule([(0.0, 16), (0.5, 24), (0.7, 32)], 32)
    assert [s.size_at(f) for f in (0.0, 0.49, 0.5, 0.69, 0.7, 1.0)] == [16, 16, 24, 24, 32, 32]
    assert s.distinct_sizes() == [16, 24, 32]
    assert s.mean_flops(float) == pytest.approx(0.5 * 16 + 0.2 * 24 + 0.3 * 32)  # each size for its share


def test_grid_masks_keep_the_full_grid_draws_and_add_each_smaller_grid():
    full, small = MaskSpec("random", 64, 0.75), MaskSpec("random", 16, 0.75)
    plain = full.generate(3, torch.Generator().manual_seed(5))
    grid = GridMasks({32: full, 16: small}, 32).generate(3, torch.Generator().manual_seed(5))
    assert torch.equal(grid["mask"], plain["mask"])  # a schedule does not change the full-size stream
    assert grid["16px/mask"].shape == (3, 16) and (grid["16px/mask"].sum(1) == 12).all()
    batch = {"image": torch.rand(3, 3, 32, 32), "label": torch.arange(3), **grid}
    at16 = at_size(batch, 16, 32)
    assert set(at16) == {"image", "label", "mask"} and torch.equal(at16["mask"], grid["16px/mask"])
    assert at16["image"].shape == (3, 3, 16, 16)
    # antialiased (a low-pass filter, not every other pixel): a 1-pixel checkerboard averages out to its mean
    board = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2
    at16 = at_size({**batch, "image": board.float().expand(3, 3, 32, 32)}, 16, 32)
    inner = at16["image"][..., 1:-1, 1:-1]  # (the borders renormalise a cut filter)
    assert torch.allclose(inner, torch.full_like(inner, 0.5), atol=1e-6)
    at32 = at_size(batch, 32, 32)
    assert set(at32) == {"image", "label", "mask"} and at32["image"] is batch["image"]


@pytest.mark.parametrize(
    "sched, words",
    [
        ("[[0.1,8],[0.5,16]]", "must start at fraction 0.0"),
        ("[[0.0,8],[0.5,8],[0.4,16]]", "must increase within [0, 1)"),
        ("[[0.0,8],[1.0,16]]", "must increase within [0, 1)"),
        ("[[0.0,6],[0.5,16]]", "not a positive multiple of model.patch_size=4"),
        ("[[0.0,8],[0.5,32]]", "larger than model.img_size=16"),
        ("[[0.0,8],[0.5,12]]", "must end at model.img_size=16"),
        ("[]", "is empty"),
    ],
)
def test_the_schedule_is_checked_at_config_time(sched, words, tmp_path, fmnist_small):
    ov = tiny_overrides(fmnist_small, tmp_path, train__resolution_schedule=sched)
    with pytest.raises(ConfigError, match=None) as e:
        C.load(None, ov)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_objectives_without_support_and_relative_positions_refuse_a_schedule(tmp_path, fmnist_small):
    sched = "train.resolution_schedule=[[0.0,8],[0.5,16]]"
    ov = tiny_overrides(fmnist_small, tmp_path)
    assert C.load(None, [*ov, sched]).train.resolution_schedule == ((0.0, 8), (0.5, 16))
    with pytest.raises(ConfigError, match="objective 'conmim' trains only at model.img_size"):
        C.load(None, [o for o in ov if not o.startswith("objective.")] + ["objective={name: conmim}", sched])
    with pytest.raises(ConfigError, match="needs an absolute position embedding"):
        C.load(None, [*ov, sched, "model.pos_embed=relative"])


@pytest.mark.parametrize("pos", ["sincos", "learned"])
def test_the_encoder_runs_a_smaller_grid_with_resampled_positions(pos):
    torch.manual_seed(0)
    enc = build_vit("vit_micro", 32, 4, 3, pos_embed=pos)
    if pos == "learned":
        torch.nn.init.normal_(enc.pos_embed, std=0.02)
        want = resample_abs_pos_embed(enc.pos_embed.detach(), 4)
    else:
        want = sincos_2d(enc.embed_dim, 4)
    assert torch.allclose(enc.pos_for_grid(4), want)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="expected 32x32 images"):
        enc.forward_features(x)  # without any_size the built grid is required (fine-tuning, evaluation)
    feats = enc.forward_features(x, any_size=True)
    assert feats.shape == (2, 1 + 16, enc.embed_dim)
    tokens = enc.patch_embed.proj(x).flatten(2).transpose(1, 2) + want[:, 1:]
    ref = enc.encode(enc.add_cls(tokens))
    assert torch.allclose(feats, ref, atol=1e-6)
    if pos == "learned":  # the built table keeps training through the resampling
        feats.sum().backward()
        assert enc.pos_embed.grad is not None and enc.pos_embed.grad.abs().sum() > 0


def test_mae_trains_on_the_batch_grid_and_counts_its_flops():
    torch.manual_seed(0)
    mae = MAE(build_vit("vit_micro", 32, 4, 3), MAE.tiny_config())
    masks = GridMasks({16: mae.mask_spec_at(16), 32: mae.mask_spec_at(32)}, 32).generate(2, torch.Generator())
    batch = {"image": torch.randn(2, 3, 32, 32), **masks}
    small = at_size(batch, 16, 32)
    pred = mae.predict(small["image"], small["mask"])
    assert pred.shape == (2, 16, 4 * 4 * 3)
    # the decoder's table on the 4x4 grid is that grid's sin-cos table
    assert torch.equal(mae.decoder.pos_for(16), sincos_2d(mae.decoder.dim, 4))
    assert torch.isfinite(mae(small).loss) and torch.isfinite(mae(at_size(batch, 32, 32)).loss)
    f16, f32 = mae.flops_per_sample_at(16), mae.flops_per_sample_at(32)
    assert f32 == mae.flops_per_sample() and 3.5 < f32 / f16 < 4.5  # ~4x the tokens everywhere


def test_emae_trains_its_parts_on_the_batch_grid():
    from mimscale.objectives.emae import EMAE

    torch.manual_seed(0)
    emae = EMAE(build_vit("vit_micro", 32, 4, 3), EMAE.tiny_config())
    masks = GridMasks({16: emae.mask_spec_at(16), 32: emae.mask_spec_at(32)}, 32).generate(2, torch.Generator())
    k = emae.num_parts
    assert masks["parts"].shape == (2, k, 64) and masks["16px/parts"].shape == (2, k, 16)
    small = at_size({"image": torch.randn(2, 3, 32, 32), **masks}, 16, 32)
    assert emae.predict(small["image"], small["parts"]).shape == (k, 2, 16, 4 * 4 * 3)
    assert torch.isfinite(emae(small).loss)
    assert 3.5 < emae.flops_per_sample() / emae.flops_per_sample_at(16) < 4.5


@pytest.mark.parametrize("adv_type", [0, 2])  # MAE+, AdPE in coordinate mode (shifted sin-cos of the grid)
def test_multicrop_objectives_shrink_their_crops_with_the_image(adv_type):
    """MAE+ / AdPE: crop_size is in pixels of the full image, so at 16 of 32 px the 16 px crops become 8 px
    (a 2x2 grid): the crops shrink with the image, the masks and every sin-cos table are the small grid's."""
    import dataclasses

    from mimscale.objectives.adpe import AdPE, MAEPlus

    cls = MAEPlus if adv_type == 0 else AdPE
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        cls.Config(), adv_type=adv_type, crop_size=16, num_crops=2, decoder_dim=32, decoder_depth=1, decoder_heads=2
    )
    obj = cls(build_vit("vit_micro", 32, 4, 3), cfg)
    assert obj.crop_at(32) == 16 and obj.crop_at(16) == 8 and obj.mask_spec_at(16).num_patches == 4
    with pytest.raises(ConfigError, match="would be 6 px, not whole 4 px patches"):
        obj.crop_at(12)
    masks = GridMasks({16: obj.mask_spec_at(16), 32: obj.mask_spec()}, 32).generate(3, torch.Generator())
    crops = torch.randn(3, 2, 3, 16, 16)
    small = at_size({"image": crops, **masks}, 16, 32)
    assert small["image"].shape == (3, 2, 3, 8, 8) and small["crop_masks"].shape == (3, 2, 4)
    ref = torch.nn.functional.interpolate(crops[1], size=(8, 8), mode="bilinear", antialias=True)
    assert torch.allclose(small["image"][1], ref, atol=1e-6)  # each crop downsampled like a whole image
    assert torch.equal(obj.crop_pos_for(4), sincos_2d(64, 2, cls_token=False))
    assert torch.equal(obj.decoder.pos_for(4), sincos_2d(32, 2))
    if adv_type == 2:  # a zero shift is the small grid's fixed table
        assert torch.equal(obj.masked_pos(torch.zeros(2), 2), sincos_2d(64, 2, cls_token=False)[0])
    crops_s, m = obj.flatten(small)
    pred = obj.predict_tokens(obj.encoder_input(crops_s, m))
    assert pred.shape == (6, 4, 4 * 4 * 3)
    loss = obj(small).loss
    assert torch.isfinite(loss) and torch.isfinite(obj({"image": crops, **masks}).loss)
    loss.backward()
    assert obj.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert 3.5 < obj.flops_per_sample() / obj.flops_per_sample_at(16) < 4.5  # ~4x the tokens per crop


def _losses(rd) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_jsonl(rd / "metrics.jsonl") if "train/loss" in r}


def test_a_run_interrupted_after_the_switch_resumes_with_equal_losses(fmnist_small, tmp_path, dist_single, caplog):
    """8 px for the first half of 4 steps, then 16 px; one run straight through, one stopped after step 3 (one
    step past the switch) and resumed: the same losses at every step, and FLOPs summed at each step's size."""
    from mimscale.pretrain import trainer as pretrain_trainer

    def overrides(rd, *extra):
        return tiny_overrides(
            fmnist_small,
            rd,
            train__precision="fp32",
            train__steps=4,
            train__max_steps="null",
            train__save_every_minutes="null",
            train__resolution_schedule="[[0.0,8],[0.5,16]]",
            data__num_workers=0,
            log__tensorboard="false",
        ) + list(extra)

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    caplog.set_level("INFO", logger="mimscale.train")
    trainer = pretrain_trainer(C.load(None, overrides(ref)))
    f8, f16 = trainer.module.flops_per_sample_at(8), trainer.module.flops_per_sample_at(16)
    summary = trainer.fit()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resolution:")]
    assert said[0].startswith("resolution: 8 px from step 0") and said[1].startswith("resolution: 16 px from step 2")
    pflops = {r["step"]: r["perf/train_pflops"] for r in read_jsonl(ref / "metrics.jsonl") if "perf/train_pflops" in r}
    assert pflops[2] == pytest.approx(2 * f8 * 16 / 1e15) and pflops[4] == pytest.approx((2 * f8 + 2 * f16) * 16 / 1e15)
    assert summary["flops_per_sample"] == pytest.approx((f8 + f16) / 2)
    from mimscale.report.data import load_run

    assert load_run(ref).flops_per_sample == pytest.approx((2 * f8 + 2 * f16) / 4)  # the actual mean

    assert pretrain_trainer(C.load(None, overrides(cut, "train.stop_after_steps=3"))).fit()["steps"] == 3
    caplog.clear()
    resumed = pretrain_trainer(C.load(None, overrides(cut)))
    assert resumed.state.step == 3
    assert resumed.fit()["steps"] == 4
    assert any(r.getMessage().startswith("resolution: 16 px from step 3") for r in caplog.records)
    want, got = _losses(ref), _losses(cut)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    assert want[1] != want[4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    last = read_jsonl(cut / "metrics.jsonl")
    assert [r["perf/train_pflops"] for r in last if r.get("step") == 4][-1] == pytest.approx(pflops[4])


def test_an_adpe_run_interrupted_after_the_switch_resumes_with_equal_losses(
    fmnist_small, tmp_path, dist_single, caplog
):
    """AdPE (coordinate mode: its adversarial delta and AdamW state are objective state in the checkpoint) with
    16 px crops of 16 px images: 8 px images and 8 px crops for the first half of 4 steps, then full size; one run
    straight through, one stopped one step past the switch and resumed: the same losses at every step."""
    from mimscale.pretrain import trainer as pretrain_trainer

    def overrides(rd, *extra, sched="[[0.0,8],[0.5,16]]", crop=16):
        ov = tiny_overrides(
            fmnist_small,
            rd,
            train__precision="fp32",
            train__steps=4,
            train__max_steps="null",
            train__save_every_minutes="null",
            train__resolution_schedule=sched,
            data__num_workers=0,
            log__tensorboard="false",
        )
        knobs = f"adv_type: 2, crop_size: {crop}, num_crops: 2, decoder_dim: 32, decoder_depth: 1, decoder_heads: 2"
        return [o for o in ov if not o.startswith("objective.")] + [f"objective={{name: adpe, {knobs}}}", *extra]

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    caplog.set_level("INFO", logger="mimscale.train")
    trainer = pretrain_trainer(C.load(None, overrides(ref)))
    f8, f16 = trainer.module.flops_per_sample_at(8), trainer.module.flops_per_sample_at(16)
    assert 3.5 < f16 / f8 < 4.5
    trainer.fit()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resolution:")]
    assert said[0].startswith("resolution: 8 px from step 0") and said[1].startswith("resolution: 16 px from step 2")
    assert pretrain_trainer(C.load(None, overrides(cut, "train.stop_after_steps=3"))).fit()["steps"] == 3
    resumed = pretrain_trainer(C.load(None, overrides(cut)))
    assert resumed.state.step == 3
    assert resumed.fit()["steps"] == 4
    want, got = _losses(ref), _losses(cut)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    from mimscale.preflight import check

    with pytest.raises(ConfigError, match="at 12 px the 8 px crops .* would be 6 px, not whole 4 px patches"):
        check(None, overrides(tmp_path / "odd", sched="[[0.0,12],[0.5,16]]", crop=8))  # before any launch
