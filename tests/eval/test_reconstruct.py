"""Reconstruction grids: four columns per fixed validation image, visible patches pasted exactly, norm-pix
predictions un-normalised with the original patches' statistics (and the caption says so), the crop-decoder
objectives drawn at their crop size, and "not a pixel objective" for the rest."""

from __future__ import annotations

import json

import pytest
import torch

from mimscale.eval import reconstruct as R
from mimscale.models.vit import build_vit
from mimscale.objectives.adpe import MAEPlus
from mimscale.objectives.mae import MAE, normalize_patches

pytestmark = pytest.mark.unit
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _images(b: int, s: int) -> torch.Tensor:
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(0)).clamp(-2, 2)


def _tile(pic, row: int, col: int, s: int, gap: int):
    y, x = row * (s + gap), col * (s + gap)
    return pic[y : y + s, x : x + s]


def test_mae_grid_columns(tmp_path):
    torch.manual_seed(0)
    obj = MAE(build_vit("vit_micro", 16, 4), MAE.Config(decoder_dim=32, decoder_depth=1, decoder_heads=4))
    assert R.pixel_kind(obj) == "decoder" and R.image_size(obj) == 16
    imgs = _images(3, 16)
    pic, caption = R.grid(obj, imgs, MEAN, STD, mask_ratio=0.75, seed=3)
    gap = 2
    assert pic.shape == (3 * 16 + 2 * gap, 4 * 16 + 3 * gap, 3) and pic.dtype.name == "uint8"
    assert "ORIGINAL patch's mean and variance" in caption and "75%" in caption
    mask = R.fixed_mask(16, 0.75, 3, seed=3)
    assert mask.sum(1).tolist() == [12, 12, 12]
    for i in range(3):
        orig, masked, pasted = (_tile(pic, i, c, 16, gap).astype(int) for c in (0, 1, 3))
        vis = ~mask[i].reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1).numpy()
        assert (pasted[vis] == orig[vis]).all() and (masked[vis] == orig[vis]).all()  # visible patches kept
        assert (masked[~vis] == 128).all()  # hidden: the data mean (0.5 -> 128)
    assert obj.training  # put back as it was


def test_norm_pix_predictions_take_the_original_patch_statistics():
    orig = torch.randn(2, 16, 48) * 3 + 1
    pred = normalize_patches(orig, 1e-6)  # a perfect norm-pix prediction
    assert torch.allclose(R.unnormalize(pred, orig, 1e-6), orig, atol=1e-4)


def test_crop_decoder_objective_draws_at_its_crop_size(tmp_path):
    torch.manual_seed(0)
    obj = MAEPlus(build_vit("vit_micro", 32, 4), MAEPlus.tiny_config())
    assert R.pixel_kind(obj) == "tokens" and R.image_size(obj) == 16
    path = R.save(obj, _images(2, 16), MEAN, STD, tmp_path)
    assert path is not None and path.is_file()
    meta = json.loads((tmp_path / R.META).read_text())
    assert meta["pixel"] and meta["images"] == 2 and meta["objective"] == "mae_plus"


def test_not_a_pixel_objective(tmp_path):
    enc = build_vit("vit_micro", 16, 4)
    assert R.pixel_kind(enc) is None
    assert R.save(enc, torch.empty(0), (), (), tmp_path) is None
    assert json.loads((tmp_path / R.META).read_text())["caption"] == R.NOT_PIXEL
