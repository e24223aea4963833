"""Shard sources: directories with a manifest, paths, brace patterns and ``pipe:`` commands -> shard URLs."""

from __future__ import annotations

import os
import shlex
from typing import Sequence

from .shards import MANIFEST_NAME, read_manifest

__all__ = ["expand_source", "url_shard_name", "local_path_of"]


def expand_pattern(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def expand_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], str | None]:
    """Shard URLs of ``source`` and the manifest that lists them (for a shard directory), else None.

    ``source``: a directory with ``manifest.json``; a path, brace pattern
    (``/d/train-{000000..000011}.tar``) or ``pipe:CMD ARGS``; or a list of those.
    """
    if isinstance(source, (str, os.PathLike)):
        items = [os.fspath(source)]
    else:
        items = [os.fspath(s) for s in source]
    urls: list[str] = []
    manifest = None
    for item in items:
        if not item.startswith("pipe:") and os.path.isdir(item):
            m = read_manifest(item)
            urls.extend(os.path.join(item, s["name"]) for s in m["shards"])
            manifest = os.path.join(item, MANIFEST_NAME) if len(items) == 1 else None
        else:
            urls.extend(expand_pattern(item))
    return urls, manifest


def url_shard_name(url: str) -> str:
    if url.startswith("pipe:"):
        parts = shlex.split(url[5:])
        return os.path.basename(parts[-1]) if parts else url
    return os.path.basename(url)


def local_path_of(url: str) -> str | None:
    """The file a shard URL reads: the path itself, or a pipe's last argument if that is an existing file."""
    if not url.startswith("pipe:"):
        return url
    parts = shlex.split(url[5:])
    if parts and os.path.isfile(parts[-1]):
        return parts[-1]
    return None

