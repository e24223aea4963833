"""Shard sources: directories with a manifest, paths, brace patterns, ``pipe:`` commands and remote URLs.

URL schemes follow ``webdataset.gopen``: a plain path or ``file:PATH`` is opened directly; ``pipe:CMD ARGS``
runs CMD and reads its stdout; ``http(s)://``, ``sftp://``, ``ftps://``, ``scp://`` stream through
``curl -f -s -L`` (with webdataset's connect timeout and retries) and ``gs://`` through ``gsutil cat``. One
deliberate difference: webdataset runs ``pipe:`` through a shell; mimscale splits it with shlex and runs the
program itself (no shell, so no ``|``, ``$()`` or ``;`` in shard URLs from configs).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence

from mimscale.errors import DataError

from .shards import MANIFEST_NAME, read_manifest

__all__ = ["expand_source", "url_shard_name", "local_path_of", "shard_command", "REMOTE_SCHEMES"]

CURL = ["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2", "-f", "-s", "-L"]
REMOTE_SCHEMES = {"http": CURL, "https": CURL, "sftp": CURL, "ftps": CURL, "scp": CURL, "gs": ["gsutil", "cat"]}


def expand_pattern(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def expand_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], str | None]:
    """Shard URLs of ``source`` and the manifest that lists them (for a shard directory), else None.

    ``source``: a directory with ``manifest.json``; a path, brace pattern
    (``/d/train-{000000..000011}.tar``), ``pipe:CMD ARGS`` or remote URL (module docstring); or a list of those.
    """
    if isinstance(source, (str, os.PathLike)):
        items = [os.fspath(source)]
    else:
        items = [os.fspath(s) for s in source]
    urls: list[str] = []
    manifest = None
    for item in items:
        if item.startswith("file:"):
            item = re.sub(r"^file://?", "", item)
        if not item.startswith("pipe:") and os.path.isdir(item):
            m = read_manifest(item)
            urls.extend(os.path.join(item, s["name"]) for s in m["shards"])
            manifest = os.path.join(item, MANIFEST_NAME) if len(items) == 1 else None
        else:
            urls.extend(expand_pattern(item))
    return urls, manifest


def _scheme(url: str) -> str | None:
    m = re.match(r"^([a-z][a-z0-9+.-]*)://", url)
    return m.group(1) if m else None


def shard_command(url: str) -> list[str] | None:
    """The argv whose stdout is the shard at ``url`` (``pipe:`` or a remote scheme), or None for a local file.

    Raises DataError for a scheme webdataset would not open either."""
    if url.startswith("pipe:"):
        return shlex.split(url[5:])
    scheme = _scheme(url)
    if scheme is None:
        return None
    if scheme not in REMOTE_SCHEMES:
        raise DataError(
            f"shard {url}: unknown URL scheme {scheme}://; use a path, pipe:CMD ARGS or one of "
            + ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
        )
    return [*REMOTE_SCHEMES[scheme], url]


def url_shard_name(url: str) -> str:
    if url.startswith("pipe:"):
        parts = shlex.split(url[5:])
        return os.path.basename(parts[-1]) if parts else url
    if _scheme(url):
        return os.path.basename(url.split("?", 1)[0].rstrip("/")) or url
    return os.path.basename(url)


def local_path_of(url: str) -> str | None:
    """The file a shard URL reads: the path itself, or a pipe's last argument if that is an existing file;
    None for remote URLs."""
    if _scheme(url):
        return None
    if not url.startswith("pipe:"):
        return url
    parts = shlex.split(url[5:])
    if parts and os.path.isfile(parts[-1]):
        return parts[-1]
    return None
