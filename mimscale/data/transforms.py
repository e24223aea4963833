"""Image transforms with explicit randomness: ``transform(img: PIL.Image, generator: torch.Generator) -> [C, H, W]``.

No transform touches a global RNG: every random draw comes from the ``generator`` the loader seeds per
sample, so augmentations are reproducible and survive an exact resume.  Objects hold only plain
values and small tensors, so they pickle cheaply to loader workers.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mimscale.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TrainTransform",
    "EvalTransform",
    "rrc_params",
    "reduced_decode_scale",
    "crop_resize_u8",
    "MultiCrop",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rrc_params(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """Random-resized-crop box ``(top, left, h, w)`` drawn from ``generator``.

    Up to 10 attempts draw an area fraction uniformly in ``scale`` and an aspect ratio log-uniformly in
    ``ratio``; the first box that fits is placed uniformly.  Otherwise: the central crop whose aspect
    ratio is the nearest one inside ``ratio``.  Always consumes 40 uniforms from ``generator``.
    """
    u = torch.rand(_RRC_DRAWS, generator=generator, dtype=torch.float64).tolist()
    return _rrc_box(width, height, scale, ratio, u)


_RRC_DRAWS = 40


def _rrc_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], u: Sequence[float]
) -> tuple[int, int, int, int]:
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(0, _RRC_DRAWS, 4):
        u_area, u_ratio, u_top, u_left = u[t : t + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Base:
    def __init__(self, img_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float], in_chans: int):
        if in_chans not in (1, 3):
            raise DataError(f"in_chans must be 1 or 3, got {in_chans}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise DataError(f"mean/std need {in_chans} values for in_chans={in_chans}, got {len(mean)}/{len(std)}")
        if any(s <= 0 for s in std):
            raise DataError(f"std values must be > 0, got {tuple(std)}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2 or min(size) < 1:
            raise DataError(f"img_size must be a positive int or (height, width), got {img_size!r}")
        self.size = (int(size[0]), int(size[1]))
        self.in_chans = in_chans
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mode = "RGB" if in_chans == 3 else "L"
        self._scale = np.asarray([1.0 / (255.0 * s) for s in self.std], dtype=np.float32)
        self._shift = np.asarray([m / s for m, s in zip(self.mean, self.std)], dtype=np.float32)

    def _prepare(self, img: Image.Image) -> Image.Image:
        """Bring exotic modes (palette, CMYK, 16-bit, alpha) to RGB/L before resampling; L stays L (cheaper)."""
        if img.mode in ("RGB", "L"):
            return img  # L stays L through crop/resize; _finish broadcasts it to 3 channels
        if img.mode == "P":
            img = img.convert("RGBA")
        return img.convert(self._mode)

    def _pixels(self, img: Image.Image) -> np.ndarray:
        """A prepared (RGB/L) PIL image -> ``uint8 [H, W, 1 or C]``."""
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.dtype != np.uint8 or arr.shape[2] not in (1, self.in_chans):
            arr = np.asarray(img.convert(self._mode))
            arr = arr[:, :, None] if arr.ndim == 2 else arr
        return arr

    def _finish(self, img: Image.Image | np.ndarray, flip: bool = False, out: np.ndarray | None = None) -> torch.Tensor:
        """uint8 PIL image or ``[H, W, C]`` array -> normalized float32 [C, H, W]: one fused scale-and-shift per
        pixel (gray -> RGB by broadcast); ``flip`` mirrors left-right inside that same pass (a reversed view)."""
        arr = img if isinstance(img, np.ndarray) else self._pixels(img)
        if flip:
            arr = arr[:, ::-1]
        # channels-first on the uint8 view, then one scale-and-shift straight into the [C, H, W] output
        if out is None:
            out = np.empty((self.in_chans, arr.shape[0], arr.shape[1]), dtype=np.float32)
        np.multiply(arr.transpose(2, 0, 1), self._scale.reshape(-1, 1, 1), out=out)
        out -= self._shift.reshape(-1, 1, 1)
        return torch.from_numpy(out)

    def _fields(self) -> str:
        return f"img_size={self.size}, in_chans={self.in_chans}, mean={self.mean}, std={self.std}"


def reduced_decode_scale(width: int, height: int, box_h: float, box_w: float, out_h: int, out_w: int) -> int:
    """The largest JPEG DCT scale-down ``s`` in {8, 4, 2, 1} at which a ``box_h x box_w`` crop of a
    ``width x height`` image still has at least ``out_h x out_w`` pixels, so decoding at ``1/s`` loses
    nothing the resize would keep."""
    for s in (8, 4, 2):
        if box_h >= s * out_h and box_w >= s * out_w and width >= s and height >= s:
            return s
    return 1


def _open_reduced(img: Image.Image, scale: int) -> tuple[Image.Image, float]:
    """``img`` decoded at ``1/scale`` in the DCT domain when it is a not yet decoded JPEG held in memory
    (what the loader hands over), else ``img`` itself: ``(image, actual scale)``.

    A fresh image object is opened on the same bytes, so ``img`` keeps its full size for other views.
    """
    fp = getattr(img, "fp", None)
    if (
        scale <= 1
        or img.format != "JPEG"
        or not isinstance(fp, io.BytesIO)
        or len(getattr(img, "tile", ())) != 1
        or getattr(img, "decoderconfig", None)
    ):
        return img, 1.0
    small = Image.open(io.BytesIO(fp.getbuffer()))
    got = small.draft(None, (img.width // scale, img.height // scale))
    if got is None:
        return img, 1.0
    return small, img.width / got[1][2]


def complete_jpeg_bytes(img: Image.Image) -> bytes | None:
    """The bytes of ``img`` when it is a not yet decoded RGB or grey JPEG held in memory whose data ends with
    an end-of-image marker (what libjpeg-turbo / nvJPEG can decode without PIL's mode handling), else None."""
    fp = getattr(img, "fp", None)
    if (
        img.format != "JPEG"
        or img.mode not in ("RGB", "L")
        or not isinstance(fp, io.BytesIO)
        or not getattr(img, "tile", None)
    ):
        return None
    data = fp.getvalue()
    return data if b"\xff\xd9" in data[-64:] else None


def _decode_jpeg_cpu(data: bytes) -> torch.Tensor:
    """``uint8 [C, H, W]`` (a channels-last view: no copy after libjpeg-turbo's output) of a JPEG."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # read-only bytes (never written); torchvision 0.29 deprecates its codecs
        warnings.simplefilter("ignore")
        return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)


def crop_resize_u8(chw: torch.Tensor, top: float, left: float, h: float, w: float, size: tuple[int, int]) -> np.ndarray:
    """``chw uint8 [C, H, W]`` (any strides) -> the box ``(top, left, h, w)`` (rounded to whole pixels) resized
    to ``size`` (bicubic, antialiased) as ``uint8 [h', w', C]``, in one pass of torch's uint8 kernel (PIL's
    filter, within +-1 grey level of ``PIL.Image.resize``; vectorised for 3/4 channels in channels-last)."""
    t0, l0 = int(round(top)), int(round(left))
    t1, l1 = max(t0 + 1, int(round(top + h))), max(l0 + 1, int(round(left + w)))
    x = chw[None, :, t0:t1, l0:l1]  # [1, C, h, w], a view
    if tuple(x.shape[-2:]) == tuple(size):
        return x[0].permute(1, 2, 0).numpy()
    if x.shape[1] in (3, 4):
        x = x.contiguous(memory_format=torch.channels_last)  # the vectorised path wants dense rows
    y = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).numpy()


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker it lives in shared memory from the start, so handing
    the batch to the main process does not copy it there (tens of MB per batch at 224 px)."""
    if torch.utils.data.get_worker_info() is not None:
        try:
            storage = torch.UntypedStorage._new_shared(torch.empty(0, dtype=dtype).element_size() * math.prod(shape))
            stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))  # contiguous, as set_'s default
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape, stride)
        except (AttributeError, RuntimeError):  # pragma: no cover - a torch without it: the usual copy
            pass
    return torch.empty(shape, dtype=dtype)


class TrainTransform(_Base):
    """RandomResizedCrop (bicubic) + horizontal flip + normalize: PIL image -> float32 ``[C, H, W]``.

    Grayscale inputs become 3-channel when ``in_chans=3``.  All randomness comes from ``generator``: one
    call draws ``_RRC_DRAWS + 1`` uniforms (box, then flip), whatever the decode path, so every path sees
    the same boxes and flips and a resume is exact on each.

    ``fast=True`` (default): a JPEG the loader has not decoded yet is decoded at 1/2, 1/4 or 1/8 size in
    the DCT domain (libjpeg-turbo scaling through PIL's ``draft``) whenever the crop box still has at least
    the output size there (else, for a plain RGB JPEG, libjpeg-turbo through ``torchvision.io.decode_jpeg``,
    which skips PIL's copy); then one fused crop + resize (:func:`crop_resize_u8`, ~6x faster than PIL's
    resize) and the flip happens inside the normalising copy.  ``fast=False``: full decode, then PIL's
    crop, resize and flip as separate steps (the path before; kept as the reference and for benchmarks).
    """

    def __init__(
        self,
        img_size: int | Sequence[int],
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_chans: int = 3,
        fast: bool = True,
    ):
        super().__init__(img_size, mean, std, in_chans)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise DataError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not (0 < ratio[0] <= ratio[1]):
            raise DataError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = bool(hflip)
        self.fast = bool(fast)

    def draw(self, width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int, bool]:
        """This sample's ``(top, left, h, w, flip)`` for a ``width x height`` image (all of one call's draws)."""
        u = torch.rand(_RRC_DRAWS + 1, generator=generator, dtype=torch.float64).tolist()
        top, left, h, w = _rrc_box(width, height, self.scale, self.ratio, u)
        return top, left, h, w, self.hflip and u[_RRC_DRAWS] < 0.5

    def crop(self, img: Image.Image, generator: torch.Generator) -> tuple[Image.Image | np.ndarray, bool]:
        """The geometric part: ``(crop resized to img_size, flip still to apply)``; the crop is a PIL image
        (``fast=False``) or ``uint8 [H, W, C]`` (``fast=True``)."""
        top, left, h, w, flip = self.draw(img.width, img.height, generator)
        out_h, out_w = self.size
        if not self.fast:
            img = self._prepare(img)
            img = TF.resized_crop(
                img, top, left, h, w, list(self.size), interpolation=InterpolationMode.BICUBIC, antialias=True
            )
            return img, flip
        scale = reduced_decode_scale(img.width, img.height, h, w, out_h, out_w)
        data = complete_jpeg_bytes(img) if scale == 1 and self.in_chans == 3 else None
        if data is not None:  # full-size JPEG: libjpeg-turbo straight into a tensor (no PIL copy)
            return crop_resize_u8(_decode_jpeg_cpu(data), top, left, h, w, self.size), flip
        src, s = _open_reduced(img, scale)
        arr = self._pixels(self._prepare(src))
        with warnings.catch_warnings():  # PIL's pixels are read-only; nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            chw = torch.from_numpy(arr).permute(2, 0, 1)
        return crop_resize_u8(chw, top / s, left / s, h / s, w / s, self.size), flip

    def __call__(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        view, flip = self.crop(img, generator)
        if not self.fast and flip:
            return self._finish(TF.hflip(view))
        return self._finish(view, flip=flip)

    @property
    def batched(self) -> bool:
        """The loader may call :meth:`crop_pixels` per sample and :meth:`finish_batch` per batch instead."""
        return self.fast

    def crop_pixels(self, img: Image.Image, generator: torch.Generator) -> tuple[Any, bool]:
        """Everything of ``__call__`` but the normalisation: ``(uint8 crop, flip)`` (same draws)."""
        return self.crop(img, generator)

    def finish_batch(self, items: Sequence[tuple[Any, bool]]) -> torch.Tensor:
        """``[(crop, flip)]`` from :meth:`crop_pixels` -> float32 ``[B, C, H, W]``, each crop flipped and normalised
        straight into its row (equal to stacking ``__call__``'s outputs)."""
        batch = batch_buffer((len(items), self.in_chans, *self.size))
        out = batch.numpy()
        for row, (view, flip) in zip(out, items):
            if not self.fast and flip:
                view = TF.hflip(view)
            self._finish(view, flip=flip and self.fast, out=row)
        return batch

    def device_views(self) -> tuple[list[TrainTransform], bool]:
        """For the device-decode path (:mod:`mimscale.data.device_decode`): one view, not stacked."""
        return [self], False

    def __repr__(self) -> str:
        return (
            f"TrainTransform({self._fields()}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
            f"fast={self.fast})"
        )


class MultiCrop:
    """``num_crops`` independent RandomResizedCrop+flip+normalise views of one image:
    ``(PIL image, generator) -> {"image": float32 [num_crops, C, H, W]}``; each crop draws its own box and
    flip from the generator, in order. Runs on the device-decode path too (``device_views``)."""

    def __init__(self, num_crops: int, crop: TrainTransform):
        if int(num_crops) < 1:
            raise DataError(f"num_crops must be >= 1, got {num_crops}")
        self.num_crops = int(num_crops)
        self.crop = crop

    def __call__(self, img: Image.Image, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"image": torch.stack([self.crop(img, generator) for _ in range(self.num_crops)])}

    def device_views(self) -> tuple[list[TrainTransform], bool]:
        return [self.crop] * self.num_crops, True

    def __repr__(self) -> str:
        return f"MultiCrop({self.num_crops} x {self.crop!r})"


class EvalTransform(_Base):
    """Resize the shorter side to ``img_size / crop_pct`` (bicubic), center crop, normalize.

    Same call signature as :class:`TrainTransform`; the generator is ignored.
    """

    def __init__(
        self,
        img_size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_chans: int = 3,
        crop_pct: float = 1.0,
    ):
        super().__init__(img_size, mean, std, in_chans)
        if not (0 < crop_pct <= 1):
            raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.crop_pct = float(crop_pct)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        img = self._prepare(img)
        short = int(math.floor(min(self.size) / self.crop_pct))
        img = TF.resize(img, short, interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, list(self.size))
        return self._finish(img)

    def __repr__(self) -> str:
        return f"EvalTransform({self._fields()}, crop_pct={self.crop_pct})"
