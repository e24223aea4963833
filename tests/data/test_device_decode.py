"""The device-decode path run on the CPU (device=cpu): same draws, same batches (within resize tolerance) as the
CPU path, exact resume, multi-crop, fallbacks for non-JPEG and corrupt images, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from mimscale.data import ShardLoader, TrainTransform
from mimscale.data.device_decode import resolve_decode
from mimscale.data.photometric import Photometric, SharedGeometryViews
from mimscale.data.transforms import MultiCrop
from mimscale.errors import ConfigError
from mimscale.masking import MaskCollate, MaskSpec

STD = 0.226 * 255  # ~ grey levels per normalised unit


@pytest.fixture
def mixed_image(images):
    """Mostly RGB JPEGs of varied size, some grey JPEGs, some PNGs (the host-decoded fallback)."""

    def make(g: int):
        if g % 7 == 3:
            return "png", images.png(g, size=(40, 30))
        size = (40 + (g * 7) % 25, 30 + (g * 5) % 20)
        return "jpg", images.jpeg(g, size=size, mode="L" if g % 5 == 1 else "RGB")

    return make


def loader(src, decode, transform=None, **kw):
    args = dict(
        batch_size=6,
        transform=transform or TrainTransform(16, fast=False),
        collate=MaskCollate(MaskSpec("random", 16, 0.75)),
        num_workers=2,
        seed=3,
        shuffle_buffer=10,
        decode=decode,
    )
    args.update(kw)
    return ShardLoader(src, **args)


def batches(ld, n):
    out = []
    while len(out) < n:
        for b in ld:
            out.append(ld.to_device(b, "cpu"))
            if len(out) == n:
                break
    return out


def levels(a, b):
    d = (a - b).abs() * STD
    return d.mean().item(), d.max().item()


def test_device_path_gives_the_cpu_paths_batches(shards, mixed_image):
    d, _ = shards([14] * 4, image=mixed_image)
    cpu, dev = loader(d, "cpu"), loader(d, "device")
    assert dev.decode == "device" and cpu.decode == "cpu"
    raw = next(iter(loader(d, "device")))  # what the workers ship: bytes + boxes, no pixels
    assert "image" not in raw and raw["encoded"].dtype == torch.uint8
    assert raw["crop_boxes"].shape == (6, 1, 5) and raw["encoded_offsets"].shape == (7,)
    a, b = batches(cpu, 6), batches(dev, 6)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and torch.equal(x["label"], y["label"])
        assert torch.equal(x["mask"], y["mask"])  # collate draws unchanged
        assert y["image"].shape == x["image"].shape == (6, 3, 16, 16) and y["image"].dtype == torch.float32
        mean, worst = levels(x["image"], y["image"])
        assert mean < 0.3 and worst <= 8, (mean, worst)  # resize-kernel tolerance (measured 0.17 / 6)
    fast = batches(loader(d, "cpu", transform=TrainTransform(16)), 6)  # the fast CPU path: same crops too
    for x, y in zip(fast, b):
        mean, worst = levels(x["image"], y["image"])
        assert mean < 1.5, mean  # + reduced decode, box rounding (<= 0.95)
    other = batches(loader(d, "device", seed=4), 1)[0]
    assert levels(other["image"], b[0]["image"])[0] > 20  # another seed: other crops (86 levels)


def test_device_path_resumes_exactly(shards, mixed_image):
    d, _ = shards([10] * 4, image=mixed_image, corrupt={7})
    ref = batches(loader(d, "device"), 9)  # 40 - 1 samples / 6 per batch: > 1 epoch
    first = loader(d, "device")
    got = batches(first, 4)
    state = json.loads(json.dumps(first.state_dict()))
    second = loader(d, "device")
    second.load_state_dict(state)
    got += batches(second, 5)
    for x, y in zip(got, ref):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert second.stats["skipped_samples"] == 1  # the corrupt one, skipped in the worker as before
    assert state == loader(d, "cpu").state_dict() | {
        k: state[k] for k in ("epoch", "batches", "cursors", "bad_samples", "bad_shards")
    }


def test_multicrop_on_the_device_path(shards, images):
    d, _ = shards([12] * 2, image=lambda g: ("jpg", images.jpeg(g, size=(48, 40))))
    mc = MultiCrop(3, TrainTransform(8, scale=(0.3, 1.0), fast=False))
    x = batches(loader(d, "cpu", transform=mc, collate=None, num_workers=0), 2)
    y = batches(loader(d, "device", transform=mc, collate=None, num_workers=0), 2)
    for a, b in zip(x, y):
        assert a["image"].shape == b["image"].shape == (6, 3, 3, 8, 8)
        assert levels(a["image"], b["image"])[0] < 0.8


def test_refusals_and_auto():
    views = SharedGeometryViews(TrainTransform(8), Photometric())  # ConMIM's two views: CPU only
    with pytest.raises(ConfigError, match="data.decode=device: the train transform SharedGeometryViews"):
        resolve_decode("device", views)
    with pytest.raises(ConfigError, match="must be one of auto, cpu, device"):
        resolve_decode("gpu", TrainTransform(8))
    expect = "device" if torch.cuda.is_available() else "cpu"
    assert resolve_decode("auto", TrainTransform(8)) == expect
    assert resolve_decode("auto", views) == "cpu"
    assert resolve_decode("device", MultiCrop(2, TrainTransform(8))) == "device"


def test_bad_jpeg_data_is_blank_and_counted(shards, images):
    """A JPEG whose header and end marker are fine but whose data is not: nvJPEG/libjpeg fail, the host retry
    fails, the sample becomes a blank image and is counted (the batch and the run go on)."""
    good = images.jpeg(0, size=(40, 30))
    bad = good[:200] + bytes(range(256)) * 3 + good[-2:]

    d, _ = shards([6], image=lambda g: ("jpg", bad if g == 2 else images.jpeg(g, size=(40, 30))))
    ld = loader(d, "device", num_workers=0, shuffle=False)
    (b,) = batches(ld, 1)
    assert b["image"].shape == (6, 3, 16, 16) and torch.isfinite(b["image"]).all()
    assert ld.stats["device_decode_failed"] <= 1  # libjpeg may still decode the garbage
