"""Resuming after the user changed something: a different data.num_workers / micro-batch restarts the epoch
with a warning (no crash); a changed decoder shape is refused in one line; resume=never starts afresh.
(SIGTERM, like SIGUSR1 and Ctrl-C, saves and exits 42: tests/engine/test_signals.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launch_utils import run, tiny_overrides

from mimscale import checkpoint as ckpt


def _cmd(rd: Path, data, *extra: str) -> list[str]:
    ov = tiny_overrides(
        data, rd, train__precision="fp32", train__save_every=2, train__save_every_minutes="null", train__max_steps=4
    )
    return [sys.executable, "-m", "mimscale.train", *ov, *extra]


@pytest.mark.slow
def test_resume_after_changes(fmnist_small, tmp_path):
    rd = tmp_path / "r"
    run(_cmd(rd, fmnist_small))
    # a new loader layout (workers, micro-batch): resumes the weights, restarts the data epoch, warns
    p = run(_cmd(rd, fmnist_small, "train.max_steps=6", "data.num_workers=0", "train.micro_batch_size=4"))
    log = p.stdout + p.stderr
    assert "resumed from checkpoint step=4" in log and "the loader restarts epoch 0" in log
    assert json.loads((rd / "summary.json").read_text())["steps"] == 6
    # a changed decoder width: one line, exit 2, nothing deleted
    p = run(_cmd(rd, fmnist_small, "train.max_steps=8", "objective.decoder_dim=48"), check=False)
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("mimscale: error:")]
    assert p.returncode == 2 and len(err) == 1 and "decoder" in err[0] and "train.resume=never" in err[0], p.stderr[
        -2000:
    ]
    assert ckpt.find(rd, {"objective": "mae"}).meta["step"] == 6
    # resume=never: a fresh start in the same directory (the old step-2 checkpoint is set aside, not deleted)
    p = run(_cmd(rd, fmnist_small, "train.max_steps=2", "train.resume=never"))
    assert "resumed from checkpoint" not in p.stdout + p.stderr
    assert json.loads((rd / "summary.json").read_text())["steps"] == 2
    names = [x.name for x in (rd / ckpt.CKPT_DIR).iterdir()]
    assert "step_00000002" in names and any(n.startswith("step_00000002.replaced") for n in names)
