"""Real evaluation runs on Fashion-MNIST through the CLI (slow; they still run in CI).

* learning: a short MAE pre-training of a micro ViT, then `mimscale eval linear` of the trained encoder vs the
  same encoder at its random init (exported from the same seed), and `mimscale eval finetune` (DeepSpeed engine,
  one process, layer-decay groups checked inside the engine's optimizer); results land in the run directory,
  its metrics.jsonl and `mimscale report`.
* multi-process: the linear probe under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) gives the
  accuracy of one process within a stated tolerance.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from launch_utils import BIN, run, tiny_overrides
from safetensors.torch import save_file

pytestmark = pytest.mark.slow

FM_NORM = ["mean=[0.286,0.286,0.286]", "std=[0.353,0.353,0.353]"]
PROBE = ["epochs=10", "batch_size=256", "optimizer=sgd", "warmup_epochs=1", "pool=mean", "num_workers=1"]


def _random_init(path, seed: int = 0):
    """The encoder a run with ``train.seed=seed`` starts from (the loop seeds, then builds the encoder first)."""
    from mimscale.models.vit import build_vit

    torch.manual_seed(seed)
    enc = build_vit("vit_micro", 16, 4, 3)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return path


def _eval(kind, source, data, *args, launcher=(sys.executable, "-m", "mimscale.cli"), env=None):
    p = run(
        [*launcher, "eval", kind, str(source), "--data", str(data["train"]), "--test", str(data["test"]), *args],
        env=env,
        timeout=900,
    )
    return p


@pytest.fixture(scope="module")
def random_init_probe(tmp_path_factory, fmnist_small):
    """One single-process linear probe of the seed-0 random init (Fashion-MNIST's mean/std): the baseline the
    trained encoder must beat, and the one-process reference of the two-process probe."""
    root = tmp_path_factory.mktemp("random_init")
    src = _random_init(root / "enc.safetensors")
    _eval("linear", src, fmnist_small, *PROBE, *FM_NORM, "--out", str(root / "one.json"))
    return src, json.loads((root / "one.json").read_text())


def test_trained_encoder_beats_random_init_linear_and_finetune(tmp_path, fmnist_small, random_init_probe):
    rd = tmp_path / "mae"
    run(
        [
            sys.executable,
            "-m",
            "mimscale.cli",
            "pretrain",
            *tiny_overrides(
                fmnist_small,
                rd,
                train__batch_size=64,
                train__micro_batch_size=64,
                train__max_steps="null",
                train__epochs=12,
                train__log_every=32,
                optim__warmup_epochs=1,
                data__shuffle_buffer=512,
            ),
        ],
        timeout=900,
    )
    _eval("linear", rd, fmnist_small, *PROBE)
    trained = json.loads((rd / "eval" / "linear.json").read_text())
    random_init = random_init_probe[1]
    assert trained["test_samples"] == random_init["test_samples"] == 512
    # measured 69.1% vs 65.2% (+3.9; 1 point = 5 of the 512 test images)
    assert trained["top1"] > random_init["top1"] + 2.5, (trained["top1"], random_init["top1"])

    p = _eval(
        "finetune",
        rd,
        fmnist_small,
        "train.epochs=2",
        "train.batch_size=64",
        "train.micro_batch_size=64",
        "train.precision=fp32",
        "train.log_every=8",
        "optim.warmup_epochs=0.25",
        "optim.blr=1e-2",
        "finetune.mixup=0",
        "finetune.cutmix=0",
        "data.num_workers=1",
        "data.shuffle_buffer=512",
        "log.wandb=disabled",
    )
    ft = json.loads((rd / "eval" / "finetune.json").read_text())
    assert "finetune top-1" in p.stdout
    assert ft["steps"] == 64 and len(ft["curve"]) == 2 and ft["world_size"] == 1
    # the fine-tune path learns (chance: 10%; measured 36.7%, 2 epochs, RandAugment at 16 px). It does not show
    # that pre-training helps fine-tuning at this budget: the same fine-tune from the random init reached 33.8%
    # (measured 2026-12-07), too close to assert on 512 images; the linear probe above carries that claim.
    assert ft["top1"] > 25.0, ft["curve"]
    assert "finetune: step" in p.stderr and "pretrain: step" not in p.stderr  # progress says what it is
    assert "recipe finetune_vit_small" in p.stderr
    depth, decay = 4, 0.75  # vit_micro gets the small-ViT recipe (finetune_vit_small), not ViT-B/16's
    assert ft["layer_decay"] == decay
    assert ft["lr_scales"] == pytest.approx(sorted(decay ** (depth + 1 - i) for i in range(depth + 2)))

    # the fine-tuned classifier loads strictly into timm (global average pooling, fc_norm)
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    timm_model = TimmViT(
        img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10, global_pool="avg", fc_norm=True
    )
    timm_model.load_state_dict(load_file(ft["model"]), strict=True)

    # results reach the run's metrics.jsonl and the report table
    from mimscale.report.data import load_run

    r = load_run(rd)
    assert r.linear_best == pytest.approx(trained["best_top1"]) and r.finetune_best == pytest.approx(ft["best_top1"])
    assert r.linear_final == pytest.approx(trained["top1"]) and r.finetune_final == pytest.approx(ft["top1"])


def test_linear_probe_two_processes_match_one(tmp_path, fmnist_small, random_init_probe):
    src, one = random_init_probe
    args = [*PROBE, *FM_NORM]
    _eval(
        "linear",
        src,
        fmnist_small,
        *args,
        "--out",
        str(tmp_path / "two.json"),
        launcher=(
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "mimscale.cli",
        ),
    )
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["train_samples"] == two["train_samples"] == 2048 and one["test_samples"] == two["test_samples"] == 512
    # the cached features stay sharded: each process holds only its share (nothing gathered)
    assert one["feature_rows_per_process"] == [2048] and two["feature_rows_per_process"] == [1024, 1024]
    # same global batches and averaged gradients; only the BatchNorm batch statistics differ (per half-batch)
    assert abs(one["top1"] - two["top1"]) <= 1.5, (one["top1"], two["top1"])


def test_finetune_at_twice_the_grid_from_an_init_matches_one_grid(tmp_path, fmnist_small):
    """From a timm-layout init (a ViT state dict with its own 1000-class head, trained here at 16 px = 4x4
    patches by a 1x fine-tuning), fine-tuning at 32 px (8x8 patches: the learned position embedding resampled
    bicubically) reaches the top-1 band of the 1x run."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    init = tmp_path / "timm_init.safetensors"
    timm_model = TimmViT(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=1000)
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(init))
    common = [
        "train.epochs=2",
        "train.batch_size=64",
        "train.micro_batch_size=64",
        "train.precision=fp32",
        "train.log_every=16",
        "optim.warmup_epochs=0.25",
        "optim.blr=1e-2",
        "finetune.mixup=0",
        "finetune.cutmix=0",
        "data.num_workers=1",
        "data.shuffle_buffer=512",
        "log.wandb=disabled",
        *(f"finetune.{k}" for k in FM_NORM),
    ]
    top1, source = {}, init
    for size in (16, 32):  # 1x from the timm file, then 2x from the 1x model (its fc_norm + head start fresh)
        out = tmp_path / f"ft{size}"
        p = _eval(
            "finetune", source, fmnist_small, f"--out-dir={out}", f"--out={out}.json", f"model.img_size={size}", *common
        )
        top1[size] = json.loads((out / "result.json").read_text())["top1"]
        log = p.stdout + p.stderr
        assert "unexpected-and-ignored 2 (head.bias, head.weight)" in log  # the file's head: ignored, and said
        source = out / "model.safetensors"
    assert "fine-tuning at 32 px (8x8 patches); the source was trained at 16 px" in log
    assert "pos_embed: bicubic 4x4 -> 8x8" in log
    assert top1[16] > 25.0 and top1[32] > top1[16] - 10.0, top1  # chance: 10%
