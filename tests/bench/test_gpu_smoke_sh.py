"""benchmarks/gpu_smoke.sh --cpu-smoke: the GPU smoke script end to end on the CPU (micro ViT, 32 px).

MAE only (the suite's budget; the other objectives' recipes run through the same code path and are trained on
the CPU by the objective and compare tests): ZeRO-1 with device decode and a kNN evaluation at the end,
ZeRO-3, then SIGUSR1 -> save -> exit 42 -> the same command resumes with bitwise-equal losses. The refusal
without CUDA and the old-driver line are in test_gpu_sh.py (parametrised over both scripts)."""

from __future__ import annotations

import json

import pytest
from launch_utils import REPO, run

SCRIPT = str(REPO / "benchmarks" / "gpu_smoke.sh")


def test_unknown_argument_is_one_line_exit_2():
    p = run(["bash", SCRIPT, "--fast"], check=False, timeout=30)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--fast" in p.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_the_script_end_to_end(tmp_path):
    p = run(
        ["bash", SCRIPT, "--cpu-smoke"],
        env={"GPU_SMOKE_OUT": str(tmp_path), "GPU_SMOKE_OBJECTIVES": "mae"},
        timeout=900,
    )
    (path,) = tmp_path.glob("gpu_smoke-*.json")
    doc = json.loads(path.read_text())
    assert doc["mode"] == "cpu-smoke" and doc["machine"]["host"] and "torch" in doc["machine"]
    assert doc["ok"] is True, json.dumps(doc, indent=1)[-3000:]
    z1, z3 = doc["runs"]["mae_zero1"], doc["runs"]["mae_zero3"]
    assert z1["rc"] == z3["rc"] == 0
    assert z1["logged_steps"] == [1, 2, 3, 4] and z3["logged_steps"] == [1, 2]  # >= two logging intervals
    assert z1["decode"] == z3["decode"] == "device"  # the device JPEG decode path, run on the CPU
    res = doc["checks"]["resume"]
    assert res["signalled_rc"] == 42 and res["resumed_rc"] == 0 and res["signalled_at"] >= 1
    assert res["steps_compared"] == [1, 2, 3, 4] and res["max_rel_loss_diff"] == 0.0  # bitwise on the CPU
    knn = doc["checks"]["knn"]
    assert knn["ok"] and 0 <= knn["reference"] <= 100 and knn["resumed"] == knn["reference"]
    assert "PASS" in p.stdout and "resume: signalled rc 42" in p.stdout
