"""Shared fixtures: small real Fashion-MNIST shards."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> dict[str, Path]:
    """Real Fashion-MNIST (Debian package) as shards: 2048 train samples in 8 shards, 512 test."""
    from mimscale.data.shards import write_fashion_mnist

    out = tmp_path_factory.mktemp("fmnist")
    dirs = write_fashion_mnist(out, splits=("train",), shard_size=256, limit=2048)
    dirs.update(write_fashion_mnist(out, splits=("test",), shard_size=256, limit=512))
    return dirs


