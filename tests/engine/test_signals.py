"""Signals end a run cleanly: Ctrl-C (SIGINT) and SIGTERM to the whole process group, with loader workers running,
save at the end of the step and exit 42; the resumed run is bitwise the uninterrupted one; a second Ctrl-C aborts
at once (no save)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from launch_utils import clean_env, run
from test_checkpoint import _cmd, _losses, _records

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
@pytest.mark.allow_slow("4 launched runs: reference, Ctrl-C, SIGTERM, the finishing resume", limit_s=120)
def test_ctrl_c_and_sigterm_to_the_process_group_save_and_resume_bitwise(fmnist_small, tmp_path):
    workers = ["data.num_workers=2", "train.save_every=0"]  # no periodic saves: the signal's save is the only one
    ref = tmp_path / "ref"
    run(_cmd(ref, fmnist_small, *workers))
    rd = tmp_path / "run"
    for sig, at, name in ((signal.SIGINT, 3, "SIGINT"), (signal.SIGTERM, 6, "SIGTERM")):
        code, out = _group_signal(_cmd(rd, fmnist_small, *workers), rd, at, sig)
        assert code == ckpt.EXIT_REQUEUE, out[-3000:]
        assert f"received {name}: saving after this step" in out
        assert "Traceback" not in out and "killed by signal" not in out, out[-3000:]
        saved = ckpt.find(rd, {"objective": "mae"}).meta["step"]
        assert at <= saved < 10, f"{name} came too late to test the save on signal"
    last = run(_cmd(rd, fmnist_small, *workers))
    assert f"resumed from checkpoint step={saved}" in last.stdout + last.stderr
    assert _losses(ref) == _losses(rd) and sorted(_losses(rd)) == list(range(1, 11))
