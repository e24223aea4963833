"""Fine-tuning runs on pre-training's Trainer: killed with -9 mid-run it resumes from its last checkpoint, and
on SIGUSR1 it saves and exits 42; the resumed run's per-step losses are bitwise those of an uninterrupted
run (fp32, drop path, mixup/cutmix and RandAugment drawing from the loader's generators, 1 worker), and the
resumed run crosses an epoch boundary (its top-1 evaluation included)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_utils import clean_env, run
from safetensors.torch import save_file

from mimscale import checkpoint as ckpt
from mimscale.models.vit import build_vit
from mimscale.telemetry.logger import read_jsonl


def _cmd(src: Path, data, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mimscale.cli",
        "eval",
        "finetune",
        str(src),
        "--data",
        str(data["train"]),
        "--test",
        str(data["test"]),
        "--out-dir",
        str(out),
        "--out",
        str(out / "result.json"),
        "train.max_steps=20",
        "train.batch_size=16",
        "train.micro_batch_size=16",
        "train.precision=fp32",
        "train.log_every=1",
        "train.save_every=3",
        "train.save_every_minutes=null",
        "optim.warmup_epochs=0.01",
        "model.drop_path=0.1",
        "finetune.train_samples=256",  # one shard: 16 steps an epoch, so the resumed run crosses one
        "finetune.test_samples=256",
        "finetune.eval_batch_size=128",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
        "log.wandb=disabled",
        "log.tensorboard=false",
    ]


def _losses(out: Path) -> dict[int, float]:
    return {
        r["step"]: r["train/loss"] for r in read_jsonl(out / "metrics.jsonl", drop_rewound=True) if "train/loss" in r
    }


def _interrupt(cmd: list[str], out: Path, at_step: int, sig: int) -> tuple[int, str]:
    seen = len(read_jsonl(out / "metrics.jsonl")) if (out / "metrics.jsonl").exists() else 0
    p = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        recs = read_jsonl(out / "metrics.jsonl")[seen:] if (out / "metrics.jsonl").exists() else []
        if any(r.get("step", 0) >= at_step and "train/loss" in r for r in recs):
            p.send_signal(sig)
            break
        time.sleep(0.05)
    text = p.communicate(timeout=300)[0]
    return p.returncode, text


@pytest.mark.slow
def test_finetune_kill9_and_sigusr1_resume_bitwise(fmnist_small, tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in build_vit("vit_micro", 16, 4, 3).state_dict().items()}, str(src))
    ref = tmp_path / "ref"
    run(_cmd(src, fmnist_small, ref), timeout=400)
    out = tmp_path / "interrupted"
    code, _ = _interrupt(_cmd(src, fmnist_small, out), out, 5, signal.SIGKILL)
    assert code == -signal.SIGKILL
    code, text = _interrupt(_cmd(src, fmnist_small, out), out, 7, signal.SIGUSR1)
    assert code == ckpt.EXIT_REQUEUE, text[-3000:]
    resumed = re.search(r"resumed from checkpoint step=(\d+)", text)
    assert resumed and int(resumed.group(1)) % 3 == 0, text[-3000:]  # the last save before the kill -9
    saved = ckpt.find(out, {"task": "finetune"})
    assert 7 <= saved.meta["step"] < 16, "SIGUSR1 came too late to test the save on signal"
    last = run(_cmd(src, fmnist_small, out), timeout=400)
    assert f"resumed from checkpoint step={saved.meta['step']}" in last.stdout + last.stderr
    assert _losses(ref) == _losses(out) and sorted(_losses(out)) == list(range(1, 21))
    r_ref, r = (json.loads((d / "result.json").read_text()) for d in (ref, out))
    assert r["steps"] == r_ref["steps"] == 20 and r["top1"] == r_ref["top1"]
    assert r["curve"] == r_ref["curve"] and r["curve"][0][0] == 1.0  # the epoch-end top-1 (step 16) of the resumed run
