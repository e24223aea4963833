"""Weights out: the printed ``timm.create_model(...)`` call, executed, loads the export strictly with equal outputs
(vit_micro, ViT-B/16, a relative-position BEiT layout, a fine-tuned head); the header describes the model;
``--format hf`` loads offline in transformers with equal outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mimscale.cli import main
from mimscale.errors import ConfigError
from mimscale.export import metadata, model_from_weights, write_hf, write_timm
from mimscale.models.vit import build_vit

pytestmark = pytest.mark.unit


def _perturbed(*args, **kw):
    m = build_vit(*args, **kw).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


CASES = {
    "micro": (("vit_micro", 32, 4), {}),
    "b16": (("vit_base", 64, 16), {}),  # ViT-B/16 on a 4x4 grid (224 px costs a minute of CPU here)
    "beit_relative": (("vit_micro", 32, 4), dict(pos_embed="relative", layer_scale_init=0.1)),
    "finetuned_head": (("vit_micro", 32, 4), dict(num_classes=10, global_pool="avg", pos_embed="learned")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_printed_timm_call_loads_strictly_with_equal_outputs(tmp_path, case):
    import timm  # noqa: F401  (the printed call names it)

    args, kw = CASES[case]
    ours = _perturbed(*args, **kw)
    out = tmp_path / "w.safetensors"
    call = write_timm(ours, out, metadata(ours, objective="mae", run="r1", step=7))
    theirs = eval(call).eval()  # the exact line `mimscale export` prints
    x = torch.randn(2, 3, ours.img_size, ours.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["timm_call"] == call and meta["objective"] == "mae" and meta["run"] == "r1" and meta["step"] == "7"
    assert (meta["img_size"], meta["patch_size"], meta["pos_embed"]) == (
        str(args[1]),
        str(args[2]),
        ours.pos_embed_type,
    )
    assert meta["fc_norm"] == str(ours.global_pool == "avg") and meta["global_pool"] == ours.global_pool
    if case == "b16":
        return
    # strict: one extra tensor in the file makes the same call fail
    sd = load_file(str(out))
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(out))
    with pytest.raises(RuntimeError, match="extra.weight"):
        eval(call)


def test_cli_export_of_a_file_prints_a_working_call(tmp_path, capsys):
    import timm  # noqa: F401

    ours = _perturbed("vit_micro", 32, 4, num_classes=10, global_pool="avg")
    src = tmp_path / "model.safetensors"  # e.g. a fine-tuning run's output, without a header
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(src))
    out = tmp_path / "out.safetensors"
    assert main(["export", str(src), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "classes 10" in lines[0] and "pool avg" in lines[0]
    call = lines[1].removeprefix("load with: ")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(eval(call).eval()(x), ours(x), atol=1e-5)
    again, fmt = model_from_weights(out)
    assert fmt == "mimscale" and again.num_classes == 10


def test_hf_folder_loads_offline_with_equal_outputs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import ViTModel

    ours = _perturbed("vit_micro", 32, 4, pos_embed="learned")
    write_hf(ours, tmp_path / "hf", metadata(ours))
    hf = ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).last_hidden_state, ours.forward_features(x), atol=1e-5)
    assert main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "hf2"), "--format", "hf"]) == 0  # and back
    with pytest.raises(ConfigError, match="--format timm"):
        write_hf(_perturbed("vit_micro", 32, 4, pos_embed="relative"), tmp_path / "x", {})
