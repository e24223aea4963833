"""Built-in data set names (``fashion-mnist:train`` / ``fashion-mnist:test``) -> shard directories.

The first use converts Debian's Fashion-MNIST files to WebDataset shards under ``data.root``; a file
lock makes concurrent ranks (or nodes on a shared file system) wait for one conversion.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from ..errors import DataError

BUILTIN = {"fashion-mnist": ("train", "test")}


def is_builtin(source: str) -> bool:
    return source.split(":", 1)[0] in BUILTIN and not Path(source).exists()


def resolve(source: str, root: str) -> str:
    """Return a shard source for ``source``: built-in names are converted on first use, others pass through."""
    if not is_builtin(source):
        return source
    name, _, split = source.partition(":")
    split = split or "train"
    if split not in BUILTIN[name]:
        raise DataError(f"'{source}': {name} has splits {', '.join(BUILTIN[name])}")
    out = Path(root).expanduser() / name
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from .shards import write_fashion_mnist

        dirs = write_fashion_mnist(out)
    return str(dirs[split])
