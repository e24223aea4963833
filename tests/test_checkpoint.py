"""Checkpoints: file-level safety (atomic publish, fallback past damaged checkpoints, identity checks,
keep-last), RNG round trips, and real runs: kill -9 / SIGUSR1 and resume with bitwise-equal per-step losses,
ZeRO-3 resharding 2 -> 1 and 2 -> 3 ranks, export into timm, the non-finite policy.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launch_utils import BIN, clean_env, free_port, run, tiny_overrides
from mimscale import checkpoint as ckpt
from mimscale.errors import CheckpointError
from mimscale.telemetry.logger import read_jsonl

IDENT = {"objective": "mae", "arch": "vit_micro"}


def fake_checkpoint(run_dir: Path, step: int, identity=IDENT, files=None, latest=True) -> Path:
    """A checkpoint directory as Checkpointer.save publishes it (file contents are placeholders)."""
    d = run_dir / ckpt.CKPT_DIR / ckpt.tag_of(step)
    d.mkdir(parents=True)
    for name, data in (files or {"mp_rank_00_model_states.pt": b"x" * 100, "trainer.pt": b"y" * 10}).items():
        (d / name).write_bytes(data)
    meta = {"format": ckpt.FORMAT, "step": step, "world_size": 1, "zero_stage": 1, "identity": identity,
            "files": ckpt._files(d)}
    (d / "meta.json").write_text(json.dumps(meta))
    if latest:
        (run_dir / ckpt.CKPT_DIR / ckpt.LATEST).write_text(d.name)
    return d


def test_find_newest_and_latest_pointer(tmp_path):
    assert ckpt.find(tmp_path, IDENT) is None
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    assert ckpt.find(tmp_path, IDENT).tag == "step_00000004"
    (tmp_path / ckpt.CKPT_DIR / ckpt.LATEST).write_text("step_00000002")   # the pointer wins
    assert ckpt.find(tmp_path, IDENT).tag == "step_00000002"


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    bad = fake_checkpoint(tmp_path, 4)
    f = bad / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:50])
    with caplog.at_level("WARNING"):
        found = ckpt.find(tmp_path, IDENT)
    assert found.tag == "step_00000002"
    assert "truncated" in caplog.text
    assert bad.exists()  # nothing is deleted


@pytest.mark.parametrize("damage", ["missing_file", "no_meta", "bad_format"])
def test_every_damage_is_detected(tmp_path, damage):
    d = fake_checkpoint(tmp_path, 3)
    if damage == "missing_file":
        (d / "trainer.pt").unlink()
    elif damage == "no_meta":
        (d / "meta.json").unlink()
    else:
        (d / "meta.json").write_text(json.dumps({"format": "something/0"}))
    with pytest.raises(CheckpointError) as e:
        ckpt.find(tmp_path, IDENT)
    assert "no usable checkpoint" in str(e.value) and "\n" not in str(e.value)
    assert d.exists()


def test_another_objective_or_model_is_refused(tmp_path):
    fake_checkpoint(tmp_path, 3, identity={"objective": "emae", "arch": "vit_micro"})
    with pytest.raises(CheckpointError, match="objective='emae'"):
        ckpt.find(tmp_path, IDENT)


def test_unfinished_save_is_invisible(tmp_path):
    fake_checkpoint(tmp_path, 2)
    debris = tmp_path / ckpt.CKPT_DIR / ".tmp-step_00000004"
    debris.mkdir()
    (debris / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert ckpt.find(tmp_path, IDENT).tag == "step_00000002"


def test_rng_state_round_trip_is_weights_only(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.randn(3), np.random.randn(3), random.random()
    torch.save(ckpt.rng_state(), tmp_path / "r.pt")
    want = (torch.randn(5), np.random.randn(5), [random.random() for _ in range(5)])
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    got = (torch.randn(5), np.random.randn(5), [random.random() for _ in range(5)])
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_export_of_a_missing_or_empty_run_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.export(tmp_path / "nope", tmp_path / "e.safetensors")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ckpt.export(tmp_path, tmp_path / "e.safetensors")


# ----------------------------------------------------------------------------- real runs

def _cmd(rd: Path, data, *extra: str, ranks: int = 1) -> list[str]:
    ov = tiny_overrides(data, rd, train__precision="fp32", model__drop_path=0.1, train__epochs=1,
                        train__max_steps=10, train__save_every=3, train__save_every_minutes="null")
    if ranks == 1:
        return [sys.executable, "-m", "mimscale.train", *ov, *extra]
    return [str(BIN / "torchrun"), f"--nproc_per_node={ranks}", f"--master_port={free_port()}", "-m",
            "mimscale.train", *ov, *extra]


def _losses(rd: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_jsonl(rd / "metrics.jsonl", drop_rewound=True) if "train/loss" in r}


def _records(rd: Path) -> list[dict]:
    return read_jsonl(rd / "metrics.jsonl") if (rd / "metrics.jsonl").exists() else []


def _start_and_interrupt(cmd: list[str], rd: Path, at_step: int, sig: int) -> subprocess.Popen:
    """Start ``cmd`` and send ``sig`` once THIS process has logged a step >= ``at_step``."""
    seen = len(_records(rd))
    p = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if any(r.get("step", 0) >= at_step and "train/loss" in r for r in _records(rd)[seen:]):
            p.send_signal(sig)
            break
        time.sleep(0.05)
    p.wait(timeout=240)
    return p


@pytest.mark.slow
def test_kill9_and_sigusr1_resume_bitwise(fmnist_small, tmp_path):
    """Uninterrupted vs killed with -9 at step >= 5 (resumes from the save at 3), then SIGUSR1 at step >= 7
    (saves, exits 42, resumes): the per-step losses are bitwise equal (fp32, drop-path on, 1 loader worker,
    a kNN evaluation at step 4 and 8 that must not disturb the training RNG streams)."""
    knn = [f"eval.knn_train={fmnist_small['train']}", f"eval.knn_test={fmnist_small['test']}", "eval.knn_every=4",
           "eval.knn_train_samples=512", "eval.knn_at_start=false", "eval.num_workers=0"]   # evaluation mid-run
    ref = tmp_path / "ref"
    run(_cmd(ref, fmnist_small, *knn))
    rd = tmp_path / "interrupted"
    p = _start_and_interrupt(_cmd(rd, fmnist_small, *knn), rd, 5, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    p = _start_and_interrupt(_cmd(rd, fmnist_small, *knn), rd, 7, signal.SIGUSR1)
    out = p.stdout.read()
    assert p.returncode == ckpt.EXIT_REQUEUE, out[-3000:]
    assert "resumed from checkpoint step=3" in out or "resumed from checkpoint step=6" in out
    signalled = ckpt.find(rd, {"objective": "mae"})
    assert 7 <= signalled.meta["step"] < 10, "SIGUSR1 came too late to test the save on signal"
    last = run(_cmd(rd, fmnist_small, *knn))
    assert f"resumed from checkpoint step={signalled.meta['step']}" in last.stdout + last.stderr
    assert _losses(ref) == _losses(rd)
    assert sorted(_losses(rd)) == list(range(1, 11))
    s_ref, s = (json.loads((d / "summary.json").read_text()) for d in (ref, rd))
    assert s["steps"] == s_ref["steps"] == 10
    assert s["knn_top1_step4"] == s_ref["knn_top1_step4"] and s["knn_top1_final"] == s_ref["knn_top1_final"]
    assert s["train_seconds"] > 0 and s["device_hours"] > 0
    names = sorted(p.name for p in (rd / ckpt.CKPT_DIR).iterdir() if p.name.startswith("step_"))
    assert len(names) == 3 and names[-1] == "step_00000010"   # keep_last=3


@pytest.mark.slow
def test_zero3_two_ranks_resume_on_one_and_three(fmnist_small, tmp_path):
    """A ZeRO-3 checkpoint of 2 ranks loads on 1 and on 3 ranks through a universal conversion: the weights
    after loading equal the saved ones exactly (fp32 master), and training continues."""
    knobs = tmp_path / "z3.json"
    knobs.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    z3 = ["train.zero_stage=3", f"train.ds_config={knobs}", "model.drop_path=0.0", "train.max_steps=4"]
    src = tmp_path / "two"
    run(_cmd(src, fmnist_small, *z3, ranks=2), timeout=400)
    saved = src / ckpt.CKPT_DIR / "step_00000004" / "encoder.safetensors"
    from safetensors.torch import load_file

    want = load_file(str(saved))
    for ranks in (1, 3):
        rd = tmp_path / f"on{ranks}"
        import shutil

        shutil.copytree(src, rd)
        p = run(_cmd(rd, fmnist_small, *z3, "train.batch_size=24", ranks=ranks), timeout=400)
        log = p.stdout + p.stderr
        assert f"universal checkpoint, world size 2 -> {ranks}" in log
        got = load_file(str(rd / "encoder.safetensors"))        # no step ran: the loaded weights
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        p = run(_cmd(rd, fmnist_small, *z3[:-1], "train.max_steps=6", "train.batch_size=24", ranks=ranks),
                timeout=400)
        losses = _losses(rd)
        assert {5, 6} <= set(losses) and all(np.isfinite(v) for v in losses.values())


@pytest.mark.slow
def test_export_loads_strictly_into_timm(fmnist_small, tmp_path):
    import timm.models.vision_transformer as tv
    from safetensors.torch import load_file

    from mimscale.models.vit import build_vit, timm_kwargs

    rd = tmp_path / "run"
    run(_cmd(rd, fmnist_small, "train.max_steps=3"))
    out = tmp_path / "enc.safetensors"
    p = run([sys.executable, "-m", "mimscale.cli", "export", str(rd), "--out", str(out)])
    assert "from" in p.stdout and out.exists()
    model = tv.VisionTransformer(**timm_kwargs(build_vit("vit_micro", 16, 4)))
    model.load_state_dict(load_file(str(out)), strict=True)
    # a damaged newest checkpoint: export falls back to the previous one; nothing deleted
    newest = rd / ckpt.CKPT_DIR / "step_00000003" / "encoder.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    p = run([sys.executable, "-m", "mimscale.cli", "export", str(rd), "--out", str(out)], check=False)
    assert p.returncode == 2 and "no usable checkpoint" in p.stderr   # only one checkpoint (step 3) exists
    assert newest.exists()


@pytest.mark.slow
def test_nonfinite_skip_stop_and_rollback(fmnist_small, tmp_path):
    # one NaN micro-batch: dropped on every rank, the run completes all steps and counts it
    rd = tmp_path / "skip"
    run(_cmd(rd, fmnist_small, "train.max_steps=4", "train.inject_nonfinite_at=[2]"))
    s = json.loads((rd / "summary.json").read_text())
    assert s["steps"] == 4 and s["nonfinite_skipped"] == 1
    # patience exceeded with on_nonfinite=stop: one line, exit 2, the checkpoint at step 3 intact
    rd = tmp_path / "stop"
    p = run(_cmd(rd, fmnist_small, "train.max_steps=6", "train.nonfinite_patience=3",
                 "train.inject_nonfinite_at=[4,4,4,4]"), check=False)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("mimscale: error:")]
    assert len(err) == 1 and "non-finite" in err[0]
    assert ckpt.find(rd, {"objective": "mae"}).meta["step"] == 3
    # rollback: back to step 3 with half the lr, then the run completes
    rd = tmp_path / "rollback"
    p = run(_cmd(rd, fmnist_small, "train.max_steps=6", "train.nonfinite_patience=3", "train.on_nonfinite=rollback",
                 "train.inject_nonfinite_at=[5,5,5]"))
    assert "rolled back to checkpoint step=3" in p.stdout + p.stderr
    s = json.loads((rd / "summary.json").read_text())
    assert s["steps"] == 6 and s["nonfinite_skipped"] == 3


@pytest.mark.slow
def test_corrupt_latest_checkpoint_resumes_from_previous(fmnist_small, tmp_path):
    rd = tmp_path / "run"
    run(_cmd(rd, fmnist_small, "train.max_steps=6"))
    newest = rd / ckpt.CKPT_DIR / "step_00000006"
    f = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    p = run(_cmd(rd, fmnist_small, "train.max_steps=8"))
    log = p.stdout + p.stderr
    assert "truncated" in log and "resumed from checkpoint step=3" in log
    assert newest.exists() or any(x.name.startswith("step_00000006.replaced") for x in (rd / ckpt.CKPT_DIR).iterdir())
    assert json.loads((rd / "summary.json").read_text())["steps"] == 8


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], check=False, capture_output=True).returncode == 0


def _save_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("mimscale: error:")]
    assert len(err) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return err[0]


def _intact(rd: Path, step: int) -> None:
    found = ckpt.find(rd, {"objective": "mae"})
    assert found.meta["step"] == step
    ckpt.check_complete(found.path)                      # every file it lists, at its recorded size
    assert not [p for p in (rd / ckpt.CKPT_DIR).iterdir() if p.name.startswith(".tmp-")]   # no debris left


@pytest.mark.slow
def test_disk_full_or_read_only_run_dir_at_save_time(fmnist_small, tmp_path):
    """A run resumed from its step-3 checkpoint cannot write its step-6 one: (a) the file system is full (a
    tmpfs sized to hold the run plus half a checkpoint), (b) the checkpoint directory is read-only. Each ends
    with exit 2 and one line naming the cause and the intact checkpoint, which a later run resumes from."""
    src = tmp_path / "src"
    run(_cmd(src, fmnist_small, "train.max_steps=3"))
    ck_bytes = sum(f.stat().st_size for f in (src / ckpt.CKPT_DIR / "step_00000003").rglob("*") if f.is_file())
    root = os.geteuid() == 0

    # (a) disk full
    fs = tmp_path / "fs"
    fs.mkdir()
    if root and _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(fs)):
        try:
            rd = fs / "run"
            import shutil

            shutil.copytree(src, rd)
            st = os.statvfs(fs)
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
            assert _mount("-o", f"remount,size={(used + ck_bytes // 2) // 4096 * 4096 + 4096}", str(fs))
            line = _save_error(run(_cmd(rd, fmnist_small, "train.max_steps=8"), check=False))
            print(line)
            assert "cannot save checkpoint step=6" in line and "the file system is full" in line, line
            assert "previous checkpoint step_00000003 is intact" in line, line
            _intact(rd, 3)
        finally:
            subprocess.run(["umount", str(fs)], check=False, capture_output=True)
    else:
        print("disk-full case skipped: needs root to mount a tmpfs")

    # (b) read-only checkpoint directory (a read-only bind mount as root: root ignores permission bits)
    import shutil

    rd = tmp_path / "ro"
    shutil.copytree(src, rd)
    ck = rd / ckpt.CKPT_DIR
    mounted = root and _mount("--bind", str(ck), str(ck)) and _mount("-o", "remount,ro,bind", str(ck))
    if not mounted:
        ck.chmod(0o555)
    try:
        line = _save_error(run(_cmd(rd, fmnist_small, "train.max_steps=8"), check=False))
    finally:
        if mounted:
            subprocess.run(["umount", str(ck)], check=False, capture_output=True)
        ck.chmod(0o755)
    assert "cannot save checkpoint step=6" in line and "previous checkpoint step_00000003 is intact" in line, line
    print(line)
    assert "(not writable;" in line, line
    _intact(rd, 3)
    p = run(_cmd(rd, fmnist_small, "train.max_steps=8"))      # writable again: resumes from 3, saves 6 and 8
    assert "resumed from checkpoint step=3" in p.stdout + p.stderr
    assert ckpt.find(rd, {"objective": "mae"}).meta["step"] == 8
