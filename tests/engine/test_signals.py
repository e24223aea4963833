"""Signals end a run cleanly: Ctrl-C (SIGINT) and SIGTERM to the whole process group, with loader workers running,
and SIGUSR1 to the main process save at the end of the step and exit 42; a kill -9 loses only the steps after the
last save; the resumed run is bitwise the uninterrupted one; a second Ctrl-C aborts at once (no save)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from launch_utils import clean_env, run
from test_checkpoint import _cmd, _losses, _records, _start_and_interrupt

from mimscale import checkpoint as ckpt
from mimscale.engine.signals import Signals


@pytest.mark.unit
def test_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)  # whatever the process had (another test or a library may set one)
    s = Signals()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert s.received == signal.SIGINT  # the first one only asks for a save
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs between bytecodes; this line is never finished)
    finally:
        s.restore()
    assert signal.getsignal(signal.SIGINT) is before  # restored, not left at the abort handler


def _group_signal(cmd: list[str], rd, at_step: int, sig: int) -> tuple[int, str]:
    """Start ``cmd`` in a process group of its own and send ``sig`` to the whole group (main process and loader
    workers, as a terminal's Ctrl-C or a scheduler does) once it has logged a step >= ``at_step``."""
    seen = len(_records(rd))
    p = subprocess.Popen(
        cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if any(r.get("step", 0) >= at_step and "train/loss" in r for r in _records(rd)[seen:]):
            os.killpg(p.pid, sig)
            break
        time.sleep(0.05)
    out = p.communicate(timeout=240)[0]
    return p.returncode, out


@pytest.mark.slow
@pytest.mark.allow_slow("6 launched runs: reference, 4 interrupted ones, the finishing resume", limit_s=120)
def test_signals_and_kill9_mid_run_save_and_resume_bitwise(fmnist_small, tmp_path):
    """One run directory, interrupted four ways and resumed each time, against an uninterrupted reference: Ctrl-C
    (SIGINT) to the process group, kill -9 of the main process (resumes from the last save, the steps after it
    done again), SIGTERM to the process group, SIGUSR1 to the main process (SLURM's warning). Each signal saves at
    the end of its step and exits 42 (no periodic saves: the signal's save is the only one). The per-step losses
    are bitwise the reference's (fp32, drop-path on, 2 loader workers, a kNN evaluation at steps 4 and 8 that must
    not disturb the training RNG streams); keep_last=3 holds at the end."""
    steps = 16  # room for four interruptions on a loaded machine (each lands a step or two after its cue)
    knobs = [
        "data.num_workers=2",
        "train.save_every=0",
        f"train.max_steps={steps}",
        f"eval.knn_train={fmnist_small['train']}",
        f"eval.knn_test={fmnist_small['test']}",
        "eval.knn_every=4",
        "eval.knn_train_samples=256",  # one shard each: the evaluation's cost is not the point, its RNG use is
        "eval.knn_test_samples=256",
        "eval.knn_at_start=false",
        "eval.num_workers=0",
    ]
    ref = tmp_path / "ref"
    run(_cmd(ref, fmnist_small, *knobs))
    rd = tmp_path / "run"
    cmd = _cmd(rd, fmnist_small, *knobs)

    def saved() -> int:
        return ckpt.find(rd, {"objective": "mae"}).meta["step"]

    def group(sig: int, name: str, at: int) -> str:
        code, out = _group_signal(cmd, rd, at, sig)
        assert code == ckpt.EXIT_REQUEUE, out[-3000:]
        assert f"received {name}: saving after this step" in out
        assert "Traceback" not in out and "killed by signal" not in out, out[-3000:]
        assert at <= saved() < steps, f"{name} came too late to test the save on signal"
        return out

    # the first cue is past the step-4 kNN: a signal that lands on an evaluation step saves before that
    # evaluation, and the resumed run starts after it (the summary then lacks it), so no save may precede step 5
    group(signal.SIGINT, "SIGINT", 5)
    s1 = saved()
    p = _start_and_interrupt(cmd, rd, s1 + 2, signal.SIGKILL)  # steps after the save are lost, then redone
    assert p.returncode == -signal.SIGKILL and saved() == s1
    out = group(signal.SIGTERM, "SIGTERM", s1 + 3)
    assert f"resumed from checkpoint step={s1}" in out
    s2 = saved()
    p = _start_and_interrupt(cmd, rd, s2 + 1, signal.SIGUSR1)
    out = p.stdout.read()
    assert p.returncode == ckpt.EXIT_REQUEUE and f"resumed from checkpoint step={s2}" in out, out[-3000:]
    s3 = saved()
    assert s2 < s3 < steps, "SIGUSR1 came too late to test the save on signal"
    last = run(cmd)
    assert f"resumed from checkpoint step={s3}" in last.stdout + last.stderr
    assert _losses(ref) == _losses(rd) and sorted(_losses(rd)) == list(range(1, steps + 1))
    s_ref, s = (json.loads((d / "summary.json").read_text()) for d in (ref, rd))
    assert s["steps"] == s_ref["steps"] == steps
    assert s["knn_top1_step4"] == s_ref["knn_top1_step4"] and s["knn_top1_final"] == s_ref["knn_top1_final"]
    assert s["train_seconds"] > 0 and s["device_hours"] > 0
    names = sorted(p.name for p in (rd / ckpt.CKPT_DIR).iterdir() if p.name.startswith("step_"))
    assert len(names) == 3 and names[-1] == f"step_{steps:08d}"  # keep_last=3 of the four signal saves and the end
