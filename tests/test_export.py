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


def _mae_run_dir(rd, objective: str = "mae", seed: int = 0):
    """A run directory as a MAE / EMAE run leaves it: encoder.safetensors (timm names, header) beside
    decoder.safetensors (MAEDecoder names, its header), and config.yaml naming the objective."""
    import yaml

    from mimscale.objectives.emae import EMAE
    from mimscale.objectives.mae import MAE, decoder_metadata

    cls = {"mae": MAE, "emae": EMAE}[objective]
    obj = cls(build_vit("vit_micro", 32, 4), cls.Config(decoder_dim=32, decoder_depth=2, decoder_heads=4)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in obj.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    rd.mkdir(parents=True)
    enc = obj.encoder
    save_file(
        {k: v.contiguous() for k, v in enc.export_state_dict(enc.state_dict()).items()},
        str(rd / "encoder.safetensors"),
        metadata=metadata(enc, objective, rd.name, 5),
    )
    save_file(
        {k: v.contiguous() for k, v in obj.decoder.state_dict().items()},
        str(rd / "decoder.safetensors"),
        metadata=decoder_metadata(obj),
    )
    (rd / "config.yaml").write_text(yaml.safe_dump({"objective": {"name": objective}}))
    return obj


@pytest.mark.parametrize("objective", ["mae", "emae"])
def test_hf_mae_export_gives_our_reconstructions_for_the_same_noise(tmp_path, monkeypatch, capsys, objective):
    """``--format hf-mae``: transformers' ViTMAEForPreTraining loads the run offline; with the same image and the
    mask its ``noise`` draws, its logits are our decoder's predictions and its loss our norm-pix MSE."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import ViTMAEForPreTraining

    obj = _mae_run_dir(tmp_path / "run", objective)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--format", "hf-mae"]) == 0
    assert "ViTMAEForPreTraining.from_pretrained(" in capsys.readouterr().out
    hf, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = hf.config
    assert (cfg.decoder_hidden_size, cfg.decoder_num_hidden_layers, cfg.decoder_num_attention_heads) == (32, 2, 4)
    assert cfg.mask_ratio == obj.cfg.mask_ratio and cfg.norm_pix_loss is True
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = hf(pixel_values=x, noise=noise)
        mask = out.mask.bool()  # True = hidden, raster order
        assert (mask.sum(1) == 48).all()
        if objective == "mae":
            ours, loss = obj.predict(x, mask), obj({"image": x, "mask": mask}).loss
        else:  # EMAE's own path with the HF mask as its one part
            ours = obj.predict(x, mask.unsqueeze(1))[0]
            from mimscale.objectives.mae import masked_mse

            loss = masked_mse(ours, obj.target(x), mask)
    assert torch.allclose(out.logits, ours, atol=1e-5), (out.logits - ours).abs().max()
    assert torch.allclose(out.loss, loss, atol=1e-6)
    # and back: model.init of the HF folder (or of the run) restores an MAE with the same predictions
    from mimscale.models.init import init_module
    from mimscale.objectives.mae import MAE

    for src in (tmp_path / "hf", tmp_path / "run"):
        again = MAE(build_vit("vit_micro", 32, 4), MAE.Config(decoder_dim=32, decoder_depth=2, decoder_heads=4)).eval()
        lines = init_module(again, src)
        assert len(lines) == 2 and all("missing 0" in ln for ln in lines), lines
        with torch.no_grad():
            assert torch.allclose(again.predict(x, mask), ours, atol=1e-5)


def test_hf_mae_export_refuses_what_vitmae_cannot_be_in_one_line(tmp_path, capsys):
    import yaml

    ours = _perturbed("vit_micro", 32, 4)
    for objective in ("mae_plus", "conmim"):
        rd = tmp_path / objective
        rd.mkdir()
        save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(rd / "encoder.safetensors"))
        (rd / "config.yaml").write_text(yaml.safe_dump({"objective": {"name": objective}}))
        assert main(["export", str(rd), "--out", str(tmp_path / "x"), "--format", "hf-mae"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        if objective == "mae_plus":  # why, in one line
            assert "drops the hidden patches before the encoder" in err[0] and "inserts none" in err[0], err[0]
        else:
            assert "a conmim run has no MAE pixel decoder" in err[0] and "--format hf or timm" in err[0], err[0]
    assert not (tmp_path / "x").exists()
