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
baseline JPEGs it supports, CUDA kernels for the rest; libjpeg-turbo on CPU), run on a side stream ordered with
the caller's (:func:`decode_in_order`: torchvision's CUDA decoder writes from a private stream that does not wait
for the caller's), then crop + bicubic antialiased resize + flip of every view as two matrix products per group
of same-size images (:func:`resize_weights`: the weights of ``F.interpolate(..., "bicubic", antialias=True)``,
the kernel family PIL and the CPU path use), rounding to whole grey levels as the CPU path's uint8 resize
does, and one normalisation of the batch. Output: ``image float32 [B, C, H, W]`` (one view) or
``[B, V, C, H, W]`` (multi-crop), on the device. Host-to-device copies: the crop plan (pinned, non-blocking)
and the rare host-decoded pixels; mean / std are made once per device.

Other maintained GPU JPEG decoders on the package index for CUDA 13 (not used: they would add a dependency):
nvImageCodec (``nvidia-nvimgcodec-cu13``, decodes on a stream the caller passes), DALI
(``nvidia-dali-cuda130``, a whole pipeline) and TorchCodec (``torchcodec``, torchvision's successor for codecs).
"""

from __future__ import annotations

import contextlib
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

__all__ = [
    "CudaStreams",
    "DeviceViews",
    "PackedCollate",
    "DeviceDecoder",
    "decode_in_order",
    "resize_weights",
    "device_views_of",
    "resolve_decode",
    "DECODE_MODES",
]

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


class CudaStreams:
    """The ``torch.cuda`` stream calls :func:`decode_in_order` makes (a test passes a recording stand-in)."""

    def current(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def new(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    def use(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def record(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)


def decode_in_order(
    work: Callable[[], list[torch.Tensor | None]], side: Any, streams: Any = None, device: torch.device | None = None
) -> list[torch.Tensor | None]:
    """Run ``work`` (the nvJPEG decode and the host fallbacks' copies) with ``side`` as the current stream, ordered
    with the caller's (current) stream. Returns ``work()``'s tensors, ready for kernels on the caller's stream.

    Why: torchvision 0.29 ``decode_jpeg(..., device="cuda")`` allocates its outputs from the caching allocator on
    the CURRENT stream but writes them from a private pool stream that never waits for the current one (it only
    host-syncs that stream and makes the current stream wait on it afterwards). Allocated on the training stream,
    an output can reuse a block that the queued backward still reads or writes (freed by the host, reused by
    the allocator on the same-stream assumption). So: (1) ``side`` waits for the caller's stream (our own
    copies on it come after everything queued before), (2) the outputs are allocated on ``side`` -- its pool
    holds only blocks of earlier decodes -- (3) the caller's stream waits for ``side``, and (4) every output
    is ``record_stream``-ed on the caller's stream, so its block goes back to ``side``'s pool only once the
    kernels queued on the caller's stream that read it have run (the next decode may write into it at once).
    """
    streams = streams or CudaStreams()
    main = streams.current(device)
    side.wait_stream(main)
    with streams.use(side):
        out = work()
    main.wait_stream(side)
    for t in out:
        if t is not None:
            streams.record(t, main)
    return out


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel with ``a = -0.5`` (PIL's and PyTorch's antialiased bicubic)."""
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """Weights of an antialiased bicubic resize of ``[start, start + length)`` of an axis of ``extent`` pixels to
    ``size`` pixels: ``float32 [K, size, extent]`` (zero outside each crop) for ``start, length float32 [K]``.

    The same filter, support and normalisation as ``F.interpolate(crop, mode="bicubic", antialias=True)`` (PIL's
    scheme: support 2 x the scale when shrinking, the plain kernel when enlarging, each row normalised to sum 1),
    so ``Wy @ image @ Wx^T`` is that crop-and-resize for a whole batch in two matrix products.
    """
    dev = start.device
    scale = length / size  # [K]
    inv = 1.0 / scale.clamp(min=1.0)
    center = scale[:, None] * (torch.arange(size, device=dev, dtype=torch.float32)[None] + 0.5)  # [K, size]
    j = torch.arange(extent, device=dev, dtype=torch.float32)[None, None] - start[:, None, None]  # [K, 1, extent]
    w = _cubic((j + 0.5 - center[..., None]) * inv[:, None, None])  # [K, size, extent]
    w = torch.where((j >= 0) & (j < length[:, None, None]), w, torch.zeros_like(w))
    return w / w.sum(-1, keepdim=True)


@contextlib.contextmanager
def _ieee_fp32(device: torch.device):
    """Exact fp32 matmuls on CUDA for the resize (TF32 would move pixels by ~0.1 grey level); restored after."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class DeviceDecoder:
    """Batched decode + crop + resize + flip + normalise of a packed batch on ``device`` (main process).

    Per batch on CUDA: one nvJPEG batch decode (ordered with the caller's stream, :func:`decode_in_order`; the
    decoder waits on the host for its own private stream, never for the training stream); for images that share
    a size, one pinned, non-blocking copy of their crop plan, the resize weights of all their views at once
    (:func:`resize_weights`, flips folded in), then per size one stack and two matrix products; an image of a
    size of its own: a crop + resize per view; then one rounding + normalisation of the whole batch (mean / std
    made once per device). No blocking host-to-device copy, no other host synchronisation.
    """

    def __init__(self, views: Sequence[TrainTransform], stacked: bool, streams: Any = None):
        _check_views(views)
        v = views[0]
        self.num_views, self.stacked = len(views), bool(stacked)
        self.size, self.in_chans = v.size, v.in_chans
        self.mean = tuple(255.0 * m for m in v.mean)
        self.inv_std = tuple(1.0 / (255.0 * s) for s in v.std)
        self.failed = 0  # images nvJPEG and the host fallback could not decode
        self.streams = streams  # None: torch.cuda (see CudaStreams)
        self._side: dict[torch.device, Any] = {}  # the decode stream of each CUDA device, made once
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean, 1/std per device, made once

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
        host = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)

    def _images(self, chunks: list[torch.Tensor], info: list[list[int]], device: torch.device):
        """Decode every image of the batch onto ``device``: ``uint8 [c, h, w]`` each, None where undecodable."""
        B = len(info)

        def work() -> list[torch.Tensor | None]:
            images: list[torch.Tensor | None] = [None] * B
            jpegs = [i for i in range(B) if info[i][0] == KIND_JPEG]
            if jpegs:
                for i, img in zip(jpegs, self._decode_jpegs([chunks[i] for i in jpegs], device)):
                    images[i] = img
            for i in range(B):
                if info[i][0] == KIND_PIXELS:  # pinned (the loader pins batches on CUDA): a non-blocking copy
                    _, h, w, c = info[i]
                    images[i] = chunks[i].view(h, w, c).permute(2, 0, 1).to(device, non_blocking=True)
            return images

        if device.type != "cuda":
            return work()
        if device not in self._side:
            self._side[device] = (self.streams or CudaStreams()).new(device)
        return decode_in_order(work, self._side[device], self.streams, device)

    def _normaliser(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._norm:
            C = self.in_chans
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, C, 1, 1).to(device)
            inv_std = torch.tensor(self.inv_std, dtype=torch.float32).view(1, C, 1, 1).to(device)
            self._norm[device] = (mean, inv_std)
        return self._norm[device]

    def _resize_views(self, img: torch.Tensor, boxes: list[list[int]], out: torch.Tensor) -> None:
        """Crop, resize and flip each view of one image ``uint8 [c, h, w]`` into ``out float32 [V, C, H, W]``."""
        C, (H, W) = self.in_chans, self.size
        img = img if img.shape[0] == C else img.expand(C, -1, -1)  # grey pixels for a 3-channel model
        for v, (top, left, h, w, flip) in enumerate(boxes):
            crop = img[None, :, top : top + h, left : left + w].float()
            if flip:
                crop = crop.flip(-1)  # the resize kernel is symmetric: flip then resize = resize then flip
            if (h, w) != (H, W):
                crop = F.interpolate(crop, size=(H, W), mode="bicubic", antialias=True, align_corners=False)
            out[v] = crop[0]

    def _resize_groups(
        self,
        groups: list[list[int]],
        images: list[torch.Tensor | None],
        boxes: list[list[list[int]]],
        out: torch.Tensor,
        device: torch.device,
    ) -> None:
        """Views of images that share a size, per group: one stack, two matrix products with the
        :func:`resize_weights` of all views (flips folded in), one write into ``out float32 [B V, C, H, W]``."""
        V, C, (H, W) = self.num_views, self.in_chans, self.size
        cuda = device.type == "cuda"
        # the crop plan of these views (top, left, h, w, flip), one host tensor -> one pinned, non-blocking copy
        order = [i for m in groups for i in m]
        plan = torch.tensor([boxes[i][v] for i in order for v in range(V)], dtype=torch.float32)
        plan = (plan.pin_memory() if cuda else plan).to(device, non_blocking=cuda)
        hmax = max(int(images[m[0]].shape[1]) for m in groups)  # type: ignore[union-attr]
        wmax = max(int(images[m[0]].shape[2]) for m in groups)  # type: ignore[union-attr]
        wy = resize_weights(plan[:, 0], plan[:, 2], H, hmax)  # [K, H, hmax]
        wx = resize_weights(plan[:, 1], plan[:, 3], W, wmax)  # [K, W, wmax]
        wx = torch.where(plan[:, 4, None, None] > 0, wx.flip(1), wx)  # a flip reverses the output columns
        k = 0
        with _ieee_fp32(device):
            for members in groups:
                n = len(members)
                views = [boxes[i][v] for i in members for v in range(V)]
                # the union of the group's crops: only those pixels are converted and multiplied
                y0, x0 = min(b[0] for b in views), min(b[1] for b in views)
                y1, x1 = max(b[0] + b[2] for b in views), max(b[1] + b[3] for b in views)
                imgs = [_channels(images[i], C) for i in members]
                px = torch.stack(imgs)[:, :, y0:y1, x0:x1].float()  # [n, C, y1 - y0, x1 - x0]
                gy, gx = wy[k : k + n * V, :, y0:y1], wx[k : k + n * V, :, x0:x1]
                k += n * V
                res = torch.matmul(gy.reshape(n, V, 1, H, -1), px[:, None])  # [n, V, C, H, x1 - x0]
                res = torch.matmul(res, gx.reshape(n, V, 1, W, -1).transpose(-1, -2))  # [n, V, C, H, W]
                rows = _rows(members, V)
                if rows is not None:
                    out[rows] = res.reshape(n * V, C, H, W)
                else:
                    for j, i in enumerate(members):
                        out[i * V : (i + 1) * V] = res[j]

    def decode(self, batch: dict, device: torch.device) -> dict:
        """``batch`` with ``encoded``, ``encoded_offsets``, ``image_info``, ``crop_boxes`` (on the host) ->
        the same batch with ``image`` on ``device`` and those four keys removed."""
        enc, offsets = batch.pop("encoded"), batch.pop("encoded_offsets").tolist()
        info, boxes = batch.pop("image_info").tolist(), batch.pop("crop_boxes").tolist()
        B, V, C, (H, W) = len(info), self.num_views, self.in_chans, self.size
        chunks = [enc[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        images = self._images(chunks, info, device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if img is None:  # undecodable on every path: a blank image, counted
                self.failed += 1
                log.warning(
                    "device decode: sample %s could not be decoded; using a blank image", batch.get("key", ["?"] * B)[i]
                )
                continue
            groups.setdefault((int(img.shape[1]), int(img.shape[2])), []).append(i)
        out = torch.zeros(B * V, C, H, W, device=device, dtype=torch.float32)
        batched = [m for m in groups.values() if len(m) > 1]
        for members in groups.values():
            if len(members) == 1:  # an image of a size of its own: crop + resize each view directly
                i = members[0]
                self._resize_views(images[i], boxes[i], out[i * V : (i + 1) * V])
        if batched:
            self._resize_groups(batched, images, boxes, out, device)
        out.clamp_(0.0, 255.0).round_()  # whole grey levels, as the CPU path's uint8 resize
        mean, inv_std = self._normaliser(device)
        out.sub_(mean).mul_(inv_std)
        batch["image"] = out.view(B, V, C, H, W) if self.stacked else out
        return batch


def _channels(img: torch.Tensor | None, C: int) -> torch.Tensor:
    """A decoded image ``uint8 [c, h, w]`` with ``C`` channels (grey pixels expanded for a 3-channel model)."""
    assert img is not None  # undecodable images are in no group
    return img if img.shape[0] == C else img.expand(C, -1, -1)


def _rows(members: list[int], V: int) -> slice | None:
    """The output rows of ``members`` as one slice when they are consecutive samples (the common case), else None."""
    if members != list(range(members[0], members[0] + len(members))):
        return None
    return slice(members[0] * V, (members[-1] + 1) * V)
