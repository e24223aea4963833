"""The DeepSpeed config the engine builds: knobs file + values from the YAML, conflicts rejected."""

from __future__ import annotations

import json

import pytest
import torch

from mimscale import config as C
from mimscale.engine import deepspeed as ds
from mimscale.errors import ConfigError


def _cfg(*overrides):
    return C.load("mae_vit_b16", ["data.train=/x", *overrides])


def _derived(cfg, world=8):
    return C.derive(cfg, world, 1_281_167)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_yaml_values_fill_the_knobs_file(stage):
    cfg = _cfg(f"train.zero_stage={stage}", "optim.clip_grad=3.0")
    d = _derived(cfg)
    out = ds.ds_config(cfg, d, "cpu")
    assert out["zero_optimization"]["stage"] == stage
    assert out["train_batch_size"] == 4096
    assert out["train_micro_batch_size_per_gpu"] == 128
    assert out["gradient_accumulation_steps"] == 4096 // (128 * 8)
    assert out["gradient_clipping"] == 3.0
    assert out["bf16"] == {"enabled": True} and "fp16" not in out
    p = out["optimizer"]["params"]
    assert out["optimizer"]["type"] == "AdamW"
    assert p["lr"] == pytest.approx(2.4e-3) and p["betas"] == [0.9, 0.95] and p["weight_decay"] == 0.05


def test_adam_kernel_follows_the_accelerator():
    cfg = _cfg()
    d = _derived(cfg)
    cpu = ds.ds_config(cfg, d, "cpu")["optimizer"]["params"]
    assert cpu["torch_adam"] is True and "fused" not in cpu  # torch foreach AdamW
    cuda = ds.ds_config(cfg, d, "cuda")["optimizer"]["params"]
    assert cuda["torch_adam"] is True and cuda["fused"] is True  # torch fused AdamW
    forced = _cfg("optim.impl=deepspeed")
    assert "torch_adam" not in ds.ds_config(forced, _derived(forced), "cuda")["optimizer"]["params"]  # FusedAdam
    fused_cpu = _cfg("optim.impl=fused")
    assert ds.ds_config(fused_cpu, _derived(fused_cpu), "cpu")["optimizer"]["params"]["fused"] is True
    off = _cfg("train.zero_stage=3", "train.offload=true")
    assert "offload_optimizer" in ds.ds_config(off, _derived(off), "cpu")["zero_optimization"]
    assert "torch_adam" not in ds.ds_config(off, _derived(off), "cpu")["optimizer"]["params"]  # CPU Adam


def test_fp16_is_dynamic_loss_scaled_on_cuda_and_refused_on_cpu():
    cfg = _cfg("train.precision=fp16")
    out = ds.ds_config(cfg, _derived(cfg), "cuda")
    assert out["fp16"]["enabled"] and out["fp16"]["loss_scale"] == 0 and "bf16" not in out
    with pytest.raises(ConfigError, match="fp16"):
        ds.ds_config(cfg, _derived(cfg), "cpu")


def test_fp32_sets_no_mixed_precision():
    cfg = _cfg("train.precision=fp32")
    out = ds.ds_config(cfg, _derived(cfg), "cpu")
    assert "bf16" not in out and "fp16" not in out


def test_knobs_file_that_sets_yaml_values_is_a_conflict(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 8, "optimizer": {}}))
    cfg = _cfg(f"train.ds_config={p}")
    with pytest.raises(ConfigError, match="train_batch_size, optimizer"):
        ds.ds_config(cfg, _derived(cfg), "cpu")


def test_knobs_file_stage_must_match(tmp_path):
    p = tmp_path / "z3.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="stage 3"):
        ds.load_knobs(_cfg(f"train.ds_config={p}", "train.zero_stage=1"))
    assert ds.load_knobs(_cfg(f"train.ds_config={p}", "train.zero_stage=3"))["zero_optimization"]["stage"] == 3


def test_unknown_or_broken_knobs_file(tmp_path):
    with pytest.raises(ConfigError, match="no DeepSpeed knobs file"):
        ds.knobs_file(_cfg("train.ds_config=zero9"))
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ds.load_knobs(_cfg(f"train.ds_config={p}"))


def test_shipped_knobs_files_hold_knobs_only():
    for f in ds.DS_CONFIG_DIR.glob("*.json"):
        knobs = json.loads(f.read_text())
        assert not set(ds.OWNED_BY_YAML) & set(knobs), f


def test_param_groups_exclude_biases_norms_and_spared_tokens_from_decay():
    from mimscale.models.vit import build_vit
    from mimscale.objectives.mae import MAE

    # MAE's code decays its 3-D tokens (the default); with the knobs off they join the no-decay group
    official = MAE(build_vit("vit_micro", 16, 4), MAE.Config(decoder_dim=32, decoder_depth=1, decoder_heads=2))
    decay, _ = ds.param_groups(official, official.no_weight_decay(), 0.05)
    names = {id(p): n for n, p in official.named_parameters()}
    assert {"encoder.cls_token", "decoder.mask_token"} <= {names[id(p)] for p in decay["params"]}
    m = MAE(
        build_vit("vit_micro", 16, 4),
        MAE.Config(decoder_dim=32, decoder_depth=1, decoder_heads=2, wd_cls_token=False, wd_mask_token=False),
    )
    decay, rest = ds.param_groups(m, m.no_weight_decay(), 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "encoder.cls_token" not in decayed and "decoder.mask_token" not in decayed
    assert all(not n.endswith(".bias") and "norm" not in n for n in decayed)
    assert "encoder.blocks.0.attn.qkv.weight" in decayed
    assert len(decay["params"]) + len(rest["params"]) == len(list(m.parameters()))
    assert all("pos_embed" not in n for n in names.values())  # sin-cos tables are buffers
    assert decay["wd_scale"] == 1.0 and rest["wd_scale"] == 0.0 and rest["weight_decay"] == 0.0


def test_set_hparams_scales_weight_decay_per_group():
    class Opt:
        param_groups = [{"wd_scale": 1.0}, {"wd_scale": 0.0, "lr_scale": 0.5}]

    class Engine:
        optimizer = Opt()

    ds.set_hparams(Engine, 1e-3, 0.05)
    g0, g1 = Engine.optimizer.param_groups
    assert (g0["lr"], g0["weight_decay"]) == (1e-3, 0.05)
    assert (g1["lr"], g1["weight_decay"]) == (5e-4, 0.0)


def test_compute_dtype():
    assert ds.compute_dtype(_cfg()) is torch.bfloat16
    assert ds.compute_dtype(_cfg("train.precision=fp32")) is torch.float32


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_throughput_timer_and_wall_clock_breakdown_are_off(stage):
    out = ds.ds_config(_cfg(f"train.zero_stage={stage}"), _derived(_cfg()), "cuda")
    assert out["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    assert out["wall_clock_breakdown"] is False
    from deepspeed.runtime.config import get_wall_clock_breakdown
    from deepspeed.utils.config import get_timers_config

    assert not get_timers_config(out).enabled and not get_wall_clock_breakdown(out)  # as DeepSpeed reads them
    assert get_timers_config({}).enabled  # (DeepSpeed's default: on)


def test_a_knobs_file_may_turn_the_timer_on_for_profiling(tmp_path):
    p = tmp_path / "prof.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 1}, "timers": {"throughput": {"enabled": True}}}))
    out = ds.ds_config(_cfg("train.zero_stage=1", f"train.ds_config={p}"), _derived(_cfg()), "cpu")
    assert out["timers"] == {"throughput": {"enabled": True}}


@pytest.mark.slow
def test_engine_steps_never_synchronize_the_device(dist_single, monkeypatch):
    """A real engine (one CPU rank): no ``accelerator.synchronize()`` in forward, backward or step (DeepSpeed's
    throughput timer calls it from the third step on when it is enabled)."""
    from deepspeed.accelerator import get_accelerator

    from mimscale.engine.build import build_model

    cfg = C.load(
        None,
        [
            "model.arch=vit_micro",
            "model.img_size=16",
            "model.patch_size=4",
            "train.zero_stage=1",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "objective.decoder_dim=32",
            "objective.decoder_depth=1",
            "objective.decoder_heads=2",
        ],
    )
    torch.manual_seed(0)
    engine = ds.initialize(build_model(cfg), cfg, C.derive(cfg, 1, 8 * 100), "cpu")
    calls = []
    acc = get_accelerator()
    real = acc.synchronize
    monkeypatch.setattr(acc, "synchronize", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(8, 3, 16, 16, generator=g), "mask": torch.rand(8, 16, generator=g).argsort(1) < 12}
    for _ in range(4):
        engine.backward(engine(batch).loss)
        engine.step()
    assert engine.global_steps == 4
    assert calls == []
    assert ds.loss_scale(engine) == 1.0  # bf16: nothing scales the loss


def test_loss_scale_reads_each_deepspeed_fp16_optimizer_layout():
    """fp16 needs CUDA (refused on CPU), so the three places DeepSpeed 0.19 keeps the scale are built from its own
    loss scaler: ZeRO-1/2/3 (``optimizer.cur_scale``), FP16_Optimizer (``loss_scale_config.cur_scale``) and an
    optimizer that only holds ``loss_scaler``."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import LossScaleConfig

    scaler = LossScaleConfig(torch.float16, True, 1.0, None, initial_dynamic_scale=2.0**12)
    assert scaler.cur_scale == 4096.0
    layouts = [
        SimpleNamespace(cur_scale=scaler.cur_scale),
        SimpleNamespace(loss_scale_config=scaler),
        SimpleNamespace(loss_scaler=scaler),
    ]
    for opt in layouts:
        engine = SimpleNamespace(fp16_enabled=lambda: True, optimizer=opt)
        assert ds.loss_scale(engine) == 4096.0
        assert isinstance(ds.loss_scale(engine), float)
    off = SimpleNamespace(fp16_enabled=lambda: False, optimizer=layouts[0])
    assert ds.loss_scale(off) == 1.0


_MUON_PROBE = r"""
import os, sys, torch
from mimscale.engine import deepspeed as ds
assert ds.skip_muon_import()
import deepspeed
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
ds.skip_shm_comm_build()
for stage in (1, 2, 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    cfg = {"train_batch_size": 4, "bf16": {"enabled": True}, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    losses = []
    for _ in range(3):
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], (stage, losses)
print("stand-ins", all(isinstance(sys.modules[m], ds._Stub) for m in ds._MUON_MODULES))
print("inductor", "torch._inductor.compile_fx" in sys.modules)
"""


def test_muon_stand_ins_keep_deepspeed_engines_from_compiling_at_start():
    """In a fresh process on the pinned DeepSpeed, bf16 engines at ZeRO-1, 2 and 3 train with the Muon stand-ins
    in place, and neither DeepSpeed's Muon modules nor inductor are imported (they cost ~1-2 s per rank)."""
    import subprocess
    import sys

    import deepspeed
    from launch_utils import REPO, clean_env, free_port

    if deepspeed.__version__ not in ds.MUON_STUB_VERIFIED:
        pytest.skip(f"DeepSpeed {deepspeed.__version__} is not one whose Muon imports were read")
    p = subprocess.run(
        [sys.executable, "-c", _MUON_PROBE, str(free_port())],
        env=clean_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "stand-ins True" in p.stdout and "inductor False" in p.stdout, p.stdout


def test_muon_stand_ins_only_on_a_verified_deepspeed(monkeypatch):
    import sys

    import deepspeed

    for name in ds._MUON_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(deepspeed, "__version__", "0.0.1")
    assert not ds.skip_muon_import() and not any(m in sys.modules for m in ds._MUON_MODULES)
    monkeypatch.setattr(deepspeed, "__version__", ds.MUON_STUB_VERIFIED[0])
    assert ds.skip_muon_import()
    stub = sys.modules[ds._MUON_MODULES[1]]
    with pytest.raises(RuntimeError, match="AdamW"):
        stub.MuonWithAuxAdam([])
    with pytest.raises(RuntimeError, match="use_muon"):
        sys.modules[ds._MUON_MODULES[0]].muon_update()
