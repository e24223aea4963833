"""slurm/pretrain.sh and slurm/pretrain_launcher.sh, unchanged, on a real local SLURM (2 CPU "nodes").

Each job overrides only the allocation shape on the sbatch command line (no GPUs, 1 rank per node, 1 CPU
per rank) and trains a micro ViT on real Fashion-MNIST shards with ZeRO-3 across the two nodes.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from launch_utils import REPO, clean_env, tiny_overrides

pytestmark = pytest.mark.slow
CPU_NODES = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=30"]  # > the 600 s warning


@pytest.fixture(scope="module")
def zero3_knobs(tmp_path_factory) -> Path:
    """ZeRO-3 knobs that partition even the micro ViT's tensors across the two nodes."""
    p = tmp_path_factory.mktemp("ds") / "zero3_all.json"
    p.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
        )
    )
    return p


def submit(slurm, script: str, args: list[str], cwd: Path, *opts: str) -> int:
    return slurm.sbatch([*CPU_NODES, *opts, str(REPO / "slurm" / script), *args], env=clean_env(), cwd=cwd)


def job_log(slurm, job_id: int) -> str:
    return Path(slurm.job(job_id)["StdOut"]).read_text()


def zero3_args(fmnist_small, run_dir: Path, knobs: Path, **kw) -> list[str]:
    return ["tiny_cpu", *tiny_overrides(fmnist_small, run_dir, train__zero_stage=3, train__ds_config=str(knobs), **kw)]


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("script", ["pretrain.sh"])  # pretrain_launcher.sh: its USR1 test checks the same
def test_two_node_zero3_job_trains(slurm, fmnist_small, zero3_knobs, tmp_path, script):
    run_dir = tmp_path / "run"
    t0 = time.time()
    jid = submit(slurm, script, zero3_args(fmnist_small, run_dir, zero3_knobs), tmp_path)
    info = slurm.wait_state(jid, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
    log = job_log(slurm, jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["NodeList"] == "msn[1-2]" and info["NumNodes"] == "2"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["params_per_rank"][0] < summary["params_total"]  # ZeRO-3 partitioned the model
    assert steps_logged(run_dir) == [1, 2, 3, 4]
    assert "config OK: mae vit_micro, world size 2" in log
    assert re.search(r"rendezvous msn1:\d+", log)
    print(f"{script}: 2-node ZeRO-3 job {jid} done in {time.time() - t0:.1f} s")


@pytest.mark.parametrize("script", ["pretrain.sh", "pretrain_launcher.sh"])
def test_usr1_saves_requeues_and_resumes(slurm, fmnist_small, zero3_knobs, tmp_path, script):
    """The warning signal to the batch shell -> save -> exit 42 -> requeue -> the same job resumes. Also what
    test_two_node_zero3_job_trains checks for pretrain.sh: two nodes, ZeRO-3 partitioned, the config line."""
    run_dir, total = tmp_path / "run", 40
    args = zero3_args(
        fmnist_small,
        run_dir,
        zero3_knobs,
        train__max_steps=total,
        train__save_every=0,
        train__save_every_minutes="null",
    )
    t0 = time.time()
    jid = submit(slurm, script, args, tmp_path)
    deadline = time.time() + 180
    while max(steps_logged(run_dir), default=0) < 2:  # mid-run: a few steps done
        assert time.time() < deadline and slurm.job(jid)["JobState"] in ("PENDING", "RUNNING"), job_log(slurm, jid)
        time.sleep(0.2)
    slurm.cmd(["scancel", "--signal=USR1", "--batch", str(jid)])  # what --signal=B:USR1@... does
    # The requeued job waits until its old credential expires (cred_expire=10 s in the test cluster; 120 s by
    # default). Forcing an earlier start gets it killed ("Job credential revoked"), so just wait.
    deadline = time.time() + 120
    while True:
        info = slurm.job(jid)
        if info.get("Restarts") == "1" and info["JobState"] != "PENDING":
            break
        assert time.time() < deadline and info["JobState"] in ("RUNNING", "COMPLETING", "PENDING"), (
            info,
            job_log(slurm, jid)[-4000:],
        )
        time.sleep(0.5)
    info = slurm.wait_state(jid, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=180)
    log = job_log(slurm, jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-4000:]
    assert "USR1 (time limit near)" in log and "exit 42): requeueing job" in log
    saved = [int(n) for n in re.findall(r"saved checkpoint step=(\d+)", log)]
    resumed = [int(n) for n in re.findall(r"resumed from checkpoint step=(\d+)", log)]
    assert len(resumed) == 1 and 0 < resumed[0] < total, log[-4000:]
    assert resumed[0] == saved[0]  # the save on USR1 is what resumed
    assert f"job {jid} (restart 1)" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == total and summary["world_size"] == 2
    assert info["NodeList"] == "msn[1-2]" and info["NumNodes"] == "2"
    assert summary["params_per_rank"][0] < summary["params_total"]  # ZeRO-3 partitioned the model
    assert "config OK: mae vit_micro, world size 2" in log and re.search(r"rendezvous msn1:\d+", log)
    steps = steps_logged(run_dir)
    assert steps[-1] == total and sorted(set(steps)) == list(range(1, total + 1))  # no gap across the restart
    print(
        f"{script}: USR1 at step >= 2, saved/resumed at step {resumed[0]}, finished {total} steps; {time.time() - t0:.1f} s"
    )


@pytest.mark.parametrize(
    "bad, reason",
    [
        (["tiny_cpu", "train.no_such_key=1"], "unknown config key 'train.no_such_key'"),
        (["no_such_recipe"], "no recipe named 'no_such_recipe'"),
    ],
)
def test_bad_argument_fails_fast_with_a_clear_line(slurm, fmnist_small, tmp_path, bad, reason):
    recipe, *extra = bad
    args = [recipe, *tiny_overrides(fmnist_small, tmp_path / "run"), *extra]
    t0 = time.time()
    jid = submit(slurm, "pretrain.sh", args, tmp_path)
    info = slurm.wait_state(jid, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=60)
    took = time.time() - t0
    log = job_log(slurm, jid)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert f"mimscale: error: {reason}" in log
    assert "FAILED: the run's arguments do not check out" in log
    assert not re.search(r"^\d+: ", log, re.M)  # no rank started (fast by construction; wait_state bounds it)
    print(f"bad argument -> FAILED in {took:.1f} s")


def _rank_pids(job_id: int, rank: int) -> list[int]:
    """PIDs of the processes of ``rank`` of job ``job_id`` (the rank and its data-loader workers), found by their
    environment; slurmd and slurmstepd do not carry SLURM_PROCID."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(
                kv.split("=", 1)
                for kv in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in kv
            )
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == str(job_id) and env.get("SLURM_PROCID") == str(rank) and "mimscale.train" in cmd:
            pids.append(int(proc.name))
    return pids


def test_a_rank_killed_on_one_node_requeues_and_resumes_the_same_curve(slurm, fmnist_small, zero3_knobs, tmp_path):
    """Node loss: the rank on the second node of a 2-node ZeRO-3 job is SIGKILLed (no polite signal) between two
    checkpoints. The job ends, requeues itself, resumes from the last checkpoint and redoes the steps after it;
    every step's loss then equals an uninterrupted run's (torchrun, same 2 ranks, fp32)."""
    import os
    import signal
    import sys

    from launch_utils import free_port, run

    from mimscale import checkpoint as ckpt
    from mimscale.telemetry.logger import read_jsonl

    total, every = 12, 4
    kw = {
        "train__max_steps": total,
        "train__save_every": every,
        "train__save_every_minutes": "null",
        "train__precision": "fp32",
        "model__drop_path": 0.1,
    }
    ref = tmp_path / "ref"
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "-m",
            "mimscale.train",
            *zero3_args(fmnist_small, ref, zero3_knobs, **kw),
        ],
        timeout=400,
    )
    run_dir = tmp_path / "run"
    t0 = time.time()
    jid = submit(slurm, "pretrain.sh", zero3_args(fmnist_small, run_dir, zero3_knobs, **kw), tmp_path)
    deadline = time.time() + 240
    while max(steps_logged(run_dir), default=0) < every + 1:  # past the first save, before the next
        assert time.time() < deadline and slurm.job(jid)["JobState"] in ("PENDING", "RUNNING"), job_log(slurm, jid)
        time.sleep(0.05)
    victims = _rank_pids(jid, 1)
    assert victims, "rank 1's processes not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = max(steps_logged(run_dir))
    last = ckpt.find(run_dir, {"objective": "mae"}).meta["step"]  # what a resume can start from
    deadline = time.time() + 240
    while True:
        info = slurm.job(jid)
        if info.get("Restarts") == "1" and info["JobState"] != "PENDING":
            break
        assert time.time() < deadline and info["JobState"] in ("RUNNING", "COMPLETING", "PENDING"), (
            info,
            job_log(slurm, jid)[-4000:],
        )
        time.sleep(0.5)
    info = slurm.wait_state(jid, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
    log = job_log(slurm, jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-4000:]
    assert re.search(r"a rank was killed \(exit 137 = signal 9\): requeueing job", log), log[-4000:]
    resumed = [int(n) for n in re.findall(r"resumed from checkpoint step=(\d+)", log)]
    assert resumed == [last] and last < killed_at, (resumed, last, killed_at)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    redone = [r["step"] for r in rows if last < r["step"] <= killed_at]
    assert sorted(set(redone)) == list(range(last + 1, killed_at + 1)) and len(redone) > len(set(redone))
    got = {
        r["step"]: r["train/loss"]
        for r in read_jsonl(run_dir / "metrics.jsonl", drop_rewound=True)
        if "train/loss" in r
    }
    want = {r["step"]: r["train/loss"] for r in read_jsonl(ref / "metrics.jsonl") if "train/loss" in r}
    assert sorted(got) == list(range(1, total + 1)) and got == want
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == total
    assert not list(tmp_path.glob(".mimscale-job-*"))  # the crash counter is cleaned up
    print(
        f"rank 1 SIGKILLed at step {killed_at}; requeued, resumed from {last}, same {total}-step curve; "
        f"{time.time() - t0:.1f} s"
    )
