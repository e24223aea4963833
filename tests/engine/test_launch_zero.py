"""Real multi-rank training through every launcher and every ZeRO stage (2 CPU ranks, gloo, DeepSpeed).

Each launch is a full `mimscale pretrain` run on real Fashion-MNIST shards; the runs share one data set
and one global batch, so their per-step losses must agree across ZeRO stages, launchers and activation
checkpointing (fp32: only reduction order differs).
"""

from __future__ import annotations

import json
import sys

import pytest
from launch_utils import REPO, clean_env, free_port, run, tiny_overrides

pytestmark = pytest.mark.slow
PY = sys.executable


def losses(run_dir) -> list[float]:
    from mimscale.telemetry import read_jsonl

    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    return [r["train/loss"] for r in rows]


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def knobs_no_persistence(tmp_path_factory):
    """ZeRO-3 knobs that partition even tiny tensors (the shipped file keeps < 1e5-element params whole)."""
    p = tmp_path_factory.mktemp("ds") / "zero3_all.json"
    p.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
        )
    )
    return p


@pytest.fixture(scope="module")
def runs(fmnist_small, tmp_path_factory, knobs_no_persistence):
    """Launch every variant once; tests below inspect the results."""
    root = tmp_path_factory.mktemp("runs")
    out = {}

    def launch(name, prefix, extra_env=None, **kw):
        rd = root / name
        args = ["tiny_cpu", *tiny_overrides(fmnist_small, rd, **kw)]
        out[name] = (rd, run([*prefix, *args], env=extra_env))

    port = free_port
    launch(
        "torchrun_z0",
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(port()), "-m", "mimscale.train"],
        train__zero_stage=0,
    )
    launch(
        "deepspeed_z1",
        ["deepspeed", "--num_gpus", "2", "--master_port", str(port()), "--module", "mimscale.train"],
        train__zero_stage=1,
    )
    launch(
        "accelerate_z2",
        [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--main_process_port",
            str(port()),
            "-m",
            "mimscale.train",
        ],
        train__zero_stage=2,
    )
    launch(  # ZeRO-3 with activation checkpointing: ZeRO-0's trajectory proves both (one launch, not two)
        "torchrun_z3_ckpt",
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(port()), "-m", "mimscale.train"],
        train__zero_stage=3,
        train__ds_config=str(knobs_no_persistence),
        model__grad_checkpointing="true",
    )
    launch(
        "torchrun_z2_bf16_clip",
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(port()), "-m", "mimscale.train"],
        train__zero_stage=2,
        train__precision="bf16",
        optim__clip_grad=0.05,
    )
    return out


def test_every_launcher_and_stage_trains(runs):
    for name, (rd, _proc) in runs.items():
        s = summary(rd)
        assert s["world_size"] == 2, name
        assert s["steps"] == 4, name
        assert len(losses(rd)) == 4, name


def test_zero_stages_give_the_same_loss_trajectory(runs):
    ref = losses(runs["torchrun_z0"][0])
    assert ref[0] > 0.5  # norm-pix MSE of an untrained model is ~1
    for name in ("deepspeed_z1", "accelerate_z2", "torchrun_z3_ckpt"):
        got = losses(runs[name][0])
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-5), name


def test_activation_checkpointing_gives_the_same_trajectory(runs):
    """ZeRO-3 with activation checkpointing (recomputed block forwards, partitioned weights gathered again for
    the recomputation) against ZeRO-0 without it, at the tolerance that held checkpointing against plain
    ZeRO-3 (measured: the logged losses of all five fp32 runs are bit-identical)."""
    ref = losses(runs["torchrun_z0"][0])
    assert losses(runs["torchrun_z3_ckpt"][0]) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_zero3_holds_about_half_the_parameters_per_rank(runs):
    s3, s0 = summary(runs["torchrun_z3_ckpt"][0]), summary(runs["torchrun_z0"][0])
    assert s3["params_total"] == s0["params_total"] > 0
    for held in s3["params_per_rank"]:
        assert abs(held / s3["params_total"] - 0.5) < 0.05
    assert s0["params_per_rank"] == [s0["params_total"]] * 2


def test_zero3_saves_the_whole_trained_encoder_and_decoder(runs):
    """The exported encoder.safetensors and decoder.safetensors of the ZeRO-3 run (every parameter partitioned
    across the 2 ranks) hold the gathered trained values: equal to ZeRO-0's within the fp32 tolerance of their
    equal losses, same keys and shapes. (4 Adam steps at lr 3.75e-4 move each weight by ~1e-3 from the shared
    init, far above the tolerance, so a save that wrote the init or a rank's empty partition cannot pass.)"""
    import torch
    from safetensors.torch import load_file

    from mimscale.models.init import DECODER_FILE

    for name in ("encoder.safetensors", DECODER_FILE):
        z0, z3 = (load_file(str(runs[r][0] / name)) for r in ("torchrun_z0", "torchrun_z3_ckpt"))
        assert z0.keys() == z3.keys() and len(z0) > 4, name
        for k in z0:
            assert z3[k].shape == z0[k].shape and z3[k].numel() > 0, (name, k)
            torch.testing.assert_close(z3[k], z0[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


def test_single_process_without_launcher(fmnist_small, tmp_path):
    """One process, gradient accumulation 2, kNN at init, every 2 steps and at the end (real shards)."""
    from mimscale.telemetry import read_jsonl

    rd = tmp_path / "single"
    run(
        [
            PY,
            "-m",
            "mimscale.train",
            "tiny_cpu",
            *tiny_overrides(
                fmnist_small,
                rd,
                eval__knn_train=fmnist_small["train"],
                eval__knn_test=fmnist_small["test"],
                eval__knn_every=2,
                eval__batch_size=128,
                eval__num_workers=1,
            ),
        ]
    )
    s = summary(rd)
    assert s["world_size"] == 1 and s["steps"] == 4
    assert (rd / "config.yaml").exists() and (rd / "encoder.safetensors").exists()
    evals = [r for r in read_jsonl(rd / "metrics.jsonl") if "eval/knn_top1" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["eval/knn_bank"] == 2048 and r["eval/knn_queries"] == 512 for r in evals)
    assert all(10.0 < r["eval/knn_top1"] <= 100.0 for r in evals)  # 10 classes: chance is 10%
    times = [r["time/train_s"] for r in evals]
    assert times[0] < 1.0 and times == sorted(times)  # training clock, eval excluded
    assert s["knn_top1_init"] == evals[0]["eval/knn_top1"] and s["knn_top1_final"] == evals[-1]["eval/knn_top1"]
    # the exported encoder loads strictly into timm's VisionTransformer of the same shape
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from mimscale.models.vit import build_vit, timm_kwargs

    timm_model = TimmViT(**timm_kwargs(build_vit("vit_micro", 16, 4)))
    assert not timm_model.load_state_dict(load_file(str(rd / "encoder.safetensors")), strict=True).missing_keys


def test_env_var_launch_like_srun(fmnist_small, tmp_path):
    """Two plain processes with SLURM_* variables only (what `srun` sets), no launcher."""
    import subprocess

    rd, port = tmp_path / "srun", free_port()
    procs = []
    for r in range(2):
        env = {
            "SLURM_PROCID": str(r),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(r),
            "SLURM_STEP_ID": "0",
            "SLURM_NNODES": "1",
            "SLURM_JOB_ID": "4242",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        knn = dict(eval__knn_train=fmnist_small["train"], eval__knn_test=fmnist_small["test"], eval__batch_size=100)
        procs.append(
            subprocess.Popen(
                [PY, "-m", "mimscale.train", "tiny_cpu", *tiny_overrides(fmnist_small, rd, **knn)],
                env={**clean_env(), **env},
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert summary(rd)["world_size"] == 2
    # kNN features gathered from both ranks: every bank and query sample exactly once (padding dropped)
    from mimscale.telemetry import read_jsonl

    evals = [r for r in read_jsonl(rd / "metrics.jsonl") if "eval/knn_top1" in r]
    assert [(r["eval/knn_bank"], r["eval/knn_queries"]) for r in evals] == [(2048, 512)] * 2


def test_bf16_with_clipping_tracks_fp32(runs):
    """bf16 forward/backward (fp32 loss and master weights) with gradient clipping stays near fp32."""
    got, ref = losses(runs["torchrun_z2_bf16_clip"][0]), losses(runs["accelerate_z2"][0])
    assert got[0] == pytest.approx(ref[0], rel=2e-2)  # same init, same batch: bf16 rounding only
    assert got != pytest.approx(ref, rel=1e-6)  # it really ran in bf16 / clipped
    assert all(abs(g - r) < 0.1 * r for g, r in zip(got, ref))
    from mimscale.telemetry import read_jsonl

    # clipping happened: every step's gradient norm (DeepSpeed's, before clipping) is above optim.clip_grad=0.05
    rows = read_jsonl(runs["torchrun_z2_bf16_clip"][0] / "metrics.jsonl")
    norms = [r["train/grad_norm"] for r in rows if "train/grad_norm" in r]
    assert len(norms) == 4 and min(norms) > 0.05 * 4, norms  # measured 1.4 .. 2.9


def test_corrupt_data_counters_are_logged(runs):
    from mimscale.telemetry import read_jsonl

    rows = [r for r in read_jsonl(runs["torchrun_z0"][0] / "metrics.jsonl") if "train/loss" in r]
    assert all(r["data/skipped_samples"] == 0 and r["data/bad_shards"] == 0 for r in rows)


def test_frozen_teacher_under_zero3_is_whole_and_not_checkpointed(fmnist_small, tmp_path, knobs_no_persistence):
    """DTM's frozen CLIP teacher (random tiny tower) at ZeRO-3 on 2 ranks: training runs, the teacher stays
    outside DeepSpeed (whole on each rank) and outside the checkpoint, and the run resumes."""
    import torch

    rd = tmp_path / "dtm_z3"
    kv = [
        a
        for a in tiny_overrides(
            fmnist_small, rd, train__zero_stage=3, train__ds_config=str(knobs_no_persistence), train__max_steps=2
        )
        if not a.startswith("objective.")
    ]
    obj = "objective={name: dtm, teacher: 'random:mimscale-tiny-clip', head_dim: 64}"
    torchrun = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "mimscale.train"]
    run([*torchrun, "tiny_cpu", *kv, obj])
    assert summary(rd)["steps"] == 2
    files = sorted((rd / "checkpoints" / "step_00000002").glob("*model_states.pt"))
    assert len(files) == 2  # ZeRO-3: one model-states file per rank
    for f in files:
        states = torch.load(f, weights_only=False)  # written by this test's own run
        assert states["module"] and not [k for k in states["module"] if k.startswith("teacher.")]
    kv = [a.replace("train.max_steps=2", "train.max_steps=3") for a in kv]
    torchrun[4] = str(free_port())
    p = run([*torchrun, "tiny_cpu", *kv, obj])
    assert "resumed from checkpoint step=2" in p.stdout + p.stderr
    assert summary(rd)["steps"] == 3


def test_mapet_two_stream_attention_is_identical_at_zero0_zero2_and_zero3(fmnist_small, tmp_path, knobs_no_persistence):
    """MaPeT reaches into the encoder's blocks (``Attention.forward_qkv``, learned ``pos_embed``) outside their
    own forward calls and uses each block's qkv weights twice per step (content and query streams): ZeRO-3 must
    still gather those weights, and ZeRO-2/3 gradient hooks must fire for both uses also under activation
    checkpointing (DeepSpeed has had bugs there, deepspeed#988). ZeRO-2 and ZeRO-3 with checkpointing give
    ZeRO-0's (no checkpointing) per-step losses and final encoder weights."""
    import torch
    from safetensors.torch import load_file

    from mimscale.models.vit import build_vit

    got, enc = {}, {}
    for stage in (0, 2, 3):
        rd = tmp_path / f"z{stage}"
        kv = [
            a
            for a in tiny_overrides(
                fmnist_small,
                rd,
                train__zero_stage=stage,
                train__max_steps=3,
                model__pos_embed="learned",
                model__grad_checkpointing=stage > 0,
            )
            if not a.startswith("objective.")
        ]
        if stage == 3:
            kv.append(f"train.ds_config={knobs_no_persistence}")
        run(
            [
                "torchrun",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(free_port()),
                "-m",
                "mimscale.train",
                "tiny_cpu",
                *kv,
                "objective={name: mapet, target_source: pixel_mean, vocab_size: 64}",
            ]
        )
        got[stage] = losses(rd)
        enc[stage] = load_file(str(rd / "encoder.safetensors"))
    assert len(got[0]) == 3
    torch.manual_seed(0)  # train.seed: the weights every run started from
    start = build_vit("vit_micro", 16, 4, pos_embed="learned").state_dict()
    assert start.keys() == enc[0].keys()
    qkv = [k for k in start if k.endswith("attn.qkv.weight")]
    assert qkv and all(not torch.equal(enc[0][k], start[k]) for k in qkv)  # the shared weights trained
    for stage in (2, 3):
        assert got[stage] == pytest.approx(got[0], rel=1e-5), stage
        assert enc[stage].keys() == enc[0].keys()
        for k in enc[0]:  # every weight moved the same way, the shared qkv included
            a, b = enc[stage][k], enc[0][k]
            if k.endswith("attn.qkv.bias"):  # the key bias has a true gradient of 0 (softmax ignores a per-row
                d = a.numel() // 3  # constant): Adam turns its rounding noise into ~lr steps; only
                assert torch.allclose(a[d : 2 * d], b[d : 2 * d], atol=1e-5)  # the noise differs across stages
                a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (stage, k, (a - b).abs().max())
