"""`mimscale check-config`: the check the SLURM templates run before starting any rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launch_utils import run, tiny_overrides

from mimscale.cli import main
from mimscale.errors import ConfigError, DataError, MimscaleError
from mimscale.preflight import check


def test_a_good_run_checks_out_for_its_world_size(fmnist_small, tmp_path):
    line = check("tiny_cpu", tiny_overrides(fmnist_small, tmp_path / "run"), world_size=2)
    assert line.startswith("config OK: mae vit_micro, world size 2, batch 16 = 8 x 2 x 1")
    assert str(tmp_path / "run") in line
    assert not (tmp_path / "run").exists()  # a check writes nothing


def test_the_world_size_must_divide_the_batch(fmnist_small, tmp_path):
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch_size x world size = 8 x 3"):
        check("tiny_cpu", tiny_overrides(fmnist_small, tmp_path), world_size=3)


def test_missing_shards_are_found_before_the_launch(fmnist_small, tmp_path):
    over = tiny_overrides(
        fmnist_small, tmp_path, data__train=str(tmp_path / "nope-{000000..000003}.tar"), data__samples_per_epoch=1000
    )
    with pytest.raises(DataError, match=r"4 of 4 shards are missing, e\.g\. .*nope-000000\.tar"):
        check("tiny_cpu", over)


def test_a_key_given_twice_is_refused(fmnist_small, tmp_path):
    over = [*tiny_overrides(fmnist_small, tmp_path), "data.train=/d/a-000000.tar", "data.train=/d/a-000001.tar"]
    with pytest.raises(ConfigError, match="data.train is given 3 times .*quote it"):
        check("tiny_cpu", over)


def test_cli_prints_one_line_and_exits_2(capsys):
    assert main(["check-config", "tiny_cpu", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mimscale: error: unknown config key 'train.no_such_key'"]
    assert main(["check-config", "no_such_recipe"]) == 2
    assert "no recipe named 'no_such_recipe'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- check-config == the launch


def _base(data, run_dir, objective: str = "mae", **knobs) -> list[str]:
    """tiny_cpu turned into a seconds-long run of ``objective`` with its small knobs (16 px, patch 4: 16 patches)."""
    over = [o for o in tiny_overrides(data, run_dir) if not o.startswith("objective.")]
    small = {
        "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        "emae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        "conmim": {"proj_hidden": 48, "proj_out": 32, "block_num_masked": 6},
        "adpe": {"crop_size": 16, "decoder_dim": 48, "decoder_depth": 1, "decoder_heads": 4},
        "mapet": {"vocab_size": 64, "target_source": "pixel_mean"},
        "dtm": {"teacher": "random:mimscale-tiny-clip", "head_dim": 64},
    }[objective]
    small.update(knobs)
    return [*over, f"objective={{name: {objective}}}", *(f"objective.{k}={v}" for k, v in small.items())]


def _write_knobs(path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


# (id, objective, objective knobs, other overrides, world size, what must be in the one line)
# Every kind of error the launch raises before its first step: ranges, unknown keys, types, combinations, each
# objective's own knob checks, the schedule for the world size, DeepSpeed knobs, the run directory's checkpoint,
# cached targets in the manifest, kNN shards. Rows that reach DeepSpeed's engine in the launch come last.
TABLE = [
    ("range_blr", "mae", {}, ["optim.blr=-0.001"], 1, "optim.blr=-0.001 must be > 0"),
    ("range_mask_ratio", "mae", {"mask_ratio": 1.0}, [], 1, "objective.mask_ratio=1.0 must be in (0, 1)"),
    ("range_knn_k", "mae", {}, ["eval.knn_k=0"], 1, "eval.knn_k=0 must be >= 1"),
    ("range_decoder_depth", "mae", {"decoder_depth": -1}, [], 1, "objective.decoder_depth=-1 must be >= 0"),
    ("range_keep_last", "mae", {}, ["train.keep_last=-1"], 1, "train.keep_last=-1 must be >= 1"),
    ("range_photometric", "conmim", {"teacher_aug": "{hue: 0.7}"}, [], 1, "objective.teacher_aug.hue=0.7"),
    ("unknown_key", "mae", {}, ["train.keep_lats=2"], 1, "did you mean 'train.keep_last'"),
    ("wrong_type", "mae", {}, ["train.batch_size=abc"], 1, "train.batch_size must be an integer"),
    ("img_not_multiple", "mae", {}, ["model.img_size=18"], 1, "not a multiple of model.patch_size"),
    ("offload_zero0", "mae", {}, ["train.offload=true", "train.zero_stage=0"], 1, "train.offload=true"),
    ("mae_decoder_shape", "mae", {"decoder_dim": 30}, [], 1, "objective.decoder_dim=30 must be a multiple of 4"),
    ("emae_parts", "emae", {"mask_ratio": 0.3}, [], 1, "EMAE needs >= 2"),
    ("conmim_unit", "conmim", {"mask_unit": 3}, [], 1, "objective.mask_unit=3 must divide the 4x4 patch grid"),
    ("adpe_crop", "adpe", {"crop_size": 10}, [], 1, "objective.crop_size=10 must be a positive multiple"),
    ("mapet_least", "mapet", {"least_context": 17}, [], 1, "objective.least_context=17 must be in [1, 16]"),
    ("dtm_num_masked", "dtm", {"num_masked": 17}, [], 1, "objective.num_masked=17 must be in [0, 16]"),
    ("dtm_teacher_missing", "dtm", {"teacher": "/nonexistent/clip.pt"}, [], 1, "/nonexistent/clip.pt"),
    ("world_size_divides", "mae", {}, [], 3, "not divisible by train.micro_batch_size x world size = 8 x 3"),
    ("epoch_too_small", "mae", {}, ["data.samples_per_epoch=8"], 1, "larger than an epoch (8 samples)"),
    ("knobs_missing", "mae", {}, ["train.ds_config=/nonexistent/z.json"], 1, "no DeepSpeed knobs file"),
    ("knobs_stage", "mae", {}, ["train.ds_config={stage2}"], 1, "has ZeRO stage 2 but train.zero_stage=1"),
    ("knobs_clash", "mae", {}, ["train.ds_config={clash}"], 1, "sets train_batch_size"),
    ("fp16_on_cpu", "mae", {}, ["train.precision=fp16"], 1, "train.precision=fp16 needs CUDA"),
    ("ckpt_of_another_run", "mae", {}, ["{ckpt:emae}"], 1, "was written for objective='emae'"),
    ("knn_manifest", "mae", {}, ["eval.knn_train={nowhere}", "eval.knn_test={nowhere}"], 1, "manifest"),
    # the launch reaches DeepSpeed for these
    ("zero0_reshard", "mae", {}, ["train.zero_stage=0", "{ckpt:zero0x2}"], 1, "ZeRO-0 checkpoint of 2 ranks"),
    ("mapet_no_codes", "mapet", {"target_source": "shards"}, [], 1, "has no cached targets 'kclip.npy'"),
    ("dtm_no_targets", "dtm", {"target_source": "shards"}, [], 1, "has no cached targets 'clip.npy'"),
]


@pytest.mark.slow
def test_check_config_raises_what_the_launch_raises(fmnist_small, tmp_path):
    """Each row through check-config and through the real launch (``pretrain``, rank 0 of that world size):
    both fail, with the same error class and the same one line, and the line says what is wrong."""
    import torch
    from test_checkpoint import fake_checkpoint

    if torch.cuda.is_available():
        pytest.skip("the fp16 row expects a CPU-only machine")
    subst = {
        "{stage2}": _write_knobs(tmp_path / "z2.json", {"zero_optimization": {"stage": 2}}),
        "{clash}": _write_knobs(tmp_path / "clash.json", {"zero_optimization": {"stage": 1}, "train_batch_size": 64}),
        "{nowhere}": str(tmp_path / "no-knn-shards"),
    }
    cases = []
    for cid, objective, knobs, extra, world, _words in TABLE:
        rd = tmp_path / cid
        over = []
        for e in extra:
            if e.startswith("{ckpt:"):
                kind = e[6:-1]
                ident = {
                    "objective": kind if kind != "zero0x2" else objective,
                    "arch": "vit_micro",
                    "img_size": 16,
                    "patch_size": 4,
                    "in_chans": 3,
                    "pos_embed": "sincos",
                }
                d = fake_checkpoint(rd, 3, identity=ident)
                meta = json.loads((d / "meta.json").read_text())
                meta.update(world_size=2, zero_stage=0 if kind == "zero0x2" else 1)
                (d / "meta.json").write_text(json.dumps(meta))
                continue
            for k, v in subst.items():
                e = e.replace(k, v)
            over.append(e)
        merged = {o.split("=", 1)[0]: o for o in [*_base(fmnist_small, rd, objective, **knobs), *over]}  # one per key
        cases.append({"id": cid, "recipe": "tiny_cpu", "overrides": list(merged.values()), "world_size": world})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    worker = Path(__file__).with_name("preflight_worker.py")
    p = run([sys.executable, str(worker), str(tmp_path / "cases.json"), str(tmp_path / "out.json")], timeout=400)
    got = json.loads((tmp_path / "out.json").read_text())
    assert set(got) == {c[0] for c in TABLE}, p.stdout[-3000:]
    for cid, *_, words in TABLE:
        check, launch = got[cid]["check"], got[cid]["launch"]
        assert launch is not None, f"{cid}: the launch did not fail before its first step"
        assert check == launch, f"{cid}: check-config {check} but the launch {launch}"
        assert words in check["message"] and "\n" not in check["message"], f"{cid}: {check}"


@pytest.mark.parametrize("objective", ["mae", "emae", "conmim", "adpe", "mapet", "dtm"])
def test_every_objective_checks_out_without_building_its_weights(fmnist_small, tmp_path, objective):
    """The good tiny run of each objective passes (the model is built on the meta device; DTM's random-init
    test teacher needs real tensors and is built on the CPU instead), and nothing is written."""
    line = check("tiny_cpu", _base(fmnist_small, tmp_path / "run", objective), world_size=2)
    assert line.startswith(f"config OK: {objective} vit_micro, world size 2")
    assert not (tmp_path / "run").exists()


def test_a_resumable_checkpoint_is_named(fmnist_small, tmp_path):
    from test_checkpoint import fake_checkpoint

    ident = {
        "objective": "mae",
        "arch": "vit_micro",
        "img_size": 16,
        "patch_size": 4,
        "in_chans": 3,
        "pos_embed": "sincos",
    }
    fake_checkpoint(tmp_path / "run", 6, identity=ident)
    assert check("tiny_cpu", _base(fmnist_small, tmp_path / "run")).endswith("resumes from step_00000006")


def test_a_vit_huge_recipe_is_checked_in_seconds(fmnist_small, tmp_path):
    """ViT-H/14 (632M parameters) is built on the meta device: no 2.5 GB of fp32 weights on the login node."""
    import resource
    import time

    check("tiny_cpu", _base(fmnist_small, tmp_path / "warm"))  # imports (torch, DeepSpeed) done
    t0, rss0 = time.time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = check(
        "mae_vit_h14",
        [
            f"data.train={fmnist_small['train']}",
            "data.samples_per_epoch=1281167",
            f"train.run_dir={tmp_path / 'run'}",
            "eval.knn_train=null",
            "eval.knn_test=null",
        ],
        world_size=64,
    )
    assert line.startswith("config OK: mae vit_huge, world size 64, batch 4096 = 32 x 64 x 2 (accumulation)")
    print(f"mae_vit_h14 checked in {time.time() - t0:.1f} s")  # the guard in conftest bounds it; no timing assert
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 300_000  # KiB: not 2.5 GB


def test_a_dtm_teacher_file_is_read_on_the_meta_device(fmnist_small, tmp_path):
    """DTM's CLIP teacher file is opened and its tower checked while the model is built on the meta device."""
    import warnings

    import torch

    from mimscale.objectives.dtm import CLIP_MEAN, CLIP_STD
    from mimscale.teachers import clip

    with torch.random.fork_rng(devices=[]):
        path = clip.save_clip(
            clip.build_clip(clip.TINY_CLIP_CFG),
            clip.TINY_CLIP_CFG,
            tmp_path / "clip.pt",
            mean=CLIP_MEAN,
            std=CLIP_STD,
            arch=clip.TINY_CLIP_ARCH,
        )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        line = check("tiny_cpu", _base(fmnist_small, tmp_path / "run", "dtm", teacher=path))
    assert line.startswith("config OK: dtm vit_micro")
    assert not [w for w in seen if "meta parameter" in str(w.message)]  # no warning per tensor
    (tmp_path / "clip.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MimscaleError):
        check("tiny_cpu", _base(fmnist_small, tmp_path / "run", "dtm", teacher=path))
