"""CLIPTeacher: patch features of a real open_clip image tower, frozen, identified by its file hash."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mimscale.cli import main
from mimscale.errors import CheckpointError
from mimscale.teachers.clip import TINY_CLIP_CFG, CLIPTeacher, build_clip, file_sha256, save_clip

MEAN, STD = [0.286] * 3, [0.353] * 3


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "random.pt"
    save_clip(build_clip(TINY_CLIP_CFG), TINY_CLIP_CFG, path, mean=MEAN, std=STD)
    return path


def test_patch_features_are_open_clip_tokens_after_ln_post_times_proj(random_clip):
    t = CLIPTeacher(random_clip)
    x = torch.randn(3, 3, 32, 32)
    f = t(x)
    assert f.shape == (3, 64, TINY_CLIP_CFG["embed_dim"]) and f.dtype == torch.float32
    assert (t.grid, t.patch_size, t.out_dim) == ((8, 8), 4, 64)
    v = t.visual  # open_clip's own forward: tokens after ln_post with the class token dropped
    v.output_tokens = True
    try:
        pooled, tokens = v(x)
    finally:
        v.output_tokens = False
    torch.testing.assert_close(f, tokens @ v.proj, rtol=0, atol=1e-6)
    # grey input is broadcast to RGB
    torch.testing.assert_close(t(x[:, :1]), t(x[:, :1].expand(-1, 3, -1, -1)))


def test_grid_resizing(random_clip):
    t_in, t_feat = CLIPTeacher(random_clip), CLIPTeacher(random_clip, resize="features")
    x = torch.randn(2, 3, 32, 32)
    # "input": a 2x larger student grid sees the image resized to 16 * 4 px with an interpolated pos-emb
    assert t_in(x, grid=(16, 16)).shape == (2, 256, 64)
    assert t_in(torch.randn(2, 3, 56, 56), grid=(14, 14)).shape == (2, 196, 64)
    # "features": native 8x8 run, feature map resized; the native grid is untouched by both modes
    assert t_feat(x, grid=(14, 14)).shape == (2, 196, 64)
    torch.testing.assert_close(t_in(x), t_feat(x))
    # "features" on a 64 px image = the native run on the image resized (bicubic, antialiased) to 32 px
    x64 = torch.randn(2, 3, 64, 64)
    small = torch.nn.functional.interpolate(x64, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(t_feat(x64, grid=(8, 8)), t_in(small))


def test_bf16_close_to_fp32(random_clip):
    x = torch.randn(2, 3, 32, 32)
    f32 = CLIPTeacher(random_clip)(x)
    bf = CLIPTeacher(random_clip, dtype=torch.bfloat16)(x)
    assert bf.dtype == torch.float32
    assert (bf - f32).abs().mean() < 0.05 * f32.abs().mean()


def test_frozen_and_excluded_from_the_owner(random_clip):
    t = CLIPTeacher(random_clip)

    class Owner(nn.Module):  # an objective holding the teacher as a submodule
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(64, 4)
            self.teacher = t

    owner = Owner().train()
    assert not t.training and not t.visual.training
    assert list(t.parameters()) == [] and t.num_params > 10_000
    assert {n for n, _ in owner.named_parameters()} == {"head.weight", "head.bias"}
    assert set(owner.state_dict()) == {"head.weight", "head.bias"}
    assert all(not p.requires_grad for p in t.visual.parameters())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss = owner.head(t(x)).sum()
    assert not t(x).requires_grad
    loss.backward() if loss.requires_grad else None
    assert all(p.grad is None for p in t.visual.parameters())
    owner.to(torch.float64)  # .to() reaches the hidden tower
    assert t.visual.proj.dtype == torch.float64
    assert t.flops_per_image() > 0


def test_teacher_id_is_path_and_sha256(tmp_path):
    path = tmp_path / "c.pt"
    torch.manual_seed(1)
    save_clip(build_clip(TINY_CLIP_CFG), TINY_CLIP_CFG, path, mean=MEAN, std=STD)
    a = CLIPTeacher(path).teacher_id()
    assert a["path"] == str(path.resolve()) and a["sha256"] == file_sha256(path) and len(a["sha256"]) == 64
    torch.manual_seed(2)
    save_clip(build_clip(TINY_CLIP_CFG), TINY_CLIP_CFG, path, mean=MEAN, std=STD)
    b = CLIPTeacher(path).teacher_id()
    assert b["path"] == a["path"] and b["sha256"] != a["sha256"]
    json.dumps(b)


def test_plain_open_clip_checkpoint_by_arch(tmp_path, random_clip):
    """A plain open_clip state dict loads through open_clip.create_model(arch, pretrained=path)."""
    import open_clip

    cfg_file = tmp_path / "mimscale-test-tiny.json"
    cfg_file.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg_file)
    ref = CLIPTeacher(random_clip)
    plain = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(torch.load(random_clip, weights_only=True)["state_dict"], plain)
    with pytest.raises(CheckpointError, match="plain state dict"):
        CLIPTeacher(plain)
    t = CLIPTeacher(plain, arch="mimscale-test-tiny")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(t(x), ref(x))
    wider = json.loads(json.dumps(TINY_CLIP_CFG))
    wider["vision_cfg"]["width"] = 48
    (tmp_path / "mimscale-test-wider.json").write_text(json.dumps(wider))
    open_clip.add_model_config(tmp_path / "mimscale-test-wider.json")
    with pytest.raises(CheckpointError, match="cannot load .* as open_clip 'mimscale-test-wider'"):
        CLIPTeacher(plain, arch="mimscale-test-wider")


def test_missing_and_corrupt_files_give_one_clear_line(tmp_path, random_clip, capsys):
    with pytest.raises(CheckpointError, match="not found"):
        CLIPTeacher(tmp_path / "nope.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(random_clip.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        CLIPTeacher(broken)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else/1"}, other)
    with pytest.raises(CheckpointError, match="not a CLIP teacher"):
        CLIPTeacher(other)
    rc = main(
        ["teacher", "fit-kmeans", str(tmp_path), "--teacher", str(broken), "--k", "4", "--out", str(tmp_path / "k")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "corrupt" in err[0], err
