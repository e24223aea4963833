"""Fine-tuning augmentation (MAE's recipe): RandomResizedCrop + flip + timm RandAugment + random erasing
per sample, and timm Mixup/CutMix with label smoothing per batch, all reproducible from the loader's
generators.

Randomness: mimscale's loader hands every sample (and every batch) its own ``torch.Generator``. Our own
draws (crop box, flip, erasing box and noise) come straight from it. timm's RandAugment and Mixup draw
from the *module-level* ``random`` and ``numpy.random`` states instead, so :func:`seeded_global_rng` draws
one 31-bit seed from the generator, seeds both global states with it for the duration of the timm call
and restores their previous states afterwards. The same sample at the same (seed, epoch, rank, worker,
position) therefore gets the same augmentation on every run and after an exact resume, and nothing else
in the process sees a changed global RNG. (Loader workers are separate processes; in-process loading
(``num_workers=0``) runs the transform on the training thread, where nothing else draws concurrently.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..data.loader import default_collate
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, rrc_params
from ..errors import ConfigError


@contextmanager
def seeded_global_rng(generator: torch.Generator):
    """Seed ``random`` and ``numpy.random`` from ``generator`` inside the block; restore them after."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield seed
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def random_erase(
    x: torch.Tensor,
    prob: float,
    generator: torch.Generator,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
) -> torch.Tensor:
    """With probability ``prob`` replace one random box of ``x [C, H, W]`` by N(0, 1) noise per pixel
    (the box: area fraction uniform in ``area``, log aspect uniform in ``log_ratio``; up to 10 tries)."""
    u = torch.rand(41, generator=generator, dtype=torch.float64).tolist()
    if u[0] >= prob:
        return x
    C, H, W = x.shape
    for t in range(1, 41, 4):
        target = H * W * (area[0] + (area[1] - area[0]) * u[t])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[t + 1])
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < h < H and 0 < w < W:
            top, left = int(u[t + 2] * (H - h + 1)), int(u[t + 3] * (W - w + 1))
            x = x.clone()
            x[:, top : top + h, left : left + w] = torch.randn((C, h, w), generator=generator, dtype=x.dtype)
            return x
    return x


class FinetuneTransform(TrainTransform):
    """PIL image -> float32 ``[C, H, W]``: RandomResizedCrop (bicubic, scale (0.08, 1)) + flip +
    RandAugment (timm ``rand_augment_transform(rand_aug)``; ``""`` turns it off) + normalise + random
    erasing with probability ``reprob`` (per-pixel N(0, 1) noise, one box). All randomness from ``generator``.
    """

    def __init__(
        self,
        img_size: int,
        scale: Sequence[float] = (0.08, 1.0),
        hflip: bool = True,
        rand_aug: str = "rand-m9-mstd0.5-inc1",
        reprob: float = 0.25,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_chans: int = 3,
    ):
        super().__init__(img_size, scale=scale, hflip=hflip, mean=mean, std=std, in_chans=in_chans)
        if not 0.0 <= reprob <= 1.0:
            raise ConfigError(f"reprob={reprob} must be a probability in [0, 1]")
        self.rand_aug, self.reprob = rand_aug, float(reprob)
        self._ra = None
        if rand_aug:
            from timm.data.auto_augment import rand_augment_transform

            fill = tuple(min(255, round(255 * m)) for m in self.mean)
            hparams = dict(
                translate_const=int(min(self.size) * 0.45),
                img_mean=fill if in_chans == 3 else fill[0],
                interpolation=Image.Resampling.BICUBIC,
            )
            try:
                self._ra = rand_augment_transform(rand_aug, hparams)
            except (AssertionError, ValueError, KeyError) as e:
                raise ConfigError(
                    f"rand_aug='{rand_aug}' is not a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' ({e})"
                ) from None

    def __call__(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        img = self._prepare(img)
        if self.in_chans == 3 and img.mode != "RGB":
            img = img.convert("RGB")  # RandAugment fills with an RGB mean colour
        top, left, h, w = rrc_params(img.width, img.height, self.scale, self.ratio, generator)
        img = TF.resized_crop(
            img, top, left, h, w, list(self.size), interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        if self.hflip and torch.rand((), generator=generator).item() < 0.5:
            img = TF.hflip(img)
        if self._ra is not None:
            with seeded_global_rng(generator):
                try:
                    img = self._ra(img)
                except ValueError:  # timm's Posterize at the top magnitude asks Pillow for 0 bits, which
                    pass  # Pillow >= 10 refuses: that draw leaves the image un-augmented
        x = self._finish(img)
        return random_erase(x, self.reprob, generator) if self.reprob > 0 else x

    def __repr__(self) -> str:
        return (
            f"FinetuneTransform({self._fields()}, scale={self.scale}, hflip={self.hflip}, "
            f"rand_aug={self.rand_aug!r}, reprob={self.reprob})"
        )


class MixupCollate:
    """Collate for fine-tuning: stacks the batch, then adds ``target float [B, C]`` (soft labels).

    With ``mixup > 0`` or ``cutmix > 0``: timm ``Mixup`` (batch mode; label smoothing ``smoothing`` inside)
    mixes ``image`` and makes the targets; otherwise the targets are the smoothed one-hot labels. Either
    way the loss is soft-target cross-entropy. The batch size must be even when mixing.
    """

    def __init__(
        self,
        num_classes: int,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        smoothing: float = 0.1,
    ):
        self.num_classes, self.smoothing = int(num_classes), float(smoothing)
        self.mix = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mix = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=prob,
                switch_prob=switch_prob,
                mode="batch",
                label_smoothing=smoothing,
                num_classes=num_classes,
            )

    def __call__(self, samples: list[dict], generator: torch.Generator) -> dict:
        batch = default_collate(samples, generator)
        if self.mix is not None:
            if len(samples) % 2:
                raise ConfigError(f"mixup/cutmix need an even micro batch, got {len(samples)}")
            with seeded_global_rng(generator):
                batch["image"], batch["target"] = self.mix(batch["image"], batch["label"])
        else:
            batch["target"] = smooth_one_hot(batch["label"], self.num_classes, self.smoothing)
        return batch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """``[B] -> [B, C]``: ``1 - s + s / C`` on the label, ``s / C`` elsewhere."""
    off = smoothing / num_classes
    out = torch.full((len(labels), num_classes), off)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)
