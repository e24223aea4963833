"""`mimscale bench plan`: ZeRO formulas by value, the activation constant against autograd, fit verdicts, CLI.

Models are built on the meta device (no memory, no compute); shapes are cached per module.
"""

from __future__ import annotations

import json

import pytest
import torch

from mimscale import cli
from mimscale.bench import plan as P
from mimscale.errors import ConfigError

GB = P.GB

# Tiny MAE: vit_micro (D 64, depth 4, mlp 256) on 16 px / patch 4 (N 16, 48 px per patch), decoder 32 x 1.
TINY_KNOBS = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4}


def _block_params(d: int, hidden: int) -> int:
    return 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)


TINY_PSI = (
    (48 * 64 + 64)
    + 64
    + 4 * _block_params(64, 256)
    + 2 * 64  # encoder: conv, cls, blocks, norm
    + (64 * 32 + 32)
    + 32
    + _block_params(32, 128)
    + 2 * 32
    + (32 * 48 + 48)  # decoder: embed, mask, block, norm, pred
)


@pytest.fixture(scope="module")
def shapes():
    cache: dict = {}

    def get(arch, patch, objective="mae", knobs=None, img=224, grad_ckpt=False):
        key = (arch, patch, objective, json.dumps(knobs, sort_keys=True), img, grad_ckpt)
        if key not in cache:
            cache[key] = P.model_shape(P.build_on_meta(arch, img, patch, objective, knobs, grad_ckpt=grad_ckpt))
        return cache[key]

    return get


def plan(shapes, knobs=None, **kw) -> P.Plan:
    inp = P.PlanInput(**kw, objective_knobs=knobs or {})
    shape = shapes(inp.model, inp.patch, inp.objective, knobs or None, inp.img, inp.grad_ckpt)
    return P.make_plan(inp, shape)


# ----------------------------------------------------------------------------- ZeRO formulas


def test_tiny_psi_and_zero_states_by_value(shapes):
    s = shapes("vit_micro", 4, "mae", TINY_KNOBS, img=16)
    assert s.params_trainable == TINY_PSI == 219_728 and s.params_frozen == 0
    psi, n = TINY_PSI, 8
    expect = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}
    for stage, value in expect.items():
        st = P.zero_model_state_bytes(psi, stage, n)
        assert st["gpu"] == pytest.approx(value) and st["cpu"] == 0
    off = {1: (4 * psi, 12 * psi / n), 2: (2 * psi + 2 * psi / n, 12 * psi / n), 3: (4 * psi / n, 12 * psi / n)}
    for stage, (gpu, host) in off.items():
        st = P.zero_model_state_bytes(psi, stage, n, offload=True)
        assert (st["gpu"], st["cpu"]) == pytest.approx((gpu, host))
    assert P.zero_model_state_bytes(psi, 3, 1)["gpu"] == 16 * psi  # one GPU: every stage is 16Ψ
    with pytest.raises(ConfigError, match="stage 1, 2 or 3"):
        P.zero_model_state_bytes(psi, 0, n, offload=True)
    with pytest.raises(ConfigError, match="0, 1, 2 or 3"):
        P.zero_model_state_bytes(psi, 4, n)


def test_plan_model_states_line_is_the_formula(shapes):
    for stage in range(4):
        p = plan(
            shapes, TINY_KNOBS, model="vit_micro", patch=4, img=16, zero=stage, micro_batch=8, nodes=2, gpus_per_node=4
        )
        expect = P.zero_model_state_bytes(TINY_PSI, stage, 8)["gpu"] / GB
        assert p.memory_gb["model_states"] == pytest.approx(expect)
        parts = ("model_states", "frozen_params", "zero_buffers", "activations_blocks", "activations_other", "overhead")
        assert p.memory_gb["total"] == pytest.approx(sum(p.memory_gb[k] for k in parts))


# ----------------------------------------------------------------------------- activations


def test_activation_constant_matches_what_autograd_saves_for_a_block():
    """ACT_ELEMS x L x D elements per block: count the tensors a real (CPU) block saves for backward."""
    from mimscale.models.vit import Block

    torch.manual_seed(0)
    b, L, d = 2, 50, 64
    blk = Block(d, 4).to(torch.bfloat16)
    own = {p.untyped_storage().data_ptr() for p in blk.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randn(b, L, d, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        blk(x)
    per_image = sum(seen.values()) / b
    formula = P.ACT_ELEMS * L * d * P.ACT_BYTES
    print(f"block saves {per_image / (L * d * 2):.2f} x L x D bf16 elements per image (formula {P.ACT_ELEMS})")
    assert per_image == pytest.approx(formula, rel=0.05)


def test_block_calls_and_checkpointing(shapes):
    s = shapes("vit_large", 16)
    enc = [c for c in s.blocks if c.width == 1024]
    dec = [c for c in s.blocks if c.width == 512]
    assert len(enc) == 24 and {c.tokens for c in enc} == {1 + 49}  # visible tokens only
    assert len(dec) == 8 and {c.tokens for c in dec} == {197}
    mb = 64
    act = P.activation_bytes(s.blocks, mb)["blocks"]
    assert act == pytest.approx(mb * 16 * 2 * (24 * 50 * 1024 + 8 * 197 * 512))
    ck = shapes("vit_large", 16, grad_ckpt=True)
    assert sum(c.checkpointed for c in ck.blocks) == 24 and not any(c.checkpointed for c in ck.blocks if c.width == 512)
    act_ck = P.activation_bytes(ck.blocks, mb)["blocks"]
    assert act_ck == pytest.approx(mb * 2 * (24 * 50 * 1024 + 16 * 50 * 1024 + 16 * 8 * 197 * 512))
    assert ck.other_saved_bytes == pytest.approx(s.other_saved_bytes)  # checkpoint inputs not counted twice
    from mimscale.telemetry.flops import transformer_forward_flops

    assert P.recompute_flops_per_sample(ck.blocks) == pytest.approx(transformer_forward_flops(50, 1024, 24))
    emae = shapes("vit_large", 16, "emae")
    assert {c.tokens for c in emae.blocks if c.width == 1024} == {4 * 50}  # K = 4 parts per image


# ----------------------------------------------------------------------------- verdicts


def test_vit_h14_mae_zero0_a100_40gb_micro64(shapes):
    """The brief expected "does not fit"; the documented estimate says ~20 GB (16Ψ = 9.8 GB, activations
    7.1 GB for 65 encoder + 257 decoder tokens per image): it fits, and micro-batch 256 does not."""
    kw = dict(model="vit_huge", patch=14, gpu="a100-40gb", zero=0, nodes=1, gpus_per_node=8)
    p = plan(shapes, micro_batch=64, **kw)
    print(P.format_plan(p))
    assert p.params_trainable == pytest.approx(656.6e6, rel=1e-3)
    assert p.memory_gb["model_states"] == pytest.approx(16 * p.params_trainable / GB)
    assert p.memory_gb["total"] == pytest.approx(20.0, abs=0.5)
    assert p.fits is True and P.fit_line(p).startswith("FIT: ")
    big = plan(shapes, micro_batch=256, **kw)
    assert big.fits is False and P.fit_line(big).startswith("DOES NOT FIT: ")
    # the reported largest micro-batch is exact for the linear model
    assert plan(shapes, micro_batch=p.max_micro_batch, **kw).fits
    assert not plan(shapes, micro_batch=p.max_micro_batch + 1, **kw).fits
    # EMAE (K = 4 parts) on the same setup does not fit at 64 but fits with ZeRO-3 + checkpointing
    e = plan(shapes, micro_batch=64, objective="emae", **kw)
    assert e.fits is False
    kw3 = {**kw, "zero": 3}
    assert plan(shapes, micro_batch=64, objective="emae", grad_ckpt=True, **kw3).fits


def test_vit_l16_mae_zero1_a100_80gb_micro64_fits(shapes):
    p = plan(
        shapes, model="vit_large", patch=16, gpu="a100-80gb", zero=1, micro_batch=64, nodes=8, gpus_per_node=8, mfu=0.45
    )
    print(P.format_plan(p))
    assert p.fits and p.memory_gb["total"] < 12
    assert p.flops_per_sample == pytest.approx(124.5e9, rel=1e-3)  # OBJECTIVES.md section 8
    assert p.images_per_s_per_gpu == pytest.approx(0.45 * 312e12 / p.flops_per_sample)
    assert p.images_per_s_cluster == pytest.approx(64 * p.images_per_s_per_gpu)
    assert p.global_batch == 4096 and p.grad_accum == 1
    assert p.step_time_s == pytest.approx(4096 / p.images_per_s_cluster)
    assert p.epoch_time_s == pytest.approx(1_281_167 / p.images_per_s_cluster)


def test_more_sharding_and_checkpointing_never_cost_memory(shapes):
    kw = dict(model="vit_large", patch=16, micro_batch=64, nodes=2, gpus_per_node=8)
    states = [plan(shapes, zero=z, **kw).memory_gb["model_states"] for z in range(4)]
    assert states == sorted(states, reverse=True)
    no, ck = plan(shapes, zero=1, **kw), plan(shapes, zero=1, grad_ckpt=True, **kw)
    assert ck.memory_gb["activations_blocks"] < no.memory_gb["activations_blocks"]
    assert ck.recompute_flops_per_sample > 0 == no.recompute_flops_per_sample
    off = plan(shapes, zero=2, offload=True, **kw)
    assert off.memory_gb["model_states"] < plan(shapes, zero=2, **kw).memory_gb["model_states"]
    assert off.cpu_memory_per_node_gb == pytest.approx(8 * 12 * off.params_trainable / 16 / GB)


def test_global_batch_must_divide(shapes):
    with pytest.raises(ConfigError, match="not a multiple"):
        plan(shapes, model="vit_large", patch=16, micro_batch=64, nodes=3, gpus_per_node=8, global_batch=4096)
    p = plan(shapes, model="vit_large", patch=16, micro_batch=32, nodes=2, gpus_per_node=8, global_batch=4096)
    assert p.grad_accum == 8 and p.steps_per_epoch == 1_281_167 // 4096


# ----------------------------------------------------------------------------- CLI


def _run(capsys, *argv):
    code = cli.main(["bench", "plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_fit_line(capsys):
    code, out, err = _run(
        capsys,
        "--model",
        "vit_large",
        "--patch",
        "16",
        "--img",
        "224",
        "--objective",
        "mae",
        "--gpu",
        "a100-80gb",
        "--zero",
        "1",
        "--micro-batch",
        "64",
        "--nodes",
        "8",
        "--gpus-per-node",
        "8",
        "--mfu",
        "0.45",
    )
    print(out)
    assert code == 0 and err == ""
    assert "\nFIT: " in out and "img/s per GPU" in out and "ImageNet-1k (1,281,167 images" in out


def test_cli_json_parses_and_says_fits(capsys):
    code, out, _ = _run(
        capsys,
        "--model",
        "vit_huge",
        "--patch",
        "14",
        "--gpu",
        "a100-40gb",
        "--zero",
        "0",
        "--micro-batch",
        "256",
        "--json",
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["fits"] is False and doc["memory_gb"]["total"] > 40 and doc["gpu_memory_gb"] == 40
    assert doc["inputs"]["zero"] == 0 and doc["n_gpus"] == 8


def test_cli_recipe_equals_explicit_flags(capsys):
    _, a, _ = _run(capsys, "--recipe", "mae_vit_l16", "--nodes", "8", "--json")
    _, b, _ = _run(
        capsys,
        "--model",
        "vit_large",
        "--patch",
        "16",
        "--img",
        "224",
        "--objective",
        "mae",
        "--zero",
        "1",
        "--micro-batch",
        "64",
        "--nodes",
        "8",
        "--global-batch",
        "4096",
        "--epochs",
        "800",
        "--json",
    )
    da, db = json.loads(a), json.loads(b)
    assert da["memory_gb"] == db["memory_gb"] and da["total_time_s"] == pytest.approx(db["total_time_s"])


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--model", "vit_giant"], ["--model vit_giant", "vit_huge"]),
        (["--model", "vit_base", "--gpu", "v100"], ["--gpu v100", "a100-80gb"]),
        (["--model", "vit_base", "--zero", "4"], ["ZeRO stage must be 0, 1, 2 or 3"]),
        (["--model", "vit_base", "--objective", "maee"], ["unknown objective.name 'maee'"]),
        (["--model", "vit_base", "--zero", "0", "--offload"], ["--offload needs ZeRO stage"]),
        (["--model", "vit_base", "--mfu", "45"], ["--mfu 45"]),
        (["--model", "vit_base", "--img", "225"], ["--img 225"]),
        ([], ["--model ARCH", "--recipe"]),
    ],
)
def test_cli_unknown_values_are_one_line_errors(capsys, argv, words):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mimscale: error: ")
    for w in words:
        assert w in lines[0]


def test_loader_cores_per_gpu_by_path(capsys, shapes):
    """'CPU cores per GPU the loader needs' = img/s per GPU / host samples/s per core of the data path; auto is
    the device path for MAE, the CPU path for an objective whose transform has none (ConMIM, DTM, MaPeT)."""
    p = plan(shapes, model="vit_large", gpu="h100-80gb", mfu=0.5)
    assert p.loader_path == "device" and p.loader_rate == P.LOADER_RATES["device"]
    assert p.loader_cores_per_gpu == pytest.approx(p.images_per_s_per_gpu / P.LOADER_RATES["device"])
    assert set(p.loader_cores_per_gpu_by_path) == {"cpu", "device", "preresized"}
    assert p.loader_cores_per_gpu_by_path["cpu"] > p.loader_cores_per_gpu_by_path["preresized"] > p.loader_cores_per_gpu
    own = plan(shapes, model="vit_large", gpu="h100-80gb", mfu=0.5, loader="cpu", loader_rate=500.0)
    assert own.loader_cores_per_gpu == pytest.approx(own.images_per_s_per_gpu / 500.0)
    code, out, err = _run(capsys, "--recipe", "mae_vit_l16", "--gpu", "h100-80gb", "--mfu", "0.5")
    line = next(x for x in out.splitlines() if x.startswith("loader"))
    assert code == 0 and "CPU cores per GPU the loader needs: " in line and "device decode path" in line
    code, out, err = _run(capsys, "--recipe", "mae_vit_l16", "--loader", "preresized", "--loader-rate", "1000")
    assert code == 0 and "on the CPU decode of pre-resized shards path" in out and "/ 1,000 samples/s per core" in out
    import dataclasses

    cpu_only = dataclasses.replace(shapes("vit_large", 16), device_decode=False)
    inp = P.PlanInput(model="vit_large", gpu="h100-80gb")
    assert P.make_plan(inp, cpu_only).loader_path == "cpu"
    assert "device" not in P.make_plan(inp, cpu_only).loader_cores_per_gpu_by_path
    with pytest.raises(ConfigError, match="no device-decode path"):
        P.make_plan(dataclasses.replace(inp, loader="device"), cpu_only)
    assert P.model_shape(P.build_on_meta("vit_micro", 16, 4, "mae", TINY_KNOBS)).device_decode
    code, out, err = _run(capsys, "--model", "vit_base", "--loader-rate", "0")
    assert code == 2 and len(err.splitlines()) == 1 and "--loader-rate 0" in err
