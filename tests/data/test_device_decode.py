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
    dht = good.index(b"\xff\xc4") + 5  # the 16 code-length counts of the first Huffman table
    bad = good[:dht] + b"\xff" * 16 + good[dht + 16 :]  # a bogus table: every decoder refuses it (libjpeg, PIL)

    d, _ = shards([6], image=lambda g: ("jpg", bad if g == 2 else images.jpeg(g, size=(40, 30))))
    ld = loader(d, "device", num_workers=0, shuffle=False)
    (b,) = batches(ld, 1)
    assert b["image"].shape == (6, 3, 16, 16) and torch.isfinite(b["image"]).all()
    assert ld.stats["device_decode_failed"] == 1
    flat = b["image"].flatten(2)  # [6, C, H*W]: a blank image is one value per channel
    assert (flat[2] == flat[2, :, :1]).all() and all(flat[i].std(-1).min() > 0 for i in (0, 1, 3, 4, 5))


def test_resize_weights_are_the_antialiased_bicubic_of_interpolate():
    """Wy @ image @ Wx^T == F.interpolate(crop, bicubic, antialias) for shrinking, enlarging and 1:1 crops, and a
    flip folded into Wx equals flipping the result (the batched path of DeviceDecoder)."""
    import torch.nn.functional as F

    from mimscale.data.device_decode import resize_weights

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        hi, wi = (int(x) for x in torch.randint(8, 70, (2,), generator=g))
        img = torch.randint(0, 256, (3, hi, wi), generator=g).float()
        h, w = int(torch.randint(1, hi + 1, (), generator=g)), int(torch.randint(1, wi + 1, (), generator=g))
        t, left = int(torch.randint(0, hi - h + 1, (), generator=g)), int(torch.randint(0, wi - w + 1, (), generator=g))
        H = W = h if trial == 0 else int(torch.randint(4, 40, (), generator=g))  # trial 0: 1:1 in height
        ref = F.interpolate(img[None, :, t : t + h, left : left + w], size=(H, W), mode="bicubic", antialias=True)[0]
        wy = resize_weights(torch.tensor([float(t)]), torch.tensor([float(h)]), H, hi)[0]
        wx = resize_weights(torch.tensor([float(left)]), torch.tensor([float(w)]), W, wi)[0]
        assert torch.allclose(wy @ img @ wx.T, ref, atol=2e-3), trial
        assert torch.allclose(wy @ img @ wx.flip(0).T, ref.flip(-1), atol=2e-3)
        assert (wy[:, :t] == 0).all() and (wy[:, t + h :] == 0).all()  # nothing outside the crop


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name}.wait_stream({other.name})")


class _RecordingStreams:
    """The CudaStreams interface on a CPU: logs every stream call, in order."""

    def __init__(self):
        self.log, self.now = [], None
        self.main = _Stream("main", self.log)

    def current(self, device):
        return self.now or self.main

    def new(self, device):
        self.log.append(f"new({device})")
        return _Stream(f"side{self.log.count(f'new({device})')}", self.log)

    def use(self, stream):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.log.append(f"enter({stream.name})")
            self.now = stream
            yield
            self.now = None
            self.log.append(f"exit({stream.name})")

        return ctx()

    def record(self, tensor, stream):
        self.log.append(f"record({int(tensor[0, 0, 0])}, {stream.name})")


def test_device_decode_is_ordered_with_the_callers_stream():
    """decode_in_order: the side stream waits for the caller's stream, the decode runs with the side stream
    CURRENT (its outputs come from the side stream's pool, not from blocks the queued backward may still use),
    the caller's stream waits for the side stream, and every output is record_stream-ed on the caller's stream
    (its block is not reused before the caller's kernels that read it have run). DeviceDecoder makes one side
    stream per device and routes every CUDA decode through it."""
    from mimscale.data.device_decode import DeviceDecoder, decode_in_order

    api = _RecordingStreams()

    def work():
        api.log.append(f"decode on {api.current(None).name}")
        return [torch.full((1, 2, 2), 7), None, torch.full((1, 2, 2), 9)]

    side = _Stream("side", api.log)
    out = decode_in_order(work, side, api, torch.device("cuda", 0))
    assert [o is None for o in out] == [False, True, False]
    assert api.log == [
        "side.wait_stream(main)",
        "enter(side)",
        "decode on side",
        "exit(side)",
        "main.wait_stream(side)",
        "record(7, main)",
        "record(9, main)",
    ]
    # through the decoder (nvJPEG replaced by a stand-in: no GPU here): one side stream for all batches
    api = _RecordingStreams()
    dec = DeviceDecoder([TrainTransform(8)], stacked=False, streams=api)
    dec._decode_jpegs = lambda chunks, device: [  # type: ignore[method-assign]
        (api.log.append(f"nvjpeg on {api.current(None).name}"), torch.full((3, 4, 4), 5, dtype=torch.uint8))[1]
        for _ in chunks
    ]
    info = [[1, 4, 4, 3], [1, 4, 4, 3]]
    for _ in range(2):
        dec._images([torch.zeros(3, dtype=torch.uint8)] * 2, info, torch.device("cuda", 0))
    assert api.log.count("new(cuda:0)") == 1
    assert api.log[1:] == 2 * [
        "side1.wait_stream(main)",
        "enter(side1)",
        "nvjpeg on side1",
        "nvjpeg on side1",
        "exit(side1)",
        "main.wait_stream(side1)",
        "record(5, main)",
        "record(5, main)",
    ]


def test_same_size_images_take_the_batched_path(shards, images):
    """Images of one size go through two matrix products per batch, not a resize per view, and give the CPU
    path's batches within the resize tolerance (flips included)."""
    from unittest import mock

    import torch.nn.functional as F

    d, _ = shards([12] * 2, image=lambda g: ("jpg", images.jpeg(g, size=(40, 30))))
    cpu = batches(loader(d, "cpu", num_workers=0), 2)
    with mock.patch.object(F, "interpolate", side_effect=AssertionError("per-view resize")):
        dev = batches(loader(d, "device", num_workers=0), 2)
    for x, y in zip(cpu, dev):
        mean, worst = levels(x["image"], y["image"])
        assert mean < 0.3 and worst <= 8, (mean, worst)
