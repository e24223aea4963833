"""Photometric perturbations on PIL images with explicit randomness, and two views sharing one geometry.

``Photometric(cfg)(img, generator) -> img``: colour jitter (brightness, contrast, saturation, hue in a random
order), random grayscale, Gaussian blur and solarisation, each applied with its own probability. Every draw
comes from the ``generator`` (a fixed number of uniforms per call), so views are reproducible and survive an
exact resume; the object holds only floats, so it pickles cheaply to loader workers.

``SharedGeometryViews(base, photometric)``: ONE RandomResizedCrop + flip (exactly the crop and flip that
``base`` — a :class:`~mimscale.data.transforms.TrainTransform` — would draw from the same generator), then
``{"image": normalised crop, "image_teacher": normalised photometric(crop)}``. Used by ConMIM
(docs/objectives/conmim.md), whose positives need the two views to cover the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import functional as TF

from ..errors import ConfigError
from ..ranges import num
from .transforms import TrainTransform

__all__ = ["ColorJitter", "JitterThen", "PhotometricConfig", "Photometric", "SharedGeometryViews"]

_DRAWS = 13  # uniforms consumed per Photometric call (whatever is applied)


@dataclass
class PhotometricConfig:
    """Probabilities and strengths (defaults: BEiT/ConMIM's teacher view, docs/objectives/conmim.md)."""

    jitter_p: float = num(0.8, "[0, 1]")
    brightness: float = num(0.4, ">= 0")
    contrast: float = num(0.4, ">= 0")
    saturation: float = num(0.2, ">= 0")
    hue: float = num(0.1, "[0, 0.5]")
    grayscale_p: float = num(0.2, "[0, 1]")
    blur_p: float = num(0.1, "[0, 1]")
    blur_radius: tuple[float, float] = num((0.1, 2.0), ">= 0")
    solarize_p: float = num(0.2, "[0, 1]")
    solarize_threshold: int = num(128, "[0, 256]")

    def validate(self, key: str = "teacher_aug") -> None:
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{key}.{name}={v} must be a probability in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"{key}.hue={self.hue} must be in [0, 0.5]")
        lo, hi = self.blur_radius
        if not 0.0 <= lo <= hi:
            raise ConfigError(f"{key}.blur_radius={list(self.blur_radius)} must satisfy 0 <= min <= max")
        if not 0 <= self.solarize_threshold <= 256:
            raise ConfigError(f"{key}.solarize_threshold={self.solarize_threshold} must be in [0, 256]")


def _factor(strength: float, u: float) -> float:
    """Uniform in ``[max(0, 1 - s), 1 + s]`` (torchvision's ColorJitter range)."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return lo + (hi - lo) * u


class Photometric:
    """``(PIL image, generator) -> PIL image`` of the same size and mode (RGB or L)."""

    def __init__(self, cfg: PhotometricConfig | None = None):
        self.cfg = cfg or PhotometricConfig()
        self.cfg.validate()

    def __call__(self, img: Image.Image, generator: torch.Generator) -> Image.Image:
        c = self.cfg
        u = torch.rand(_DRAWS, generator=generator, dtype=torch.float64).tolist()
        if u[0] < c.jitter_p:
            ops = [
                lambda x: TF.adjust_brightness(x, _factor(c.brightness, u[1])) if c.brightness else x,
                lambda x: TF.adjust_contrast(x, _factor(c.contrast, u[2])) if c.contrast else x,
                lambda x: TF.adjust_saturation(x, _factor(c.saturation, u[3])) if c.saturation else x,
                lambda x: TF.adjust_hue(x, (2.0 * u[4] - 1.0) * c.hue) if c.hue else x,
            ]
            for i in sorted(range(4), key=lambda i: u[5 + i]):  # a random order of the four
                img = ops[i](img)
        if u[9] < c.grayscale_p and img.mode == "RGB":
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if u[10] < c.blur_p:
            lo, hi = c.blur_radius
            img = img.filter(ImageFilter.GaussianBlur(radius=lo + (hi - lo) * u[11]))
        if u[12] < c.solarize_p:
            img = TF.solarize(img, c.solarize_threshold)
        return img

    def __repr__(self) -> str:
        return f"Photometric({self.cfg})"


class SharedGeometryViews:
    """Two views of one random crop: ``{"image": [C, H, W], "image_teacher": [C, H, W]}`` (float32, normalised).

    The crop box and flip are drawn exactly as ``base`` draws them (same number of uniforms, same order), so
    ``out["image"]`` equals ``base(img, g)`` for a generator ``g`` in the same state; the photometric draws
    follow from the same generator.
    """

    def __init__(self, base: TrainTransform, photometric: Photometric):
        if not isinstance(base, TrainTransform):
            raise ConfigError(f"two views sharing geometry need a TrainTransform to draw the crop, got {base!r}")
        self.base = base
        self.photometric = photometric

    def crop(self, img: Image.Image, generator: torch.Generator) -> Image.Image:
        """The geometric part of ``base``: RandomResizedCrop (bicubic) + horizontal flip, as a PIL image."""
        view, flip = self.base.crop(img, generator)
        if isinstance(view, np.ndarray):
            view = Image.fromarray(np.ascontiguousarray(view[:, :, 0] if view.shape[2] == 1 else view))
        return TF.hflip(view) if flip else view

    def __call__(self, img: Image.Image, generator: torch.Generator) -> dict[str, torch.Tensor]:
        view = self.crop(img, generator)
        return {"image": self.base._finish(view), "image_teacher": self.base._finish(self.photometric(view, generator))}

    def __repr__(self) -> str:
        return f"SharedGeometryViews({self.base!r}, {self.photometric!r})"


class ColorJitter:
    """Brightness, contrast and saturation jitter (hue untouched) of a PIL image, in a random order.

    Each factor is uniform in ``[max(0, 1 - s), 1 + s]`` (torchvision's ``ColorJitter(s, s, s)``); every call
    draws 3 factors and one order from ``generator`` (a fixed number of draws). ``strength = 0`` is the
    identity. DTM (before the crop) and MaPeT (after the centre crop) use it."""

    def __init__(self, strength: float, key: str = "objective.color_jitter"):
        if strength < 0:
            raise ConfigError(f"{key}={strength} must be >= 0")
        self.strength = float(strength)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> Image.Image:
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        order = torch.randperm(3, generator=generator).tolist()
        if self.strength == 0:
            return img
        lo, hi = max(0.0, 1.0 - self.strength), 1.0 + self.strength
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
        for i in order:
            img = ops[i](img, lo + (hi - lo) * u[i])
        return img

    def __repr__(self) -> str:
        return f"ColorJitter({self.strength})"


class JitterThen:
    """``(PIL image, generator) -> [C, H, W]``: colour jitter, then ``geometric`` (crop/flip/normalise)."""

    def __init__(self, jitter: ColorJitter, geometric):
        self.jitter, self.geometric = jitter, geometric

    def __call__(self, img, generator: torch.Generator) -> torch.Tensor:
        if img.mode not in ("RGB", "L"):
            img = (img.convert("RGBA") if img.mode == "P" else img).convert("RGB")
        return self.geometric(self.jitter(img, generator), generator)

    def __repr__(self) -> str:
        return f"JitterThen({self.jitter!r}, {self.geometric!r})"
