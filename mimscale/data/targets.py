"""Teacher targets cached in shards: what they are, the view they are computed on, and the check that shards
hold the targets an objective trains on. Writing them (``mimscale data add-targets SRC --teacher clip.pt --out
DIR``) is :mod:`mimscale.teachers.targets`.

``add-targets`` reads the shards of ``SRC`` and writes new shards to ``DIR`` holding every original field plus one
per-sample array computed by a frozen CLIP teacher on a **deterministic centre crop** of the image:

* ``--kind features`` -> ``clip.npy``: float16 ``[N, D]`` patch features (:class:`CLIPTeacher` output);
* ``--kind codes --kmeans km.pt`` -> ``kclip.npy``: uint16 ``[N]`` nearest-centroid codes (k-CLIP, MaPeT).

``N = gh * gw`` tokens in raster order. The loader hands them over as ``batch["clip.npy"] float16 [B, N, D]``
/ ``batch["kclip.npy"] uint16 [B, N]`` (the dtype as stored: cast before use).

**Crop rule.** The targets belong to the exact pixels of :func:`target_view`: resize the shorter side to
``floor(image_size / crop_pct)`` (bicubic, antialiased), centre crop ``image_size``, normalise with
``mean``/``std``. An objective that trains on cached targets must feed the student the same geometric
view (no random crop, no flip; photometric jitter only, e.g. MaPeT's ``CenterCropJitter``), and must ask
for the rule it uses: :func:`check_targets` (which the pre-training task calls before its loader starts)
refuses shards whose recorded rule or size differ. The manifest records, per field::

    "targets": {"clip.npy": {"kind", "dtype", "shape", "grid", "crop_rule", "image_size", "crop_pct",
                             "mean", "std", "teacher": {"path", "sha256", "arch"}, "kmeans": null | {...}}}
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

from ..errors import DataError
from .shards import read_manifest

__all__ = ["FIELD_NAMES", "crop_rule", "target_view", "check_targets", "find_manifest", "teacher_view_args"]

FIELD_NAMES = {"features": "clip.npy", "codes": "kclip.npy"}


def crop_rule(crop_pct: float = 1.0) -> str:
    """The identifier of the deterministic view targets are computed on (recorded in manifests)."""
    return f"center-crop/1:shorter-side=floor(size/{float(crop_pct):g}),bicubic,antialias"


def target_view(image_size: int, mean: Sequence[float], std: Sequence[float], in_chans: int = 3, crop_pct: float = 1.0):
    """The deterministic transform ``(PIL image, generator=None) -> [C, S, S]`` targets are computed on."""
    from .transforms import EvalTransform

    return EvalTransform(int(image_size), mean=mean, std=std, in_chans=in_chans, crop_pct=crop_pct)


# --------------------------------------------------------------------------------------------- checking


def local_file(url: str) -> str | None:
    """The file a shard URL reads: the path itself, or a ``pipe:`` command's last argument if it is a file."""
    if not url.startswith("pipe:"):
        return url
    parts = shlex.split(url[5:])
    return parts[-1] if parts and os.path.isfile(parts[-1]) else None


def find_manifest(source) -> str:
    """The manifest of a shard source (a directory, or the ``manifest.json`` beside its first local shard)."""
    from .sources import expand_source

    urls, manifest = expand_source(source)
    if manifest is None and urls:
        local = local_file(urls[0])
        beside = os.path.join(os.path.dirname(local), "manifest.json") if local else None
        if beside and os.path.isfile(beside):
            manifest = beside
    if manifest is None:
        raise DataError(f"cached targets need the shards' manifest.json, none found for {source!r}")
    return manifest


def check_targets(source, names: Sequence[str], image_size: int | Sequence[int], crop_pct: float = 1.0) -> dict:
    """Refuse (``DataError``, one line) cached targets ``names`` of ``source`` unless they were computed with
    the crop rule and image size the caller will train on. Returns ``{name: manifest entry}``."""
    manifest = find_manifest(source)
    entries = read_manifest(manifest).get("targets") or {}
    size = [int(image_size), int(image_size)] if isinstance(image_size, int) else [int(s) for s in image_size]
    want = crop_rule(crop_pct)
    out = {}
    for name in names:
        e = entries.get(name)
        if e is None:
            have = ", ".join(sorted(entries)) or "none"
            raise DataError(
                f"{manifest} has no cached targets '{name}' (has: {have}); write them with mimscale data add-targets"
            )
        if e.get("crop_rule") != want or list(e.get("image_size") or []) != size:
            raise DataError(
                f"cached targets '{name}' in {manifest} were computed on crop rule "
                f"{e.get('crop_rule')!r} at size {e.get('image_size')} but training asks for {want!r} at "
                f"size {size}; rebuild them with mimscale data add-targets --image-size/--crop-pct"
            )
        out[name] = e
    return out


def teacher_view_args(t, image_size, grid, mean, std) -> tuple[int, int, list[float], list[float]]:
    """Crop size, token-grid side and 3-channel normalisation for teacher ``t``: the given values, else
    the teacher's own (its image size, size // patch, its mean/std)."""
    size = int(image_size or t.image_size)
    side = int(grid or size // t.patch_size)
    mean = [float(m) for m in (mean or t.mean)]
    std = [float(s) for s in (std or t.std)]
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return size, side, mean, std
