"""ConMIM (OBJECTIVES.md section 4): loss invariants 4.5, masks, views, EMA wiring, FLOPs, recipes, learning.

Tiny model: vit_micro cut to 2 blocks (D = 64), 16x16 images, p = 4 -> N = 16 patches on a 4x4 grid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.data.photometric import PhotometricConfig, SharedGeometryViews
from mimscale.data.transforms import TrainTransform
from mimscale.errors import ConfigError
from mimscale.masking import MaskCollate, MaskSpec, unit_masks
from mimscale.models.vit import build_vit
from mimscale.objectives import StepContext
from mimscale.objectives.conmim import ConMIM, patch_infonce
from mimscale.objectives.mae import MAE

IMG, PATCH, N = 16, 4, 16
OFF = PhotometricConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def make(seed: int = 0, **kw) -> ConMIM:
    torch.manual_seed(seed)
    enc = build_vit("vit_micro", IMG, PATCH, depth=2)
    return ConMIM(enc, dataclasses.replace(ConMIM.tiny_config(), **kw))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch(obj: ConMIM, b: int = 4, seed: int = 0) -> dict:
    g = gen(seed)
    img = torch.randn(b, 3, IMG, IMG, generator=g)
    return {
        "image": img,
        "image_teacher": img + 0.2 * torch.randn(img.shape, generator=g),
        **obj.mask_spec().generate(b, g),
    }


# ----------------------------------------------------------------------------- loss invariants (4.5 items 1-4)


@pytest.mark.parametrize("n", [16, 196])
def test_constant_output_gives_log_n(n):
    s = torch.full((3, n, 8), 0.7)
    t = torch.full((3, n, 8), -2.0)
    mask = unit_masks(3, int(n**0.5), 2 if n == 16 else 2, 0.75, gen(0)) if n == 16 else torch.rand(3, n) < 0.7
    loss, _ = patch_infonce(s, t, mask, 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(n), abs=1e-5)


@pytest.mark.parametrize("n,tau,expect", [(196, 0.1, 0.008814), (16, 0.1, None), (16, 0.5, None)])
def test_one_hot_diagonal_positives(n, tau, expect):
    feats = torch.eye(n, 256)[None].repeat(2, 1, 1)  # distinct one-hot per position
    mask = torch.rand(2, n, generator=gen(1)) < 0.6
    loss, acc = patch_infonce(feats, feats.clone(), mask, tau)
    formula = math.log(1 + (n - 1) * math.exp(-1 / tau))
    assert loss.item() == pytest.approx(formula, abs=1e-6)  # fp32 cross-entropy
    if expect is not None:
        assert loss.item() == pytest.approx(expect, abs=1e-6)
    assert acc.item() == 1.0


def test_visible_positions_do_not_change_the_loss():
    g = gen(2)
    s, t = torch.randn(3, N, 8, generator=g), torch.randn(3, N, 8, generator=g)
    mask = unit_masks(3, 4, 2, 0.5, g)
    s2 = torch.where(mask.unsqueeze(-1), s, torch.randn(s.shape, generator=g))
    assert not torch.equal(s, s2)
    assert patch_infonce(s, t, mask, 0.1)[0].item() == patch_infonce(s2, t, mask, 0.1)[0].item()
    s3 = s.clone()
    s3[mask] += 1.0  # a masked row changes: the loss does
    assert patch_infonce(s3, t, mask, 0.1)[0].item() != patch_infonce(s, t, mask, 0.1)[0].item()


def test_negatives_are_intra_image():
    """The batch loss is the row-weighted mean of per-image losses, whatever the other images hold."""
    g = gen(3)
    s, t = torch.randn(3, N, 8, generator=g), torch.randn(3, N, 8, generator=g)
    mask = torch.rand(3, N, generator=g) < 0.5
    per = [patch_infonce(s[i : i + 1], t[i : i + 1], mask[i : i + 1], 0.1)[0] for i in range(3)]
    rows = mask.sum(1).float()
    total = patch_infonce(s, t, mask, 0.1)[0]
    assert total.item() == pytest.approx(float((torch.stack(per) * rows).sum() / rows.sum()), rel=1e-6)
    t2, s2 = t.clone(), s.clone()
    t2[2], s2[2] = torch.randn(N, 8, generator=g), torch.randn(N, 8, generator=g)
    changed = patch_infonce(s2, t2, mask, 0.1)[0]
    per2 = patch_infonce(s2[2:], t2[2:], mask[2:], 0.1)[0]
    expect = (per[0] * rows[0] + per[1] * rows[1] + per2 * rows[2]) / rows.sum()
    assert changed.item() == pytest.approx(expect.item(), rel=1e-6)


def test_negatives_are_intra_image_through_the_model_in_eval_mode():
    """Projector BatchNorm in eval mode: changing image 1 leaves image 0's student and teacher features."""
    obj = make().eval()
    obj.teacher_encoder.eval()
    obj.teacher_projector.eval()
    batch = random_batch(obj, b=2)
    other = {k: v.clone() for k, v in batch.items()}
    other["image"][1] = torch.randn(3, IMG, IMG)
    other["image_teacher"][1] = torch.randn(3, IMG, IMG)
    with torch.no_grad():
        feats = [
            (
                obj.projector(obj.student_features(b["image"], b["mask"]))[:, 1:],
                obj.teacher_targets(b["image_teacher"], torch.float32),
            )
            for b in (batch, other)
        ]
        losses = [patch_infonce(s[:1], t[:1], batch["mask"][:1], 0.1)[0] for s, t in feats]
    assert torch.allclose(feats[0][0][0], feats[1][0][0], atol=1e-6)
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-6)


def test_logits_are_fp32_for_bf16_features():
    g = gen(4)
    s, t = torch.randn(2, N, 8, generator=g), torch.randn(2, N, 8, generator=g)
    mask = torch.rand(2, N, generator=g) < 0.5
    ref = patch_infonce(s, t, mask, 0.1)[0]
    low = patch_infonce(s.bfloat16(), t.bfloat16(), mask, 0.1)[0]
    assert low.dtype == torch.float32 and low.item() == pytest.approx(ref.item(), rel=2e-2)


def test_nothing_masked_gives_zero_not_nan():
    s = torch.randn(2, N, 8, requires_grad=True)
    loss, _ = patch_infonce(s, torch.randn(2, N, 8), torch.zeros(2, N, dtype=torch.bool), 0.1)
    assert loss.item() == 0.0
    loss.backward()


# ----------------------------------------------------------------------------- model


def test_forward_shapes_metrics_and_value_range():
    obj = make().train()
    out = obj(random_batch(obj))
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert set(out.metrics) == {"loss", "pos_acc", "ema_momentum"}
    assert 0.0 < out.loss.item() < 2 * math.log(N)
    assert out.metrics["ema_momentum"].item() == pytest.approx(0.996)


def test_student_is_beit_style_masked_patches_are_mask_tokens():
    """Pixels of masked patches never reach the student; the teacher sees every patch."""
    obj = make().eval()
    batch = random_batch(obj, b=2)
    mask = batch["mask"]
    img2 = batch["image"].clone()
    pm = mask.view(2, 4, 4).repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)  # [B, H, W]
    img2[pm.unsqueeze(1).expand_as(img2)] = 5.0
    with torch.no_grad():
        a = obj.student_features(batch["image"], mask)
        b = obj.student_features(img2, mask)
        assert a.shape == (2, 1 + N, 64)
        assert torch.equal(a, b)
        ta = obj.teacher_targets(batch["image"], torch.float32)
        tb = obj.teacher_targets(img2, torch.float32)
    assert ta.shape == (2, N, 32) and not torch.allclose(ta, tb)
    img3 = batch["image"].clone()
    img3[(~pm).unsqueeze(1).expand_as(img3)] = 5.0  # visible pixels do reach it
    with torch.no_grad():
        assert not torch.allclose(a, obj.student_features(img3, mask))


def test_relative_position_encoder_init_and_weight_decay():
    """The recipe's encoder (BEiT layout): student and EMA teacher carry the shared relative bias, it trains;
    BEiT init of encoder, mask token and projector; the mask token is decayed, cls is not (official code)."""
    from mimscale.engine.deepspeed import param_groups

    torch.manual_seed(0)
    enc = build_vit("vit_micro", IMG, PATCH, depth=2, pos_embed="relative", layer_scale_init=0.1)
    obj = ConMIM(enc, ConMIM.tiny_config()).train()
    assert obj.encoder.pos_embed is None and obj.teacher_encoder.module.rel_pos_bias is not None
    assert obj.mask_token.abs().max() <= 0.02 and obj.encoder.cls_token.abs().max() <= 0.02
    assert all(m.weight.abs().max() <= 0.02 for m in obj.projector.net if isinstance(m, torch.nn.Linear))
    assert obj.encoder.blocks[1].mlp.fc2.weight.abs().max() <= 0.02 / 2 + 1e-7  # 1 / sqrt(2 * 2)
    out = obj(random_batch(obj))
    out.loss.backward()
    assert obj.encoder.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0
    assert obj.no_weight_decay() == {"encoder.cls_token"}
    decay, rest = param_groups(obj, obj.no_weight_decay(), 0.05)
    assert any(p is obj.mask_token for p in decay["params"])
    assert any(p is obj.encoder.cls_token for p in rest["params"])
    spared = ConMIM(
        build_vit("vit_micro", IMG, PATCH, depth=2),
        dataclasses.replace(ConMIM.tiny_config(), wd_mask_token=False, wd_cls_token=True, init="mae"),
    )
    assert spared.no_weight_decay() == {"mask_token"}
    with pytest.raises(ConfigError, match="objective.init"):
        ConMIM(build_vit("vit_micro", IMG, PATCH, depth=2), dataclasses.replace(ConMIM.tiny_config(), init="x"))


def test_teacher_gets_no_gradient_and_is_outside_the_optimizer():
    from mimscale.engine.deepspeed import param_groups

    obj = make().train()
    teachers = obj.private_modules()
    assert teachers == [obj.teacher_encoder, obj.teacher_projector]
    assert obj.frozen_modules() == []  # frozen would force eval mode
    obj(random_batch(obj)).loss.backward()
    t_params = [p for m in teachers for p in m.parameters()]
    assert t_params and all(not p.requires_grad and p.grad is None for p in t_params)
    assert all(p.grad is not None for n, p in obj.named_parameters() if p.requires_grad)
    # outside the module tree: DeepSpeed (and ZeRO-3's parameter walks) never see the teacher
    assert not {id(p) for p in obj.parameters()} & {id(p) for p in t_params}
    assert not any(k.startswith("teacher") for k in obj.state_dict())
    grouped = {id(p) for g in param_groups(obj, obj.no_weight_decay(), 0.05) for p in g["params"]}
    assert grouped == {id(p) for p in obj.parameters()}
    obj.bfloat16()  # what DeepSpeed does for bf16 runs
    assert all(p.dtype == torch.float32 for p in t_params)


def test_teacher_stays_in_train_mode_and_has_no_drop_path():
    torch.manual_seed(0)
    obj = ConMIM(build_vit("vit_micro", IMG, PATCH, depth=2, drop_path_rate=0.2), ConMIM.tiny_config()).eval()
    assert obj.teacher_projector.training and obj.teacher_encoder.training  # BatchNorm uses batch statistics
    assert all(m.p == 0 for m in obj.teacher_encoder.modules() if type(m).__name__ == "DropPath")
    img = torch.randn(4, 3, IMG, IMG)
    assert torch.equal(obj.teacher_targets(img, torch.float32), obj.teacher_targets(img, torch.float32))
    running = obj.teacher_projector.module.net[1].running_mean.clone()
    obj.teacher_targets(img, torch.float32)
    assert not torch.equal(running, obj.teacher_projector.module.net[1].running_mean)  # batch stats in use


def test_projector_structure():
    obj = make(proj_layers=3)
    kinds = [type(m).__name__.replace("StatsPrecision", "") for m in obj.projector.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(isinstance(m, torch.nn.BatchNorm1d) for m in obj.projector.net[1::3])
    assert all(m.bias is None for m in obj.projector.net if isinstance(m, torch.nn.Linear))
    assert not obj.projector.net[-1].affine and obj.projector.net[1].affine
    assert [m.out_features for m in obj.projector.net if isinstance(m, torch.nn.Linear)] == [48, 48, 32]
    assert [type(m).__name__ for m in make(proj_layers=1).projector.net] == ["Linear", "StatsPrecisionBatchNorm1d"]
    assert not hasattr(obj, "lm_head")


def test_ema_after_optimizer_step_and_checkpoint_state():
    obj = make(ema_m0=0.5)
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(1.0)
        for p in obj.projector.parameters():
            p.add_(1.0)
    t0 = {n: p.clone() for n, p in obj.teacher_encoder.module.named_parameters()}
    s = dict(obj.encoder.named_parameters())
    obj.after_optimizer_step(StepContext(step=0, total_steps=4))  # m(0) = m0
    assert obj.momentum == 0.5
    for n, p in obj.teacher_encoder.module.named_parameters():
        torch.testing.assert_close(p, 0.5 * t0[n] + 0.5 * s[n].detach())
    obj.after_optimizer_step(StepContext(step=4, total_steps=4))  # the last step: m = 1
    assert obj.momentum == 1.0
    state = obj.checkpoint_state()
    assert set(state) == {"teacher_encoder", "teacher_projector", "ema_momentum"}
    fresh = make(seed=3)
    fresh.load_checkpoint_state(state)
    assert fresh.momentum == 1.0
    for a, b in zip(fresh.teacher_encoder.state_dict().values(), obj.teacher_encoder.state_dict().values()):
        assert torch.equal(a, b)
    from mimscale.errors import CheckpointError

    with pytest.raises(CheckpointError):
        fresh.load_checkpoint_state({"teacher_encoder": state["teacher_encoder"]})


# ----------------------------------------------------------------------------- masks (4.5 item 9)


@pytest.mark.parametrize("grid,unit,r", [(14, 2, 0.75), (16, 2, 0.75), (4, 2, 0.75), (8, 2, 0.4), (14, 7, 0.5)])
def test_mps_mask_count_and_alignment(grid, unit, r):
    m = unit_masks(64, grid, unit, r, gen(5))
    units = (grid // unit) ** 2
    assert m.shape == (64, grid * grid) and m.dtype == torch.bool
    assert (m.sum(1) == unit * unit * math.ceil(units * r)).all()
    blocks = m.view(64, grid // unit, unit, grid // unit, unit)
    assert (blocks.all(dim=(2, 4)) | ~blocks.any(dim=(2, 4))).all()  # every unit all-or-nothing
    assert len({tuple(row.tolist()) for row in m}) > 1  # differs per sample


def test_mps_vit_b_masks_148_of_196():
    spec = MaskSpec("units", 196, 0.75, unit=2)
    m = spec.generate(8, gen(6))["mask"]
    assert (m.sum(1) == 148).all()


def test_block_masks_count_follows_the_code_and_collate():
    """The official ConMIM (BEiT) block generator does not force the count (rows at or below 75, mean ~74.5);
    block_exact_count=true forces it (DTM's generator). The loss takes rows with different counts."""
    obj = make(mask_type="block", block_num_masked=6, block_exact_count=True)
    m = obj.mask_spec().generate(32, gen(7))["mask"]
    assert (m.sum(1) == 6).all()
    spec = MaskSpec("block", 196, num_masked=75, exact=False)
    counts = spec.generate(64, gen(8))["mask"].sum(1)
    assert (counts <= 75).all() and (counts < 75).any() and counts.float().mean() > 73
    assert not ConMIM.Config().block_exact_count
    a, b = spec.generate(4, gen(9))["mask"], spec.generate(4, gen(9))["mask"]
    assert torch.equal(a, b)  # all randomness from the generator
    free = make(mask_type="block", block_num_masked=6)
    batch = random_batch(free, b=8)
    assert len(set(batch["mask"].sum(1).tolist())) > 1
    assert torch.isfinite(free(batch).loss)


def test_config_errors():
    with pytest.raises(ConfigError, match="mask_unit=3 must divide"):
        make(mask_unit=3)
    with pytest.raises(ConfigError, match="block_num_masked=16"):
        make(mask_type="block", block_num_masked=16)
    with pytest.raises(ConfigError, match="temperature"):
        make(temperature=0.0)
    with pytest.raises(ConfigError, match="ema_m0"):
        make(ema_m0=1.5)
    with pytest.raises(ConfigError, match="teacher_aug.blur_p"):
        make(teacher_aug=PhotometricConfig(blur_p=2.0))


# ----------------------------------------------------------------------------- views (4.5 item 8)


def unique_colour_image(size: int = 40) -> Image.Image:
    """Every 4x4 block of the source image has its own RGB colour."""
    g = gen(10)
    cells = torch.randperm(256**2, generator=g)[: (size // 4) ** 2]
    rgb = torch.stack([cells % 256, cells // 256, (cells * 7) % 256], dim=1).view(size // 4, size // 4, 3)
    arr = rgb.repeat_interleave(4, 0).repeat_interleave(4, 1).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def test_views_share_geometry_when_photometric_ops_are_off():
    obj = make(teacher_aug=OFF)
    tf = obj.train_transform(TrainTransform(IMG, scale=(0.2, 1.0)))
    img = unique_colour_image()
    outs = [tf(img, gen(s)) for s in range(6)]
    for out in outs:
        assert set(out) == {"image", "image_teacher"}
        assert out["image"].shape == (3, IMG, IMG)
        assert torch.equal(out["image"], out["image_teacher"])
    assert len({out["image"].sum().item() for out in outs}) > 1  # crops really differ per draw


def test_student_view_is_the_default_transform_and_teacher_view_is_the_same_crop():
    base = TrainTransform(IMG, scale=(0.2, 1.0))
    bright = PhotometricConfig(
        jitter_p=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0
    )
    tf = make(teacher_aug=bright).train_transform(base)
    img = unique_colour_image()
    for seed in range(5):
        out = tf(img, gen(seed))
        assert torch.equal(out["image"], base(img, gen(seed)))  # same crop + flip draws as default
        a, b = out["image"].flatten(), out["image_teacher"].flatten()
        assert not torch.equal(a, b)
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.98  # a brightness change of the same pixels


def test_photometric_ops_are_reproducible_and_all_reachable():
    tf = make().train_transform(TrainTransform(IMG))
    img = unique_colour_image()
    a, b = tf(img, gen(11)), tf(img, gen(11))
    assert torch.equal(a["image_teacher"], b["image_teacher"])
    differ = sum(not torch.equal(o["image"], o["image_teacher"]) for o in (tf(img, gen(s)) for s in range(20)))
    assert differ >= 12  # p(at least one op) ~ 0.89


def test_grayscale_input_stays_valid():
    """Fashion-MNIST is single-channel: the teacher view of an L image has the right shape and range."""
    tf = make().train_transform(TrainTransform(IMG, mean=(0.5,) * 3, std=(0.5,) * 3))
    arr = (np.arange(28 * 28) % 251).reshape(28, 28).astype(np.uint8)
    for s in range(10):
        out = tf(Image.fromarray(arr, mode="L"), gen(s))
        assert out["image_teacher"].shape == (3, IMG, IMG)
        assert out["image_teacher"].abs().max() <= 1.0 + 1e-6


def test_collate_stacks_both_views():
    obj = make()
    tf = obj.train_transform(TrainTransform(IMG))
    img = unique_colour_image()
    samples = [{**tf(img, gen(i)), "label": 0, "key": str(i)} for i in range(3)]
    batch = MaskCollate(obj.mask_spec())(samples, gen(0))
    assert batch["image"].shape == batch["image_teacher"].shape == (3, 3, IMG, IMG)
    assert batch["mask"].shape == (3, N)
    out = obj(batch)
    assert torch.isfinite(out.loss)


def test_views_need_a_train_transform():
    with pytest.raises(ConfigError, match="TrainTransform"):
        SharedGeometryViews(lambda img, g: img, None)


# ----------------------------------------------------------------------------- compute (section 8), recipes


@pytest.mark.parametrize("arch,patch,ratio", [("vit_base", 16, 2.96), ("vit_large", 16, 4.23), ("vit_huge", 14, 4.76)])
def test_flops_match_objectives_section_8(arch, patch, ratio):
    with torch.device("meta"):
        enc = build_vit(arch, img_size=224, patch_size=patch)
        con, mae = ConMIM(enc, ConMIM.Config()), MAE(enc, MAE.Config())
    assert con.flops_per_sample() / mae.flops_per_sample() == pytest.approx(ratio, abs=0.01)
    if arch == "vit_base":
        assert con.flops_per_sample() / 1e9 == pytest.approx(173.6, rel=0.005)


@pytest.mark.parametrize(
    "recipe,arch,lr,ls", [("conmim_vit_b16", "vit_base", 5e-4, 0.1), ("conmim_vit_l16", "vit_large", 7.5e-4, 1e-5)]
)
def test_recipes_validate(recipe, arch, lr, ls):
    from mimscale import config as C

    with pytest.raises(ConfigError, match="data.train must be set"):
        C.load(recipe)
    cfg = C.load(recipe, ["data.train=/data/in1k/train-{000000..001281}.tar"])
    knobs = C.objective_knobs(cfg)
    assert cfg.objective["name"] == "conmim" and cfg.model.arch == arch
    assert cfg.optim.lr == lr and cfg.optim.min_lr == 1e-5 and cfg.optim.betas == (0.9, 0.98)
    assert cfg.optim.clip_grad == 1.0 and cfg.optim.weight_decay == 0.05 and cfg.optim.warmup_epochs == 10
    assert cfg.model.layer_scale_init == ls and cfg.model.drop_path == 0.0
    assert cfg.model.pos_embed == "relative" and knobs.init == "beit"  # BEiT encoder, as the code
    assert (knobs.wd_mask_token, knobs.wd_cls_token) == (True, False)
    assert cfg.train.batch_size == 2048
    assert knobs.temperature == 0.1 and knobs.ema_m0 == 0.996 and knobs.proj_hidden == 4096
    assert knobs.proj_out == 256 and knobs.mask_type == "random_mps32" and knobs.mask_ratio == 0.75
    assert knobs.teacher_aug == PhotometricConfig()


# ----------------------------------------------------------------------------- learning on real data


@pytest.mark.slow
def test_learns_on_fashion_mnist_through_the_train_cli(fmnist_small, tmp_path):
    """A short real `python -m mimscale.train` run of the tiny ConMIM on Fashion-MNIST shards: the kNN top-1
    of the trained encoder beats the same encoder at random init (summary.json).

    This run keeps the absolute sin-cos encoder and MAE's init (knobs), not the recipes' BEiT encoder: with
    only a relative position bias the 4 x 4-patch student has to learn where its masked tokens are through a
    zero-initialised bias table, and in this budget it does not get there (measured in-process, 200 steps:
    positive accuracy stays at chance, 1/16; it starts to rise after ~250 steps). With an absolute teacher
    the task is partly solvable from position alone, which is what makes this short run learn. The BEiT
    path through the engine (export into timm's Beit, ZeRO-3) is covered by test_dtm.py."""
    from launch_utils import run, tiny_overrides

    rd = tmp_path / "conmim"
    args = tiny_overrides(
        fmnist_small,
        rd,
        train__max_steps=LEARN["steps"],
        train__epochs=LEARN["epochs"],
        train__batch_size=64,
        train__micro_batch_size=64,
        train__log_every=10,
        optim__blr=LEARN["blr"],
        optim__warmup_epochs=LEARN["warmup_epochs"],
        eval__knn_train=fmnist_small["train"],
        eval__knn_test=fmnist_small["test"],
        eval__batch_size=256,
        eval__num_workers=1,
    )
    knobs = ", ".join(
        f"{k}: {LEARN[k]}" for k in ("proj_hidden", "proj_out", "ema_m0", "mask_unit", "mask_ratio", "init")
    )
    obj = f"{{name: conmim, {knobs}}}"
    args = [a for a in args if not a.startswith("objective.")] + [f"objective={obj}"]
    run([sys.executable, "-m", "mimscale.train", "tiny_cpu", *args], timeout=400)
    s = json.loads((rd / "summary.json").read_text())
    assert s["objective"] == "conmim" and s["steps"] == LEARN["steps"]
    print(f"kNN top-1: init {s['knn_top1_init']:.2f}% -> trained {s['knn_top1_final']:.2f}%")
    assert s["knn_top1_final"] > s["knn_top1_init"] + LEARN["min_gain"], s


# Measured on 2 busy shared cores (fmnist_small, 16 px, p = 4, vit_micro, 128 steps of 64): kNN top-1 60.5% at
# init -> 66.6% / 67.6% trained (two runs). Per-patch masking (mask_unit 1) at r = 0.5 suits the 4x4 grid (2x2
# units would leave one visible quadrant: +0.8 points only); m0 = 0.99 lets the teacher bootstrap within a short
# run (0.996: no gain in 64 steps).
LEARN = {
    "steps": 128,
    "epochs": 4,
    "blr": 6e-3,
    "warmup_epochs": 0.2,
    "proj_hidden": 256,
    "proj_out": 64,
    "ema_m0": 0.99,
    "mask_unit": 1,
    "mask_ratio": 0.5,
    "init": "mae",
    "min_gain": 4.0,  # measured +6.1 / +7.1; an untrained CLIP teacher gives DTM +2.7 (tests/objectives/test_dtm.py)
}


def test_bf16_student_with_fp32_teacher():
    """DeepSpeed bf16 casts the objective (not the teacher): the teacher runs under autocast, the loss stays fp32."""
    obj = make().train()
    batch = random_batch(obj)
    ref = obj(batch).loss.item()
    obj.bfloat16()
    assert obj.teacher_encoder.module.cls_token.dtype == torch.float32
    out = obj(batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(ref, rel=0.05)
    out.loss.backward()
    assert obj.mask_token.grad is not None and obj.mask_token.grad.dtype == torch.bfloat16


def test_projector_batchnorm_matches_torch_in_fp32_and_takes_bf16_weights_beside_fp32_statistics():
    """fp32: outputs and running statistics equal ``nn.BatchNorm1d``'s (train and eval); with DeepSpeed's
    placement (bf16 parameters, fp32 buffers) it runs, returns bf16 and stays close to the fp32 result."""
    from mimscale.objectives.conmim import StatsPrecisionBatchNorm1d

    torch.manual_seed(0)
    ref, ours = torch.nn.BatchNorm1d(6), StatsPrecisionBatchNorm1d(6)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(32, 6) * 3 + 1
    for mode in (True, False):
        ref.train(mode), ours.train(mode)
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked == ref.num_batches_tracked == 1
    for prm in ours.parameters():
        prm.data = prm.data.bfloat16()
    ours.train()
    y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref.train()(x), atol=0.05, rtol=0.05)
