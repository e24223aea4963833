"""GPU-only code paths, run on a CPU through the same functions the GPU run calls.

Inventory (grep -i 'cuda|nccl|pin_memory|autocast' over mimscale/) and where each branch is exercised:

NCCL env         dist.nccl_env_defaults (called by bench throughput; lead to call it in
                 dist.export/pretrain)                                  -> test_nccl_env_defaults_* (here)
backend choice   dist.accelerator_name(True) -> "cuda"                  -> tests/test_dist.py::test_accelerator_name
bf16 on CUDA     engine.deepspeed.ds_config(cfg, derived, "cuda"): bf16 block + torch fused AdamW;
                 ds.compute_dtype; the encoder casts its input to the weight dtype (vit.embed)
                                                                        -> test_bf16_config_for_cuda (here),
                 tests/engine/test_deepspeed_config.py (fp16/FusedAdam/compute_dtype),
                 tests/engine/test_launch_zero.py::test_bf16_with_clipping_tracks_fp32 (bf16 engine on CPU)
fp16 on CUDA     ds_config(..., "cuda") loss scaling                   -> tests/engine/test_deepspeed_config.py
pinned memory    ShardLoader(pin_memory=accelerator == "cuda") in mimscale/pretrain.py and bench throughput
                                                                        -> test_pinned_memory_loader_path (here)
CUDA memory      telemetry.memory.cuda_memory_gb / memory_stats / reset_peak CUDA branch
                                                                        -> tests/telemetry/test_memory.py
CUDA peak FLOP/s telemetry.mfu.peak_flops_for / device_peak_flops with a GPU name
                                                                        -> test_peak_flops_for_* (here),
                                                                           tests/telemetry/test_mfu.py
CUDA device info bench.throughput.device_info (name, memory, synchronize), gpu_plan_key, --plan-gpu auto
                                                                        -> test_device_info_cuda_branch (here)
NCCL gather      eval.knn gathers features on the training device       -> tests/eval (multi-rank kNN, gloo)
"""

from __future__ import annotations

import os

import pytest
import torch

from mimscale import dist
from mimscale.bench import throughput as T
from mimscale.telemetry.mfu import PEAK_TFLOPS, cpu_matmul_peak, measure_matmul_flops, mfu, peak_flops_for


def test_nccl_env_defaults_on_a_cuda_node():
    env = {"NCCL_DEBUG": "INFO", "PATH": "/usr/bin"}
    added = dist.nccl_env_defaults(env, cuda_available=True)
    assert added == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}  # the user's NCCL_DEBUG wins
    assert env == {"NCCL_DEBUG": "INFO", "PATH": "/usr/bin", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert dist.nccl_env_defaults(env, cuda_available=True) == {}  # idempotent
    fresh: dict = {}
    assert dist.nccl_env_defaults(fresh, cuda_available=True) == dist.NCCL_ENV_DEFAULTS == fresh


def test_nccl_env_defaults_leave_cpu_nodes_alone(monkeypatch):
    env = {"PATH": "/usr/bin"}
    assert dist.nccl_env_defaults(env, cuda_available=False) == {} and env == {"PATH": "/usr/bin"}
    for k in dist.NCCL_ENV_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    added = dist.nccl_env_defaults()  # os.environ, this machine
    assert (added == {}) == (not torch.cuda.is_available())
    assert all(os.environ.get(k) == v for k, v in added.items())


@pytest.mark.parametrize(
    "name, precision, tflops",
    [
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-PCIE-40GB", "fp16", 312.0),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.0),
    ],
)
def test_peak_flops_for_a_named_gpu(name, precision, tflops):
    assert peak_flops_for(torch.device("cuda", 0), precision, name=name) == pytest.approx(tflops * 1e12)
    # what the train loop logs: MFU of 45 % of an A100 for MAE ViT-L/16 (~ 124.4 GFLOP per image)
    peak = peak_flops_for("cuda:0", "bf16", name="NVIDIA A100-SXM4-80GB")
    assert mfu(124.4e9, 0.45 * peak / 124.4e9, peak) == pytest.approx(0.45)


def test_peak_flops_for_an_unknown_gpu_is_none_not_a_crash():
    assert peak_flops_for("cuda:0", "bf16", name="Tesla V100-SXM2-32GB") is None
    assert peak_flops_for("cuda:0", "bf16", name="NVIDIA H100 NVL") == pytest.approx(835.5e12)  # raised before
    assert PEAK_TFLOPS["a100"]["bf16"] == 312.0


def test_peak_flops_for_cpu_is_the_best_measured_gemm():
    peak = peak_flops_for("cpu", "fp32")
    assert peak == cpu_matmul_peak("fp32") > 0
    assert peak >= measure_matmul_flops("fp32", n=256)  # the max over sizes includes 256
    assert peak_flops_for("cpu", "tf32") == peak  # tf32 is an fp32 matmul on a CPU


def test_bf16_config_for_cuda():
    """The bench (and the loop) hand ds_config accelerator "cuda" on a GPU: bf16 block, fused Adam."""
    from mimscale import config as C
    from mimscale.engine import deepspeed as ds

    cfg = T.build_config(T.ThroughputConfig(recipe="mae_vit_l16", zero=3, micro_batch=64, precision="bf16"), 1)
    out = ds.ds_config(cfg, C.derive(cfg, 1, 64 * 1000), "cuda")
    assert out["bf16"] == {"enabled": True} and "fp16" not in out
    assert out["optimizer"]["params"]["fused"] is True  # torch fused AdamW on CUDA (no JIT build)
    assert out["zero_optimization"]["stage"] == 3
    assert ds.compute_dtype(cfg) is torch.bfloat16


def test_pinned_memory_loader_path(fmnist_small):
    """``pin_memory=True`` (what the loop and the bench pass on CUDA) gives the same batches on a CPU."""
    from mimscale.data.loader import ShardLoader
    from mimscale.data.transforms import TrainTransform
    from mimscale.masking import MaskCollate, MaskSpec

    def first_batches(pin: bool) -> list[dict]:
        loader = ShardLoader(
            fmnist_small["train"],
            batch_size=16,
            transform=TrainTransform(16),
            collate=MaskCollate(MaskSpec("random", 16, 0.75)),
            num_workers=1,
            seed=3,
            shuffle_buffer=64,
            samples_per_epoch=48,
            pin_memory=pin,
        )
        assert loader.pin_memory is pin
        return list(loader)

    with pytest.warns(UserWarning, match="pin_memory") if not torch.cuda.is_available() else _no_warning():
        pinned = first_batches(True)
    plain = first_batches(False)
    assert len(pinned) == len(plain) == 3
    for a, b in zip(pinned, plain):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["image"].is_pinned() == torch.cuda.is_available()
    moved = {k: v.to("cpu", non_blocking=True) for k, v in pinned[0].items() if torch.is_tensor(v)}
    assert torch.equal(moved["image"], pinned[0]["image"])


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FakeCuda:
    """The three torch.cuda calls of bench.throughput.device_info."""

    def __init__(self):
        self.synced = []

    def get_device_name(self, device):
        return "NVIDIA A100-SXM4-40GB"

    def get_device_properties(self, device):
        return type("Props", (), {"total_memory": 40 * 2**30 - 2**28})()

    def synchronize(self, device):
        self.synced.append(device)


def test_device_info_cuda_branch():
    fake = _FakeCuda()
    dev = torch.device("cuda", 2)
    info = T.device_info(dev, cuda=fake)
    assert info["name"] == "NVIDIA A100-SXM4-40GB" and info["memory_gb"] == pytest.approx(39.75)
    info["sync"]()
    assert fake.synced == [dev]
    assert T.gpu_plan_key(info["name"], info["memory_gb"]) == "a100-40gb"  # what --plan-gpu auto resolves to
    cpu = T.device_info("cpu", cuda=fake)
    assert cpu["memory_gb"] is None and cpu["name"] and cpu["sync"]() is None and fake.synced == [dev]
    for name in ("get_device_name", "get_device_properties", "synchronize"):
        assert callable(getattr(torch.cuda, name))  # the stand-in mirrors real names
