"""`mimscale bench throughput`: argument checks (one line, exit 2), the config it builds, counted FLOPs on
meta, synthetic batches, sweep output; and one real measured configuration through the CLI (slow)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from launch_utils import run

from mimscale import cli
from mimscale.bench import throughput as T

TINY = (
    "--recipe",
    "tiny_cpu",
    "--img",
    "16",
    "--patch",
    "4",
    "--set",
    "objective.decoder_dim=32",
    "--set",
    "objective.decoder_depth=1",
    "--set",
    "objective.decoder_heads=2",
)


def _main(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "bad",
    [
        ["--zero", "5"],
        ["--zero", "x"],
        ["--ckpt", "2"],
        ["--micro-batch", "0"],
        ["--steps", "0"],
        ["--warmup", "-1"],
        ["--world-size", "0"],
        ["--precision", "fp8"],
        ["--arch", "vit_gigantic"],
        ["--recipe", "no_such_recipe"],
        ["--plan-gpu", "v100"],
        ["--set", "train.zero_stage"],
        ["--bogus"],
        ["--repeats", "0"],
        ["--objective", "no_such_objective"],
        *([["--plan-gpu", "auto"]] if not torch.cuda.is_available() else []),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(bad, capsys):
    watched = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "NCCL_DEBUG")
    env_before = {k: os.environ.get(k) for k in watched}
    code, out, err = _main(["bench", "throughput", *bad], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (bad, out, err)
    assert len(lines) == 1 and "error" in lines[0], (bad, err)
    assert out == ""
    assert {k: os.environ.get(k) for k in watched} == env_before  # nothing was launched or exported


def test_config_takes_recipe_then_configuration_then_overrides():
    tc = T.ThroughputConfig(
        zero=3,
        ckpt=True,
        micro_batch=8,
        world_size=2,
        arch="vit_tiny",
        precision="bf16",
        overrides=("objective.decoder_depth=3",),
    )
    cfg = T.build_config(tc, tc.world_size)
    assert (cfg.model.arch, cfg.model.img_size, cfg.model.patch_size) == ("vit_tiny", 32, 4)  # recipe's img/patch
    assert cfg.train.zero_stage == 3 and cfg.model.grad_checkpointing is True
    assert (cfg.train.micro_batch_size, cfg.train.batch_size, cfg.train.precision) == (8, 16, "bf16")
    assert cfg.objective["decoder_dim"] == 64 and cfg.objective["decoder_depth"] == 3  # recipe knob, then --set
    assert cfg.eval.knn_train is None and cfg.data.train == "synthetic"
    # another objective starts from its own default knobs, not the recipe's MAE ones
    other = T.build_config(T.ThroughputConfig(objective="emae"), 1)
    assert other.objective == {"name": "emae"}


def test_cli_args_reproduce_the_configuration():
    """The subprocess / torchrun path re-parses ``cli_args()``: it must give back the same configuration."""
    tc = T.ThroughputConfig(
        recipe="tiny_cpu",
        objective="mae",
        arch="vit_micro",
        img=16,
        patch=4,
        zero=2,
        ckpt=True,
        micro_batch=6,
        precision="fp32",
        steps=4,
        warmup=1,
        world_size=2,
        data="synthetic",
        seed=3,
        plan_gpu="h100-80gb",
        overrides=("optim.blr=1e-3",),
    )
    args = cli._parser().parse_args(["bench", "throughput", *tc.cli_args()])
    back = T.ThroughputConfig(
        recipe=args.recipe,
        objective=args.objective,
        arch=args.arch,
        img=args.img,
        patch=args.patch,
        zero=args.zero[0],
        ckpt=bool(args.ckpt[0]),
        micro_batch=args.micro_batch[0],
        precision=args.precision,
        steps=args.steps,
        warmup=args.warmup,
        world_size=args.world_size,
        data=args.data,
        seed=args.seed,
        plan_gpu=args.plan_gpu,
        overrides=tuple(args.overrides),
    )
    assert back == tc
    cmd = T._child_cmd(tc)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node" in cmd
    assert T._child_cmd(T.ThroughputConfig())[:3] == [sys.executable, "-m", "mimscale.cli"]


def test_synthetic_batches_and_meta_flop_count_match_a_real_count():
    from mimscale.telemetry.mfu import count_train_flops

    cfg = T.build_config(T.ThroughputConfig(micro_batch=3, overrides=("model.img_size=16",)), 1)
    torch.manual_seed(0)
    obj = T.build_objective_for(cfg)
    batches = T.synthetic_batches(obj, cfg, 2, seed=1)
    b = batches[0]
    assert b["image"].shape == (3, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (3, 16) and int(b["mask"][0].sum()) == 12  # 75 % of 16 patches hidden
    assert not torch.equal(batches[0]["image"], batches[1]["image"])
    assert abs(float(b["image"].mean())) < 1.0  # normalised, not raw 0-255
    per_sample = T.counted_flops_per_sample(cfg, b)
    assert per_sample == pytest.approx(count_train_flops(obj, b) / 3, rel=1e-12)  # meta copy = real model
    assert per_sample == pytest.approx(obj.flops_per_sample(), rel=0.05)


def test_gpu_plan_key_and_plan_projection():
    assert T.gpu_plan_key("NVIDIA A100-SXM4-40GB", 39.4) == "a100-40gb"
    assert T.gpu_plan_key("NVIDIA A100-SXM4-80GB", 79.2) == "a100-80gb"
    assert T.gpu_plan_key("NVIDIA H100 80GB HBM3", 79.1) == "h100-80gb"
    assert T.gpu_plan_key("NVIDIA H100 PCIe", 79.1) == "h100-pcie"
    assert T.gpu_plan_key("NVIDIA H200", 140.0) == "h200"
    # a GPU the planner does not know: no projection (a warning), never an abort of gpu.sh
    for name in ("Tesla V100-SXM2-32GB", "NVIDIA L40S", "NVIDIA GH200 480GB", "NVIDIA H100 NVL"):
        assert T.gpu_plan_key(name, 90.0) is None
    cfg = T.build_config(T.ThroughputConfig(recipe="mae_vit_h14", zero=0, micro_batch=512), 1)
    p = T.plan_projection(cfg, 1, "a100-40gb")
    assert p["fits"] is False and p["precision"] == "bf16"  # MAE ViT-H, ZeRO-0, mb 512 on 40 GB
    assert 64 < p["max_micro_batch"] < 512
    p3 = T.plan_projection(
        T.build_config(T.ThroughputConfig(recipe="mae_vit_h14", zero=3, ckpt=True, micro_batch=16), 1), 1, "a100-80gb"
    )
    assert p3["fits"] is True and p3["mem_gb"] < p["mem_gb"]


def _row(zero, ckpt, mb, img_s, **kw):
    return {
        "objective": "mae",
        "arch": "vit_micro",
        "zero": zero,
        "ckpt": ckpt,
        "micro_batch": mb,
        "world_size": 1,
        "device": "cpu",
        "precision": "fp32",
        "img_per_s": img_s,
        "step_time_s": mb / img_s,
        "mfu": 0.1,
        "mem_peak_gb": 0.9,
        **kw,
    }


def test_sweep_ratios_table_and_plot(tmp_path):
    rows = [_row(0, 0, 8, 100.0), _row(3, 0, 8, 80.0), _row(3, 1, 8, 60.0), _row(1, 0, 16, 50.0)]
    rel = T.ratios(rows)
    assert [r["img_per_s_vs_zero0"] for r in rel] == [1.0, 0.8, 0.6, None]  # mb 16 has no ZeRO-0 baseline
    assert [r["img_per_cpu_s_vs_zero0"] for r in rel] == [None] * 4  # not measured in these rows
    cpu = [dict(rows[0], img_per_cpu_s=120.0), dict(rows[1], img_per_cpu_s=90.0)]
    assert [r["img_per_cpu_s_vs_zero0"] for r in T.ratios(cpu)] == [1.0, 0.75]
    assert [r["img_per_s_vs_zero0"] for r in T.ratios([*cpu, dict(rows[1], arch="vit_tiny")])] == [1.0, 0.8, None]
    table = T.format_table(rows)
    assert len(table.splitlines()) == 5 and "0.800" in table
    path, svg = T.write_sweep(rows, tmp_path, {"zero": [0, 1, 3]}, 1)
    doc = json.loads(path.read_text())
    assert path.name.startswith("throughput-") and doc["benchmark"] == "throughput" and doc["results"] == rows
    text = svg.read_text()
    assert text.startswith('<svg xmlns="http://www.w3.org/2000/svg"') and "<style>" in text
    assert text.count('class="curve"') == 3  # mb 8, mb 8 + ckpt, mb 16
    import xml.dom.minidom

    xml.dom.minidom.parseString(text)  # well-formed standalone SVG
    assert ">img/s</text>" in text
    on_cpu = T.sweep_svg([dict(r, img_per_cpu_s=2 * r["img_per_s"]) for r in rows])
    assert ">img per CPU-second</text>" in on_cpu  # load-robust metric on CPUs


@pytest.mark.slow
def test_one_real_configuration_prints_one_json_line():
    """A real DeepSpeed ZeRO-1 engine (1 rank, CPU) with activation checkpointing: stdout is one JSON line."""
    p = run(
        [
            sys.executable,
            "-m",
            "mimscale.cli",
            "bench",
            "throughput",
            *TINY,
            "--zero",
            "1",
            "--ckpt",
            "1",
            "--micro-batch",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
        ],
        timeout=240,
    )
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout
    row = json.loads(lines[0])
    assert (row["zero"], row["ckpt"], row["micro_batch"], row["world_size"]) == (1, 1, 4, 1)
    assert (row["arch"], row["img"], row["patch"], row["device"]) == ("vit_micro", 16, 4, "cpu")
    assert row["img_per_s"] == pytest.approx(4 / row["step_time_s"])
    assert row["step_time_iqr_s"][0] <= row["step_time_s"] <= row["step_time_iqr_s"][1]
    assert row["peak_source"] == "measured GEMM" and row["peak_tflops"] > 0
    assert row["mfu"] == pytest.approx(row["flops_per_sample"] * row["img_per_s"] / (row["peak_tflops"] * 1e12))
    assert 0 < row["mfu"] < 1.5  # a measured CPU peak can be beaten a little by a lucky step
    assert row["flops_per_sample"] == pytest.approx(row["flops_per_sample_analytic"], rel=0.05)
    assert row["mem_peak_gb"] > 0.1 and row["final_loss"] > 0
