"""benchmarks/loop_overhead.py (gpu.sh part 2) trains where it is asked: on a CUDA machine its contenders get no CPU
pin (DS_ACCELERATOR=cpu made DeepSpeed train MAE ViT-L on one CPU thread even with a GPU present)."""

from __future__ import annotations

import importlib.util
import sys
from unittest import mock

import pytest
import torch
from launch_utils import REPO


@pytest.fixture(scope="module")
def lo():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("loop_overhead", REPO / "benchmarks" / "loop_overhead.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_with_cuda_available_the_runs_are_not_pinned_to_the_cpu(lo, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # even a pin left in the caller's environment is dropped
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("RANK", "3")
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        acc = lo.resolve_accelerator("auto")
    assert acc == "cuda"
    env = lo._env(acc)
    assert "DS_ACCELERATOR" not in env and "OMP_NUM_THREADS" not in env
    assert "RANK" not in env and env["WANDB_MODE"] == "disabled"


def test_the_cpu_pin_only_when_asked_or_without_cuda(lo, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        assert lo.resolve_accelerator("auto") == "cpu"
    assert lo.resolve_accelerator("cpu", cuda_available=True) == "cpu"
    env = lo._env("cpu")
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(SystemExit, match="--accelerator tpu"):
        lo.resolve_accelerator("tpu")
