"""Shared helpers for the data tests: tiny real PNG images in real WebDataset shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimscale.data import shard_name, write_manifest, write_shard


def png_bytes(seed: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 36), mode: str = "RGB", quality: int = 90) -> bytes:
    """A smooth photo-like JPEG (gradients + a few discs: JPEG-friendly, unlike noise) of ``size`` = (w, h)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    arr = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        arr[:, :, c] = rng.uniform(40, 200) + rng.uniform(-1, 1) * xx * 120 / w + rng.uniform(-1, 1) * yy * 120 / h
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, max(4, w / 3))
        arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.uniform(-80, 80, 3)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    (img if mode == "RGB" else img.convert(mode)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_shards(
    out: Path,
    sizes,
    corrupt=(),
    truncate=(),
    extra_npy: bool = False,
    manifest: bool = True,
    prefix: str = "train",
    image=None,
) -> list[Path]:
    """Shards with ``sizes[i]`` samples each; keys are global indices, label = index % 5.

    ``corrupt``: global indices whose png is garbage; ``truncate``: shard indices cut in half after writing
    (the manifest keeps the original counts, like a shard damaged after conversion). ``image(g) -> (ext, bytes)``
    replaces the default PNG of sample ``g``.
    """
    out.mkdir(parents=True, exist_ok=True)
    infos, paths, g = [], [], 0
    for i, n in enumerate(sizes):
        samples = []
        for _ in range(n):
            ext, data = image(g) if image is not None else ("png", png_bytes(g))
            sample = {"__key__": f"{g:09d}", ext: b"this is not an image" if g in corrupt else data, "cls": g % 5}
            if extra_npy:
                sample["npy"] = np.full((2, 3), g, dtype=np.int16)
            samples.append(sample)
            g += 1
        path = out / shard_name(prefix, i)
        infos.append(write_shard(path, samples))
        paths.append(path)
    if manifest:
        write_manifest(out, infos, classes=[str(c) for c in range(5)], source="test")
    for i in truncate:
        data = paths[i].read_bytes()
        paths[i].write_bytes(data[: len(data) // 2])
    return paths


@pytest.fixture
def shards(tmp_path):
    """Factory: ``shards(sizes, **kw) -> (dir, paths)``."""
    counter = iter(range(1000))

    def make(sizes, **kw):
        d = tmp_path / f"shards{next(counter)}"
        return d, make_shards(d, sizes, **kw)

    return make


@pytest.fixture
def images():
    """The image makers for tests that build their own shards: ``images.jpeg(seed, size, mode)``, ``images.png``."""
    from types import SimpleNamespace

    return SimpleNamespace(jpeg=jpeg_bytes, png=png_bytes)
