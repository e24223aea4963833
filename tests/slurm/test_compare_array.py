"""slurm/compare.sh, unchanged, on a real local SLURM: `mimscale compare --slurm` submits one array task per
member (CPU nodes, 1 rank each), each task runs its member under srun; `mimscale report` reads the result.

The comparison is MAE vs EMAE on a micro ViT (16 px, patch 4) on real Fashion-MNIST shards: a budget of 18
training seconds (one task is signalled mid-run), kNN on 256-image banks once during training, a tiny linear
probe. One array job carries both proofs (every member runs and is reported; USR1 requeues one task).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from launch_utils import REPO, clean_env, tiny_overrides

pytestmark = pytest.mark.slow
CPU_NODES = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=30"]  # > the 600 s warning
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def write_spec(path: Path, data: dict[str, Path], minutes: float, linear: dict | None) -> Path:
    """A compare spec over tiny_cpu that makes every member a seconds-long run on ``fmnist_small``."""
    extra = dict(
        train__micro_batch_size=16,
        eval__knn_train=data["train"],
        eval__knn_test=data["test"],
        eval__knn_train_samples=256,
        eval__knn_test_samples=256,
        eval__batch_size=128,
        eval__num_workers=0,
    )
    own = ("train.run_dir=", "train.max_steps=", "log.wandb=")  # compare sets the run dir, budget and logging
    overrides = [o for o in tiny_overrides(data, path.parent, **extra) if not o.startswith(own)]
    spec = {
        "recipe": "tiny_cpu",
        "overrides": overrides,
        "budget": {"minutes": minutes},  # (MAE-equivalent epochs count MAE's default 8-block decoder)
        "knn_evals": 1,
        "linear": linear,
        "members": {"mae": {}, "emae": {}},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def compare_slurm(slurm, spec: Path, out: Path, cwd: Path, *extra: str) -> str:
    """``mimscale compare SPEC --out DIR --slurm --sbatch=...`` as a user types it; returns the array job id."""
    cmd = [sys.executable, "-m", "mimscale.cli", "compare", str(spec), "--out", str(out), *extra, "--slurm"]
    cmd += [f"--sbatch={o}" for o in CPU_NODES]
    env = {**clean_env(), "SLURM_CONF": str(slurm.conf), "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "sbatch --parsable --array=" in p.stdout and str(REPO / "slurm" / "compare.sh") in p.stdout
    return p.stdout.strip().splitlines()[-1]


def task_log(slurm, task: str) -> str:
    return Path(slurm.job(task)["StdOut"]).read_text()


def wait_done(slurm, task: str, timeout: float) -> dict[str, str]:
    info = slurm.wait_state(task, ENDED, timeout=timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", task_log(slurm, task)[-5000:]
    return info


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "train/loss" in r]


def test_compare_array_runs_every_member_requeues_one_on_usr1_and_reports(slurm, fmnist_small, tmp_path):
    """One array (both members, named with --member: array indices 0,1), one launch for both proofs:
    * every member runs as its own array task under srun and `mimscale report` reads the league;
    * the warning signal to task 1's batch shell -> its member saves -> `mimscale compare` exits 42 ->
      compare.sh requeues that task only -> it resumes from the checkpoint, with no step lost or repeated,
      while task 0 runs through once."""
    linear = {"pool": "mean", "optimizer": "sgd", "epochs": 2, "batch_size": 128, "warmup_epochs": 0}
    linear |= {"train_samples": 256, "test_samples": 256, "feature_batch_size": 128, "num_workers": 0}
    spec, out = write_spec(tmp_path / "spec.yaml", fmnist_small, 0.3, linear), tmp_path / "league"
    t0 = time.time()
    job = compare_slurm(slurm, spec, out, tmp_path, "--member", "emae", "--member", "mae")
    plan = json.loads((out / "compare.json").read_text())
    assert [m["name"] for m in plan["members"]] == ["mae", "emae"]
    task, run_dir = f"{job}_1", out / "members" / "emae" / "run"
    deadline = time.time() + 300
    while max(train_steps(run_dir), default=0) < 2:  # mid-training: past calibration, a few steps done
        assert time.time() < deadline and slurm.job(task)["JobState"] in ("PENDING", "RUNNING"), task_log(slurm, task)
        time.sleep(0.2)
    slurm.cmd(["scancel", "--signal=USR1", "--batch", task])  # what --signal=B:USR1@... does
    # The requeued task waits until its old credential expires (cred_expire=10 s in the test cluster).
    deadline = time.time() + 120
    while True:
        info = slurm.job(task)
        if info.get("Restarts") == "1" and info["JobState"] != "PENDING":
            break
        assert time.time() < deadline and info["JobState"] in ("RUNNING", "COMPLETING", "PENDING"), (
            info,
            task_log(slurm, task)[-4000:],
        )
        time.sleep(0.5)
    infos = [wait_done(slurm, f"{job}_{i}", timeout=400) for i in range(2)]
    for i, (name, info) in enumerate(zip(("mae", "emae"), infos)):
        assert info["ArrayJobId"] == job and info["ArrayTaskId"] == str(i) and info["Restarts"] == str(i)
        log = task_log(slurm, f"{job}_{i}")
        assert Path(info["StdOut"]).name == f"mimscale-compare-{job}_{i}.out"
        assert f"task {job}_{i} " in log and f"member #{i} of {out}" in log and "rendezvous msn" in log
        result = json.loads((out / "members" / name / "result.json").read_text())
        assert result["name"] == name and result["status"] == "done"
        assert result["summary"]["steps"] > 0 and result["summary"]["knn_top1_final"] is not None
        assert result["linear_top1"] is not None
        member_log = (out / "members" / name / "log.txt").read_text()
        assert re.search(r"^0: ", member_log, re.M)  # the steps ran under srun (--label)
    # task 1: saved on USR1, requeued once, resumed from that checkpoint, no gap
    log, member_log = task_log(slurm, task), (out / "members" / "emae" / "log.txt").read_text()
    assert "USR1 (time limit near)" in log and f"the member saved (exit 42): requeueing task {task}" in log
    assert f"task {task} (job {infos[1]['JobId']}, restart 1)" in log and "- resuming" in log
    saved = [int(n) for n in re.findall(r"saved checkpoint step=(\d+)", member_log)]
    resumed = [int(n) for n in re.findall(r"resumed from checkpoint step=(\d+)", member_log)]
    assert len(resumed) == 1 and resumed[0] in saved, member_log[-4000:]
    result, steps = json.loads((out / "members" / "emae" / "result.json").read_text()), train_steps(run_dir)
    assert result["summary"]["steps"] == steps[-1] > resumed[0]
    assert sorted(set(steps)) == list(range(1, steps[-1] + 1))  # no gap across the restart
    # the requeued EMAE run ends with its decoder beside the encoder (a real EMAE run's decoder save): it
    # exports to a transformers ViTMAEForPreTraining that misses no weight
    pytest.importorskip("transformers")
    from mimscale.cli import main as cli_main

    assert cli_main(["export", str(run_dir), "--out", str(tmp_path / "hf"), "--format", "hf-mae"]) == 0
    from transformers import ViTMAEForPreTraining

    _, loading = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(loading.values()), loading
    p = subprocess.run(
        [sys.executable, "-m", "mimscale.cli", "report", str(out)],
        capture_output=True,
        text=True,
        env={**clean_env(), "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    league = json.loads((out / "report.json").read_text())["league"]
    assert sorted(m["name"] for m in league["members"]) == ["emae", "mae"]
    assert all(m["status"] == "done" for m in league["members"])
    print(
        f"compare array {job}: both tasks COMPLETED, task 1 saved/resumed at step {resumed[0]}; {time.time() - t0:.1f} s"
    )
