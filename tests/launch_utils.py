"""Helpers for tests that launch real processes (imported as `launch_utils`; tests/ is on sys.path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(data: dict[str, Path], run_dir: Path, **extra) -> list[str]:
    """Overrides that turn the tiny_cpu recipe into a seconds-long run on ``fmnist_small``."""
    kv = {
        "model.arch": "vit_micro",
        "model.img_size": 16,
        "model.patch_size": 4,
        "data.train": str(data["train"]),
        "data.num_workers": 1,
        "data.shuffle_buffer": 64,
        "train.batch_size": 16,
        "train.micro_batch_size": 8,
        "train.max_steps": 4,
        "train.log_every": 1,
        "train.run_dir": str(run_dir),
        "optim.warmup_epochs": 0.01,
        "objective.decoder_dim": 32,
        "objective.decoder_depth": 1,
        "objective.decoder_heads": 2,
        "eval.knn_train": "null",
        "eval.knn_test": "null",
        "log.wandb": "disabled",
    }
    kv.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in kv.items()]


def clean_env() -> dict[str, str]:
    """This process's environment without any launcher variables, set up for CPU ranks."""
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            (
                "RANK",
                "WORLD_SIZE",
                "LOCAL_",
                "GROUP_RANK",
                "ROLE_",
                "CROSS_",
                "NODE_RANK",
                "MASTER_",
                "SLURM_",
                "TORCHELASTIC",
                "OMPI_",
                "PMI_",
            )
        )
    }
    e.update(
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}:{e.get('PATH', '')}",
    )
    return e


def run(
    cmd: list[str], *, env: dict | None = None, timeout: float = 240, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a real process (launcher or CLI) with a clean, CPU-friendly environment."""
    p = subprocess.run(
        cmd, env={**clean_env(), **(env or {})}, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
        )
    return p
