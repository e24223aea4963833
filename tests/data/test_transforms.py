"""Transforms: explicit-generator determinism, shapes, channel handling, normalization, pickling."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.data import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, rrc_params
from mimscale.errors import DataError


def _img(w=40, h=30, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_train_transform_deterministic_given_generator():
    t = TrainTransform(16)
    img = _img()
    a, b = t(img, _gen(7)), t(img, _gen(7))
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    outs = [t(img, _gen(s)) for s in range(8)]
    assert len({o.numpy().tobytes() for o in outs}) == 8  # different seeds -> different crops/flips


def test_no_global_rng_is_used():
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    TrainTransform(16)(_img(), _gen(1))
    EvalTransform(16)(_img(), None)
    rrc_params(40, 30, (0.2, 1.0), (3 / 4, 4 / 3), _gen(2))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_grayscale_becomes_three_channels():
    g = _img(mode="L")
    x = TrainTransform(12, hflip=False)(g, _gen(0))
    assert x.shape == (3, 12, 12)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = x * std + mean
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[1], raw[2], atol=1e-5, rtol=0)
    y = TrainTransform(12, mean=(0.5,), std=(0.5,), in_chans=1)(g, _gen(0))
    assert y.shape == (1, 12, 12)
    z = TrainTransform(12, mean=(0.5,), std=(0.5,), in_chans=1)(_img(), _gen(0))  # RGB -> L
    assert z.shape == (1, 12, 12)


@pytest.mark.parametrize("mode", ["P", "RGBA", "CMYK", "LA", "I;16"])
def test_exotic_modes(mode):
    img = _img().convert(mode) if mode != "I;16" else Image.fromarray(np.full((20, 20), 1000, dtype=np.uint16))
    assert TrainTransform(8)(img, _gen(0)).shape == (3, 8, 8)
    assert EvalTransform(8)(img, None).shape == (3, 8, 8)


def test_normalization_values():
    img = Image.new("RGB", (20, 20), (255, 0, 128))
    x = EvalTransform(10)(img)
    expected = (torch.tensor([255, 0, 128]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 5, 5], expected.float(), atol=1e-5, rtol=0)


def test_eval_transform_center_crop():
    img = Image.new("RGB", (60, 30), 0)
    img.paste((255, 255, 255), (20, 0, 40, 30))  # white band in the middle third
    x = EvalTransform(16, mean=(0, 0, 0), std=(1, 1, 1))(img, _gen(0))
    assert x.shape == (3, 16, 16)
    assert torch.equal(EvalTransform(16)(img, _gen(0)), EvalTransform(16)(img, _gen(99)))  # generator ignored
    # shorter side 30 -> 16, width 60 -> 32, center 16 columns = the white band (edges blur from bicubic)
    assert x[:, :, 4:12].min() > 0.95
    assert EvalTransform(16, crop_pct=0.875)(img).shape == (3, 16, 16)


def test_rrc_params_bounds_and_fallback():
    g = _gen(0)
    for _ in range(200):
        top, left, h, w = rrc_params(50, 40, (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert top >= 0 and top + h <= 40 and left >= 0 and left + w <= 50 and h > 0 and w > 0
        assert 0.15 * 2000 <= h * w <= 2000
    # an extreme aspect ratio never fits -> center crop clamped to the allowed ratio
    top, left, h, w = rrc_params(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), _gen(1))
    assert (h, w) == (10, 13) and left == (1000 - 13) // 2 and top == 0


def test_transforms_pickle():
    for t in (TrainTransform(16, scale=(0.5, 1.0)), EvalTransform(16, crop_pct=0.9)):
        t2 = pickle.loads(pickle.dumps(t))
        assert torch.equal(t(_img(), _gen(3)), t2(_img(), _gen(3)))
        assert len(pickle.dumps(t)) < 2000
        assert "img_size" in repr(t)


def test_bad_arguments_raise_data_error():
    with pytest.raises(DataError, match="in_chans=1"):
        TrainTransform(16, in_chans=1)
    with pytest.raises(DataError, match="scale"):
        TrainTransform(16, scale=(0.5, 1.5))
    with pytest.raises(DataError, match="crop_pct"):
        EvalTransform(16, crop_pct=0)
    with pytest.raises(DataError, match="in_chans must be 1 or 3"):
        EvalTransform(16, in_chans=2, mean=(0, 0), std=(1, 1))


def test_layout_and_values_match_torchvision_per_pixel():
    """Channels-first layout, per-channel mean/std: equal to torchvision's to_tensor + normalize."""
    import numpy as np
    import torchvision.transforms.functional as TF

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    ref = TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)
    x = EvalTransform(16)(img)  # same size: the resize/crop leaves pixels untouched
    assert x.is_contiguous() and x.dtype == torch.float32
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)


def _jpeg(w, h, seed=0, mode="RGB"):
    import io

    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1).astype(np.uint8)
    arr = np.clip(arr + rng.integers(0, 12, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_fast_path_equals_the_pil_path_within_resize_tolerance(mode):
    """Same draws on both paths (box + flip); pixels within the resize kernels' rounding. Small outputs from a big
    image take the reduced-size DCT decode (1/2 .. 1/8), which must stay close too."""
    import io

    from mimscale.data.transforms import reduced_decode_scale

    data = _jpeg(320, 240, mode=mode)
    for out, tol in ((128, 0.6), (24, 3.0)):
        fast, slow = TrainTransform(out), TrainTransform(out, fast=False)
        errs, scales = [], []
        for seed in range(12):
            a = fast(Image.open(io.BytesIO(data)), _gen(seed))
            b = slow(Image.open(io.BytesIO(data)), _gen(seed))
            errs.append(((a - b).abs() * 0.226 * 255).mean().item())
            top, left, h, w, _ = fast.draw(320, 240, _gen(seed))
            scales.append(reduced_decode_scale(320, 240, h, w, out, out))
        assert max(errs) < tol, (out, errs)
        assert (set(scales) == {1}) == (out == 128)  # 24 px crops decode at reduced size
    g1, g2 = _gen(5), _gen(5)
    fast(Image.open(io.BytesIO(data)), g1)
    slow(Image.open(io.BytesIO(data)), g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))  # same number of draws


def test_finish_batch_writes_rows_and_collate_takes_them_without_a_copy():
    import io

    from mimscale.data.streams import stack_rows

    data = [_jpeg(64, 48, seed=s) for s in range(4)]
    t = TrainTransform(16)
    rows = t.finish_batch([t.crop_pixels(Image.open(io.BytesIO(d)), _gen(i)) for i, d in enumerate(data)])
    ref = torch.stack([t(Image.open(io.BytesIO(d)), _gen(i)) for i, d in enumerate(data)])
    assert torch.equal(rows, ref)
    views = [rows[i] for i in range(4)]
    assert stack_rows(views) is rows  # zero-copy
    assert stack_rows(views[::-1]) is not rows and torch.equal(stack_rows(views[::-1]), rows.flip(0))
    assert torch.equal(stack_rows([ref[0].clone(), ref[1]]), ref[:2])
