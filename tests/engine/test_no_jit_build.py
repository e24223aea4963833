"""No default path builds a DeepSpeed op at run time: a GPU node with only a driver and our venv (no nvcc,
no CUDA toolkit) must run every default recipe. Engine construction is done for real here, on the CPU
accelerator, with the exact config dict the engine builds for CUDA, while every op builder's ``load()``
(and ``jit_load()``) is replaced by a recorder."""

from __future__ import annotations

import pytest
import torch
from deepspeed.ops.op_builder.builder import OpBuilder

from mimscale import config as C
from mimscale.engine import deepspeed as ds
from mimscale.engine.build import build_model


@pytest.fixture
def builds(monkeypatch):
    calls: list[str] = []

    def record(self, *a, **k):
        calls.append(type(self).__name__)
        raise RuntimeError(f"{type(self).__name__}.load() called: a JIT build on a default path")

    monkeypatch.setattr(OpBuilder, "load", record)
    monkeypatch.setattr(OpBuilder, "jit_load", record)
    return calls


def _tiny(stage: int, precision: str) -> C.Config:
    return C.load(
        "mae_vit_b16",
        [
            "data.train=/x",
            "model.arch=vit_micro",
            "model.img_size=16",
            "model.patch_size=4",
            f"train.zero_stage={stage}",
            f"train.precision={precision}",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "objective.decoder_dim=16",
            "objective.decoder_depth=1",
            "objective.decoder_heads=2",
        ],
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("accelerator", ["cpu", "cuda"])
def test_engine_construction_builds_no_op(builds, monkeypatch, stage, accelerator, dist_single):
    cfg = _tiny(stage, "bf16" if accelerator == "cuda" else "fp32")
    derived = C.derive(cfg, 1, 8 * 100)
    config = ds.ds_config(cfg, derived, accelerator)
    if accelerator == "cuda":
        assert config["optimizer"]["params"] == {**config["optimizer"]["params"], "torch_adam": True, "fused": True}
    # the CUDA dict, built on a CPU: initialize() with it, on the CPU accelerator
    monkeypatch.setattr(ds, "ds_config", lambda *a, **k: config)
    engine = ds.initialize(build_model(cfg), cfg, derived, "cpu")
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    assert isinstance(inner, torch.optim.AdamW)
    assert inner.defaults.get("fused") is (True if accelerator == "cuda" else None)
    x = {"image": torch.randn(8, 3, 16, 16), "mask": torch.rand(8, 16).argsort(1) < 12}
    out = engine(x)
    engine.backward(out.loss)
    engine.step()  # the optimizer step itself builds nothing either
    assert builds == []


def test_offload_says_it_builds_cpu_adam(caplog):
    cfg = C.load("mae_vit_b16", ["data.train=/x", "train.zero_stage=3", "train.offload=true"])
    with caplog.at_level("INFO", logger="mimscale.train"):
        params = ds.ds_config(cfg, C.derive(cfg, 1, 10**6), "cuda")["optimizer"]["params"]
    assert "torch_adam" not in params
    assert any("CPUAdam" in r.getMessage() and "g++" in r.getMessage() for r in caplog.records)
