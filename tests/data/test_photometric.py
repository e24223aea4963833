"""Photometric perturbations with explicit randomness (mimscale.data.photometric)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.data.photometric import Photometric, PhotometricConfig, SharedGeometryViews
from mimscale.data.transforms import TrainTransform
from mimscale.errors import ConfigError

NONE = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def rgb(seed: int = 0, size: int = 24) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8))


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int32)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_all_off_is_identity_and_consumes_a_fixed_number_of_draws():
    img = rgb()
    g1, g2 = gen(1), gen(1)
    out = Photometric(PhotometricConfig(**NONE))(img, g1)
    assert np.array_equal(arr(out), arr(img))
    Photometric(PhotometricConfig())(img, g2)  # everything possible switched on
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # same generator advance


def test_grayscale():
    out = Photometric(PhotometricConfig(**{**NONE, "grayscale_p": 1.0}))(rgb(), gen())
    a = arr(out)
    assert out.mode == "RGB" and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_solarize_inverts_bright_pixels():
    img = rgb()
    out = arr(Photometric(PhotometricConfig(**{**NONE, "solarize_p": 1.0}))(img, gen()))
    src = arr(img)
    assert np.array_equal(out, np.where(src >= 128, 255 - src, src))


def test_blur_smooths():
    img = rgb()
    out = arr(Photometric(PhotometricConfig(**{**NONE, "blur_p": 1.0, "blur_radius": (1.5, 2.0)}))(img, gen()))
    assert np.abs(np.diff(out, axis=1)).mean() < 0.5 * np.abs(np.diff(arr(img), axis=1)).mean()


def test_brightness_jitter_scales_within_its_range():
    img = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    cfg = PhotometricConfig(**{**NONE, "jitter_p": 1.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0})
    values = {int(arr(Photometric(cfg)(img, gen(s)))[0, 0, 0]) for s in range(30)}
    assert len(values) > 10 and min(values) >= 60 and max(values) <= 140


def test_probabilities_are_respected():
    cfg = PhotometricConfig(**{**NONE, "grayscale_p": 0.2})
    img = rgb()
    hits = sum(np.ptp(arr(Photometric(cfg)(img, gen(s))), axis=2).max() == 0 for s in range(400))
    assert 50 < hits < 110  # ~ 80 of 400


def test_grayscale_images_stay_grayscale():
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3, mode="L")
    for s in range(20):
        out = Photometric()(img, gen(s))
        assert out.mode == "L" and out.size == (8, 8)


def test_reproducible_and_picklable():
    tf = SharedGeometryViews(TrainTransform(16), Photometric())
    tf2 = pickle.loads(pickle.dumps(tf))
    a, b = tf(rgb(3, 40), gen(7)), tf2(rgb(3, 40), gen(7))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_teacher"], b["image_teacher"])


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"blur_p": -0.1}, "blur_p"),
        ({"hue": 0.7}, "hue"),
        ({"brightness": -1.0}, "brightness"),
        ({"blur_radius": (2.0, 1.0)}, "blur_radius"),
        ({"solarize_threshold": 300}, "solarize_threshold"),
    ],
)
def test_bad_config_is_one_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        Photometric(PhotometricConfig(**bad))
