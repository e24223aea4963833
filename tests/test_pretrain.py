"""A pre-training run started from released weights (``model.init``, here an official-MAE-layout checkpoint with
its decoder) ends with the reconstruction grid of fixed validation images, its encoder export describes itself
in the safetensors header, and `mimscale report` shows the grid."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from launch_utils import run, tiny_overrides
from safetensors import safe_open

pytestmark = pytest.mark.slow


def _mae_layout_checkpoint(path) -> None:
    """An encoder in timm names plus the official MAE decoder names (decoder_embed, mask_token, ...)."""
    from mimscale.models.vit import build_vit
    from mimscale.objectives.mae import MAE

    torch.manual_seed(1)
    obj = MAE(build_vit("vit_micro", 16, 4), MAE.Config(decoder_dim=32, decoder_depth=1, decoder_heads=2))
    sd = dict(obj.encoder.state_dict())
    rename = {"embed": "decoder_embed", "blocks": "decoder_blocks", "norm": "decoder_norm", "pred": "decoder_pred"}
    for k, v in obj.decoder.state_dict().items():
        head, _, rest = k.partition(".")
        if k == "mask_token":
            sd[k] = v
        elif k != "pos_embed":
            sd[f"{rename[head]}.{rest}"] = v
    torch.save({"model": sd, "epoch": 1}, path)


def test_init_run_ends_with_reconstructions_in_the_report(tmp_path, fmnist_small):
    init = tmp_path / "mae_pretrain.pth"
    _mae_layout_checkpoint(init)
    rd = tmp_path / "run"
    p = run(
        [
            sys.executable,
            "-m",
            "mimscale.cli",
            "pretrain",
            *tiny_overrides(fmnist_small, rd, model__init=str(init), train__max_steps=2),
        ]
    )
    log = p.stdout + p.stderr
    assert "init encoder from" in log and "(mae): loaded" in log and "init decoder from" in log
    meta = json.loads((rd / "reconstructions.json").read_text())
    assert meta["pixel"] and meta["images"] == 8 and "ORIGINAL patch" in meta["caption"]
    assert (rd / "reconstructions.png").stat().st_size > 100
    with safe_open(str(rd / "encoder.safetensors"), framework="pt") as f:
        header = f.metadata()
    assert header["objective"] == "mae" and header["img_size"] == "16" and "timm.create_model(" in header["timm_call"]
    run([sys.executable, "-m", "mimscale.cli", "report", str(rd), "--out", str(tmp_path / "rep")])
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<h2>Reconstructions</h2>" in html and "data:image/png;base64," in html
    _the_run_exports_as_hf_vitmae(rd, tmp_path / "hf")


def _the_run_exports_as_hf_vitmae(rd, out) -> None:
    """The run wrote its MAE decoder beside the encoder (at the end and in its checkpoint); ``--format hf-mae``
    of the run loads in transformers with the reconstructions of our MAE restored from the run."""
    pytest.importorskip("transformers")
    from transformers import ViTMAEForPreTraining

    from mimscale.models.init import init_module
    from mimscale.models.vit import build_vit
    from mimscale.objectives.mae import MAE

    assert (rd / "decoder.safetensors").is_file() and list((rd / "checkpoints").glob("step_*/decoder.safetensors"))
    run([sys.executable, "-m", "mimscale.cli", "export", str(rd), "--out", str(out), "--format", "hf-mae"])
    hf = ViTMAEForPreTraining.from_pretrained(out).eval()
    ours = MAE(build_vit("vit_micro", 16, 4), MAE.Config(decoder_dim=32, decoder_depth=1, decoder_heads=2)).eval()
    assert all("missing 0" in line for line in init_module(ours, rd))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = hf(pixel_values=x, noise=torch.rand(2, 16, generator=torch.Generator().manual_seed(1)))
        assert torch.allclose(got.logits, ours.predict(x, got.mask.bool()), atol=1e-5)
