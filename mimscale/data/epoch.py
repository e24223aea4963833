"""Epoch sizing from shard manifests, and capped shard lists (the first whole shards covering N samples)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .loader import ShardLoader, expand_source
from .shards import read_manifest


def count_samples(source: str | list[str], override: int | None) -> int:
    """Epoch size: ``override`` (``data.samples_per_epoch``), else the manifest counts of exactly the listed
    shards (``source``: a shard source string or a list of shard paths)."""
    if override:
        return override
    urls, manifest = expand_source(source)
    local = [u for u in urls if not u.startswith("pipe:")]
    if manifest is None and local:
        manifest = str(Path(local[0]).parent)
    if manifest is None:
        raise DataError(f"cannot size an epoch of '{source}' without a manifest: set data.samples_per_epoch")
    counts = {s["name"]: int(s["count"]) for s in read_manifest(manifest)["shards"]}
    missing = [u for u in urls if Path(u.split()[-1]).name not in counts]
    if missing:
        raise DataError(f"{missing[0]} is not listed in {manifest}: set data.samples_per_epoch")
    return sum(counts[Path(u.split()[-1]).name] for u in urls)


def first_shards(shard_dir: str, cap: int | None) -> list[str]:
    """The shards of a shard directory, or its first whole shards covering ``cap`` samples."""
    shards, n = [], 0
    for s in read_manifest(shard_dir)["shards"]:
        if cap and n >= cap:
            break
        shards.append(str(Path(shard_dir) / s["name"]))
        n += int(s["count"])
    return shards


def capped_eval_loader(
    shard_dir: str, cap: int | None, *, batch_size: int, transform, rank: int, world_size: int, num_workers: int
) -> ShardLoader:
    """This rank's eval-mode, unshuffled loader over the first whole shards of ``shard_dir`` covering ``cap``
    samples (all of them when ``cap`` is None): what kNN, the linear probe and fine-tuning evaluate on."""
    return ShardLoader(
        first_shards(shard_dir, cap),
        manifest=shard_dir,
        batch_size=batch_size,
        transform=transform,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        mode="eval",
        shuffle=False,
    )
