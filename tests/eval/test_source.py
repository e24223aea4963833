"""SOURCE loading: run directory or exported file, geometry inferred and checked; bad files -> one line, exit 2."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mimscale.cli import main
from mimscale.errors import CheckpointError
from mimscale.eval.source import load_source
from mimscale.models.vit import build_vit


def _export(path, arch="vit_micro", img=16, patch=4, **kw):
    torch.manual_seed(0)
    enc = build_vit(arch, img, patch, 3, **kw)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return enc


def test_exported_file_geometry_is_inferred(tmp_path):
    enc = _export(tmp_path / "e.safetensors", img=24, patch=4)
    s = load_source(tmp_path / "e.safetensors")
    assert (s.arch, s.img_size, s.patch_size, s.in_chans, s.pos_embed) == ("vit_micro", 24, 4, 3, "sincos")
    assert s.run_dir is None
    for k, v in enc.state_dict().items():
        assert torch.equal(s.encoder.state_dict()[k], v)
    _export(tmp_path / "l.safetensors", pos_embed="learned")
    assert load_source(tmp_path / "l.safetensors").pos_embed == "learned"


def test_run_dir(tmp_path):
    _export(tmp_path / "encoder.safetensors")
    cfg = {
        "model": {"arch": "vit_micro", "img_size": 16, "patch_size": 4, "in_chans": 3},
        "data": {"mean": [0.3, 0.3, 0.3], "std": [0.4, 0.4, 0.4]},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "summary.json").write_text('{"steps": 77}')
    s = load_source(tmp_path)
    assert s.run_dir == tmp_path and s.step == 77 and s.mean == (0.3, 0.3, 0.3)
    cfg["model"]["img_size"] = 32  # config and weights disagree
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="img_size=32"):
        load_source(tmp_path)


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "not_vit", "wrong_arch", "no_config"])
def test_bad_sources_give_one_line(tmp_path, case):
    f = tmp_path / "e.safetensors"
    kw = {}
    if case == "corrupt":
        f.write_bytes(b"\x00garbage" * 10)
    elif case == "truncated":
        _export(f)
        f.write_bytes(f.read_bytes()[:500])
    elif case == "not_vit":
        save_file({"w": torch.zeros(3)}, str(f))
    elif case == "wrong_arch":
        _export(f)
        kw["arch"] = "vit_base"
    elif case == "no_config":
        f = tmp_path
    with pytest.raises(CheckpointError) as ei:
        load_source(f, **kw)
    assert "\n" not in str(ei.value)


def test_cli_exits_2_with_one_line(tmp_path, capsys, fmnist_small):
    rc = main(
        [
            "eval",
            "linear",
            str(tmp_path / "nope.safetensors"),
            "--data",
            str(fmnist_small["train"]),
            "--test",
            str(fmnist_small["test"]),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "not found" in err
    _export(tmp_path / "e.safetensors")
    rc = main(
        [
            "eval",
            "knn",
            str(tmp_path / "e.safetensors"),
            "--data",
            str(fmnist_small["train"]),
            "--test",
            str(fmnist_small["test"]),
            "k=abc",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "k must be an integer" in err


def test_relative_position_export_is_read_back_with_its_geometry(tmp_path):
    """A BEiT-layout export (pos_embed=relative: per-block relative tables, gamma_1/2, no pos_embed) is
    recognised from its tensors and loads strictly into the encoder eval builds."""
    import torch
    from safetensors.torch import save_file

    from mimscale.eval.source import load_source
    from mimscale.models.vit import build_vit

    torch.manual_seed(0)
    m = build_vit("vit_micro", 32, 4, pos_embed="relative", layer_scale_init=0.1).eval()
    with torch.no_grad():
        m.rel_pos_bias.relative_position_bias_table.normal_()
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in m.export_state_dict(m.state_dict()).items()}, str(path))
    src = load_source(path)
    assert (src.arch, src.img_size, src.patch_size, src.pos_embed) == ("vit_micro", 32, 4, "relative")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(src.encoder.forward_features(x), m.forward_features(x))
    from mimscale.eval.finetune import build_classifier

    clf = build_classifier(src, classes=10, drop_path=0.0, head_init_std=2e-5)  # fine-tuning reads it too
    assert torch.equal(clf.rel_pos_bias.relative_position_bias_table, m.rel_pos_bias.relative_position_bias_table)
    assert torch.equal(clf.blocks[2].ls2.gamma, m.blocks[2].ls2.gamma)


def test_another_img_size_resamples_the_position_embedding(tmp_path):
    from timm.layers import resample_abs_pos_embed

    enc = _export(tmp_path / "l.safetensors", pos_embed="learned")
    with torch.no_grad():
        enc.pos_embed.normal_()
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "l.safetensors"))
    s = load_source(tmp_path / "l.safetensors", img_size=32)  # trained at 16 px: 4x4 -> 8x8 patches
    assert s.img_size == 32 and s.encoder(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    want = resample_abs_pos_embed(enc.pos_embed.detach(), [8, 8], num_prefix_tokens=1)
    assert torch.allclose(s.encoder.pos_embed, want, atol=1e-6)
    with pytest.raises(CheckpointError, match="not a multiple of the patch size 4"):
        load_source(tmp_path / "l.safetensors", img_size=30)
