"""benchmarks/gpu.sh: refuses in one line without CUDA; --cpu-smoke runs the whole script end to end."""

from __future__ import annotations

import json

import pytest
import torch
from launch_utils import REPO, run

SCRIPT = str(REPO / "benchmarks" / "gpu.sh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_refuses_without_cuda_in_one_line():
    p = run(["bash", SCRIPT], check=False, timeout=120)
    assert p.returncode == 3
    assert p.stdout == ""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-smoke" in lines[0]


FAKE_SMI = """#!/bin/sh
if [ "$1" = "-L" ]; then echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"; exit 0; fi
echo "| NVIDIA-SMI 535.54.03    Driver Version: 535.54.03    CUDA Version: 12.2 |"
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
@pytest.mark.parametrize("script", ["gpu.sh", "gpu_smoke.sh"])
def test_a_driver_too_old_for_torch_is_named_not_no_cuda_device(tmp_path, script):
    """nvidia-smi lists a GPU but torch cannot use it (an old driver says CUDA 12.2, torch is built for 13.0):
    one line naming both versions and the fix, not "no CUDA device"."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    import os

    p = run(
        ["bash", str(REPO / "benchmarks" / script)],
        env={"PATH": f"{tmp_path}:{os.environ['PATH']}"},
        check=False,
        timeout=120,
    )
    assert p.returncode == 3 and p.stdout == ""
    (line,) = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"{script}: error: nvidia-smi lists 1 GPU(s) (driver 535.54.03, CUDA 12.2)")
    if torch.version.cuda and tuple(map(int, torch.version.cuda.split(".")[:2])) > (12, 2):
        assert "driver is too old" in line and f"CUDA >= {torch.version.cuda}" in line
    assert "no CUDA device" not in line


def test_unknown_argument_is_one_line_exit_2():
    p = run(["bash", SCRIPT, "--fast"], check=False, timeout=30)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--fast" in p.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_the_script_end_to_end(tmp_path):
    """The GPU recipe (mae_vit_l16) through the same flags with a micro encoder: ZeRO-3 + checkpointing,
    bf16, --plan-gpu comparison, sweep file, summary with the target line."""
    p = run(["bash", SCRIPT, "--cpu-smoke"], env={"GPU_SH_OUT": str(tmp_path)}, timeout=400)
    files = sorted(tmp_path.glob("throughput-*-mae_vit_l16.json"))
    assert len(files) == 1 and files[0].with_suffix(".svg").exists()
    doc = json.loads(files[0].read_text())
    (row,) = doc["results"]
    assert (row["objective"], row["arch"], row["zero"], row["ckpt"], row["precision"]) == (
        "mae",
        "vit_micro",
        3,
        1,
        "bf16",
    )
    assert row["img_per_s"] > 0 and row["mfu"] > 0 and row["mem_peak_gb"] > 0
    assert row["plan"]["gpu"] == "a100-80gb" and row["plan"]["fits"] is True
    out = p.stdout
    # part 2: the real train path (mimscale pretrain on generated JPEG shards) vs bench on the same shards
    (loop_file,) = tmp_path.glob("gpu_loop-*.json")
    loop = json.loads(loop_file.read_text())
    (r,) = loop["rounds"]
    assert r["loop"]["img_per_s"] > 0 and r["bench"]["img_per_s"] > 0 and loop["ratio_loop_over_bench"] > 0
    assert r["loop"]["mem_peak_gb"] > 0 and r["loop"]["mfu"] > 0
    assert "the real train path" in out and "loop / bench" in out
    assert "== summary" in out and "plan GB" in out
    assert "target: >= 45% MFU for MAE vit_large" in out and "not evaluated" in out
