"""Fine-tune augmentation: reproducible from the loader's generators, global RNGs left untouched."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mimscale.errors import ConfigError
from mimscale.eval.augment import FinetuneTransform, MixupCollate, random_erase, seeded_global_rng, smooth_one_hot


def _img(seed=0, mode="L", size=28):
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def g(seed):
    return torch.Generator().manual_seed(seed)


def test_transform_is_reproducible_and_leaves_global_rngs_alone():
    tf = FinetuneTransform(16, reprob=0.5)
    random.seed(123)
    np.random.seed(123)
    py, npy = random.getstate(), np.random.get_state()
    a = tf(_img(), g(7))
    b = tf(_img(), g(7))
    c = tf(_img(), g(8))
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random.getstate() == py and np.array_equal(np.random.get_state()[1], npy[1])


def test_randaugment_changes_the_image_and_can_be_off():
    img = _img(mode="RGB")
    plain = FinetuneTransform(16, rand_aug="", reprob=0.0)
    ra = FinetuneTransform(16, rand_aug="rand-m9-mstd0.5-inc1", reprob=0.0)
    diffs = [not torch.equal(plain(img, g(s)), ra(img, g(s))) for s in range(8)]  # same crop/flip draws
    assert sum(diffs) >= 6
    with pytest.raises(ConfigError, match="rand_aug"):
        FinetuneTransform(16, rand_aug="nonsense-m9")


def test_seeded_global_rng_draws_one_seed_from_the_generator():
    with seeded_global_rng(g(1)) as s1:
        x = random.random(), np.random.rand()
    with seeded_global_rng(g(1)) as s2:
        y = random.random(), np.random.rand()
    assert s1 == s2 and x == y


def test_random_erase():
    x = torch.zeros(3, 16, 16)
    assert torch.equal(random_erase(x, 0.0, g(0)), x)
    y = random_erase(x, 1.0, g(0))
    changed = (y != 0).any(0)
    assert 0 < changed.sum() < 16 * 16 and torch.equal(x, torch.zeros(3, 16, 16))  # a box; input untouched
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    assert changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # it is one rectangle
    assert torch.equal(y, random_erase(x, 1.0, g(0)))


def _samples(n=8, classes=10):
    return [{"image": torch.full((3, 4, 4), float(i)), "label": i % classes, "key": str(i)} for i in range(n)]


def test_mixup_collate_soft_targets():
    col = MixupCollate(10, mixup=0.8, cutmix=1.0, smoothing=0.1)
    b1, b2 = col(_samples(), g(3)), col(_samples(), g(3))
    assert b1["target"].shape == (8, 10) and torch.allclose(b1["target"].sum(1), torch.ones(8))
    assert torch.equal(b1["image"], b2["image"]) and torch.equal(b1["target"], b2["target"])
    assert not torch.equal(b1["image"], torch.stack([s["image"] for s in _samples()]))  # mixed
    with pytest.raises(ConfigError, match="even"):
        col(_samples(7), g(0))


def test_no_mixup_gives_smoothed_one_hot():
    b = MixupCollate(10, mixup=0.0, cutmix=0.0, smoothing=0.1)(_samples(), g(0))
    assert torch.equal(b["image"], torch.stack([s["image"] for s in _samples()]))
    assert torch.allclose(b["target"], smooth_one_hot(b["label"], 10, 0.1))
    assert b["target"][0, 0].item() == pytest.approx(0.91) and b["target"][0, 1].item() == pytest.approx(0.01)
