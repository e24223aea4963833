"""Decode on the accelerator: loader workers ship JPEG bytes and each sample's crop boxes; the device decodes,
crops, resizes and normalises whole batches (``ShardLoader(decode="device")``, ``data.decode``).

Worker side, :class:`DeviceViews` ``(img, generator) -> sample``: reads only the JPEG header (width, height,
mode) and draws every view's box and flip with the views' own :meth:`TrainTransform.draw` -- the same
uniforms, in the same order, as the CPU path -- so augmentation, the loader state and an exact resume do
not depend on where the pixels are decoded. A sample holds::

    encoded     uint8 [n]           the JPEG bytes (kind 1), or the decoded HWC pixels (kind 0: PNG, CMYK,
                                    palette, a JPEG without an end marker ... anything nvJPEG should not get)
    image_info  int32 [4]           kind, height, width, channels
    crop_boxes  int32 [V, 5]        top, left, h, w, flip of each of the V views

:class:`PackedCollate` packs the ``encoded`` fields of a batch into one buffer (one shared-memory block
between processes instead of B), ``encoded uint8 [sum n]`` + ``encoded_offsets int64 [B + 1]``, and hands the
rest to the objective's collate (masks etc.).

Device side, :meth:`DeviceDecoder.decode` (called by ``ShardLoader.to_device``): one batched
``torchvision.io.decode_jpeg(device=...)`` (nvJPEG on CUDA: the A100/H100 hardware JPEG engine for the
baseline JPEGs it supports, CUDA kernels for the rest; libjpeg-turbo on CPU), then per view a crop (a view),
one bicubic antialiased resize (the kernel family PIL and the CPU path use), rounding to whole grey levels as
the CPU path's uint8 resize does, the flips, and one normalisation of the batch. Output: ``image float32
[B, C, H, W]`` (one view) or ``[B, V, C, H, W]`` (multi-crop), on the device.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mimscale.errors import ConfigError

from .transforms import TrainTransform, batch_buffer, complete_jpeg_bytes

__all__ = ["DeviceViews", "PackedCollate", "DeviceDecoder", "device_views_of", "resolve_decode", "DECODE_MODES"]

log = logging.getLogger("mimscale.data")

DECODE_MODES = ("auto", "cpu", "device")
KIND_PIXELS, KIND_JPEG = 0, 1


def device_views_of(transform: Any) -> tuple[list[TrainTransform], bool] | None:
    """``(views, stacked)`` when ``transform`` can run on the device path (it has ``device_views()``), else None."""
    fn = getattr(transform, "device_views", None)
    return fn() if callable(fn) else None


def resolve_decode(decode: str, transform: Any) -> str:
    """``"cpu"`` or ``"device"`` for ``data.decode`` = auto | cpu | device and this train transform.

    auto: the device path when CUDA is available and the transform has one, else the CPU path. device: the
    device path, or a ConfigError naming the transform when it has none (transforms with photometric views or
    a fixed centre crop: ConMIM, DTM, MaPeT).
    """
    if decode not in DECODE_MODES:
        raise ConfigError(f"data.decode={decode!r} must be one of {', '.join(DECODE_MODES)}")
    if decode == "cpu":
        return "cpu"
    supported = device_views_of(transform) is not None
    if decode == "device":
        if not supported:
            raise ConfigError(
                f"data.decode=device: the train transform {type(transform).__name__} has no device path "
                "(only RandomResizedCrop+flip views: TrainTransform, MultiCrop); set data.decode=cpu"
            )
        return "device"
    if torch.cuda.is_available() and not supported:
        log.info("data.decode=auto: %s has no device path, decoding on the CPU", type(transform).__name__)
    return "device" if supported and torch.cuda.is_available() else "cpu"


def _check_views(views: Sequence[TrainTransform]) -> None:
    if not views or not all(isinstance(v, TrainTransform) for v in views):
        raise ConfigError(f"device decode needs TrainTransform views, got {list(views)!r}")
    first = views[0]
    for v in views[1:]:
        if (v.size, v.in_chans, v.mean, v.std) != (first.size, first.in_chans, first.mean, first.std):
            raise ConfigError("device decode needs views of one size, channel count and mean/std")


class DeviceViews:
    """Worker-side transform of the device path: ``(PIL image, generator) -> {"encoded", "image_info",
    "crop_boxes"}`` (see the module docstring); the pixels are not decoded unless the image is no JPEG."""

    def __init__(self, views: Sequence[TrainTransform]):
        _check_views(views)
        self.views = list(views)

    def __call__(self, img, generator: torch.Generator) -> dict[str, Any]:
        width, height = img.size
        boxes = [v.draw(width, height, generator) for v in self.views]
        first = self.views[0]
        data = complete_jpeg_bytes(img)
        if data is not None:  # a complete RGB/grey JPEG: the device decodes it
            encoded = np.frombuffer(data, dtype=np.uint8)
            info = (KIND_JPEG, height, width, first.in_chans)
        else:  # decode here (also raises on a corrupt image -> skipped)
            pixels = np.ascontiguousarray(first._pixels(first._prepare(img)))
            encoded = pixels.reshape(-1)
            info = (KIND_PIXELS, pixels.shape[0], pixels.shape[1], pixels.shape[2])
        return {
            "encoded": encoded,
            "image_info": torch.tensor(info, dtype=torch.int32),
            "crop_boxes": torch.tensor([[t, left, h, w, int(f)] for t, left, h, w, f in boxes], dtype=torch.int32),
        }

    def __repr__(self) -> str:
        return f"DeviceViews({len(self.views)} x {self.views[0]!r})"


class PackedCollate:
    """Collate of the device path: pack the samples' ``encoded`` bytes into ``encoded uint8 [sum n]`` +
    ``encoded_offsets int64 [B + 1]``, then ``inner(samples, generator)`` on the rest (picklable)."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, samples: list[dict], generator: torch.Generator) -> dict:
        chunks = [s["encoded"] for s in samples]
        offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in chunks], out=offsets[1:])
        encoded = batch_buffer((int(offsets[-1]),), torch.uint8)  # shared memory in a worker: no copy later
        packed = encoded.numpy()
        for c, a, b in zip(chunks, offsets[:-1], offsets[1:]):
            packed[a:b] = c
        batch = self.inner([{k: v for k, v in s.items() if k != "encoded"} for s in samples], generator)
        batch["encoded"] = encoded
        batch["encoded_offsets"] = torch.from_numpy(offsets)
        return batch


class DeviceDecoder:
    """Batched decode + crop + resize + flip + normalise of a packed batch on ``device`` (main process)."""

    def __init__(self, views: Sequence[TrainTransform], stacked: bool):
        _check_views(views)
        v = views[0]
        self.num_views, self.stacked = len(views), bool(stacked)
        self.size, self.in_chans = v.size, v.in_chans
        self.mean = tuple(255.0 * m for m in v.mean)
        self.inv_std = tuple(1.0 / (255.0 * s) for s in v.std)
        self.failed = 0  # images nvJPEG and the host fallback could not decode

    def _decode_jpegs(self, chunks: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.RGB if self.in_chans == 3 else ImageReadMode.GRAY
        with warnings.catch_warnings():  # torchvision 0.29 marks its image codecs deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return list(decode_jpeg(chunks, mode=mode, device=device))
            except RuntimeError:  # one bad image fails the whole batch: retry one by one
                out: list[torch.Tensor | None] = []
                for c in chunks:
                    try:
                        out.append(decode_jpeg(c, mode=mode, device=device))
                    except RuntimeError:
                        out.append(self._host_decode(c, device))
                return out

    def _host_decode(self, chunk: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        from PIL import Image

        try:
            img: Image.Image = Image.open(io.BytesIO(chunk.numpy().tobytes()))
            img = img.convert("RGB" if self.in_chans == 3 else "L")
            arr = np.asarray(img)
        except Exception:
            return None
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(device)

    def decode(self, batch: dict, device: torch.device) -> dict:
        """``batch`` with ``encoded``, ``encoded_offsets``, ``image_info``, ``crop_boxes`` (on the host) ->
        the same batch with ``image`` on ``device`` and those four keys removed."""
        enc, offsets = batch.pop("encoded"), batch.pop("encoded_offsets").tolist()
        info, boxes = batch.pop("image_info").tolist(), batch.pop("crop_boxes").tolist()
        B, V, C, (H, W) = len(info), self.num_views, self.in_chans, self.size
        chunks = [enc[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        images: list[torch.Tensor | None] = [None] * B
        jpegs = [i for i in range(B) if info[i][0] == KIND_JPEG]
        if jpegs:
            for i, img in zip(jpegs, self._decode_jpegs([chunks[i] for i in jpegs], device)):
                images[i] = img
        for i in range(B):
            if info[i][0] == KIND_PIXELS:
                _, h, w, c = info[i]
                images[i] = chunks[i].view(h, w, c).permute(2, 0, 1).to(device, non_blocking=True)
        out = torch.empty(B * V, C, H, W, device=device, dtype=torch.float32)
        flips = []
        for i in range(B):
            img = images[i]
            if img is None:  # undecodable on every path: a grey image, counted
                self.failed += 1
                log.warning(
                    "device decode: sample %s could not be decoded; using a blank image", batch.get("key", ["?"] * B)[i]
                )
                out[i * V : (i + 1) * V] = 0.0
                continue
            if img.shape[0] != C:  # grey pixels for a 3-channel model
                img = img.expand(C, -1, -1)
            for v in range(V):
                top, left, h, w, flip = boxes[i][v]
                crop = img[None, :, top : top + h, left : left + w].float()
                out[i * V + v] = (
                    crop[0]
                    if (h, w) == (H, W)
                    else F.interpolate(crop, size=(H, W), mode="bicubic", antialias=True, align_corners=False)[0]
                )
                if flip:
                    flips.append(i * V + v)
        out.clamp_(0.0, 255.0).round_()  # whole grey levels, as the CPU path's uint8 resize
        if flips:
            idx = torch.tensor(flips, device=device)
            out[idx] = out[idx].flip(-1)
        mean = torch.tensor(self.mean, device=device, dtype=torch.float32).view(1, C, 1, 1)
        inv_std = torch.tensor(self.inv_std, device=device, dtype=torch.float32).view(1, C, 1, 1)
        out.sub_(mean).mul_(inv_std)
        batch["image"] = out.view(B, V, C, H, W) if self.stacked else out
        return batch
